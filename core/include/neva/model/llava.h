#pragma once
// A NeVA / LLaVA model: vision encoder -> connector -> language backbone, composed from plugins.
// Image features replace the image placeholder tokens of the text in order (images in order,
// tokens within an image row-major), exactly as transformers' LlavaForConditionalGeneration does.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "neva/connector.h"
#include "neva/api.h"
#include "neva/language_backbone.h"
#include "neva/vision_encoder.h"

namespace neva {

struct MultimodalInputs {
  at::Tensor input_ids;       // [batch, seq] int64, with image_token_id placeholders
  at::Tensor pixel_values;    // optional [images, 3, H, W], in placeholder order across the batch
  std::vector<at::Tensor> images;  // or images of different sizes, [3, H, W] each (aspect ratio "keep")
  at::Tensor attention_mask;  // optional [batch, past + seq]
  at::Tensor positions;       // optional [batch, seq]
  at::Tensor segment_ids;     // optional [batch, seq] (packing)
  KVCache* cache = nullptr;
  at::Tensor logits_mask;     // optional [batch, seq] bool: logits only there (BackboneInputs::logits_mask)
  bool vocab_parallel_logits = false;  // BackboneInputs::vocab_parallel_logits
};

class NEVA_API LlavaModel {
 public:
  // `encoder` and `connector` may be null for a text-only model.
  LlavaModel(std::shared_ptr<VisionEncoder> encoder, std::shared_ptr<Connector> connector,
             std::shared_ptr<LanguageBackbone> backbone, std::int64_t image_token_id);

  // Token embeddings with the projected image features written over the placeholders. Throws when
  // the number of placeholders is not the images' token count.
  at::Tensor embed(const at::Tensor& input_ids, const std::vector<at::Tensor>& images);
  // All images' features, one after the other: [total tokens, backbone hidden].
  at::Tensor image_features(const std::vector<at::Tensor>& images);
  // Tokens an image of this size becomes (the encoder's count, through the connector).
  std::int64_t tokens_for_image(std::int64_t height, std::int64_t width) const;
  BackboneOutputs forward(const MultimodalInputs& inputs);

  std::int64_t image_token_id() const { return image_token_id_; }
  std::int64_t tokens_per_image() const;
  VisionEncoder* encoder() const { return encoder_.get(); }
  Connector* connector() const { return connector_.get(); }
  LanguageBackbone& backbone() const { return *backbone_; }

 private:
  std::shared_ptr<VisionEncoder> encoder_;
  std::shared_ptr<Connector> connector_;
  std::shared_ptr<LanguageBackbone> backbone_;
  std::int64_t image_token_id_;
  // Where the weights live (the plugins build them on the context's device): inputs built on the
  // CPU are moved there by forward. Found once here, not by walking the parameters every call.
  at::Device device_ = at::kCPU;
};

}  // namespace neva
