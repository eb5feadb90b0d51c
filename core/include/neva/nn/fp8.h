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

// A fresh state on `device`: history of zeros, scale 1. Throws Error for a length < 1.
NEVA_API ScalingState make_state(std::int64_t history_length, c10::Device device = c10::Device(c10::DeviceType::CPU));

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
// The emulation scaled_mm falls back to (dequantise, float32 matmul, round to out_dtype): exposed so
// that its equality with LibTorch's kernel is tested.
NEVA_API at::Tensor scaled_mm_emulated(const at::Tensor& a, const at::Tensor& a_scale_inv, const at::Tensor& b,
                                       const at::Tensor& b_scale_inv, c10::ScalarType out_dtype);

// How a linear layer's FP8 product is computed (fp8::linear).
struct LinearConfig {
  Format format = Format::Hybrid;
  bool current_scaling = false;  // true: each cast takes its scale from its own amax (margin applies)
  double margin = 0;
  c10::ScalarType out_dtype = c10::ScalarType::Float;  // the compute dtype: the GEMMs' outputs
};

// The scaling state of one linear layer: its input, its weight and its output gradient (TE's
// fp8_meta "scaling_fwd" input/weight and "scaling_bwd" grad_output), and its weight cast to FP8
// with that weight's scale (row-major for the forward GEMM, transposed for the input gradient's),
// kept while neither the weight (its version counter) nor the weight's scale changes: cast once per
// optimizer step, not per micro-batch.
struct NEVA_API LinearState {
  explicit LinearState(std::int64_t history_length, c10::Device device = c10::Device(c10::DeviceType::CPU));
  ScalingState input, weight, grad_output;
  at::Tensor weight_fp8, weight_fp8_t, weight_fp8_scale_inv;
  const void* cached_weight = nullptr;  // the weight's TensorImpl and version, and the scale's, it was cast with
  std::uint32_t cached_version = 0;
  const void* cached_scale = nullptr;
  std::uint32_t cached_scale_version = 0;
};

// y = x @ weight^T (+ bias) with both operands cast to FP8 (E4M3) and the GEMM in FP8 (scaled_mm),
// the output in config.out_dtype; differentiable: the backward pass casts the output gradient to FP8
// (E5M2 under Hybrid) and computes the input gradient (grad_fp8 @ weight_fp8) and the weight
// gradient (grad_fp8^T @ input_fp8) with FP8 GEMMs too, the bias gradient in the gradient's dtype.
// Each cast records its amax in its role's history (delayed scaling) or sets its role's scale
// (current scaling). Runs with autocast off whatever the caller's; `x` [..., in], `weight` [out, in].
NEVA_API at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, LinearState& state,
                           const LinearConfig& config);

// update() of the layer's three roles (the gradient's in E5M2 under Hybrid), for delayed scaling.
NEVA_API void update(LinearState& state, const LinearConfig& config, AmaxAlgorithm algorithm, std::int64_t interval);

}  // namespace neva::fp8
