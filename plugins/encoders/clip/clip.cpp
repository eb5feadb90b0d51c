// The `clip` vision encoder: the CLIP ViT vision tower as transformers' CLIPVisionModel computes it
// (patch conv without bias, class token, learned positions, pre_layrnorm, quick_gelu encoder layers).
// Features are the hidden state vision_select_layer picks, with the class token dropped
// ("default") or kept ("full"); post_layernorm is loaded but, as in LLaVA, not applied.
//
// Recipe keys (table model.mm_cfg.vision_encoder):
//   from_pretrained  a Hugging Face directory: CLIPVisionModel, a full CLIPModel, or a llava-hf
//                    LlavaForConditionalGeneration (its vision tower, in either key layout)
//   config           a config.json alone: the same architecture, randomly initialised (debug flavour)
//   vision_select_layer, vision_feature_select_strategy, class_token_length (see docs/recipes.md);
//   for a llava-hf directory they default to its vision_feature_layer / vision_feature_select_strategy.
#include <ATen/ATen.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/normalization.h>

#include "neva/error.h"
#include "neva/hf_config.h"
#include "neva/nn/encoder_layer.h"
#include "neva/nn/mlp.h"
#include "neva/plugin_abi.h"
#include "neva/safetensors.h"
#include "neva/vision_encoder.h"
#include "neva/weights.h"

namespace {

struct ClipConfig : neva::VisionEncoderConfig {
  std::string config_source;
  std::string weights;  // "" = random initialisation
  std::int64_t intermediate_size = 3072, num_layers = 12, num_heads = 12;  // hidden_size: in the base
  std::int64_t num_channels = 3, image_size = 224, patch_size = 32;
  double layer_norm_eps = 1e-5;
  std::string hidden_act = "quick_gelu";

  std::int64_t num_patches() const { return (image_size / patch_size) * (image_size / patch_size); }

  static ClipConfig parse(const char*, const neva::ConfigSection& section) {
    ClipConfig config;
    auto pretrained = section.path_value("from_pretrained");
    auto config_file = section.path_value("config");
    if (pretrained && config_file) section.fail("config", "give from_pretrained or config, not both");
    if (!pretrained && !config_file) {
      section.fail("from_pretrained", "missing: a Hugging Face CLIP or llava-hf directory (or `config`, a "
                                      "config.json for a randomly initialised tower)");
    }
    const std::string key = pretrained ? "from_pretrained" : "config";
    neva::VisionEncoderConfig defaults;
    try {
      defaults = config.read(neva::HfConfig::load(pretrained ? *pretrained : *config_file));
    } catch (const neva::Error& error) {
      section.fail(key, error.what());
    }
    config.read_common(section, defaults);
    try {
      config.selected_hidden_state(config.num_layers);
    } catch (const neva::Error& error) {
      section.fail("vision_select_layer", error.what());
    }
    if (pretrained) config.weights = *pretrained;
    return config;
  }

  // Reads the tower's settings; returns the shared-key defaults this file implies.
  neva::VisionEncoderConfig read(const neva::HfConfig& file) {
    neva::VisionEncoderConfig defaults;  // LLaVA's: layer -2, drop the class token
    std::string file_type = file.get<std::string>("model_type", "clip_vision_model");
    neva::HfConfig hf = file;
    if (file_type == "llava") {
      hf = file.child("vision_config");
      if (file.has("vision_feature_layer")) defaults.vision_select_layer = file.require<std::int64_t>("vision_feature_layer");
      defaults.vision_feature_select_strategy = file.get<std::string>("vision_feature_select_strategy", "default");
    } else if (file_type == "clip") {
      hf = file.child("vision_config");
    } else if (file_type != "clip_vision_model") {
      file.fail("model_type", "expected \"clip_vision_model\", \"clip\" or \"llava\", got \"" + file_type + "\"");
    }
    config_source = hf.source();
    std::string model_type = hf.get<std::string>("model_type", "clip_vision_model");
    if (model_type != "clip_vision_model") hf.fail("model_type", "expected a CLIP vision config, got \"" + model_type + "\"");
    // Missing keys take CLIPVisionConfig's defaults, as transformers does.
    auto positive = [&](const char* key, std::int64_t fallback) {
      std::int64_t value = hf.get<std::int64_t>(key, fallback);
      if (value <= 0) hf.fail(key, "expected a positive integer, got " + std::to_string(value));
      return value;
    };
    hidden_size = positive("hidden_size", 768);
    intermediate_size = positive("intermediate_size", intermediate_size);
    num_layers = positive("num_hidden_layers", num_layers);
    num_heads = positive("num_attention_heads", num_heads);
    num_channels = positive("num_channels", num_channels);
    image_size = positive("image_size", image_size);
    patch_size = positive("patch_size", patch_size);
    if (hidden_size % num_heads != 0) hf.fail("num_attention_heads", "does not divide hidden_size");
    if (image_size % patch_size != 0) hf.fail("patch_size", "does not divide image_size");
    layer_norm_eps = hf.get<double>("layer_norm_eps", layer_norm_eps);
    hidden_act = hf.get<std::string>("hidden_act", hidden_act);
    neva::check_activation(hidden_act, hf.source() + ": hidden_act");
    return defaults;
  }
};

class ClipEmbeddings : public torch::nn::Module {
 public:
  explicit ClipEmbeddings(const ClipConfig& config) {
    class_embedding = register_parameter("class_embedding", at::randn({config.hidden_size}));
    patch_embedding = register_module(
        "patch_embedding", torch::nn::Conv2d(torch::nn::Conv2dOptions(config.num_channels, config.hidden_size,
                                                                      config.patch_size)
                                                 .stride(config.patch_size)
                                                 .bias(false)));
    position_embedding = register_module("position_embedding",
                                         torch::nn::Embedding(config.num_patches() + 1, config.hidden_size));
  }

  at::Tensor forward(const at::Tensor& pixel_values) {
    const at::Tensor& weight = patch_embedding->weight;
    at::Tensor patches = patch_embedding->forward(pixel_values.to(weight.device(), weight.scalar_type()));
    patches = patches.flatten(2).transpose(1, 2);  // [images, patches, hidden], row-major patch order
    at::Tensor cls = class_embedding.to(patches.scalar_type()).view({1, 1, -1}).expand({patches.size(0), 1, -1});
    return at::cat({cls, patches}, 1) + position_embedding->weight.to(patches.scalar_type());
  }

  at::Tensor class_embedding;
  torch::nn::Conv2d patch_embedding{nullptr};
  torch::nn::Embedding position_embedding{nullptr};
};

class ClipTransformer : public torch::nn::Module {
 public:
  explicit ClipTransformer(const ClipConfig& config) {
    auto norm = [&] { return torch::nn::LayerNorm(torch::nn::LayerNormOptions({config.hidden_size}).eps(config.layer_norm_eps)); };
    embeddings = register_module("embeddings", std::make_shared<ClipEmbeddings>(config));
    pre_layrnorm = register_module("pre_layrnorm", norm());  // transformers' spelling
    auto encoder = register_module("encoder", std::make_shared<torch::nn::Module>());
    layers = encoder->register_module("layers", torch::nn::ModuleList());
    neva::EncoderLayerConfig layer{config.hidden_size, config.intermediate_size, config.num_heads,
                                   config.layer_norm_eps, config.hidden_act};
    for (std::int64_t i = 0; i < config.num_layers; ++i) layers->push_back(std::make_shared<neva::EncoderLayer>(layer));
    post_layernorm = register_module("post_layernorm", norm());
  }

  std::shared_ptr<ClipEmbeddings> embeddings;
  torch::nn::LayerNorm pre_layrnorm{nullptr}, post_layernorm{nullptr};
  torch::nn::ModuleList layers{nullptr};
};

class ClipEncoder : public neva::VisionEncoder {
 public:
  ClipEncoder(const ClipConfig& config, const neva::RuntimeContext& context)
      : config_(config), hidden_state_(config.selected_hidden_state(config.num_layers)) {
    vision_model_ = register_module("vision_model", std::make_shared<ClipTransformer>(config));
    to(context.device, context.dtypes.params);
    if (!config.weights.empty()) load(config.weights);
  }

  at::Tensor forward(const at::Tensor& pixel_values) override {
    if (pixel_values.dim() != 4 || pixel_values.size(1) != config_.num_channels ||
        pixel_values.size(2) != config_.image_size || pixel_values.size(3) != config_.image_size) {
      throw neva::Error("clip: pixel_values have shape " + std::string(c10::str(pixel_values.sizes())) +
                        ", expected [images, " + std::to_string(config_.num_channels) + ", " +
                        std::to_string(config_.image_size) + ", " + std::to_string(config_.image_size) + "]");
    }
    at::Tensor h = vision_model_->pre_layrnorm->forward(vision_model_->embeddings->forward(pixel_values));
    // Hidden state i is the output of layer i: the layers after the selected one never run.
    for (std::int64_t i = 0; i < hidden_state_; ++i) h = vision_model_->layers->ptr<neva::EncoderLayer>(i)->forward(h);
    return dropped() ? h.narrow(1, dropped(), h.size(1) - dropped()) : h;
  }

  std::int64_t hidden_size() const override { return config_.hidden_size; }
  std::int64_t image_size() const override { return config_.image_size; }
  std::int64_t num_tokens() const override { return config_.num_patches() + 1 - dropped(); }
  // CLIPImageProcessor: shortest edge to the input size, centre crop, OpenAI CLIP mean and std.
  neva::ImageProcessorConfig image_processor() const override {
    neva::ImageProcessorConfig processor;
    processor.size = processor.crop_size = static_cast<int>(config_.image_size);
    return processor;
  }

 private:
  std::int64_t dropped() const {
    return config_.vision_feature_select_strategy == "default" ? config_.class_token_length : 0;
  }

  void load(const std::string& directory) {
    neva::SafetensorsCheckpoint checkpoint(directory);
    // CLIPModel / CLIPVisionModel (4.x); llava-hf hub files, transformers 4.52+ nesting, and what
    // transformers 5 writes (towers without the vision_model. level); a bare CLIPVisionModel (5.x).
    std::vector<neva::WeightLayout> layouts;
    for (const char* prefix : {"vision_model.", "vision_tower.vision_model.", "model.vision_tower.vision_model.",
                               "vision_tower.", "model.vision_tower.", ""}) {
      layouts.push_back({std::string(prefix) + "embeddings.class_embedding", {{"vision_model.", prefix}}});
    }
    auto map = neva::detect_layout(checkpoint, layouts, "CLIP vision tower", [](const std::string& name) {
      return name == "vision_model.embeddings.position_ids";
    });
    neva::load_weights(*this, checkpoint, map, "CLIP vision tower (" + config_.config_source + ")");
  }

  ClipConfig config_;
  std::int64_t hidden_state_;
  std::shared_ptr<ClipTransformer> vision_model_;
};

const neva::PluginDescriptor* describe() {
  static const neva::PluginDescriptor descriptor{
      NEVA_PLUGIN_ABI_FIELDS,
      neva::VisionEncoder::kKind,
      "clip",
      "0.1.0",
      NEVA_PLUGIN_TORCH_VERSION,
      "CLIP ViT vision tower (transformers CLIPVisionModel)",
      nullptr,
      &neva::parse_plugin_config<ClipConfig>,
      &neva::create_plugin_component<ClipConfig, ClipEncoder>,
  };
  return &descriptor;
}

}  // namespace

NEVA_PLUGIN(describe)
