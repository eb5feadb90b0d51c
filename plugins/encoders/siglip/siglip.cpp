// The `siglip` vision encoder: transformers' SiglipVisionModel — patch conv with bias, no class
// token, learned positions, tanh-approximate GELU encoder layers, post_layernorm over the whole last
// hidden state. Features are the hidden state vision_select_layer picks (hidden states carry no
// post_layernorm); the attention-pooling head is loaded when the checkpoint has it but never used.
// Images are resized straight to the square input size, mean = std = 0.5.
//
// Recipe keys (table model.mm_cfg.vision_encoder): from_pretrained (a SiglipVisionModel, SiglipModel
// or llava-hf directory) or config; vision_select_layer, vision_feature_select_strategy,
// class_token_length (0: SigLIP has no class token).
#include <ATen/ATen.h>

#include "neva/error.h"
#include "neva/nn/encoder_layer.h"
#include "neva/nn/linear.h"
#include "neva/nn/norm.h"
#include "neva/model/vision_tower.h"
#include "neva/plugin_abi.h"

namespace {

using Config = neva::VisionTowerConfig;

// SiglipVisionConfig's defaults.
constexpr neva::VisionTowerDefaults kSiglip{"SigLIP", "siglip_vision_model", "siglip", 768, 3072, 12, 12, 224, 16, 1e-6,
                                            "gelu_pytorch_tanh", 0};

class SiglipEmbeddings : public torch::nn::Module {
 public:
  SiglipEmbeddings(const neva::RuntimeContext& context, const Config& config) {
    patch_embedding = register_module("patch_embedding", neva::nn::conv2d(context, config.num_channels, config.hidden_size,
                                                                          config.patch_size, config.patch_size));
    position_embedding = register_module("position_embedding",
                                         neva::nn::embedding(context, config.num_patches(), config.hidden_size));
  }

  at::Tensor forward(const at::Tensor& pixel_values) {
    const at::Tensor& weight = patch_embedding->weight;
    at::Tensor patches = patch_embedding->forward(pixel_values.to(weight.device(), weight.scalar_type()));
    return patches.flatten(2).transpose(1, 2) + position_embedding->weight.to(patches.scalar_type());
  }

  neva::nn::Conv2d patch_embedding;
  neva::nn::Embedding position_embedding;
};

// SiglipMultiheadAttentionPoolingHead's parameters (probe, attention.in_proj_*, attention.out_proj,
// layernorm, mlp): held so checkpoints load strictly; LLaVA-style models never use the head.
class SiglipHead : public torch::nn::Module {
 public:
  SiglipHead(const neva::RuntimeContext& context, const Config& config) {
    const std::int64_t d = config.hidden_size;
    register_parameter("probe", at::zeros({1, 1, d}));
    auto attention = register_module("attention", std::make_shared<torch::nn::Module>());
    attention->register_parameter("in_proj_weight", at::zeros({3 * d, d}));
    attention->register_parameter("in_proj_bias", at::zeros({3 * d}));
    attention->register_module("out_proj", neva::nn::linear(context, d, d));
    register_module("layernorm", std::make_shared<neva::LayerNorm>(context, d, config.layer_norm_eps));
    register_module("mlp", std::make_shared<neva::EncoderMLP>(context, d, config.intermediate_size, config.hidden_act));
  }
};

class SiglipTransformer : public torch::nn::Module {
 public:
  SiglipTransformer(const neva::RuntimeContext& context, const Config& config) {
    embeddings = register_module("embeddings", std::make_shared<SiglipEmbeddings>(context, config));
    encoder = register_module("encoder", std::make_shared<neva::EncoderStack>(context, config));
    auto post = register_module("post_layernorm",
                                std::make_shared<neva::LayerNorm>(context, config.hidden_size, config.layer_norm_eps));
    std::shared_ptr<torch::nn::Module> head;
    if (config.use_head) head = register_module("head", std::make_shared<SiglipHead>(context, config));
    // Held for checkpoints; LLaVA features never pass through them, so they are not trainable.
    for (auto& parameter : post->parameters()) parameter.set_requires_grad(false);
    if (head) {
      for (auto& parameter : head->parameters()) parameter.set_requires_grad(false);
    }
  }

  std::shared_ptr<SiglipEmbeddings> embeddings;
  std::shared_ptr<neva::EncoderStack> encoder;
};

class SiglipEncoder : public neva::VisionEncoder {
 public:
  SiglipEncoder(const Config& config, const neva::RuntimeContext& context)
      : config_(config), hidden_state_(config.selected_hidden_state(config.num_layers)) {
    {
      neva::nn::UninitialisedParameters loaded_next(!config.weights.empty());  // load_weights fills every one
      vision_model_ = register_module("vision_model", std::make_shared<SiglipTransformer>(context, config));
    }
    vision_model_->encoder->freeze_from(hidden_state_);
    to(context.device, context.dtypes.params);
    if (!config.weights.empty()) {
      neva::SafetensorsCheckpoint checkpoint(config.weights);
      auto map = neva::vision_tower_weights(checkpoint, "embeddings.patch_embedding.bias", "SigLIP vision tower", nullptr);
      neva::load_weights(*this, checkpoint, map, "SigLIP vision tower (" + config.config_source + ")");
    }
  }

  at::Tensor forward(const at::Tensor& pixel_values) override {
    if (pixel_values.dim() != 4 || pixel_values.size(1) != config_.num_channels ||
        pixel_values.size(2) != config_.image_size || pixel_values.size(3) != config_.image_size) {
      throw neva::Error("siglip: pixel_values have shape " + std::string(c10::str(pixel_values.sizes())) +
                        ", expected [images, " + std::to_string(config_.num_channels) + ", " +
                        std::to_string(config_.image_size) + ", " + std::to_string(config_.image_size) + "]");
    }
    at::Tensor h = vision_model_->encoder->run(vision_model_->embeddings->forward(pixel_values), hidden_state_);
    const std::int64_t dropped = config_.dropped_tokens();
    return dropped ? h.narrow(1, dropped, h.size(1) - dropped) : h;
  }

  std::int64_t hidden_size() const override { return config_.hidden_size; }
  std::int64_t image_size() const override { return config_.image_size; }
  std::int64_t num_tokens() const override { return config_.num_patches() - config_.dropped_tokens(); }
  // SiglipImageProcessor: resize straight to the square input size, mean = std = 0.5.
  neva::ImageProcessorConfig image_processor() const override {
    neva::ImageProcessorConfig processor;
    processor.resize = neva::ImageProcessorConfig::Resize::Exact;
    processor.size = processor.crop_size = static_cast<int>(config_.image_size);
    processor.mean = {0.5f, 0.5f, 0.5f};
    processor.std = {0.5f, 0.5f, 0.5f};
    return processor;
  }

 private:

  Config config_;
  std::int64_t hidden_state_;
  std::shared_ptr<SiglipTransformer> vision_model_;
};

neva::ComponentConfig* parse(const char*, const neva::ConfigSection& section) {
  auto config = std::make_unique<Config>();
  neva::parse_vision_tower(section, kSiglip, *config);
  return config.release();
}

const neva::PluginDescriptor* describe() {
  static const neva::PluginDescriptor descriptor{
      NEVA_PLUGIN_ABI_FIELDS,       neva::VisionEncoder::kKind, "siglip", "0.1.0", NEVA_PLUGIN_TORCH_VERSION,
      "SigLIP vision tower (transformers SiglipVisionModel)", nullptr, &parse,
      &neva::create_plugin_component<Config, SiglipEncoder>,
  };
  return &descriptor;
}

}  // namespace

NEVA_PLUGIN(describe)
