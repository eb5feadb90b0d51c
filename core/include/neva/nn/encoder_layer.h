#pragma once
// The pre-norm transformer encoder layer of ViT-style vision towers (CLIP, SigLIP):
//   x = x + out_proj(attention(layer_norm1(x)));  x = x + fc2(act(fc1(layer_norm2(x))))
// Bidirectional attention, biases everywhere. Parameter names match transformers:
// layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.{fc1,fc2}.
#include <ATen/core/Tensor.h>

#include <string>

#include "neva/api.h"
#include "neva/context.h"
#include "neva/nn/linear.h"
#include "neva/nn/norm.h"

namespace neva {

struct EncoderLayerConfig {
  std::int64_t hidden_size = 0;
  std::int64_t intermediate_size = 0;
  std::int64_t num_heads = 0;
  double layer_norm_eps = 1e-5;
  std::string activation = "quick_gelu";
};

// q/k/v split their outputs (whole heads) over the tensor-parallel group, out_proj its input; the
// head size is the config's, not the input's.
class NEVA_API EncoderAttention : public nn::Module {
 public:
  EncoderAttention(const RuntimeContext& context, std::int64_t hidden_size, std::int64_t num_heads);
  at::Tensor forward(const at::Tensor& x);

 private:
  std::int64_t num_heads_, head_dim_;
  nn::Linear q_proj_, k_proj_, v_proj_, out_proj_;
};

class NEVA_API EncoderMLP : public nn::Module {
 public:
  EncoderMLP(const RuntimeContext& context, std::int64_t hidden_size, std::int64_t intermediate_size,
             std::string activation);
  at::Tensor forward(const at::Tensor& x);

 private:
  nn::Linear fc1_, fc2_;
  std::string activation_;
};

class NEVA_API EncoderLayer : public nn::Module {
 public:
  EncoderLayer(const RuntimeContext& context, const EncoderLayerConfig& config);
  at::Tensor forward(const at::Tensor& x);

 private:
  std::shared_ptr<LayerNorm> layer_norm1_, layer_norm2_;
  std::shared_ptr<EncoderAttention> self_attn_;
  std::shared_ptr<EncoderMLP> mlp_;
};

}  // namespace neva
