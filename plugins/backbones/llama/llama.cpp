// The `llama` language backbone: Llama 2 and Llama 3 as transformers' LlamaForCausalLM computes them
// (GQA down to one KV head; RoPE default, linear, dynamic and llama3; tied or untied embeddings;
// attention and MLP bias flags). Parameter names are transformers' own, so a Hugging Face checkpoint
// maps one-to-one.
//
// Recipe keys (table model.mm_cfg.llm):
//   from_pretrained  a Hugging Face directory: config.json + model.safetensors[.index.json], either a
//                    LlamaForCausalLM or a llava-hf LlavaForConditionalGeneration (its text model, in
//                    either key layout)
//   config           a config.json alone: the same architecture, randomly initialised (debug flavour)
#include <ATen/ATen.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>

#include "neva/error.h"
#include "neva/hf_config.h"
#include "neva/language_backbone.h"
#include "neva/nn/attention.h"
#include "neva/nn/gated_mlp.h"
#include "neva/nn/rms_norm.h"
#include "neva/nn/rotary.h"
#include "neva/plugin_abi.h"
#include "neva/safetensors.h"
#include "neva/weights.h"

namespace {

struct LlamaConfig : neva::LanguageBackboneConfig {
  std::string config_source;  // the config.json read, for messages
  std::string weights;        // checkpoint directory; "" = random initialisation
  std::int64_t intermediate_size = 0, num_layers = 0;  // hidden_size, vocab_size: in the base
  std::int64_t num_heads = 0, num_kv_heads = 0, head_dim = 0;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false, attention_bias = false, mlp_bias = false;
  std::string hidden_act = "silu";
  neva::RopeConfig rope;

  static LlamaConfig parse(const char*, const neva::ConfigSection& section) {
    LlamaConfig config;
    auto pretrained = section.path_value("from_pretrained");
    auto config_file = section.path_value("config");
    if (pretrained && config_file) section.fail("config", "give from_pretrained or config, not both");
    if (!pretrained && !config_file) {
      section.fail("from_pretrained", "missing: a Hugging Face Llama directory (or `config`, a config.json for a "
                                      "randomly initialised model)");
    }
    const std::string key = pretrained ? "from_pretrained" : "config";
    try {
      config.read(neva::HfConfig::load(pretrained ? *pretrained : *config_file));
    } catch (const neva::Error& error) {
      section.fail(key, error.what());
    }
    if (pretrained) config.weights = *pretrained;
    return config;
  }

  void read(const neva::HfConfig& file) {
    // A llava-hf directory keeps the language model's settings under text_config.
    std::string file_type = file.get<std::string>("model_type", "llama");
    neva::HfConfig hf = file_type == "llava" ? file.child("text_config") : file;
    config_source = hf.source();
    std::string model_type = hf.get<std::string>("model_type", "llama");
    if (model_type != "llama") hf.fail("model_type", "expected \"llama\" (or \"llava\" with a llama text_config), got \"" + model_type + "\"");
    // Missing keys take LlamaConfig's defaults, as transformers does (llava-hf text_configs rely on them).
    auto positive = [&](const char* key, std::int64_t fallback) {
      std::int64_t value = hf.get<std::int64_t>(key, fallback);
      if (value <= 0) hf.fail(key, "expected a positive integer, got " + std::to_string(value));
      return value;
    };
    vocab_size = positive("vocab_size", 32000);
    hidden_size = positive("hidden_size", 4096);
    intermediate_size = positive("intermediate_size", 11008);
    num_layers = positive("num_hidden_layers", 32);
    num_heads = positive("num_attention_heads", 32);
    num_kv_heads = positive("num_key_value_heads", num_heads);
    if (num_heads % num_kv_heads != 0) {
      hf.fail("num_key_value_heads", std::to_string(num_kv_heads) + " does not divide num_attention_heads " +
                                         std::to_string(num_heads));
    }
    head_dim = positive("head_dim", hidden_size / num_heads);
    rms_norm_eps = hf.get<double>("rms_norm_eps", rms_norm_eps);
    tie_word_embeddings = hf.get<bool>("tie_word_embeddings", false);
    attention_bias = hf.get<bool>("attention_bias", false);
    mlp_bias = hf.get<bool>("mlp_bias", false);
    hidden_act = hf.get<std::string>("hidden_act", hidden_act);
    neva::check_activation(hidden_act, hf.source() + ": hidden_act");
    rope = hf.rope(head_dim);
  }
};

class DecoderLayer : public torch::nn::Module {
 public:
  explicit DecoderLayer(const LlamaConfig& config) {
    input_layernorm_ = register_module("input_layernorm", std::make_shared<neva::RMSNorm>(config.hidden_size, config.rms_norm_eps));
    self_attn_ = register_module(
        "self_attn", std::make_shared<neva::SelfAttention>(neva::AttentionConfig{
                         config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                         config.attention_bias, config.attention_bias}));
    post_attention_layernorm_ = register_module(
        "post_attention_layernorm", std::make_shared<neva::RMSNorm>(config.hidden_size, config.rms_norm_eps));
    mlp_ = register_module("mlp", std::make_shared<neva::GatedMLP>(config.hidden_size, config.intermediate_size,
                                                                   config.mlp_bias, config.hidden_act));
  }

  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                     const neva::AttentionMask& mask, neva::LayerCache* cache) {
    at::Tensor h = x + self_attn_->forward(input_layernorm_->forward(x), cos, sin, mask, cache);
    return h + mlp_->forward(post_attention_layernorm_->forward(h));
  }

 private:
  std::shared_ptr<neva::RMSNorm> input_layernorm_, post_attention_layernorm_;
  std::shared_ptr<neva::SelfAttention> self_attn_;
  std::shared_ptr<neva::GatedMLP> mlp_;
};

// transformers' LlamaModel: embed_tokens, layers, norm.
class LlamaModel : public torch::nn::Module {
 public:
  explicit LlamaModel(const LlamaConfig& config) {
    embed_tokens = register_module("embed_tokens", torch::nn::Embedding(config.vocab_size, config.hidden_size));
    layers = register_module("layers", torch::nn::ModuleList());
    for (std::int64_t i = 0; i < config.num_layers; ++i) layers->push_back(std::make_shared<DecoderLayer>(config));
    norm = register_module("norm", std::make_shared<neva::RMSNorm>(config.hidden_size, config.rms_norm_eps));
  }
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  std::shared_ptr<neva::RMSNorm> norm;
};

struct LlamaCache : neva::KVCache {
  std::vector<neva::LayerCache> layers;
  std::int64_t length = 0;
};

class LlamaBackbone : public neva::LanguageBackbone {
 public:
  LlamaBackbone(const LlamaConfig& config, const neva::RuntimeContext& context)
      : config_(config), context_(context), rotary_(config.rope) {
    model_ = register_module("model", std::make_shared<LlamaModel>(config));
    if (!config.tie_word_embeddings) {
      lm_head_ = register_module("lm_head", torch::nn::Linear(torch::nn::LinearOptions(config.hidden_size,
                                                                                       config.vocab_size).bias(false)));
    }
    to(context.device, context.dtypes.params);
    if (!config.weights.empty()) load(config.weights);
  }

  at::Tensor embed(const at::Tensor& token_ids) override {
    if (token_ids.numel() > 0) {
      auto [low, high] = at::aminmax(token_ids);
      if (low.item<std::int64_t>() < 0 || high.item<std::int64_t>() >= config_.vocab_size) {
        throw neva::Error("token id " + std::to_string(low.item<std::int64_t>() < 0 ? low.item<std::int64_t>()
                                                                                   : high.item<std::int64_t>()) +
                          " is outside the vocabulary of " + std::to_string(config_.vocab_size));
      }
    }
    return model_->embed_tokens->forward(token_ids.to(context_.device));
  }

  neva::BackboneOutputs forward(const neva::BackboneInputs& inputs) override {
    const at::Tensor& x0 = inputs.embeddings;
    if (x0.dim() != 3 || x0.size(2) != config_.hidden_size) {
      throw neva::Error("llama: embeddings have shape " + std::string(c10::str(x0.sizes())) + ", expected [batch, seq, " +
                        std::to_string(config_.hidden_size) + "]");
    }
    const std::int64_t batch = x0.size(0), seq = x0.size(1);
    auto* cache = dynamic_cast<LlamaCache*>(inputs.cache);
    if (inputs.cache && !cache) throw neva::Error("llama: the KV cache was not made by this backbone");
    const std::int64_t past = cache ? cache->length : 0;
    at::Tensor positions = inputs.positions.defined()
                               ? inputs.positions.to(context_.device)
                               : at::arange(past, past + seq, at::TensorOptions().dtype(at::kLong).device(context_.device))
                                     .expand({batch, seq});
    auto mask = neva::AttentionMask::build(batch, seq, past, inputs.attention_mask, inputs.segment_ids, 0, context_.device);
    auto [cos, sin] = rotary_.cos_sin(positions, x0.scalar_type());

    at::Tensor h = x0;
    for (std::size_t i = 0; i < model_->layers->size(); ++i) {
      h = model_->layers->ptr<DecoderLayer>(i)->forward(h, cos, sin, mask, cache ? &cache->layers[i] : nullptr);
    }
    h = model_->norm->forward(h);
    if (cache) cache->length += seq;
    at::Tensor logits = lm_head_ ? lm_head_->forward(h) : at::linear(h, model_->embed_tokens->weight);
    return {logits, {}};
  }

  std::unique_ptr<neva::KVCache> new_cache(std::int64_t batch, std::int64_t max_tokens) override {
    auto cache = std::make_unique<LlamaCache>();
    auto options = at::TensorOptions().device(context_.device).dtype(context_.dtypes.compute);
    for (std::int64_t i = 0; i < config_.num_layers; ++i) {
      cache->layers.push_back({at::empty({batch, config_.num_kv_heads, max_tokens, config_.head_dim}, options),
                               at::empty({batch, config_.num_kv_heads, max_tokens, config_.head_dim}, options)});
    }
    return cache;
  }

  std::int64_t hidden_size() const override { return config_.hidden_size; }
  std::int64_t vocab_size() const override { return config_.vocab_size; }
  std::int64_t max_position_embeddings() const override { return config_.rope.max_position_embeddings; }

 private:
  // LlamaForCausalLM names, or a llava-hf checkpoint's text model in its older or newer layout.
  void load(const std::string& directory) {
    neva::SafetensorsCheckpoint checkpoint(directory);
    const bool tied = config_.tie_word_embeddings;
    auto map = neva::detect_layout(
        checkpoint,
        {{"model.embed_tokens.weight", {{"model.", "model."}, {"lm_head.", "lm_head."}}},
         {"language_model.model.embed_tokens.weight", {{"model.", "language_model.model."}, {"lm_head.", "language_model.lm_head."}}},
         {"model.language_model.embed_tokens.weight", {{"model.", "model.language_model."}, {"lm_head.", "lm_head."}}}},
        "Llama", [tied](const std::string& name) {
          return (tied && name == "lm_head.weight") ||
                 (name.size() > 9 && name.compare(name.size() - 9, 9, ".inv_freq") == 0);
        });
    neva::load_weights(*this, checkpoint, map, "Llama language model (" + config_.config_source + ")");
  }

  LlamaConfig config_;
  neva::RuntimeContext context_;
  neva::RotaryEmbedding rotary_;
  std::shared_ptr<LlamaModel> model_;
  torch::nn::Linear lm_head_{nullptr};
};

const neva::PluginDescriptor* describe() {
  static const neva::PluginDescriptor descriptor{
      NEVA_PLUGIN_ABI_FIELDS,
      neva::LanguageBackbone::kKind,
      "llama",
      "0.1.0",
      NEVA_PLUGIN_TORCH_VERSION,
      "Llama 2 / Llama 3 decoder (transformers LlamaForCausalLM)",
      nullptr,
      &neva::parse_plugin_config<LlamaConfig>,
      &neva::create_plugin_component<LlamaConfig, LlamaBackbone>,
  };
  return &descriptor;
}

}  // namespace

NEVA_PLUGIN(describe)
