#pragma once
// The pre-norm transformer encoder layer of ViT-style vision towers (CLIP, SigLIP):
//   x = x + out_proj(attention(layer_norm1(x)));  x = x + fc2(act(fc1(layer_norm2(x))))
// Bidirectional attention, biases everywhere. Parameter names match transformers:
// layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.{fc1,fc2}.
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include <string>

#include "neva/api.h"

namespace neva {

struct EncoderLayerConfig {
  std::int64_t hidden_size = 0;
  std::int64_t intermediate_size = 0;
  std::int64_t num_heads = 0;
  double layer_norm_eps = 1e-5;
  std::string activation = "quick_gelu";
};

class NEVA_API EncoderAttention : public torch::nn::Module {
 public:
  EncoderAttention(std::int64_t hidden_size, std::int64_t num_heads);
  at::Tensor forward(const at::Tensor& x);

 private:
  std::int64_t num_heads_;
  torch::nn::Linear q_proj_{nullptr}, k_proj_{nullptr}, v_proj_{nullptr}, out_proj_{nullptr};
};

class NEVA_API EncoderMLP : public torch::nn::Module {
 public:
  EncoderMLP(std::int64_t hidden_size, std::int64_t intermediate_size, std::string activation);
  at::Tensor forward(const at::Tensor& x);

 private:
  torch::nn::Linear fc1_{nullptr}, fc2_{nullptr};
  std::string activation_;
};

class NEVA_API EncoderLayer : public torch::nn::Module {
 public:
  explicit EncoderLayer(const EncoderLayerConfig& config);
  at::Tensor forward(const at::Tensor& x);

 private:
  torch::nn::LayerNorm layer_norm1_{nullptr}, layer_norm2_{nullptr};
  std::shared_ptr<EncoderAttention> self_attn_;
  std::shared_ptr<EncoderMLP> mlp_;
};

}  // namespace neva
