#pragma once
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>

#include <string>

#include "neva/export.h"

namespace neva {

// down_proj(act(gate_proj(x)) * up_proj(x)): the SwiGLU family (Llama, Mistral, Mixtral experts).
// Parameter names match transformers: gate_proj, up_proj, down_proj.
class NEVA_API GatedMLP : public torch::nn::Module {
 public:
  GatedMLP(std::int64_t hidden_size, std::int64_t intermediate_size, bool bias, std::string activation);
  at::Tensor forward(const at::Tensor& x);

 private:
  torch::nn::Linear gate_proj_{nullptr}, up_proj_{nullptr}, down_proj_{nullptr};
  std::string activation_;
};

// Applies a transformers activation by its config name: silu, gelu, gelu_pytorch_tanh, quick_gelu, relu2, relu.
NEVA_API at::Tensor activation(const std::string& name, const at::Tensor& x);
// Throws neva::Error for a name activation() does not know.
NEVA_API void check_activation(const std::string& name, const std::string& where);

}  // namespace neva
