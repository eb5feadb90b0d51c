// The `mixtral` language backbone: transformers' MixtralForCausalLM — Mistral's attention with a
// sparse mixture of SwiGLU experts in every layer (router softmax in fp32 over all experts, top-k,
// renormalised weights; block_sparse_moe.experts.N.w1/w2/w3). In training the load-balancing loss,
// weighted by router_aux_loss_coef, comes back as the backbone's aux_loss.
//
// Recipe keys (table model.mm_cfg.llm): from_pretrained (a MixtralForCausalLM or llava-hf directory)
// or config (a config.json alone).
#include "neva/nn/decoder.h"
#include "neva/nn/mlp.h"
#include "neva/plugin_abi.h"

namespace {

// config.json -> DecoderConfig; absent keys take MixtralConfig's defaults.
void read_mixtral(const neva::HfConfig& hf, neva::DecoderConfig& d) {
  d.vocab_size = hf.positive("vocab_size", 32000);
  d.hidden_size = hf.positive("hidden_size", 4096);
  d.intermediate_size = hf.positive("intermediate_size", 14336);
  d.num_layers = hf.positive("num_hidden_layers", 32);
  d.num_heads = hf.positive("num_attention_heads", 32);
  d.num_kv_heads = hf.positive("num_key_value_heads", 8);
  if (d.num_heads % d.num_kv_heads != 0) hf.fail("num_key_value_heads", "does not divide num_attention_heads");
  d.head_dim = hf.positive("head_dim", d.hidden_size / d.num_heads);
  d.norm = "rms";
  d.norm_eps = hf.get<double>("rms_norm_eps", 1e-5);
  d.mlp = "moe";
  d.num_experts = hf.positive("num_local_experts", hf.positive("num_experts", 8));
  d.experts_per_token = hf.positive("num_experts_per_tok", 2);
  if (d.experts_per_token > d.num_experts) hf.fail("num_experts_per_tok", "exceeds the number of experts");
  d.router_aux_loss_coef = hf.get<double>("router_aux_loss_coef", 0.001);
  d.activation = hf.get<std::string>("hidden_act", "silu");
  neva::check_activation(d.activation, hf.source() + ": hidden_act");
  d.tie_word_embeddings = hf.get<bool>("tie_word_embeddings", false);
  d.sliding_window = hf.has("sliding_window") ? hf.positive("sliding_window", 4096) : 0;
  d.rope = hf.rope(d.head_dim, 1e6, 131072);
}

neva::ComponentConfig* parse(const char*, const neva::ConfigSection& section) {
  return neva::parse_decoder_plugin_config(section, "Mixtral", "mixtral", &read_mixtral);
}

const neva::PluginDescriptor* describe() {
  static const neva::PluginDescriptor descriptor{
      NEVA_PLUGIN_ABI_FIELDS,       neva::LanguageBackbone::kKind, "mixtral", "0.1.0", NEVA_PLUGIN_TORCH_VERSION,
      "Mixtral sparse mixture-of-experts decoder (transformers MixtralForCausalLM)", nullptr, &parse,
      &neva::create_decoder_backbone,
  };
  return &descriptor;
}

}  // namespace

NEVA_PLUGIN(describe)
