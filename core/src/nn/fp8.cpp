#include "neva/nn/fp8.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "neva/error.h"

namespace neva::fp8 {

namespace {

bool is_fp8(c10::ScalarType type) {
  return type == at::kFloat8_e4m3fn || type == at::kFloat8_e5m2;
}

// TE's scale rule, in float32 on the state's device: the new scale where amax is positive and
// finite, else `previous`; an infinite result becomes the largest float.
at::Tensor scale_from(const at::Tensor& amax, const at::Tensor& previous, double fp8_max, double margin) {
  at::Tensor scale = (fp8_max / amax) / std::pow(2.0, margin);
  scale = at::where(at::isinf(scale), at::full_like(scale, std::numeric_limits<float>::max()), scale);
  return at::where((amax > 0).logical_and(at::isfinite(amax)), scale, previous).to(at::kFloat);
}

}  // namespace

c10::ScalarType dtype_for(Format format, bool gradient) {
  return format == Format::Hybrid && gradient ? at::kFloat8_e5m2 : at::kFloat8_e4m3fn;
}

double max_of(c10::ScalarType fp8) {
  if (fp8 == at::kFloat8_e4m3fn) return 448.0;
  if (fp8 == at::kFloat8_e5m2) return 57344.0;
  throw Error(std::string("fp8: ") + c10::toString(fp8) + " is not float8_e4m3fn or float8_e5m2");
}

ScalingState make_state(std::int64_t history_length) {
  if (history_length < 1) {
    throw Error("fp8: the amax history length must be at least 1 (fp8_amax_history_len = " +
                std::to_string(history_length) + ")");
  }
  ScalingState state;
  state.amax_history = at::zeros({history_length}, at::kFloat);
  state.scale = at::ones({}, at::kFloat);
  state.scale_inv = at::ones({}, at::kFloat);
  return state;
}

at::Tensor cast(const at::Tensor& x, const at::Tensor& scale, c10::ScalarType fp8) {
  const double limit = max_of(fp8);
  // In float32: a bf16 product would round before the cast. The clamp saturates (LibTorch's cast
  // alone turns e4m3 overflow into NaN and e5m2 overflow into inf); NaN passes through.
  return (x.to(at::kFloat) * scale.to(x.device())).clamp(-limit, limit).to(fp8);
}

at::Tensor quantize(const at::Tensor& x, ScalingState& state, c10::ScalarType fp8) {
  at::NoGradGuard no_grad;
  const at::Tensor amax = x.numel() == 0 ? at::zeros({}, at::kFloat) : x.detach().abs().amax().to(at::kFloat);
  at::Tensor current = state.amax_history.select(0, 0);
  // fmax would drop a NaN; TE's kernel propagates it (the step's scale update then keeps the scale).
  current.copy_(at::where(at::isnan(amax), amax, at::maximum(current, amax.to(current.device()))));
  return cast(x, state.scale, fp8);
}

at::Tensor quantize_current(const at::Tensor& x, ScalingState& state, c10::ScalarType fp8, double margin) {
  at::NoGradGuard no_grad;
  const at::Tensor amax = x.numel() == 0 ? at::zeros({}, at::kFloat) : x.detach().abs().amax().to(at::kFloat);
  state.scale = scale_from(amax.to(state.scale.device()), state.scale, max_of(fp8), margin);
  state.scale_inv = state.scale.reciprocal();
  return cast(x, state.scale, fp8);
}

void update(ScalingState& state, c10::ScalarType fp8, double margin, AmaxAlgorithm algorithm, std::int64_t interval) {
  if (margin < 0) throw Error("fp8: fp8_margin must be at least 0 (got " + std::to_string(margin) + ")");
  if (interval < 1) throw Error("fp8: fp8_interval must be at least 1 (got " + std::to_string(interval) + ")");
  at::NoGradGuard no_grad;
  at::Tensor& history = state.amax_history;
  // at::max skips nothing: a NaN in the window makes the amax NaN, and the scale is kept.
  const at::Tensor amax = algorithm == AmaxAlgorithm::Max ? history.max() : history.select(0, 0).clone();
  ++state.updates;
  if (state.updates % interval == 0) {
    state.scale = scale_from(amax, state.scale, max_of(fp8), margin);
    state.scale_inv = state.scale.reciprocal();
  }
  history.copy_(at::roll(history, -1, 0));
  history.select(0, 0).zero_();
}

at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& a_scale_inv, const at::Tensor& b,
                     const at::Tensor& b_scale_inv, c10::ScalarType out_dtype) {
  if (a.dim() != 2 || b.dim() != 2 || a.size(1) != b.size(1) || !is_fp8(a.scalar_type()) || !is_fp8(b.scalar_type())) {
    throw Error("fp8::scaled_mm: expected float8 matrices [M, K] and [N, K], got " +
                std::string(c10::toString(a.scalar_type())) + " " + c10::str(a.sizes()) + " and " +
                c10::toString(b.scalar_type()) + " " + c10::str(b.sizes()));
  }
  const at::Tensor scale_a = a_scale_inv.to(at::kFloat).reshape({}), scale_b = b_scale_inv.to(at::kFloat).reshape({});
  // LibTorch's kernel (CPU: oneDNN or its reference loop; CUDA: FP8 tensor cores, which want both
  // operands' inner dimension a multiple of 16) where it takes the operands; the same arithmetic
  // otherwise. b^T is column-major as _scaled_mm wants it.
  const bool cuda_shape_ok = !a.is_cuda() || (a.size(1) % 16 == 0 && b.size(0) % 16 == 0);
  if ((a.is_cpu() || a.is_cuda()) && cuda_shape_ok && !(a.is_cuda() && (a.scalar_type() == at::kFloat8_e5m2 &&
                                                                        b.scalar_type() == at::kFloat8_e5m2))) {
    return at::_scaled_mm(a.contiguous(), b.contiguous().t(), scale_a.to(a.device()), scale_b.to(a.device()), std::nullopt,
                          std::nullopt, out_dtype);
  }
  return at::matmul(a.to(at::kFloat) * scale_a.to(a.device()), (b.to(at::kFloat) * scale_b.to(a.device())).t())
      .to(out_dtype);
}

}  // namespace neva::fp8
