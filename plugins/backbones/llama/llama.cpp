// The `llama` language backbone: Llama 2 and Llama 3 as transformers' LlamaForCausalLM computes them
// (GQA down to one KV head; RoPE default, linear, dynamic and llama3; tied or untied embeddings;
// attention and MLP bias flags), on core's DecoderBackbone.
//
// Recipe keys (table model.mm_cfg.llm): from_pretrained (a LlamaForCausalLM or llava-hf directory)
// or config (a config.json alone, for a randomly initialised model).
#include "neva/model/decoder.h"
#include "neva/plugin_abi.h"

namespace {

// config.json -> DecoderConfig; absent keys take LlamaConfig's defaults, as transformers does.
void read_llama(const neva::HfConfig& hf, neva::DecoderConfig& d) {
  neva::read_decoder_shape(hf, {32000, 4096, 11008, 32, 32, 0, "silu", 10000.0, 2048}, d);
  d.norm_eps = hf.get<double>("rms_norm_eps", 1e-6);
  d.attention_bias = d.attention_output_bias = hf.get<bool>("attention_bias", false);
  d.mlp_bias = hf.get<bool>("mlp_bias", false);
}

neva::ComponentConfig* parse(const char*, const neva::ConfigSection& section) {
  return neva::parse_decoder_plugin_config(section, "Llama", "llama", &read_llama);
}

const neva::PluginDescriptor* describe() {
  static const neva::PluginDescriptor descriptor{
      NEVA_PLUGIN_ABI_FIELDS,       neva::LanguageBackbone::kKind, "llama", "0.1.0", NEVA_PLUGIN_TORCH_VERSION,
      "Llama 2 / Llama 3 decoder (transformers LlamaForCausalLM)", nullptr, &parse, &neva::create_decoder_backbone,
  };
  return &descriptor;
}

}  // namespace

NEVA_PLUGIN(describe)
