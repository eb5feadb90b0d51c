#pragma once
#include <torch/nn/module.h>

#include "neva/export.h"

namespace neva {

// y = weight * (x / sqrt(mean(x^2) + eps)), normalised in fp32 and cast back to x's dtype before the
// weight multiply (LlamaRMSNorm).
class NEVA_API RMSNorm : public torch::nn::Module {
 public:
  RMSNorm(std::int64_t size, double eps);
  at::Tensor forward(const at::Tensor& x);

 private:
  at::Tensor weight_;
  double eps_;
};

}  // namespace neva
