#include "neva/model/llava.h"

#include <ATen/ATen.h>

#include "neva/error.h"

namespace neva {

namespace {

at::Tensor moved(const at::Tensor& tensor, at::Device device) { return tensor.defined() ? tensor.to(device) : tensor; }

}  // namespace

LlavaModel::LlavaModel(std::shared_ptr<VisionEncoder> encoder, std::shared_ptr<Connector> connector,
                       std::shared_ptr<LanguageBackbone> backbone, std::int64_t image_token_id)
    : encoder_(std::move(encoder)), connector_(std::move(connector)), backbone_(std::move(backbone)),
      image_token_id_(image_token_id) {
  if (!backbone_) throw Error("a LLaVA model needs a language backbone");
  for (const auto& parameter : backbone_->parameters()) {
    device_ = parameter.device();
    break;
  }
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

std::int64_t LlavaModel::tokens_for_image(std::int64_t height, std::int64_t width) const {
  return encoder_ ? connector_->output_tokens(encoder_->num_tokens_for(height, width)) : 0;
}

at::Tensor LlavaModel::image_features(const std::vector<at::Tensor>& images) {
  if (!encoder_) throw Error("this model has no vision encoder, but images were given");
  std::vector<at::Tensor> features;
  // Consecutive images of one size go through the encoder together.
  for (std::size_t start = 0; start < images.size();) {
    std::size_t end = start + 1;
    while (end < images.size() && images[end].sizes() == images[start].sizes()) ++end;
    std::vector<at::Tensor> group(images.begin() + start, images.begin() + end);
    at::Tensor projected = connector_->forward(encoder_->forward(at::stack(group).to(device_)));
    features.push_back(projected.reshape({-1, projected.size(-1)}));
    start = end;
  }
  return at::cat(features, 0);
}

at::Tensor LlavaModel::embed(const at::Tensor& input_ids, const std::vector<at::Tensor>& images) {
  at::Tensor placeholders = input_ids == image_token_id_;
  const std::int64_t count = placeholders.sum().item<std::int64_t>();
  std::int64_t needed = 0;
  for (const auto& image : images) needed += tokens_for_image(image.size(-2), image.size(-1));
  if (count != needed) {
    throw Error("image tokens and images do not match: the text holds " + std::to_string(count) +
                " image placeholder tokens (id " + std::to_string(image_token_id_) + "), but the " +
                std::to_string(images.size()) + " image(s) need " + std::to_string(needed));
  }
  // The placeholder's own embedding is discarded, so its id need not be inside the vocabulary.
  at::Tensor embeddings = backbone_->embed(at::where(placeholders, at::zeros_like(input_ids), input_ids));
  if (images.empty()) return embeddings;
  at::Tensor features = image_features(images).to(embeddings.scalar_type());
  return embeddings.masked_scatter(placeholders.unsqueeze(-1).to(embeddings.device()), features);
}

BackboneOutputs LlavaModel::forward(const MultimodalInputs& inputs) {
  // Batches are built on the CPU (tokenizer, image decoding, collation); the model runs where its
  // weights are, so every input follows them there.
  BackboneInputs backbone_inputs;
  std::vector<at::Tensor> images = inputs.images;
  if (inputs.pixel_values.defined()) {
    auto stacked = inputs.pixel_values.unbind(0);
    images.insert(images.end(), stacked.begin(), stacked.end());
  }
  backbone_inputs.embeddings = embed(moved(inputs.input_ids, device_), images);
  backbone_inputs.attention_mask = moved(inputs.attention_mask, device_);
  backbone_inputs.positions = moved(inputs.positions, device_);
  backbone_inputs.segment_ids = moved(inputs.segment_ids, device_);
  backbone_inputs.cache = inputs.cache;
  backbone_inputs.logits_mask = moved(inputs.logits_mask, device_);
  backbone_inputs.vocab_parallel_logits = inputs.vocab_parallel_logits;
  return backbone_->forward(backbone_inputs);
}

}  // namespace neva
