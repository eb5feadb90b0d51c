// bf16 x bf16 products of a few rows (decoding: one row per sequence) with a weight matrix, at the
// memory's bandwidth.
//
// Why our own kernel: decoding a token reads every weight once, so the speed of a one-row product is
// the bandwidth it reads the weight at. Measured on the project's 2-vCPU EPYC (docs/benchmarks.md),
// the LibTorch wheel's one-row bf16 products read weights at 9-17 GB/s (oneDNN's at::linear, at::mv,
// at::matmul) where a plain read of the same bytes runs at 23-28 GB/s, and no packaged library has a
// faster one: Debian's OpenBLAS 0.3.21 and PyPI's scipy-openblas 0.3.34 are built without
// BUILD_BFLOAT16 (no sbgemv). llama.cpp reads bf16 weights near the bound with the same few dozen lines
// of dot products. A GEMM (more rows) stays oneDNN's.
//
// How: each task takes blocks of 4 weight rows and, for up to 4 input rows at a time, streams them once
// with 4 x (input rows) fp32 accumulators in registers, prefetching the next block into L2 as it goes
// (AVX512-BF16's vdpbf16ps: 32 products a step; AVX2: bf16 widened to fp32 by a shift, then FMA, 8 a
// step and 2 input rows at a time; scalar elsewhere). The bias is added in fp32 and the sum rounded to
// bf16 to nearest even, as oneDNN does. Alternatives measured in the 1.1B decode on the EPYC, paired
// runs: one row per stream with AVX-512 widen-and-FMA was 0.8-1.0x this.

#include "bf16_gemv.h"

#include "neva/error.h"
#include "neva/nn/intra_op.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace neva::nn::detail {

namespace {

constexpr int kWeightRows = 4;  // weight rows a block streams together
constexpr int kMaxPass = 4;     // input rows a pass keeps accumulators for (AVX2: 2 of its 16 registers)

inline float widen(std::uint16_t bits) {
  const std::uint32_t word = static_cast<std::uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}

// The sum of a vector register's lanes, stored to `lanes`, in lane order.
template <int L>
float sum_of(const float (&lanes)[L]) {
  float sum = 0.0f;
  for (const float lane : lanes) sum += lane;
  return sum;
}

// out[m * R + r] = sum_k x[m * K + k] * w[r * K + k], for R weight rows and MT input rows.
template <int R, int MT>
void tile_scalar(const std::uint16_t* x, const std::uint16_t* w, std::int64_t K, float* out) {
  for (int m = 0; m < MT; ++m) {
    for (int r = 0; r < R; ++r) {
      float sum = 0.0f;
      for (std::int64_t k = 0; k < K; ++k) sum += widen(x[m * K + k]) * widen(w[r * K + k]);
      out[m * R + r] = sum;
    }
  }
}

#if defined(__x86_64__)
// GCC 12's intrinsics headers start some vectors from _mm*_undefined_*(), which its own -Wuninitialized
// then reports at every use (GCC bug 105593): false positives, silenced for the kernels only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// The address `elements` bf16 past w, for a prefetch: past the last block it lies beyond the weight,
// which a prefetch may name (it never faults) but pointer arithmetic may not, hence integers.
inline const char* ahead(const std::uint16_t* w, std::int64_t elements) {
  return reinterpret_cast<const char*>(reinterpret_cast<std::uintptr_t>(w) +
                                       static_cast<std::uintptr_t>(elements) * sizeof(std::uint16_t));
}

#define NEVA_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))
#define NEVA_AVX2 __attribute__((target("avx2,fma")))

template <int R, int MT>
NEVA_AVX512_BF16 void tile_avx512bf16(const std::uint16_t* x, const std::uint16_t* w, std::int64_t K, float* out) {
  __m512 acc[MT][R];
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  }
  // Masked loads throughout (a full mask but for the last step): the tail needs no second loop.
  for (std::int64_t k = 0; k < K; k += 32) {
    const __mmask32 mask =
        K - k >= 32 ? static_cast<__mmask32>(~0u) : static_cast<__mmask32>((std::uint64_t{1} << (K - k)) - 1);
    __m512i wv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      wv[r] = _mm512_maskz_loadu_epi16(mask, w + r * K + k);
      _mm_prefetch(ahead(w, (R + r) * K + k), _MM_HINT_T1);  // the next block
    }
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) {
      const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + m * K + k);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)wv[r], (__m512bh)xv);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      alignas(64) float lanes[16];
      _mm512_store_ps(lanes, acc[m][r]);
      out[m * R + r] = sum_of(lanes);
    }
  }
}

NEVA_AVX2 inline __m256 widen8(const std::uint16_t* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

template <int R, int MT>
NEVA_AVX2 void tile_avx2(const std::uint16_t* x, const std::uint16_t* w, std::int64_t K, float* out) {
  __m256 acc[MT][R];
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  }
  std::int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      wv[r] = widen8(w + r * K + k);
      if (k % 32 == 0) _mm_prefetch(ahead(w, (R + r) * K + k), _MM_HINT_T1);
    }
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) {
      const __m256 xv = widen8(x + m * K + k);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, acc[m][r]);
      float sum = sum_of(lanes);
      for (std::int64_t j = k; j < K; ++j) sum += widen(x[m * K + j]) * widen(w[r * K + j]);
      out[m * R + r] = sum;
    }
  }
}
#pragma GCC diagnostic pop
#endif

enum class Isa { Scalar, Avx2, Avx512Bf16 };

Isa detect() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw")) return Isa::Avx512Bf16;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
#endif
  return Isa::Scalar;
}

const char* name_of(Isa isa) {
  switch (isa) {
    case Isa::Avx512Bf16: return "avx512bf16";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

// The best this CPU has, or less when NEVA_BF16_GEMV asks for it (to test or compare the other kernels).
struct Choice {
  Isa isa = Isa::Scalar;
  std::string error;
};

Choice choose() {
  const Isa best = detect();
  const char* cap = std::getenv("NEVA_BF16_GEMV");
  if (!cap || !*cap) return {best, {}};
  const std::string wanted = cap;
  for (const Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512Bf16}) {
    if (wanted != name_of(isa)) continue;
    if (isa > best) return {best, "NEVA_BF16_GEMV=" + wanted + ", but this CPU's best is " + name_of(best)};
    return {isa, {}};
  }
  return {best, "NEVA_BF16_GEMV is '" + wanted + "': expected avx512bf16, avx2 or scalar (or unset: the best this CPU has)"};
}

Isa isa() {
  static const Choice choice = choose();
  if (!choice.error.empty()) throw Error(choice.error);
  return choice.isa;
}

using Tile = void (*)(const std::uint16_t*, const std::uint16_t*, std::int64_t, float*);

// The kernel for R weight rows (1 or kWeightRows) and mt input rows (1 to rows_per_pass()) on this CPU.
template <int R>
Tile tile_for(int mt) {
  switch (isa()) {
#if defined(__x86_64__)
    case Isa::Avx512Bf16: {
      static constexpr Tile tiles[] = {tile_avx512bf16<R, 1>, tile_avx512bf16<R, 2>, tile_avx512bf16<R, 3>,
                                       tile_avx512bf16<R, 4>};
      return tiles[mt - 1];
    }
    case Isa::Avx2: {
      static constexpr Tile tiles[] = {tile_avx2<R, 1>, tile_avx2<R, 2>};
      return tiles[mt - 1];
    }
#endif
    default: {
      static constexpr Tile tiles[] = {tile_scalar<R, 1>, tile_scalar<R, 2>, tile_scalar<R, 3>, tile_scalar<R, 4>};
      return tiles[mt - 1];
    }
  }
}

int rows_per_pass() { return isa() == Isa::Avx2 ? 2 : kMaxPass; }

}  // namespace

std::string bf16_gemv_isa() {
  switch (isa()) {
    case Isa::Avx512Bf16: return "AVX512-BF16";
    case Isa::Avx2: return "AVX2";
    default: return "scalar";
  }
}

at::Tensor bf16_rows_times_weight(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  const std::int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(M >= 1 && M <= kBf16GemvMaxRows && weight.size(1) == K && x.is_contiguous() && weight.is_contiguous() &&
                  x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "bf16_rows_times_weight: contiguous bf16 x [M <= 8, K] and weight [N, K] expected");
  at::Tensor y = at::empty({M, N}, x.options());
  const auto* xs = reinterpret_cast<const std::uint16_t*>(x.const_data_ptr<at::BFloat16>());
  const auto* ws = reinterpret_cast<const std::uint16_t*>(weight.const_data_ptr<at::BFloat16>());
  const at::BFloat16* bs = bias.defined() ? bias.const_data_ptr<at::BFloat16>() : nullptr;
  at::BFloat16* ys = y.mutable_data_ptr<at::BFloat16>();
  const int per_pass = rows_per_pass();
  const std::int64_t blocks = (N + kWeightRows - 1) / kWeightRows;
  // At least 64 KiB of weights per task: each thread a few long streams.
  const std::int64_t grain = std::max<std::int64_t>(1, (std::int64_t{1} << 16) / (kWeightRows * K * 2));
  intra_op_for(blocks, grain, [&](std::int64_t first, std::int64_t last) {
    float sums[kWeightRows * kMaxPass];
    for (std::int64_t block = first; block < last; ++block) {
      const std::int64_t n = block * kWeightRows;
      const int rows = static_cast<int>(std::min<std::int64_t>(kWeightRows, N - n));
      for (std::int64_t m = 0; m < M; m += per_pass) {
        const int mt = static_cast<int>(std::min<std::int64_t>(per_pass, M - m));
        if (rows == kWeightRows) {
          tile_for<kWeightRows>(mt)(xs + m * K, ws + n * K, K, sums);
        } else {  // the last, partial block: one weight row at a time
          for (int r = 0; r < rows; ++r) {
            float one[kMaxPass];
            tile_for<1>(mt)(xs + m * K, ws + (n + r) * K, K, one);
            for (int i = 0; i < mt; ++i) sums[i * kWeightRows + r] = one[i];
          }
        }
        for (int i = 0; i < mt; ++i) {
          for (int r = 0; r < rows; ++r) {
            const float bias_value = bs ? static_cast<float>(bs[n + r]) : 0.0f;
            ys[(m + i) * N + n + r] = at::BFloat16(sums[i * kWeightRows + r] + bias_value);
          }
        }
      }
    }
  });
  return y;
}

}  // namespace neva::nn::detail
