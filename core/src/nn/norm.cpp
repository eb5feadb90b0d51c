#include "neva/nn/norm.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include "neva/error.h"

namespace neva {

Norm::~Norm() = default;

namespace {
at::Tensor filled(const RuntimeContext& context, std::int64_t size, double value) {
  return at::full({size}, value, at::TensorOptions(at::kFloat).device(context.device));
}
}  // namespace

RMSNorm::RMSNorm(const RuntimeContext& context, std::int64_t size, double eps) : eps_(eps) {
  weight_ = register_parameter("weight", filled(context, size, 1.0));
}

at::Tensor RMSNorm::forward(const at::Tensor& x) {
  at::Tensor x32 = x.to(at::kFloat);
  at::Tensor normalized = x32 * at::rsqrt(x32.pow(2).mean(-1, true) + eps_);
  return weight_ * normalized.to(x.scalar_type());
}

LayerNorm1P::LayerNorm1P(const RuntimeContext& context, std::int64_t size, double eps) : eps_(eps) {
  weight_ = register_parameter("weight", filled(context, size, 0.0));
  bias_ = register_parameter("bias", filled(context, size, 0.0));
}

at::Tensor LayerNorm1P::forward(const at::Tensor& x) {
  // transformers runs it with autocast disabled, in the input's dtype.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return at::layer_norm(x, {x.size(-1)}, (weight_ + 1).to(x.scalar_type()), bias_.to(x.scalar_type()), eps_);
}

LayerNorm::LayerNorm(const RuntimeContext& context, std::int64_t size, double eps) : eps_(eps) {
  weight_ = register_parameter("weight", filled(context, size, 1.0));
  bias_ = register_parameter("bias", filled(context, size, 0.0));
}

at::Tensor LayerNorm::forward(const at::Tensor& x) { return at::layer_norm(x, {weight_.size(0)}, weight_, bias_, eps_); }

std::shared_ptr<Norm> make_norm(const RuntimeContext& context, const std::string& kind, std::int64_t size, double eps) {
  if (kind == "rms") return std::make_shared<RMSNorm>(context, size, eps);
  if (kind == "layernorm1p") return std::make_shared<LayerNorm1P>(context, size, eps);
  throw Error("unknown norm '" + kind + "' (known: rms, layernorm1p)");
}

}  // namespace neva
