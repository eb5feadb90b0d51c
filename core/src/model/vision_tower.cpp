#include "neva/model/vision_tower.h"

#include "neva/error.h"
#include "neva/nn/encoder_layer.h"
#include "neva/nn/mlp.h"

namespace neva {

VisionTowerConfig::~VisionTowerConfig() = default;

void parse_vision_tower(const ConfigSection& section, const VisionTowerDefaults& defaults, VisionTowerConfig& config) {
  HfSource source = read_hf_source(section, "vision_config");
  VisionEncoderConfig shared;  // LLaVA's defaults: layer -2, drop the class tokens
  shared.class_token_length = defaults.class_token_length;
  try {
    std::string file_type = source.file.get<std::string>("model_type", defaults.tower_model_type);
    HfConfig hf = source.config;
    if (file_type == "llava") {
      if (source.file.has("vision_feature_layer")) {
        shared.vision_select_layer = source.file.require<std::int64_t>("vision_feature_layer");
      }
      shared.vision_feature_select_strategy = source.file.get<std::string>("vision_feature_select_strategy", "default");
      // transformers' "default" drops exactly one leading token whatever the tower: with SigLIP (no
      // class token) that is the first patch, and a llava-hf checkpoint saying so is read that way.
      if (shared.vision_feature_select_strategy == "default") shared.class_token_length = 1;
    } else if (file_type == defaults.full_model_type) {
      hf = source.file.child("vision_config");
    } else if (file_type != defaults.tower_model_type) {
      source.file.fail("model_type", std::string("expected \"") + defaults.tower_model_type + "\", \"" +
                                         defaults.full_model_type + "\" or \"llava\", got \"" + file_type + "\"");
    }
    std::string model_type = hf.get<std::string>("model_type", defaults.tower_model_type);
    if (model_type != defaults.tower_model_type) {
      hf.fail("model_type", std::string("expected a ") + defaults.architecture + " vision config, got \"" + model_type + "\"");
    }
    config.architecture = defaults.architecture;
    config.config_source = hf.source();
    config.hidden_size = hf.positive("hidden_size", defaults.hidden_size);
    config.intermediate_size = hf.positive("intermediate_size", defaults.intermediate_size);
    config.num_layers = hf.positive("num_hidden_layers", defaults.num_layers);
    config.num_heads = hf.positive("num_attention_heads", defaults.num_heads);
    config.num_channels = hf.positive("num_channels", 3);
    config.image_size = hf.positive("image_size", defaults.image_size);
    config.patch_size = hf.positive("patch_size", defaults.patch_size);
    if (config.hidden_size % config.num_heads != 0) hf.fail("num_attention_heads", "does not divide hidden_size");
    if (config.patch_size > config.image_size) {
      hf.fail("patch_size", "expected at most image_size (" + std::to_string(config.image_size) + "), got " +
                                std::to_string(config.patch_size) + ": the image would have no patch");
    }
    config.layer_norm_eps = hf.get<double>("layer_norm_eps", defaults.layer_norm_eps);
    config.hidden_act = hf.get<std::string>("hidden_act", defaults.hidden_act);
    check_activation(config.hidden_act, hf.source() + ": hidden_act");
    config.use_head = hf.get<bool>("vision_use_head", true);
  } catch (const Error& error) {
    section.fail(source.key, error.what());
  }
  config.read_common(section, shared);
  try {
    config.selected_hidden_state(config.num_layers);
  } catch (const Error& error) {
    section.fail("vision_select_layer", error.what());
  }
  config.weights = source.weights;
}

EncoderStack::EncoderStack(const RuntimeContext& context, const VisionTowerConfig& config) {
  layers_ = register_module("layers", torch::nn::ModuleList());
  EncoderLayerConfig layer{config.hidden_size, config.intermediate_size, config.num_heads, config.layer_norm_eps,
                           config.hidden_act};
  for (std::int64_t i = 0; i < config.num_layers; ++i) layers_->push_back(std::make_shared<EncoderLayer>(context, layer));
}

at::Tensor EncoderStack::run(at::Tensor hidden, std::int64_t count) {
  for (std::int64_t i = 0; i < count; ++i) hidden = layers_->ptr<EncoderLayer>(i)->forward(hidden);
  return hidden;
}

void EncoderStack::freeze_from(std::int64_t count) {
  for (std::int64_t i = count; i < static_cast<std::int64_t>(layers_->size()); ++i) {
    for (auto& parameter : layers_[i]->parameters()) parameter.set_requires_grad(false);
  }
}

WeightMap vision_tower_weights(const SafetensorsCheckpoint& checkpoint, const std::string& probe, const std::string& what,
                               std::function<bool(const std::string&)> may_ignore) {
  std::vector<WeightLayout> layouts;
  for (const char* prefix : {"vision_model.", "vision_tower.vision_model.", "model.vision_tower.vision_model.",
                             "vision_tower.", "model.vision_tower.", ""}) {
    layouts.push_back({std::string(prefix) + probe, {{"vision_model.", prefix}}});
  }
  return detect_layout(checkpoint, layouts, what, std::move(may_ignore));
}

}  // namespace neva
