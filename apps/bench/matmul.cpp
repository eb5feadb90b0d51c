// neva-bench-matmul: GFLOP/s of the linear layers neva runs, in fp32 and bf16, on this machine's
// CPU (oneDNN picks AMX, AVX512-BF16 or AVX2 kernels); the numbers behind docs/benchmarks.md.
// Each call is timed on its own for about a second after warm-up: "best" is the fastest call (the
// machine's peak at that shape, the denominator of MFU), "mean" the rate over all of them (what a
// shared VM sustains in that second).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

int main(int argc, char** argv) {
  struct Shape {
    const char* what;
    std::int64_t tokens, in, out;
  };
  const Shape shapes[] = {{"connector fc1 (576 CLIP tokens, 1024 -> 4096)", 576, 1024, 4096},
                          {"decoder q_proj (512 tokens, 4096 -> 4096)", 512, 4096, 4096},
                          {"decoder up_proj (512 tokens, 4096 -> 11008)", 512, 4096, 11008},
                          {"bench up_proj (520 tokens, 768 -> 2048)", 520, 768, 2048}};
  std::printf("threads: %d\n%s\n", at::get_num_threads(), at::get_parallel_info().c_str());
  for (const auto& shape : shapes) {
    for (auto dtype : {at::kFloat, at::kBFloat16}) {
      at::Tensor x = at::randn({shape.tokens, shape.in}).to(dtype), w = at::randn({shape.out, shape.in}).to(dtype);
      for (int i = 0; i < 3; ++i) at::linear(x, w);
      int runs = 0;
      double total = 0, fastest = 1e30;
      while (total < 1.0 || runs < 5) {
        auto start = std::chrono::steady_clock::now();
        at::linear(x, w);
        double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        total += seconds;
        fastest = std::min(fastest, seconds);
        ++runs;
      }
      const double flops = 2.0 * shape.tokens * shape.in * shape.out;
      std::printf("%-48s %-5s mean %8.1f  best %8.1f GFLOP/s\n", shape.what, dtype == at::kFloat ? "fp32" : "bf16",
                  flops * runs / total / 1e9, flops / fastest / 1e9);
    }
  }
  return 0;
}
