#include "neva/nn/encoder_layer.h"

#include <ATen/ATen.h>

#include <cmath>

#include "neva/nn/mlp.h"

namespace neva {

EncoderAttention::EncoderAttention(const RuntimeContext& context, std::int64_t hidden_size, std::int64_t num_heads)
    : num_heads_(num_heads), head_dim_(hidden_size / num_heads) {
  const nn::LinearOptions column{true, nn::Parallel::Column}, row{true, nn::Parallel::Row};
  q_proj_ = register_module("q_proj", nn::linear(context, hidden_size, hidden_size, column));
  k_proj_ = register_module("k_proj", nn::linear(context, hidden_size, hidden_size, column));
  v_proj_ = register_module("v_proj", nn::linear(context, hidden_size, hidden_size, column));
  out_proj_ = register_module("out_proj", nn::linear(context, hidden_size, hidden_size, row));
}

at::Tensor EncoderAttention::forward(const at::Tensor& x) {
  const std::int64_t batch = x.size(0), seq = x.size(1);
  auto heads = [&](const at::Tensor& t) { return t.view({batch, seq, num_heads_, head_dim_}).transpose(1, 2); };
  at::Tensor out = at::scaled_dot_product_attention(heads(q_proj_->forward(x)), heads(k_proj_->forward(x)),
                                                    heads(v_proj_->forward(x)), std::nullopt, 0.0, false,
                                                    std::pow(static_cast<double>(head_dim_), -0.5));
  return out_proj_->forward(out.transpose(1, 2).reshape({batch, seq, num_heads_ * head_dim_}));
}

EncoderMLP::EncoderMLP(const RuntimeContext& context, std::int64_t hidden_size, std::int64_t intermediate_size,
                       std::string activation)
    : activation_(std::move(activation)) {
  fc1_ = register_module("fc1", nn::linear(context, hidden_size, intermediate_size, {true, nn::Parallel::Column}));
  fc2_ = register_module("fc2", nn::linear(context, intermediate_size, hidden_size, {true, nn::Parallel::Row}));
}

at::Tensor EncoderMLP::forward(const at::Tensor& x) { return fc2_->forward(activation(activation_, fc1_->forward(x))); }

EncoderLayer::EncoderLayer(const RuntimeContext& context, const EncoderLayerConfig& config) {
  auto norm = [&] { return std::make_shared<LayerNorm>(context, config.hidden_size, config.layer_norm_eps); };
  layer_norm1_ = register_module("layer_norm1", norm());
  self_attn_ = register_module("self_attn", std::make_shared<EncoderAttention>(context, config.hidden_size, config.num_heads));
  layer_norm2_ = register_module("layer_norm2", norm());
  mlp_ = register_module("mlp", std::make_shared<EncoderMLP>(context, config.hidden_size, config.intermediate_size,
                                                             config.activation));
}

at::Tensor EncoderLayer::forward(const at::Tensor& x) {
  at::Tensor h = x + self_attn_->forward(layer_norm1_->forward(x));
  return h + mlp_->forward(layer_norm2_->forward(h));
}

}  // namespace neva
