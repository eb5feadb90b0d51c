#pragma once
#include <torch/nn/module.h>

#include <cstdint>

#include "neva/component.h"

namespace neva {

// NeVA's vision_encoder keys shared by every encoder; the host fills them from the recipe.
struct NEVA_API VisionEncoderConfig : ComponentConfig {
  std::int64_t vision_select_layer = -2;  // hidden layer whose output feeds the connector
  std::int64_t class_token_length = 1;    // leading class tokens dropped from the features
  ~VisionEncoderConfig() override;
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
};

}  // namespace neva
