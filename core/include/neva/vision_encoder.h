#pragma once
#include <torch/nn/module.h>

#include <cstdint>
#include <string>

#include "neva/component.h"
#include "neva/config.h"
#include "neva/data/image.h"

namespace neva {

// The vision_encoder keys every encoder shares (NeMo's and transformers' names).
struct NEVA_API VisionEncoderConfig : ComponentConfig {
  // Which hidden state feeds the connector: 0 is the embeddings, i the output of layer i, negative
  // values count from the end (-1 the last layer, -2 the one before: LLaVA's choice).
  std::int64_t vision_select_layer = -2;
  // "default" drops the leading class tokens from the features, "full" keeps them
  // (transformers' vision_feature_select_strategy).
  std::string vision_feature_select_strategy = "default";
  // How many leading class tokens the encoder emits (CLIP 1, SigLIP 0), i.e. how many "default" drops.
  std::int64_t class_token_length = 1;
  // Filled by the plugin when it parses its config: the feature width the connector receives.
  std::int64_t hidden_size = 0;
  ~VisionEncoderConfig() override;

  // How many leading tokens the features drop: the class tokens under "default", none under "full".
  // (transformers' "default" always drops one; a llava-hf config is read as class_token_length = 1.)
  std::int64_t dropped_tokens() const { return vision_feature_select_strategy == "default" ? class_token_length : 0; }

  // Reads the shared keys; `defaults` holds the encoder's own defaults (e.g. from a llava config.json).
  void read_common(const ConfigSection& section, const VisionEncoderConfig& defaults);
  // The hidden-state index vision_select_layer selects in an encoder of `num_layers` layers; throws
  // when it is out of range.
  std::int64_t selected_hidden_state(std::int64_t num_layers) const;
};

// Turns preprocessed images into a sequence of feature vectors per image (CLIP, SigLIP, ...).
class NEVA_API VisionEncoder : public torch::nn::Module, public Component {
 public:
  static constexpr const char* kKind = "vision_encoder";
  ~VisionEncoder() override;

  // pixel_values [images, 3, image_size, image_size] -> [images, num_tokens(), hidden_size()]
  virtual at::Tensor forward(const at::Tensor& pixel_values) = 0;
  virtual std::int64_t hidden_size() const = 0;
  virtual std::int64_t image_size() const = 0;
  virtual std::int64_t num_tokens() const = 0;
  // Tokens for an image of another size, for encoders that interpolate their position embeddings
  // (image_aspect_ratio "keep"); others accept only image_size x image_size.
  virtual std::int64_t num_tokens_for(std::int64_t height, std::int64_t width) const { return num_tokens(); }
  // How images must be prepared for this encoder (resize, crop, mean, std).
  virtual ImageProcessorConfig image_processor() const = 0;
};

}  // namespace neva
