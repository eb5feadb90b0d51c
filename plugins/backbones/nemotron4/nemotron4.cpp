// The `nemotron4` language backbone: transformers' NemotronForCausalLM (Nemotron-4, Minitron) —
// LayerNorm1P (weight + 1, with bias) norms, a squared-ReLU MLP without gate, and partial rotary
// embeddings (only the first partial_rotary_factor of each head rotates).
//
// Recipe keys (table model.mm_cfg.llm): from_pretrained (a NemotronForCausalLM or llava-hf directory)
// or config (a config.json alone).
#include "neva/model/decoder.h"
#include "neva/plugin_abi.h"

namespace {

// config.json -> DecoderConfig; absent keys take NemotronConfig's defaults.
void read_nemotron(const neva::HfConfig& hf, neva::DecoderConfig& d) {
  // NemotronConfig does not default the KV heads to the attention heads: config.json must say (-1).
  neva::read_decoder_shape(hf, {256000, 6144, 24576, 32, 48, -1, "relu2", 10000.0, 4096}, d);
  d.norm = "layernorm1p";
  d.norm_eps = hf.get<double>("norm_eps", 1e-5);
  d.mlp = "plain";
  d.attention_bias = d.attention_output_bias = hf.get<bool>("attention_bias", false);
  d.mlp_bias = hf.get<bool>("mlp_bias", false);
  bool given = hf.has("partial_rotary_factor") ||
               (hf.has("rope_parameters") && hf.child("rope_parameters").has("partial_rotary_factor"));
  if (!given) d.rope.partial_rotary_factor = 0.5;  // NemotronConfig's default
  d.rope.type = "default";                         // Nemotron's rotary embedding ignores rope scaling
}

neva::ComponentConfig* parse(const char*, const neva::ConfigSection& section) {
  return neva::parse_decoder_plugin_config(section, "Nemotron", "nemotron", &read_nemotron);
}

const neva::PluginDescriptor* describe() {
  static const neva::PluginDescriptor descriptor{
      NEVA_PLUGIN_ABI_FIELDS,       neva::LanguageBackbone::kKind, "nemotron4", "0.1.0", NEVA_PLUGIN_TORCH_VERSION,
      "Nemotron-4 decoder: LayerNorm1P, squared-ReLU MLP, partial RoPE (transformers NemotronForCausalLM)",
      nullptr, &parse, &neva::create_decoder_backbone,
  };
  return &descriptor;
}

}  // namespace

NEVA_PLUGIN(describe)
