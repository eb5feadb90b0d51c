// Built with -fopenmp and without the precompiled header (core/CMakeLists.txt): see neva/nn/intra_op.h.
#include "neva/nn/intra_op.h"

#include <ATen/Parallel.h>

#ifndef _OPENMP
#error "intra_op.cpp must be compiled with -fopenmp: at::parallel_for would run serially"
#endif

namespace neva::nn {

void intra_op_for(std::int64_t n, std::int64_t grain, const std::function<void(std::int64_t, std::int64_t)>& body) {
  at::parallel_for(0, n, grain, [&](std::int64_t first, std::int64_t last) { body(first, last); });
}

}  // namespace neva::nn
