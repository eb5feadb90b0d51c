#pragma once
// FP8 numerics as Transformer Engine defines them (delayed scaling): per-tensor scaling factors, an
// amax history per tensor role, saturating casts to LibTorch's float8 dtypes, and the FP8 GEMM.
// The building blocks of the fp8 precision recipe; tested against torch's float8 dtypes
// (tests/oracle/fp8_oracle.py).
//
// One tensor role (a linear layer's input, its weight, or its output gradient) keeps a
// ScalingState. Each quantisation records amax(|x|) into history[0] (the largest of the step's
// calls) and casts with the current scale; update() then does TE's amax_and_scale_update: the amax
// chosen from the history ("max": all of it, the current entry included; "most_recent": the current
// entry), scale = (fp8_max / amax) / 2^margin (kept when amax is 0 or not finite; an infinite scale
// becomes the largest float), and the history rolled (entry i takes entry i + 1, the current amax
// goes to the last slot, entry 0 is cleared). A step therefore casts with the scale the earlier
// steps' amaxes gave ("delayed"); `current` scaling instead takes the scale from this call's amax.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "neva/api.h"

namespace neva::fp8 {

// NeMo's fp8_e4m3 (E4M3 for every tensor) or fp8_hybrid (E4M3 forward, E5M2 for gradients).
enum class Format { E4M3, Hybrid };
enum class AmaxAlgorithm { Max, MostRecent };

// The dtype a tensor is cast to: float8_e4m3fn, or float8_e5m2 for a gradient under Hybrid.
NEVA_API c10::ScalarType dtype_for(Format format, bool gradient);
// The largest finite value of a float8 dtype: 448 (e4m3fn), 57344 (e5m2).
NEVA_API double max_of(c10::ScalarType fp8);

struct NEVA_API ScalingState {
  at::Tensor amax_history;  // [history_length] float32, entry 0 the current step's
  at::Tensor scale;         // [] float32: x * scale is cast
  at::Tensor scale_inv;     // [] float32: 1 / scale, what the GEMM multiplies back
  std::int64_t updates = 0; // update() calls so far (the interval counts them)
};

// A fresh state: history of zeros, scale 1. Throws Error for a length < 1.
NEVA_API ScalingState make_state(std::int64_t history_length);

// clamp(x * scale, -max, max) cast to `fp8` (round to nearest even; NaN stays NaN). `x` any float dtype.
NEVA_API at::Tensor cast(const at::Tensor& x, const at::Tensor& scale, c10::ScalarType fp8);

// Records amax(|x|) into state.amax_history[0] (the maximum with what this step recorded before; a
// NaN anywhere records NaN) and returns cast(x, state.scale, fp8).
NEVA_API at::Tensor quantize(const at::Tensor& x, ScalingState& state, c10::ScalarType fp8);

// Current scaling: the scale from this x's own amax (the same rules: an amax of 0 or not finite
// keeps state.scale), stored in the state, then the cast. The history is not used.
NEVA_API at::Tensor quantize_current(const at::Tensor& x, ScalingState& state, c10::ScalarType fp8, double margin);

// TE's amax_and_scale_update (above); the scale is recomputed on every `interval`-th call (the
// history rolls on every call). Throws Error for a negative margin or an interval < 1.
NEVA_API void update(ScalingState& state, c10::ScalarType fp8, double margin, AmaxAlgorithm algorithm,
                     std::int64_t interval = 1);

// The FP8 GEMM: (a * a_scale_inv) @ (b * b_scale_inv)^T for a [M, K] and b [N, K] of float8 dtypes,
// accumulated in float32 and returned as `out_dtype`: at::_scaled_mm where LibTorch runs it for these
// operands (CPU: every e4m3 / e5m2 pairing; CUDA: FP8 tensor cores), else exactly the same arithmetic
// emulated (dequantise, float32 matmul). Bitwise equal either way.
NEVA_API at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& a_scale_inv, const at::Tensor& b,
                              const at::Tensor& b_scale_inv, c10::ScalarType out_dtype);

}  // namespace neva::fp8
