// The `llama` language backbone: Llama 2 and Llama 3 as transformers' LlamaForCausalLM computes them
// (GQA down to one KV head; RoPE default, linear, dynamic and llama3; tied or untied embeddings;
// attention and MLP bias flags), on core's DecoderBackbone.
//
// Recipe keys (table model.mm_cfg.llm): from_pretrained (a LlamaForCausalLM or llava-hf directory)
// or config (a config.json alone, for a randomly initialised model).
#include "neva/nn/decoder.h"
#include "neva/nn/mlp.h"
#include "neva/plugin_abi.h"

namespace {

// config.json -> DecoderConfig; absent keys take LlamaConfig's defaults, as transformers does.
void read_llama(const neva::HfConfig& hf, neva::DecoderConfig& d) {
  d.vocab_size = hf.positive("vocab_size", 32000);
  d.hidden_size = hf.positive("hidden_size", 4096);
  d.intermediate_size = hf.positive("intermediate_size", 11008);
  d.num_layers = hf.positive("num_hidden_layers", 32);
  d.num_heads = hf.positive("num_attention_heads", 32);
  d.num_kv_heads = hf.positive("num_key_value_heads", d.num_heads);
  if (d.num_heads % d.num_kv_heads != 0) hf.fail("num_key_value_heads", "does not divide num_attention_heads");
  d.head_dim = hf.positive("head_dim", d.hidden_size / d.num_heads);
  d.norm = "rms";
  d.norm_eps = hf.get<double>("rms_norm_eps", 1e-6);
  d.mlp = "gated";
  d.activation = hf.get<std::string>("hidden_act", "silu");
  neva::check_activation(d.activation, hf.source() + ": hidden_act");
  d.tie_word_embeddings = hf.get<bool>("tie_word_embeddings", false);
  d.attention_bias = hf.get<bool>("attention_bias", false);
  d.mlp_bias = hf.get<bool>("mlp_bias", false);
  d.rope = hf.rope(d.head_dim, 10000.0, 2048);
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
