// The `clip` vision encoder: the CLIP ViT vision tower as transformers' CLIPVisionModel computes it
// (patch conv without bias, class token, learned positions, pre_layrnorm, quick_gelu encoder layers).
// Features are the hidden state vision_select_layer picks, with the class token dropped
// ("default") or kept ("full"); post_layernorm is loaded but, as in LLaVA, not applied.
//
// Recipe keys (table model.mm_cfg.vision_encoder): from_pretrained (a CLIPVisionModel, CLIPModel or
// llava-hf directory) or config (a config.json alone); vision_select_layer,
// vision_feature_select_strategy, class_token_length (docs/recipes.md).
#include <ATen/ATen.h>

#include <cmath>

#include "neva/error.h"
#include "neva/model/vision_tower.h"
#include "neva/nn/linear.h"
#include "neva/nn/norm.h"
#include "neva/plugin_abi.h"

namespace {

using Config = neva::VisionTowerConfig;

// CLIPVisionConfig's defaults.
constexpr neva::VisionTowerDefaults kClip{"CLIP", "clip_vision_model", "clip", 768, 3072, 12, 12, 224, 32, 1e-5,
                                          "quick_gelu", 1};

class ClipEmbeddings : public torch::nn::Module {
 public:
  ClipEmbeddings(const neva::RuntimeContext& context, const Config& config) {
    class_embedding = register_parameter("class_embedding", neva::nn::normal_parameter(context, {config.hidden_size}));
    patch_embedding = register_module("patch_embedding",
                                      neva::nn::conv2d(context, config.num_channels, config.hidden_size,
                                                       config.patch_size, config.patch_size, /*bias=*/false));
    position_embedding = register_module("position_embedding",
                                         neva::nn::embedding(context, config.num_patches() + 1, config.hidden_size));
  }

  at::Tensor forward(const at::Tensor& pixel_values) {
    const at::Tensor& weight = patch_embedding->weight;
    at::Tensor grid = patch_embedding->forward(pixel_values.to(weight.device(), weight.scalar_type()));
    const std::int64_t rows = grid.size(2), columns = grid.size(3);
    at::Tensor patches = grid.flatten(2).transpose(1, 2);  // [images, patches, hidden], row-major patch order
    at::Tensor cls = class_embedding.to(patches.scalar_type()).view({1, 1, -1}).expand({patches.size(0), 1, -1});
    return at::cat({cls, patches}, 1) + positions(rows, columns).to(patches.scalar_type());
  }

  // The learned positions, bicubically interpolated to another patch grid as transformers'
  // interpolate_pos_encoding does (align_corners = false); unchanged for the trained square grid.
  at::Tensor positions(std::int64_t rows, std::int64_t columns) {
    const at::Tensor& table = position_embedding->weight;
    const std::int64_t side = static_cast<std::int64_t>(std::lround(std::sqrt(static_cast<double>(table.size(0) - 1))));
    if (rows == side && columns == side) return table;
    at::Tensor grid = table.narrow(0, 1, side * side).view({1, side, side, -1}).permute({0, 3, 1, 2});
    grid = at::upsample_bicubic2d(grid, {rows, columns}, /*align_corners=*/false);
    return at::cat({table.narrow(0, 0, 1), grid.permute({0, 2, 3, 1}).reshape({rows * columns, -1})}, 0);
  }

  at::Tensor class_embedding;
  neva::nn::Conv2d patch_embedding;
  neva::nn::Embedding position_embedding;
};

class ClipTransformer : public torch::nn::Module {
 public:
  ClipTransformer(const neva::RuntimeContext& context, const Config& config) {
    auto norm = [&] { return std::make_shared<neva::LayerNorm>(context, config.hidden_size, config.layer_norm_eps); };
    embeddings = register_module("embeddings", std::make_shared<ClipEmbeddings>(context, config));
    pre_layrnorm = register_module("pre_layrnorm", norm());  // transformers' spelling
    encoder = register_module("encoder", std::make_shared<neva::EncoderStack>(context, config));
    post_layernorm = register_module("post_layernorm", norm());
  }

  std::shared_ptr<ClipEmbeddings> embeddings;
  std::shared_ptr<neva::LayerNorm> pre_layrnorm, post_layernorm;
  std::shared_ptr<neva::EncoderStack> encoder;
};

class ClipEncoder : public neva::VisionEncoder {
 public:
  ClipEncoder(const Config& config, const neva::RuntimeContext& context)
      : config_(config), hidden_state_(config.selected_hidden_state(config.num_layers)) {
    {
      neva::nn::UninitialisedParameters loaded_next(!config.weights.empty());  // load_weights fills every one
      vision_model_ = register_module("vision_model", std::make_shared<ClipTransformer>(context, config));
    }
    // What the features never pass through is held for checkpoints but not trainable.
    vision_model_->encoder->freeze_from(hidden_state_);
    for (auto& parameter : vision_model_->post_layernorm->parameters()) parameter.set_requires_grad(false);
    to(context.device, context.dtypes.params);
    if (!config.weights.empty()) {
      neva::SafetensorsCheckpoint checkpoint(config.weights);
      auto map = neva::vision_tower_weights(checkpoint, "embeddings.class_embedding", "CLIP vision tower",
                                            [](const std::string& name) { return name == "vision_model.embeddings.position_ids"; });
      neva::load_weights(*this, checkpoint, map, "CLIP vision tower (" + config.config_source + ")");
    }
  }

  at::Tensor forward(const at::Tensor& pixel_values) override {
    check_pixels(pixel_values);  // other sizes than image_size get interpolated position embeddings
    at::Tensor h = vision_model_->pre_layrnorm->forward(vision_model_->embeddings->forward(pixel_values));
    h = vision_model_->encoder->run(h, hidden_state_);  // layers after the selected one never run
    const std::int64_t dropped = config_.dropped_tokens();
    return dropped ? h.narrow(1, dropped, h.size(1) - dropped) : h;
  }

  std::int64_t hidden_size() const override { return config_.hidden_size; }
  std::int64_t image_size() const override { return config_.image_size; }
  std::int64_t num_tokens() const override { return config_.num_patches() + 1 - config_.dropped_tokens(); }
  std::int64_t num_tokens_for(std::int64_t height, std::int64_t width) const override {
    return (height / config_.patch_size) * (width / config_.patch_size) + 1 - config_.dropped_tokens();
  }
  // CLIPImageProcessor: shortest edge to the input size, centre crop, OpenAI CLIP mean and std.
  neva::ImageProcessorConfig image_processor() const override {
    neva::ImageProcessorConfig processor;
    processor.size = processor.crop_size = static_cast<int>(config_.image_size);
    return processor;
  }

 private:
  void check_pixels(const at::Tensor& pixels) const {
    if (pixels.dim() != 4 || pixels.size(1) != config_.num_channels || pixels.size(2) < config_.patch_size ||
        pixels.size(3) < config_.patch_size) {
      throw neva::Error("clip: pixel_values have shape " + std::string(c10::str(pixels.sizes())) + ", expected [images, " +
                        std::to_string(config_.num_channels) + ", height, width] with height and width at least the " +
                        "patch size " + std::to_string(config_.patch_size) + " (trained on " +
                        std::to_string(config_.image_size) + "x" + std::to_string(config_.image_size) + ")");
    }
  }

  Config config_;
  std::int64_t hidden_state_;
  std::shared_ptr<ClipTransformer> vision_model_;
};

neva::ComponentConfig* parse(const char*, const neva::ConfigSection& section) {
  auto config = std::make_unique<Config>();
  neva::parse_vision_tower(section, kClip, *config);
  return config.release();
}

const neva::PluginDescriptor* describe() {
  static const neva::PluginDescriptor descriptor{
      NEVA_PLUGIN_ABI_FIELDS,       neva::VisionEncoder::kKind, "clip", "0.1.0", NEVA_PLUGIN_TORCH_VERSION,
      "CLIP ViT vision tower (transformers CLIPVisionModel)", nullptr, &parse,
      &neva::create_plugin_component<Config, ClipEncoder>,
  };
  return &descriptor;
}

}  // namespace

NEVA_PLUGIN(describe)
