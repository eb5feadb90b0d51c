// fp32 and bf16 products of a few rows (decoding: one row per sequence) with a weight matrix, at the
// memory's bandwidth.
//
// Why our own kernels: decoding a token reads every weight once, so the speed of a one-row product is
// the bandwidth it reads the weight at. Measured on the project's 2-vCPU EPYC (docs/benchmarks.md):
// - bf16: the LibTorch wheel's one-row products read weights at 9-17 GB/s (oneDNN's at::linear, at::mv,
//   at::matmul) where a plain read of the same bytes runs at 23-28 GB/s, and no packaged library has a
//   faster one: Debian's OpenBLAS 0.3.21 and PyPI's scipy-openblas 0.3.34 are built without
//   BUILD_BFLOAT16 (no sbgemv). Alternatives measured in the 1.1B decode, paired runs: one row per
//   stream with AVX-512 widen-and-FMA was 0.8-1.0x this.
// - fp32: MKL's GEMV (the wheel's) reads at half OpenBLAS's bandwidth on AMD processors, and OpenBLAS's
//   sgemv itself (Debian's 0.3.21, its Cooperlake kernel on this Zen 4) read a Llama-1.1B's layer
//   sequence at 30-42 GB/s where 8-row blocks with prefetching (this kernel) read 34-60 GB/s in the
//   same minutes; llama.cpp's fp32 decode read 36-44 GB/s beside neva's 29-30 through OpenBLAS.
//
// How: each task takes blocks of weight rows (8 on AVX-512, 4 on AVX2) and, for a few input rows at a
// time, streams them once with (weight rows) x (input rows) fp32 accumulators in
// registers, prefetching the next block into L2 as it goes (AVX512-BF16's vdpbf16ps: 32 products a
// step; AVX-512 FMA: 16; AVX2: FMA, 8 a step, bf16 widened to fp32 by a shift; scalar elsewhere). The
// bias is added in fp32; bf16 sums are rounded to bf16 to nearest even, as oneDNN does.

#include "gemv.h"

#include "neva/error.h"
#include "neva/nn/intra_op.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace neva::nn::detail {

namespace {

using Bf16 = std::uint16_t;  // bf16 bits

constexpr int kMaxPass = 4;       // input rows a pass keeps accumulators for, at most
constexpr int kMaxBlockRows = 8;  // weight rows a block streams together, at most

inline float widen(Bf16 bits) {
  const std::uint32_t word = static_cast<std::uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}
inline float widen(float value) { return value; }

// The sum of a vector register's lanes, stored to `lanes`, in lane order.
template <int L>
float sum_of(const float (&lanes)[L]) {
  float sum = 0.0f;
  for (const float lane : lanes) sum += lane;
  return sum;
}

// out[m * R + r] = sum_k x[m * K + k] * w[r * K + k], for R weight rows and MT input rows: fp32 sums in
// k's order.
template <typename T, int R, int MT>
void tile_scalar(const T* x, const T* w, std::int64_t K, float* out) {
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
// The address `elements` past w, for a prefetch: past the last block it lies beyond the weight, which
// a prefetch may name (it never faults) but pointer arithmetic may not, hence integers.
template <typename T>
inline const char* ahead(const T* w, std::int64_t elements) {
  return reinterpret_cast<const char*>(reinterpret_cast<std::uintptr_t>(w) +
                                       static_cast<std::uintptr_t>(elements) * sizeof(T));
}

#define NEVA_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))
#define NEVA_AVX512 __attribute__((target("avx512f")))
#define NEVA_AVX2 __attribute__((target("avx2,fma")))

// Sums of the accumulators' lanes into out, input row by input row.
template <int R, int MT>
NEVA_AVX512 void store_sums(const __m512 (&acc)[MT][R], float* out) {
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      alignas(64) float lanes[16];
      _mm512_store_ps(lanes, acc[m][r]);
      out[m * R + r] = sum_of(lanes);
    }
  }
}

template <int R, int MT>
NEVA_AVX512_BF16 void tile_avx512bf16(const Bf16* x, const Bf16* w, std::int64_t K, float* out) {
  __m512 acc[MT][R];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  }
  // Masked loads throughout (a full mask but for the last step): the tail needs no second loop.
  for (std::int64_t k = 0; k < K; k += 32) {
    const __mmask32 mask =
        K - k >= 32 ? static_cast<__mmask32>(~0u) : static_cast<__mmask32>((std::uint64_t{1} << (K - k)) - 1);
    __m512i xv[MT];
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) xv[m] = _mm512_maskz_loadu_epi16(mask, x + m * K + k);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512i wv = _mm512_maskz_loadu_epi16(mask, w + r * K + k);
      _mm_prefetch(ahead(w, (R + r) * K + k), _MM_HINT_T1);  // the next block
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)wv, (__m512bh)xv[m]);
    }
  }
  store_sums<R, MT>(acc, out);
}

// The same shape as tile_avx512bf16, kept apart: a template's target attribute covers every
// instantiation, and this tile must run on AVX-512 processors without AVX512-BF16.
template <int R, int MT>
NEVA_AVX512 void tile_avx512(const float* x, const float* w, std::int64_t K, float* out) {
  __m512 acc[MT][R];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  }
  for (std::int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask =
        K - k >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 xv[MT];
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x + m * K + k);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_maskz_loadu_ps(mask, w + r * K + k);
      _mm_prefetch(ahead(w, (R + r) * K + k), _MM_HINT_T1);  // the next block
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) acc[m][r] = _mm512_fmadd_ps(wv, xv[m], acc[m][r]);
    }
  }
  store_sums<R, MT>(acc, out);
}

NEVA_AVX2 inline __m256 load8(const Bf16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
NEVA_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

template <typename T, int R, int MT>
NEVA_AVX2 void tile_avx2(const T* x, const T* w, std::int64_t K, float* out) {
  constexpr int kPerLine = 64 / sizeof(T);  // elements per cache line: one prefetch each
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
      wv[r] = load8(w + r * K + k);
      if (k % kPerLine == 0) _mm_prefetch(ahead(w, (R + r) * K + k), _MM_HINT_T1);
    }
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) {
      const __m256 xv = load8(x + m * K + k);
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

// How wide the kernels may go: what the CPU has (AVX-512 = AVX-512F), at most what NEVA_GEMV allows.
enum class Level { Scalar, Avx2, Avx512 };

const char* name_of(Level level) {
  switch (level) {
    case Level::Avx512: return "avx512";
    case Level::Avx2: return "avx2";
    default: return "scalar";
  }
}

struct Choice {
  Level level = Level::Scalar;
  bool bf16_instructions = false;  // AVX512-BF16 (and AVX512-BW) besides
  std::string error;
};

Choice choose() {
  Choice choice;
  Level best = Level::Scalar;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Level::Avx2;
  if (__builtin_cpu_supports("avx512f")) best = Level::Avx512;
  choice.bf16_instructions = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
#endif
  choice.level = best;
  const char* cap = std::getenv("NEVA_GEMV");
  if (!cap || !*cap) return choice;
  const std::string wanted = cap;
  for (const Level level : {Level::Scalar, Level::Avx2, Level::Avx512}) {
    if (wanted != name_of(level)) continue;
    if (level > best) choice.error = "NEVA_GEMV=" + wanted + ", but this CPU's best is " + name_of(best);
    else choice.level = level;
    return choice;
  }
  choice.error = "NEVA_GEMV is '" + wanted + "': expected avx512, avx2 or scalar (or unset: the best this CPU has)";
  return choice;
}

const Choice& chosen() {
  static const Choice choice = choose();
  if (!choice.error.empty()) throw Error(choice.error);
  return choice;
}

template <typename T>
using Tile = void (*)(const T*, const T*, std::int64_t, float*);

// One kernel family: its weight rows a block, input rows a pass, and tiles for a whole block and for a
// single weight row (the last, partial block), indexed by input rows - 1.
template <typename T>
struct Kernel {
  const char* name;
  int block_rows;
  int per_pass;
  Tile<T> block[kMaxPass];
  Tile<T> row[kMaxPass];
};

#if defined(__x86_64__)
// The AVX-512 tile for each dtype: vdpbf16ps for bf16, FMA for fp32.
template <typename T>
struct Avx512;
template <>
struct Avx512<Bf16> {
  static constexpr const char* name = "AVX512-BF16";
  template <int R, int MT>
  static constexpr Tile<Bf16> tile = tile_avx512bf16<R, MT>;
};
template <>
struct Avx512<float> {
  static constexpr const char* name = "AVX-512";
  template <int R, int MT>
  static constexpr Tile<float> tile = tile_avx512<R, MT>;
};
#endif

// The best kernel family for T that the CPU has and NEVA_GEMV allows.
template <typename T>
const Kernel<T>& kernel() {
  static const Kernel<T> scalar{"scalar", 4, 4, {tile_scalar<T, 4, 1>, tile_scalar<T, 4, 2>, tile_scalar<T, 4, 3>, tile_scalar<T, 4, 4>},
                                {tile_scalar<T, 1, 1>, tile_scalar<T, 1, 2>, tile_scalar<T, 1, 3>, tile_scalar<T, 1, 4>}};
#if defined(__x86_64__)
  // AVX-512's 32 registers: 8 x 3 accumulators, 3 input vectors and a weight one (8 rows a block read
  // 1.0-1.27x faster than 4 in five alternating bf16 decode runs).
  using A = Avx512<T>;
  static const Kernel<T> avx512{A::name, 8, 3,
                                {A::template tile<8, 1>, A::template tile<8, 2>, A::template tile<8, 3>},
                                {A::template tile<1, 1>, A::template tile<1, 2>, A::template tile<1, 3>}};
  // AVX2's 16 registers: 4 x 2 accumulators, 4 weight vectors and an input one.
  static const Kernel<T> avx2{"AVX2", 4, 2, {tile_avx2<T, 4, 1>, tile_avx2<T, 4, 2>}, {tile_avx2<T, 1, 1>, tile_avx2<T, 1, 2>}};
  const Choice& choice = chosen();
  const bool has_avx512_tile = std::is_same_v<T, float> || choice.bf16_instructions;
  if (choice.level == Level::Avx512 && has_avx512_tile) return avx512;
  if (choice.level >= Level::Avx2) return avx2;
#endif
  return scalar;
}

inline void store(float sum, float* y) { *y = sum; }
inline void store(float sum, at::BFloat16* y) { *y = at::BFloat16(sum); }  // to nearest even

// T: the weights' element (float or Bf16); E: the tensors' (float or at::BFloat16).
template <typename T, typename E>
void rows_times(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& y) {
  const std::int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const auto* xs = reinterpret_cast<const T*>(x.const_data_ptr<E>());
  const auto* ws = reinterpret_cast<const T*>(weight.const_data_ptr<E>());
  const E* bs = bias.defined() ? bias.const_data_ptr<E>() : nullptr;
  E* ys = y.mutable_data_ptr<E>();
  const Kernel<T>& k = kernel<T>();
  const int R = k.block_rows;
  const std::int64_t blocks = (N + R - 1) / R;
  // At least 64 KiB of weights per task: each thread a few long streams.
  const std::int64_t grain = std::max<std::int64_t>(1, (std::int64_t{1} << 16) / (R * K * std::int64_t{sizeof(T)}));
  intra_op_for(blocks, grain, [&](std::int64_t first, std::int64_t last) {
    float sums[kMaxBlockRows * kMaxPass];
    for (std::int64_t block = first; block < last; ++block) {
      const std::int64_t n = block * R;
      const int rows = static_cast<int>(std::min<std::int64_t>(R, N - n));
      for (std::int64_t m = 0; m < M; m += k.per_pass) {
        const int mt = static_cast<int>(std::min<std::int64_t>(k.per_pass, M - m));
        if (rows == R) {
          k.block[mt - 1](xs + m * K, ws + n * K, K, sums);
        } else {  // the last, partial block: one weight row at a time
          for (int r = 0; r < rows; ++r) {
            float one[kMaxPass];
            k.row[mt - 1](xs + m * K, ws + (n + r) * K, K, one);
            for (int i = 0; i < mt; ++i) sums[i * R + r] = one[i];
          }
        }
        for (int i = 0; i < mt; ++i) {
          for (int r = 0; r < rows; ++r) {
            const float bias_value = bs ? static_cast<float>(bs[n + r]) : 0.0f;
            store(sums[i * R + r] + bias_value, ys + (m + i) * N + n + r);
          }
        }
      }
    }
  });
}

}  // namespace

std::string gemv_isa(c10::ScalarType dtype) {
  if (dtype == at::kBFloat16) return kernel<Bf16>().name;
  if (dtype == at::kFloat) return kernel<float>().name;
  throw Error(std::string("neva's GEMV computes fp32 and bf16, not ") + c10::toString(dtype));
}

at::Tensor rows_times_weight(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  const std::int64_t M = x.size(0), K = x.size(1);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(M >= 1 && M <= kGemvMaxRows && weight.size(1) == K && x.is_contiguous() && weight.is_contiguous() &&
                  (dtype == at::kFloat || dtype == at::kBFloat16) && weight.scalar_type() == dtype &&
                  (!bias.defined() || (bias.is_contiguous() && bias.scalar_type() == dtype)),
              "rows_times_weight: contiguous fp32 or bf16 x [M <= 8, K], weight [N, K] and bias [N] expected");
  at::Tensor y = at::empty({M, weight.size(0)}, x.options());
  if (dtype == at::kFloat) rows_times<float, float>(x, weight, bias, y);
  else rows_times<Bf16, at::BFloat16>(x, weight, bias, y);
  return y;
}

}  // namespace neva::nn::detail
