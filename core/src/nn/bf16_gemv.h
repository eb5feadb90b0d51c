#pragma once
// bf16 products of a few rows with a weight matrix on the CPU, reading the weights once at the memory's
// bandwidth (core/src/nn/bf16_gemv.cpp). Internal to libneva_core: linear_product's bf16 path.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace neva::nn::detail {

// Rows of x up to this many go through bf16_rows_times_weight; more are a GEMM (oneDNN's).
constexpr std::int64_t kBf16GemvMaxRows = 8;

// y = x @ weight^T (+ bias), all bf16 and contiguous: x [M, K] with M <= kBf16GemvMaxRows, weight [N, K],
// bias [N] or undefined; y [M, N] bf16. Sums in fp32 (in a different order from oneDNN's, so equal to
// at::linear to fp32 rounding before the result's rounding to bf16, which is to nearest even). Runs on
// LibTorch's intra-op threads, each on its own rows of the weight.
at::Tensor bf16_rows_times_weight(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);

// The instructions it runs on: "AVX512-BF16", "AVX2" or "scalar" — the best this CPU has, or the one
// NEVA_BF16_GEMV=avx512bf16|avx2|scalar asks for (to test or compare the kernels on one machine; one the
// CPU lacks, or another value, is a neva::Error).
std::string bf16_gemv_isa();

}  // namespace neva::nn::detail
