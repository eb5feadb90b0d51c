#pragma once
// What ViT-style vision towers (CLIP, SigLIP) share: their config.json settings, the recipe keys
// that say where they come from, the stack of encoder layers that runs only up to the selected
// hidden state, and the checkpoint layouts they are found in.
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>

#include <functional>
#include <string>

#include "neva/config.h"
#include "neva/context.h"
#include "neva/io/hf_config.h"
#include "neva/io/safetensors.h"
#include "neva/vision_encoder.h"
#include "neva/io/weights.h"

namespace neva {

struct NEVA_API VisionTowerConfig : VisionEncoderConfig {
  std::string architecture;   // "CLIP", "SigLIP": for messages
  std::string config_source;  // the config.json read
  std::string weights;        // "" = random initialisation
  std::int64_t intermediate_size = 0, num_layers = 0, num_heads = 0;  // hidden_size: in the base
  std::int64_t num_channels = 3, image_size = 0, patch_size = 0;
  double layer_norm_eps = 1e-5;
  std::string hidden_act;
  bool use_head = false;  // SigLIP's attention-pooling head present in the checkpoint
  // A "valid" convolution: a partial last patch is dropped (so400m: 384 / 14 -> 27 x 27).
  std::int64_t num_patches() const { return (image_size / patch_size) * (image_size / patch_size); }
  ~VisionTowerConfig() override;
};

// The architecture's transformers defaults and model_type names.
struct VisionTowerDefaults {
  const char* architecture;
  const char* tower_model_type;  // "clip_vision_model"
  const char* full_model_type;   // "clip": a whole dual-encoder model with a vision_config
  std::int64_t hidden_size, intermediate_size, num_layers, num_heads, image_size, patch_size;
  double layer_norm_eps;
  const char* hidden_act;
  std::int64_t class_token_length;
};

// Reads from_pretrained / config (a tower config.json, a full model's vision_config, or a llava-hf
// config's vision_config, whose vision_feature_layer / select strategy become the defaults) and the
// shared keys (vision_select_layer, vision_feature_select_strategy, class_token_length).
NEVA_API void parse_vision_tower(const ConfigSection& section, const VisionTowerDefaults& defaults,
                                 VisionTowerConfig& config);

// encoder.layers.N: EncoderLayer stack.
class NEVA_API EncoderStack : public torch::nn::Module {
 public:
  EncoderStack(const RuntimeContext& context, const VisionTowerConfig& config);
  // The output of layer `count` (0: the input itself).
  at::Tensor run(at::Tensor hidden, std::int64_t count);
  // Layers from `count` on never run: they are loaded (checkpoints hold them) but not trainable.
  void freeze_from(std::int64_t count);

 private:
  torch::nn::ModuleList layers_{nullptr};
};

// Where a tower registered as "vision_model" finds its tensors: under vision_model. (4.x towers and
// dual encoders), vision_tower.vision_model. (llava-hf hub files), model.vision_tower.vision_model.
// (4.52+ nesting), vision_tower. and model.vision_tower. (as transformers 5 writes llava), or bare
// (a tower saved by transformers 5). `probe` is a tensor name inside the tower, e.g.
// "embeddings.patch_embedding.weight".
NEVA_API WeightMap vision_tower_weights(const SafetensorsCheckpoint& checkpoint, const std::string& probe,
                                        const std::string& what, std::function<bool(const std::string&)> may_ignore);

}  // namespace neva
