// neva-bench-machine: this machine's limits, measured with the LibTorch neva runs on, the
// denominators every benchmark row divides by (docs/benchmarks.md):
//   - memory bandwidth: a STREAM-style triad a = b + s * c over three float64 arrays (--mib MiB in all,
//     at least 1 GiB by default), one ATen kernel (at::add_out with alpha) on all intra-op threads,
//     counted as STREAM counts it (24 bytes per element: two reads and a write); the best of --runs;
//   - GEMM peak: at::mm of square matrices (--n) in fp32 and bf16, the fastest call of ~1 s of calls;
//     and fp32 through neva::nn::linear_product without autograd (OpenBLAS where installed: neva's
//     inference linears), the denominator of their rows;
//   - one-row products (a decode step's linears): the GB/s of weights read by at::linear and by
//     neva::nn::linear_product without autograd, fp32 and bf16, over 512 MiB of 2048 x 5632 weights
//     (far beyond the caches), the best of --runs sweeps.
// Prints one line per figure and, with --json FILE, the same as JSON (what --compare reads).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "neva/nn/linear.h"

namespace {

double seconds_of(const std::chrono::steady_clock::time_point& start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double triad_gb_per_s(std::int64_t mib, int runs) {
  const std::int64_t n = mib * (1 << 20) / 3 / 8;
  at::Tensor a = at::empty({n}, at::kDouble), b = at::full({n}, 1.0, at::kDouble), c = at::full({n}, 2.0, at::kDouble);
  at::add_out(a, b, c, 3.0);  // first touch
  double best = 1e30;
  for (int i = 0; i < runs; ++i) {
    const auto start = std::chrono::steady_clock::now();
    at::add_out(a, b, c, 3.0);
    best = std::min(best, seconds_of(start));
  }
  if (a[n - 1].item<double>() != 7.0) {
    std::fprintf(stderr, "neva-bench-machine: the triad computed %g, expected 7\n", a[n - 1].item<double>());
    std::exit(1);
  }
  return 24.0 * static_cast<double>(n) / best / 1e9;
}

template <class Product>
double gemm_gflop_per_s(std::int64_t n, at::ScalarType dtype, Product product) {
  const at::Tensor x = at::randn({n, n}).to(dtype), y = at::randn({n, n}).to(dtype);
  for (int i = 0; i < 2; ++i) product(x, y);
  double best = 1e30, total = 0;
  int calls = 0;
  while (total < 1.0 || calls < 3) {
    const auto start = std::chrono::steady_clock::now();
    product(x, y);
    const double s = seconds_of(start);
    best = std::min(best, s);
    total += s;
    ++calls;
  }
  return 2.0 * static_cast<double>(n) * n * n / best / 1e9;
}

// Weight bytes per second of x [1, K] @ w^T over enough matrices [N, K] to stream them from memory.
template <class Product>
double gemv_gb_per_s(at::ScalarType dtype, int runs, Product product) {
  const std::int64_t n = 5632, k = 2048;
  const std::int64_t bytes = n * k * static_cast<std::int64_t>(c10::elementSize(dtype));
  const std::int64_t count = std::max<std::int64_t>(4, (std::int64_t{512} << 20) / bytes);
  std::vector<at::Tensor> weights;
  for (std::int64_t i = 0; i < count; ++i) weights.push_back(at::randn({n, k}).to(dtype));
  const at::Tensor x = at::randn({1, k}).to(dtype);
  for (const at::Tensor& w : weights) product(x, w);
  double best = 1e30;
  for (int i = 0; i < std::max(runs, 3); ++i) {
    const auto start = std::chrono::steady_clock::now();
    for (const at::Tensor& w : weights) product(x, w);
    best = std::min(best, seconds_of(start));
  }
  return static_cast<double>(bytes * count) / best / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  std::int64_t mib = 1536, n = 2048;
  int runs = 10;
  std::string json;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "neva-bench-machine: %s needs a value\n", arg.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--mib") mib = std::stoll(value());
    else if (arg == "--n") n = std::stoll(value());
    else if (arg == "--runs") runs = std::stoi(value());
    else if (arg == "--json") json = value();
    else {
      std::fprintf(stderr, "usage: neva-bench-machine [--mib MIB (>= 1024)] [--n N] [--runs R] [--json FILE]\n");
      return 2;
    }
  }
  if (mib < 1024 || n < 64 || runs < 1) {
    std::fprintf(stderr, "neva-bench-machine: --mib must be >= 1024 (a triad over at least 1 GiB), --n >= 64, --runs >= 1\n");
    return 2;
  }
  const int threads = at::get_num_threads();
  const double triad = triad_gb_per_s(mib, runs);
  auto mm = [](const at::Tensor& x, const at::Tensor& y) { return at::mm(x, y); };
  const double fp32 = gemm_gflop_per_s(n, at::kFloat, mm), bf16 = gemm_gflop_per_s(n, at::kBFloat16, mm);
  at::NoGradGuard no_grad;
  const double linear = gemm_gflop_per_s(n, at::kFloat, [](const at::Tensor& x, const at::Tensor& w) {
    return neva::nn::linear_product(x, w);
  });
  auto aten_linear = [](const at::Tensor& x, const at::Tensor& w) { return at::linear(x, w); };
  auto neva_linear = [](const at::Tensor& x, const at::Tensor& w) { return neva::nn::linear_product(x, w); };
  const double gemv_fp32_aten = gemv_gb_per_s(at::kFloat, runs, aten_linear);
  const double gemv_fp32_neva = gemv_gb_per_s(at::kFloat, runs, neva_linear);
  const double gemv_bf16_aten = gemv_gb_per_s(at::kBFloat16, runs, aten_linear);
  const double gemv_bf16_neva = gemv_gb_per_s(at::kBFloat16, runs, neva_linear);
  std::printf("threads: %d\n", threads);
  std::printf("memory bandwidth (triad over %lld MiB, best of %d): %.1f GB/s\n", static_cast<long long>(mib), runs, triad);
  std::printf("GEMM peak fp32 (%lld x %lld x %lld): %.1f GFLOP/s\n", static_cast<long long>(n), static_cast<long long>(n),
              static_cast<long long>(n), fp32);
  std::printf("GEMM peak bf16 (%lld x %lld x %lld): %.1f GFLOP/s\n", static_cast<long long>(n), static_cast<long long>(n),
              static_cast<long long>(n), bf16);
  std::printf("GEMM peak fp32, neva's inference linears (%lld x %lld x %lld, %s): %.1f GFLOP/s\n",
              static_cast<long long>(n), static_cast<long long>(n), static_cast<long long>(n),
              neva::nn::cpu_blas_name().c_str(), linear);
  std::printf("one-row products, weights read (5632 x 2048): fp32 at::linear %.1f GB/s, neva %.1f GB/s (%s); "
              "bf16 at::linear %.1f GB/s, neva %.1f GB/s (%s)\n",
              gemv_fp32_aten, gemv_fp32_neva, neva::nn::cpu_fp32_gemv_name().c_str(), gemv_bf16_aten, gemv_bf16_neva,
              neva::nn::cpu_bf16_gemv_name().c_str());
  if (!json.empty()) {
    std::ofstream out(json);
    out << "{\"threads\": " << threads << ", \"triad_gb_per_s\": " << triad << ", \"gemm_fp32_gflop_per_s\": " << fp32
        << ", \"gemm_bf16_gflop_per_s\": " << bf16 << ", \"gemm_fp32_inference_gflop_per_s\": " << linear
        << ", \"gemv_fp32_aten_gb_per_s\": " << gemv_fp32_aten << ", \"gemv_fp32_gb_per_s\": " << gemv_fp32_neva
        << ", \"gemv_bf16_aten_gb_per_s\": " << gemv_bf16_aten << ", \"gemv_bf16_gb_per_s\": " << gemv_bf16_neva << "}\n";
    if (!out) {
      std::fprintf(stderr, "neva-bench-machine: cannot write %s\n", json.c_str());
      return 1;
    }
  }
  return 0;
}
