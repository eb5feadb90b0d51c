#include "neva/nn/rms_norm.h"

#include <ATen/ATen.h>

namespace neva {

RMSNorm::RMSNorm(std::int64_t size, double eps) : eps_(eps) {
  weight_ = register_parameter("weight", at::ones({size}));
}

at::Tensor RMSNorm::forward(const at::Tensor& x) {
  at::Tensor x32 = x.to(at::kFloat);
  at::Tensor normalized = x32 * at::rsqrt(x32.pow(2).mean(-1, true) + eps_);
  return weight_ * normalized.to(x.scalar_type());
}

}  // namespace neva
