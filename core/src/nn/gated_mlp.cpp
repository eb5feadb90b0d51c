#include "neva/nn/gated_mlp.h"

#include <ATen/ATen.h>

#include <cmath>

#include "neva/error.h"

namespace neva {

at::Tensor activation(const std::string& name, const at::Tensor& x) {
  if (name == "silu" || name == "swish") return at::silu(x);
  if (name == "gelu") return at::gelu(x);
  if (name == "gelu_pytorch_tanh") return at::gelu(x, "tanh");
  if (name == "quick_gelu") return x * at::sigmoid(1.702 * x);
  if (name == "relu") return at::relu(x);
  if (name == "relu2") return at::relu(x).pow(2);
  throw Error("unknown activation '" + name + "'");
}

void check_activation(const std::string& name, const std::string& where) {
  static const char* known[] = {"silu", "swish", "gelu", "gelu_pytorch_tanh", "quick_gelu", "relu", "relu2"};
  for (const char* candidate : known) {
    if (name == candidate) return;
  }
  throw Error(where + ": unknown activation '" + name +
              "' (known: silu, gelu, gelu_pytorch_tanh, quick_gelu, relu, relu2)");
}

GatedMLP::GatedMLP(std::int64_t hidden_size, std::int64_t intermediate_size, bool bias, std::string activation)
    : activation_(std::move(activation)) {
  auto linear = [&](std::int64_t in, std::int64_t out) { return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(bias)); };
  gate_proj_ = register_module("gate_proj", linear(hidden_size, intermediate_size));
  up_proj_ = register_module("up_proj", linear(hidden_size, intermediate_size));
  down_proj_ = register_module("down_proj", linear(intermediate_size, hidden_size));
}

at::Tensor GatedMLP::forward(const at::Tensor& x) {
  return down_proj_->forward(activation(activation_, gate_proj_->forward(x)) * up_proj_->forward(x));
}

}  // namespace neva
