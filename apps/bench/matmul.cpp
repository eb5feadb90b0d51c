// neva-bench-matmul: GFLOP/s of the linear layers neva runs, in fp32, bf16 and FP8, on this
// machine's CPU (oneDNN picks AMX, AVX512-BF16 or AVX2 kernels); the numbers behind docs/benchmarks.md.
// FP8 rows: "fp8-gemm" is at::_scaled_mm on operands already in float8_e4m3fn (fp32 output), what
// the GEMM alone costs; "fp8-linear" is the fp8 recipe's forward (neva::fp8::linear: the input's
// amax and cast each call, the weight cast once and cached, the GEMM).
// Each call is timed on its own for about a second after warm-up: "best" is the fastest call (the
// machine's peak at that shape, the denominator of MFU), "mean" the rate over all of them (what a
// shared VM sustains in that second).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <string>

#include "neva/nn/fp8.h"

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
    const at::Tensor x32 = at::randn({shape.tokens, shape.in}), w32 = at::randn({shape.out, shape.in});
    const at::Tensor one = at::ones({}, at::kFloat);
    const at::Tensor x8 = neva::fp8::cast(x32, one, at::kFloat8_e4m3fn), w8 = neva::fp8::cast(w32, one, at::kFloat8_e4m3fn);
    const at::Tensor x16 = x32.to(at::kBFloat16), w16 = w32.to(at::kBFloat16);
    neva::fp8::LinearState state(1);
    neva::fp8::LinearConfig config;
    at::NoGradGuard no_grad;
    const std::pair<const char*, std::function<void()>> kinds[] = {
        {"fp32", [&] { at::linear(x32, w32); }},
        {"bf16", [&] { at::linear(x16, w16); }},
        {"fp8-gemm", [&] { neva::fp8::scaled_mm(x8, one, w8, one, at::kFloat); }},
        {"fp8-linear", [&] { neva::fp8::linear(x32, w32, at::Tensor(), state, config); }}};
    for (const auto& [kind, call] : kinds) {
      for (int i = 0; i < 3; ++i) call();
      int runs = 0;
      double total = 0, fastest = 1e30;
      while (total < 1.0 || runs < 5) {
        auto start = std::chrono::steady_clock::now();
        call();
        double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        total += seconds;
        fastest = std::min(fastest, seconds);
        ++runs;
      }
      const double flops = 2.0 * shape.tokens * shape.in * shape.out;
      std::printf("%-48s %-10s mean %8.1f  best %8.1f GFLOP/s\n", shape.what, kind, flops * runs / total / 1e9,
                  flops / fastest / 1e9);
    }
  }
  return 0;
}
