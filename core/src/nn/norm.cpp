#include "neva/nn/norm.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include "neva/error.h"

namespace neva {

Norm::~Norm() = default;

RMSNorm::RMSNorm(std::int64_t size, double eps) : eps_(eps) {
  weight_ = register_parameter("weight", at::ones({size}));
}

at::Tensor RMSNorm::forward(const at::Tensor& x) {
  at::Tensor x32 = x.to(at::kFloat);
  at::Tensor normalized = x32 * at::rsqrt(x32.pow(2).mean(-1, true) + eps_);
  return weight_ * normalized.to(x.scalar_type());
}

LayerNorm1P::LayerNorm1P(std::int64_t size, double eps) : eps_(eps) {
  weight_ = register_parameter("weight", at::zeros({size}));
  bias_ = register_parameter("bias", at::zeros({size}));
}

at::Tensor LayerNorm1P::forward(const at::Tensor& x) {
  // transformers runs it with autocast disabled, in the input's dtype.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return at::layer_norm(x, {x.size(-1)}, (weight_ + 1).to(x.scalar_type()), bias_.to(x.scalar_type()), eps_);
}

std::shared_ptr<Norm> make_norm(const std::string& kind, std::int64_t size, double eps) {
  if (kind == "rms") return std::make_shared<RMSNorm>(size, eps);
  if (kind == "layernorm1p") return std::make_shared<LayerNorm1P>(size, eps);
  throw Error("unknown norm '" + kind + "' (known: rms, layernorm1p)");
}

}  // namespace neva
