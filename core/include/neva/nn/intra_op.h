#pragma once
// Splitting a kernel's work over LibTorch's intra-op threads, for neva's own kernels and plugins'.
#include <cstdint>
#include <functional>

#include "neva/api.h"

namespace neva::nn {

// body(first, last) over [0, n) in at most at::get_num_threads() chunks of at least `grain` items each,
// on LibTorch's OpenMP pool (the threads its own kernels run on); on the caller's thread alone when
// nested in a parallel region or when n <= grain.
//
// Why not at::parallel_for: its OpenMP body lives in its header, and a translation unit compiled
// without -fopenmp (every neva and plugin target: LibTorch's CMake flags do not add it) gets the
// serial fallback, silently. This one enters the wheel's libgomp itself (core/src/nn/intra_op.cpp),
// so the process keeps one OpenMP runtime and one pool, whatever compiler built the caller.
NEVA_API void intra_op_for(std::int64_t n, std::int64_t grain, const std::function<void(std::int64_t, std::int64_t)>& body);

}  // namespace neva::nn
