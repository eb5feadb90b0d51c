// The `mixtral` language backbone: transformers' MixtralForCausalLM — Mistral's attention with a
// sparse mixture of SwiGLU experts in every layer (router softmax in fp32 over all experts, top-k,
// renormalised weights; block_sparse_moe.experts.N.w1/w2/w3). In training the load-balancing loss,
// weighted by router_aux_loss_coef, comes back as the backbone's aux_loss.
//
// Recipe keys (table model.mm_cfg.llm): from_pretrained (a MixtralForCausalLM or llava-hf directory)
// or config (a config.json alone).
#include "neva/model/decoder.h"
#include "neva/plugin_abi.h"

namespace {

// config.json -> DecoderConfig; absent keys take MixtralConfig's defaults.
void read_mixtral(const neva::HfConfig& hf, neva::DecoderConfig& d) {
  neva::read_decoder_shape(hf, {32000, 4096, 14336, 32, 32, 8, "silu", 1e6, 131072}, d);
  d.norm_eps = hf.get<double>("rms_norm_eps", 1e-5);
  d.sliding_window = hf.has("sliding_window") ? hf.positive("sliding_window", 4096) : 0;
  d.mlp = "moe";
  d.num_experts = hf.positive("num_local_experts", hf.positive("num_experts", 8));
  d.experts_per_token = hf.positive("num_experts_per_tok", 2);
  if (d.experts_per_token > d.num_experts) hf.fail("num_experts_per_tok", "exceeds the number of experts");
  d.router_aux_loss_coef = hf.get<double>("router_aux_loss_coef", 0.001);
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
