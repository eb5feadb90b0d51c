#pragma once
#include <torch/nn/module.h>

#include <memory>
#include <string>

#include "neva/api.h"
#include "neva/context.h"
#include "neva/nn/module.h"

namespace neva {

// A normalisation over the last dimension.
class NEVA_API Norm : public nn::Module {
 public:
  ~Norm() override;
  virtual at::Tensor forward(const at::Tensor& x) = 0;
};

// y = weight * (x / sqrt(mean(x^2) + eps)), normalised in fp32 and cast back to x's dtype before the
// weight multiply (LlamaRMSNorm).
class NEVA_API RMSNorm : public Norm {
 public:
  RMSNorm(const RuntimeContext& context, std::int64_t size, double eps);
  at::Tensor forward(const at::Tensor& x) override;

 private:
  at::Tensor weight_;
  double eps_;
};

// Nemotron's LayerNorm1P: layer_norm(x, weight + 1, bias, eps), outside autocast. The stored weight
// is zero-centred.
class NEVA_API LayerNorm1P : public Norm {
 public:
  LayerNorm1P(const RuntimeContext& context, std::int64_t size, double eps);
  at::Tensor forward(const at::Tensor& x) override;

 private:
  at::Tensor weight_, bias_;
  double eps_;
};

// torch.nn.LayerNorm: layer_norm(x, weight, bias, eps) (ViT towers).
class NEVA_API LayerNorm : public Norm {
 public:
  LayerNorm(const RuntimeContext& context, std::int64_t size, double eps);
  at::Tensor forward(const at::Tensor& x) override;

 private:
  at::Tensor weight_, bias_;
  double eps_;
};

// A decoder's norm by its DecoderConfig::norm name: "rms" or "layernorm1p".
NEVA_API std::shared_ptr<Norm> make_norm(const RuntimeContext& context, const std::string& kind, std::int64_t size,
                                         double eps);

}  // namespace neva
