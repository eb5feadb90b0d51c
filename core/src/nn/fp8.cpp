#include "neva/nn/fp8.h"

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>

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

ScalingState make_state(std::int64_t history_length, c10::Device device) {
  if (history_length < 1) {
    throw Error("fp8: the amax history length must be at least 1 (fp8_amax_history_len = " +
                std::to_string(history_length) + ")");
  }
  ScalingState state;
  const at::TensorOptions options = at::TensorOptions(at::kFloat).device(device);
  state.amax_history = at::zeros({history_length}, options);
  state.scale = at::ones({}, options);
  state.scale_inv = at::ones({}, options);
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
  const bool out_ok = out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf;
  if ((a.is_cpu() || a.is_cuda()) && cuda_shape_ok && out_ok &&
      !(a.is_cuda() && (a.scalar_type() == at::kFloat8_e5m2 && b.scalar_type() == at::kFloat8_e5m2))) {
    return at::_scaled_mm(a.contiguous(), b.contiguous().t(), scale_a.to(a.device()), scale_b.to(a.device()), std::nullopt,
                          std::nullopt, out_dtype);
  }
  return scaled_mm_emulated(a, scale_a, b, scale_b, out_dtype);
}

at::Tensor scaled_mm_emulated(const at::Tensor& a, const at::Tensor& a_scale_inv, const at::Tensor& b,
                              const at::Tensor& b_scale_inv, c10::ScalarType out_dtype) {
  const at::Tensor scale_a = a_scale_inv.to(a.device(), at::kFloat).reshape({});
  const at::Tensor scale_b = b_scale_inv.to(a.device(), at::kFloat).reshape({});
  return at::matmul(a.to(at::kFloat) * scale_a, (b.to(at::kFloat) * scale_b).t()).to(out_dtype);
}

LinearState::LinearState(std::int64_t history_length, c10::Device device)
    : input(make_state(history_length, device)),
      weight(make_state(history_length, device)),
      grad_output(make_state(history_length, device)) {}

namespace {

at::Tensor cast_role(const at::Tensor& x, ScalingState& state, c10::ScalarType fp8, const LinearConfig& config) {
  return config.current_scaling ? quantize_current(x, state, fp8, config.margin) : quantize(x, state, fp8);
}

// The weight in FP8 (and transposed), cast again only when the weight or its scale changed.
void cast_weight(const at::Tensor& weight, LinearState& state, const LinearConfig& config) {
  const void* impl = weight.unsafeGetTensorImpl();
  const std::uint32_t version = weight._version();
  const void* scale = state.weight.scale.unsafeGetTensorImpl();
  const std::uint32_t scale_version = state.weight.scale._version();
  const bool fresh = state.weight_fp8.defined() && state.cached_weight == impl && state.cached_version == version &&
                     (config.current_scaling || (state.cached_scale == scale && state.cached_scale_version == scale_version));
  if (fresh) return;
  state.weight_fp8 = cast_role(weight, state.weight, at::kFloat8_e4m3fn, config).contiguous();
  state.weight_fp8_t = state.weight_fp8.t().contiguous();
  state.weight_fp8_scale_inv = state.weight.scale_inv.clone();
  state.cached_weight = impl;
  state.cached_version = version;
  state.cached_scale = state.weight.scale.unsafeGetTensorImpl();
  state.cached_scale_version = state.weight.scale._version();
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The product of x [M, K] and weight [N, K]^T in FP8, and its two gradients in FP8.
struct Fp8Matmul : torch::autograd::Function<Fp8Matmul> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, LinearState* state,
                            const LinearConfig* config) {
    const at::Tensor xq = cast_role(x, state->input, at::kFloat8_e4m3fn, *config);
    const at::Tensor x_scale_inv = state->input.scale_inv.clone();
    cast_weight(weight, *state, *config);
    at::Tensor y = scaled_mm(xq, x_scale_inv, state->weight_fp8, state->weight_fp8_scale_inv, config->out_dtype);
    ctx->save_for_backward({xq, x_scale_inv, state->weight_fp8_t, state->weight_fp8_scale_inv});
    ctx->saved_data["state"] = reinterpret_cast<std::int64_t>(state);
    ctx->saved_data["config"] = reinterpret_cast<std::int64_t>(config);
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["weight_dtype"] = weight.scalar_type();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto* state = reinterpret_cast<LinearState*>(ctx->saved_data["state"].toInt());
    const auto* config = reinterpret_cast<const LinearConfig*>(ctx->saved_data["config"].toInt());
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &xq = saved[0], &x_scale_inv = saved[1], &weight_t = saved[2], &w_scale_inv = saved[3];
    const at::Tensor grad = grads[0].contiguous();
    const at::Tensor gq = cast_role(grad, state->grad_output, dtype_for(config->format, /*gradient=*/true), *config);
    const at::Tensor g_scale_inv = state->grad_output.scale_inv.clone();
    at::Tensor dx, dw;
    if (ctx->needs_input_grad(0)) dx = scaled_mm(gq, g_scale_inv, weight_t, w_scale_inv, ctx->saved_data["x_dtype"].toScalarType());
    if (ctx->needs_input_grad(1)) {
      const c10::ScalarType dtype = ctx->saved_data["weight_dtype"].toScalarType();
      dw = xq.size(0) == 0 ? at::zeros({weight_t.size(1), weight_t.size(0)}, grad.options().dtype(dtype))
                           : scaled_mm(gq.t().contiguous(), g_scale_inv, xq.t().contiguous(), x_scale_inv, dtype);
    }
    return {dx, dw, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, LinearState& state,
                  const LinearConfig& config) {
  if (weight.dim() != 2 || x.dim() < 1 || x.size(-1) != weight.size(1)) {
    throw Error("fp8::linear: an input [..., " + std::to_string(weight.dim() == 2 ? weight.size(1) : -1) +
                "] and a weight [out, in] were expected, got " + c10::str(x.sizes()) + " and " + c10::str(weight.sizes()));
  }
  // The casts and GEMMs choose their own dtypes: autocast would round the emulated GEMM to bf16.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  std::vector<std::int64_t> shape = x.sizes().vec();
  at::Tensor y = Fp8Matmul::apply(x.reshape({-1, x.size(-1)}), weight, &state, &config);
  shape.back() = weight.size(0);
  y = y.view(shape);
  return bias.defined() ? y + bias.to(y.scalar_type()) : y;
}

void update(LinearState& state, const LinearConfig& config, AmaxAlgorithm algorithm, std::int64_t interval) {
  update(state.input, at::kFloat8_e4m3fn, config.margin, algorithm, interval);
  update(state.weight, at::kFloat8_e4m3fn, config.margin, algorithm, interval);
  update(state.grad_output, dtype_for(config.format, true), config.margin, algorithm, interval);
}

}  // namespace neva::fp8
