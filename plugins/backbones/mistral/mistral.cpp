// The `mistral` language backbone: transformers' MistralForCausalLM — Llama's layers without any
// bias, a head_dim that need not be hidden / heads, and sliding-window attention (a key is visible
// iff q - W < k <= q) in prefill, with the KV cache and in batches.
//
// Recipe keys (table model.mm_cfg.llm): from_pretrained (a MistralForCausalLM or llava-hf directory)
// or config (a config.json alone).
#include "neva/model/decoder.h"
#include "neva/plugin_abi.h"

namespace {

// config.json -> DecoderConfig; absent keys take MistralConfig's defaults.
void read_mistral(const neva::HfConfig& hf, neva::DecoderConfig& d) {
  neva::read_decoder_shape(hf, {32000, 4096, 14336, 32, 32, 8, "silu", 10000.0, 4096 * 32}, d);
  d.norm_eps = hf.get<double>("rms_norm_eps", 1e-6);
  d.sliding_window = hf.has("sliding_window") ? hf.positive("sliding_window", 4096) : 0;  // null: no window
}

neva::ComponentConfig* parse(const char*, const neva::ConfigSection& section) {
  return neva::parse_decoder_plugin_config(section, "Mistral", "mistral", &read_mistral);
}

const neva::PluginDescriptor* describe() {
  static const neva::PluginDescriptor descriptor{
      NEVA_PLUGIN_ABI_FIELDS,       neva::LanguageBackbone::kKind, "mistral", "0.1.0", NEVA_PLUGIN_TORCH_VERSION,
      "Mistral decoder with sliding-window attention (transformers MistralForCausalLM)", nullptr, &parse,
      &neva::create_decoder_backbone,
  };
  return &descriptor;
}

}  // namespace

NEVA_PLUGIN(describe)
