#pragma once
// The small decoder the layer and training tests build: 4 layers, GQA (4 heads, 2 KV heads), a gated,
// plain or MoE (4 experts, top 2) feed-forward.
#include <string>

#include "neva/model/decoder.h"

namespace neva::test {

inline DecoderConfig tiny_decoder(const std::string& mlp = "gated") {
  DecoderConfig config;
  config.source = "test";
  config.vocab_size = 97;
  config.hidden_size = 64;
  config.intermediate_size = 128;
  config.num_layers = 4;
  config.num_heads = 4;
  config.num_kv_heads = 2;
  config.head_dim = 16;
  config.mlp = mlp;
  if (mlp == "moe") {
    config.num_experts = 4;
    config.experts_per_token = 2;
    config.router_aux_loss_coef = 0.02;
  }
  config.rope.head_dim = 16;
  return config;
}

}  // namespace neva::test
