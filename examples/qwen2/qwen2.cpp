// An example third-party language backbone: Qwen2 (transformers' Qwen2ForCausalLM) — a Llama-style
// decoder whose q/k/v projections carry biases and whose o_proj does not. Written only against the
// neva SDK headers: it reads config.json into core's DecoderConfig and lets core build the model.
#include "neva/model/decoder.h"
#include "neva/plugin_abi.h"

namespace {

// config.json -> DecoderConfig; absent keys take Qwen2Config's defaults.
void read_qwen2(const neva::HfConfig& hf, neva::DecoderConfig& d) {
  neva::read_decoder_shape(hf, {151936, 4096, 22016, 32, 32, 32, "silu", 10000.0, 32768}, d);
  d.norm_eps = hf.get<double>("rms_norm_eps", 1e-6);
  d.attention_bias = true;          // q_proj, k_proj, v_proj
  d.attention_output_bias = false;  // o_proj
  if (hf.get<bool>("use_sliding_window", false)) d.sliding_window = hf.positive("sliding_window", 4096);
}

neva::ComponentConfig* parse(const char*, const neva::ConfigSection& section) {
  return neva::parse_decoder_plugin_config(section, "Qwen2", "qwen2", &read_qwen2);
}

const neva::PluginDescriptor* describe() {
  static const neva::PluginDescriptor descriptor{
      NEVA_PLUGIN_ABI_FIELDS,       neva::LanguageBackbone::kKind, "qwen2", "0.1.0", NEVA_PLUGIN_TORCH_VERSION,
      "Qwen2 decoder, an out-of-tree example (transformers Qwen2ForCausalLM)", nullptr, &parse,
      &neva::create_decoder_backbone,
  };
  return &descriptor;
}

}  // namespace

NEVA_PLUGIN(describe)
