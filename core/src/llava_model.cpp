#include "neva/llava_model.h"

#include <ATen/ATen.h>

#include "neva/error.h"

namespace neva {

LlavaModel::LlavaModel(std::shared_ptr<VisionEncoder> encoder, std::shared_ptr<Connector> connector,
                       std::shared_ptr<LanguageBackbone> backbone, std::int64_t image_token_id)
    : encoder_(std::move(encoder)), connector_(std::move(connector)), backbone_(std::move(backbone)),
      image_token_id_(image_token_id) {
  if (!backbone_) throw Error("a LLaVA model needs a language backbone");
  if (!encoder_ != !connector_) throw Error("a LLaVA model needs both a vision encoder and a connector, or neither");
  if (encoder_ && connector_->input_size() != encoder_->hidden_size()) {
    throw Error("connector input size " + std::to_string(connector_->input_size()) + " differs from the vision encoder's " +
                "hidden size " + std::to_string(encoder_->hidden_size()));
  }
  if (connector_ && connector_->output_size() != backbone_->hidden_size()) {
    throw Error("connector output size " + std::to_string(connector_->output_size()) + " differs from the language " +
                "model's hidden size " + std::to_string(backbone_->hidden_size()));
  }
}

std::int64_t LlavaModel::tokens_per_image() const {
  return encoder_ ? connector_->output_tokens(encoder_->num_tokens()) : 0;
}

at::Tensor LlavaModel::image_features(const at::Tensor& pixel_values) {
  if (!encoder_) throw Error("this model has no vision encoder, but images were given");
  return connector_->forward(encoder_->forward(pixel_values));
}

at::Tensor LlavaModel::embed(const at::Tensor& input_ids, const at::Tensor& pixel_values) {
  at::Tensor placeholders = input_ids == image_token_id_;
  const std::int64_t count = placeholders.sum().item<std::int64_t>();
  const std::int64_t images = pixel_values.defined() ? pixel_values.size(0) : 0;
  if (count != images * tokens_per_image()) {
    throw Error("image tokens and images do not match: the text holds " + std::to_string(count) +
                " image placeholder tokens (id " + std::to_string(image_token_id_) + "), but " + std::to_string(images) +
                " image(s) of " + std::to_string(tokens_per_image()) + " tokens each need " +
                std::to_string(images * tokens_per_image()));
  }
  // The placeholder's own embedding is discarded, so its id need not be inside the vocabulary.
  at::Tensor embeddings = backbone_->embed(at::where(placeholders, at::zeros_like(input_ids), input_ids));
  if (images == 0) return embeddings;
  at::Tensor features = image_features(pixel_values).to(embeddings.scalar_type());
  return embeddings.masked_scatter(placeholders.unsqueeze(-1).to(embeddings.device()), features);
}

BackboneOutputs LlavaModel::forward(const MultimodalInputs& inputs) {
  BackboneInputs backbone_inputs;
  backbone_inputs.embeddings = embed(inputs.input_ids, inputs.pixel_values);
  backbone_inputs.attention_mask = inputs.attention_mask;
  backbone_inputs.positions = inputs.positions;
  backbone_inputs.segment_ids = inputs.segment_ids;
  backbone_inputs.cache = inputs.cache;
  return backbone_->forward(backbone_inputs);
}

}  // namespace neva
