#pragma once
// Products of a few rows with a weight matrix on the CPU (decoding: one row per sequence), reading
// the weights once at the memory's bandwidth (core/src/nn/gemv.cpp). Internal to libneva_core:
// linear_product's path for fp32 and bf16 products of up to kGemvMaxRows rows.
#include <ATen/core/Tensor.h>

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>

namespace neva::nn::detail {

// Rows of x up to this many go through rows_times_weight; more are a GEMM (OpenBLAS's or oneDNN's).
constexpr std::int64_t kGemvMaxRows = 8;

// y = x @ weight^T (+ bias), all fp32 or all bf16, contiguous: x [M, K] with M <= kGemvMaxRows,
// weight [N, K], bias [N] or undefined; y [M, N] of x's dtype. Sums in fp32 in an order of its own
// (so equal to at::linear to fp32 rounding; bf16 results then rounded once, to nearest even, as
// oneDNN does). Runs on LibTorch's intra-op threads, each on its own rows of the weight.
at::Tensor rows_times_weight(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);

// The instructions the kernel for `dtype` (kFloat or kBFloat16) runs on: "AVX-512" (fp32) or
// "AVX512-BF16" (bf16), "AVX2" or "scalar": the best this CPU has, or at most what NEVA_GEMV=avx512|
// avx2|scalar allows (to test or compare the kernels on one machine; a level the CPU lacks, or another
// value, is a neva::Error).
std::string gemv_isa(c10::ScalarType dtype);

}  // namespace neva::nn::detail
