// neva-bench-matmul: GFLOP/s of the linear layers neva runs, in fp32 and bf16, on this machine's
// CPU (oneDNN picks AMX, AVX512-BF16 or AVX2 kernels); the numbers behind docs/benchmarks.md.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <chrono>
#include <cstdio>

int main(int argc, char** argv) {
  struct Shape {
    const char* what;
    std::int64_t tokens, in, out;
  };
  const Shape shapes[] = {{"connector fc1 (576 CLIP tokens, 1024 -> 4096)", 576, 1024, 4096},
                          {"decoder q_proj (512 tokens, 4096 -> 4096)", 512, 4096, 4096},
                          {"decoder up_proj (512 tokens, 4096 -> 11008)", 512, 4096, 11008}};
  std::printf("threads: %d\n%s\n", at::get_num_threads(), at::get_parallel_info().c_str());
  for (const auto& shape : shapes) {
    for (auto dtype : {at::kFloat, at::kBFloat16}) {
      at::Tensor x = at::randn({shape.tokens, shape.in}).to(dtype), w = at::randn({shape.out, shape.in}).to(dtype);
      for (int i = 0; i < 2; ++i) at::linear(x, w);
      int runs = 0;
      auto start = std::chrono::steady_clock::now();
      double seconds = 0;
      do {
        at::linear(x, w);
        ++runs;
        seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      } while (seconds < 1.0);
      double flops = 2.0 * shape.tokens * shape.in * shape.out * runs / seconds;
      std::printf("%-48s %-9s %8.1f GFLOP/s\n", shape.what, dtype == at::kFloat ? "fp32" : "bf16", flops / 1e9);
    }
  }
  return 0;
}
