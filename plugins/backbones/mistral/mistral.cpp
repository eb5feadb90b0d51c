// The `mistral` language backbone: transformers' MistralForCausalLM — Llama's layers without any
// bias, a head_dim that need not be hidden / heads, and sliding-window attention (a key is visible
// iff q - W < k <= q) in prefill, with the KV cache and in batches.
//
// Recipe keys (table model.mm_cfg.llm): from_pretrained (a MistralForCausalLM or llava-hf directory)
// or config (a config.json alone).
#include "neva/nn/decoder.h"
#include "neva/nn/mlp.h"
#include "neva/plugin_abi.h"

namespace {

// config.json -> DecoderConfig; absent keys take MistralConfig's defaults.
void read_mistral(const neva::HfConfig& hf, neva::DecoderConfig& d) {
  d.vocab_size = hf.positive("vocab_size", 32000);
  d.hidden_size = hf.positive("hidden_size", 4096);
  d.intermediate_size = hf.positive("intermediate_size", 14336);
  d.num_layers = hf.positive("num_hidden_layers", 32);
  d.num_heads = hf.positive("num_attention_heads", 32);
  d.num_kv_heads = hf.positive("num_key_value_heads", 8);
  if (d.num_heads % d.num_kv_heads != 0) hf.fail("num_key_value_heads", "does not divide num_attention_heads");
  d.head_dim = hf.positive("head_dim", d.hidden_size / d.num_heads);
  d.norm = "rms";
  d.norm_eps = hf.get<double>("rms_norm_eps", 1e-6);
  d.mlp = "gated";
  d.activation = hf.get<std::string>("hidden_act", "silu");
  neva::check_activation(d.activation, hf.source() + ": hidden_act");
  d.tie_word_embeddings = hf.get<bool>("tie_word_embeddings", false);
  d.sliding_window = hf.has("sliding_window") ? hf.positive("sliding_window", 4096) : 0;  // null: no window
  d.rope = hf.rope(d.head_dim, 10000.0, 4096 * 32);
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
