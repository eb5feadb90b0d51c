// neva::nn::intra_op_for: LibTorch's OpenMP pool, entered through libgomp's documented entry point.
//
// at::parallel_for cannot be used from neva's sources: its OpenMP body is a `#pragma omp parallel` in
// LibTorch's header, compiled only under -fopenmp, and without it the call runs serially, silently.
// Compiling this file with -fopenmp would tie it to one compiler (clang's -fopenmp targets LLVM's
// runtime, a second pool; its -fopenmp=libgomp generates no parallel code). So it calls what GCC's
// codegen calls, GOMP_parallel (libgomp manual, "The libgomp ABI": a parallel region is
// GOMP_parallel(subfunction, &data, num_threads, flags)), in the wheel's libgomp, the one libtorch_cpu
// runs on (core/CMakeLists.txt links that file): the same threads, the same thread count
// (at::set_num_threads sets libgomp's), one runtime in the process. The rest is what
// at::parallel_for does around its region: the thread count's lazy set-up, the serial cases, thread
// ids and the parallel-region flag for the ATen calls a body makes, the first exception rethrown.
#include "neva/nn/intra_op.h"

#include <ATen/Parallel.h>
#include <c10/util/ParallelGuard.h>

#include <algorithm>
#include <atomic>
#include <exception>

// libgomp's entry points (C linkage; declared here, as omp.h is the compiler's and not every compiler
// ships one without its OpenMP mode).
extern "C" {
void GOMP_parallel(void (*function)(void*), void* data, unsigned num_threads, unsigned flags);
int omp_get_num_threads();
int omp_get_thread_num();
}

namespace neva::nn {

namespace {

struct Region {
  std::int64_t n;
  std::int64_t grain;
  const std::function<void(std::int64_t, std::int64_t)>* body;
  std::atomic_flag failed = ATOMIC_FLAG_INIT;
  std::exception_ptr error;
};

void run_chunk(void* data) {
  auto& region = *static_cast<Region*>(data);
  const std::int64_t threads = omp_get_num_threads();
  const std::int64_t tasks = std::min(threads, (region.n + region.grain - 1) / region.grain);
  const std::int64_t chunk = (region.n + tasks - 1) / tasks;
  const std::int64_t id = omp_get_thread_num();
  const std::int64_t first = id * chunk;
  if (first >= region.n) return;
  try {
    at::internal::ThreadIdGuard thread_id(static_cast<int>(id));
    c10::ParallelGuard in_region(true);
    (*region.body)(first, std::min(region.n, first + chunk));
  } catch (...) {
    if (!region.failed.test_and_set()) region.error = std::current_exception();
  }
}

}  // namespace

void intra_op_for(std::int64_t n, std::int64_t grain, const std::function<void(std::int64_t, std::int64_t)>& body) {
  if (n <= 0) return;
  grain = std::max<std::int64_t>(grain, 1);
  at::internal::lazy_init_num_threads();
  if (n <= grain || at::get_num_threads() <= 1 || at::in_parallel_region()) {
    at::internal::ThreadIdGuard thread_id(0);
    c10::ParallelGuard in_region(true);
    body(0, n);
    return;
  }
  Region region{n, grain, &body};
  GOMP_parallel(run_chunk, &region, 0, 0);  // 0 threads: libgomp's count, which at::set_num_threads sets
  if (region.error) std::rethrow_exception(region.error);
}

}  // namespace neva::nn
