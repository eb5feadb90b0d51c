#include "neva/model/llava.h"

#include <ATen/ATen.h>

#include "neva/context.h"
#include "neva/error.h"
#include "neva/model/decoder.h"
#include "neva/parallel/process_group.h"

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

void LlavaModel::set_pipeline(std::shared_ptr<ProcessGroup> pipeline) {
  if (group_size(pipeline) == 1) return;
  const auto* decoder = dynamic_cast<const DecoderBackbone*>(backbone_.get());
  if (!decoder) {
    throw Error("pipeline parallelism needs a language backbone built on neva's DecoderBackbone (its layers split "
                "into stages); this one is not");
  }
  pipeline_ = std::move(pipeline);
  chunks_ = static_cast<std::int64_t>(decoder->placement().chunks.size());  // the backbone's placement decides
  total_chunks_ = decoder->placement().total_chunks;
  for (const auto& parameter : backbone_->parameters()) {
    hidden_dtype_ = parameter.scalar_type();
    break;
  }
}

bool LlavaModel::first_chunk(std::int64_t chunk) const { return chunk * group_size(pipeline_) + group_rank(pipeline_) == 0; }

bool LlavaModel::last_chunk(std::int64_t chunk) const {
  return chunk * group_size(pipeline_) + group_rank(pipeline_) == total_chunks_ - 1;
}

BackboneOutputs LlavaModel::forward(const MultimodalInputs& inputs) {
  if (inputs.pipeline_chunk >= 0) return forward_chunk(inputs, inputs.pipeline_chunk);
  if (!pipeline_) return forward_chunk(inputs, 0);
  return forward_pipelined(inputs);
}

BackboneOutputs LlavaModel::forward_chunk(const MultimodalInputs& inputs, std::int64_t chunk) {
  // Batches are built on the CPU (tokenizer, image decoding, collation); the model runs where its
  // weights are, so every input follows them there.
  BackboneInputs backbone_inputs;
  if (first_chunk(chunk)) {
    std::vector<at::Tensor> images = inputs.images;
    if (inputs.pixel_values.defined()) {
      auto stacked = inputs.pixel_values.unbind(0);
      images.insert(images.end(), stacked.begin(), stacked.end());
    }
    backbone_inputs.embeddings = embed(moved(inputs.input_ids, device_), images);
  } else {
    if (!inputs.hidden_states.defined()) throw Error("a pipeline chunk after the first needs the previous one's hidden states");
    backbone_inputs.embeddings = inputs.hidden_states;
    backbone_inputs.sequence_length = inputs.input_ids.size(1);
  }
  backbone_inputs.attention_mask = moved(inputs.attention_mask, device_);
  backbone_inputs.positions = moved(inputs.positions, device_);
  backbone_inputs.segment_ids = moved(inputs.segment_ids, device_);
  backbone_inputs.cache = inputs.cache;
  backbone_inputs.cache_rows = inputs.cache_rows;
  backbone_inputs.cache_lengths = inputs.cache_lengths;
  backbone_inputs.logits_mask = moved(inputs.logits_mask, device_);
  backbone_inputs.vocab_parallel_logits = inputs.vocab_parallel_logits;
  backbone_inputs.pipeline_chunk = chunk;
  return backbone_->forward(backbone_inputs);
}

std::vector<std::int64_t> LlavaModel::hidden_states_shape(std::int64_t batch, std::int64_t sequence_length) const {
  return dynamic_cast<const DecoderBackbone&>(*backbone_).pipeline_hidden_shape(batch, sequence_length);
}

at::Tensor LlavaModel::empty_hidden_states(std::int64_t batch, std::int64_t sequence_length) const {
  return at::empty(hidden_states_shape(batch, sequence_length), at::TensorOptions().device(device_).dtype(hidden_dtype_));
}

BackboneOutputs LlavaModel::forward_pipelined(const MultimodalInputs& inputs) {
  // Inference through every stage: this rank runs its chunks in pipeline order, receiving each
  // one's input from the previous rank and sending its output to the next (the shapes follow from
  // the batch: nothing but the hidden states travels); the last stage's logits are then broadcast,
  // so that every stage returns them (and samples the same token).
  at::NoGradGuard no_grad;
  ProcessGroup& group = *pipeline_;
  const int p = group.size(), me = group.rank();
  const std::int64_t batch = inputs.input_ids.size(0), length = inputs.input_ids.size(1);
  BackboneOutputs outputs;
  std::vector<Work> sends;
  std::vector<at::Tensor> sent;
  for (std::int64_t chunk = 0; chunk < chunks_; ++chunk) {
    MultimodalInputs step = inputs;
    step.pipeline_chunk = chunk;
    const int index = static_cast<int>(chunk * p + me);  // in the whole pipeline
    if (!first_chunk(chunk)) {
      step.hidden_states = empty_hidden_states(batch, length);
      group.irecv(step.hidden_states, (me - 1 + p) % p, kInferenceTag + index).wait();
    }
    outputs = forward_chunk(step, chunk);
    if (!last_chunk(chunk)) {
      sent.push_back(outputs.logits.contiguous());
      sends.push_back(group.isend(sent.back(), (me + 1) % p, kInferenceTag + index + 1));
    }
  }
  for (auto& work : sends) work.wait();
  // The last stage's logits: their dtype and shape first (how many positions it computed depends on
  // the logits mask), then the values.
  const int last = static_cast<int>((total_chunks_ - 1) % p);
  const at::TensorOptions options = at::TensorOptions().device(device_).dtype(at::kLong);
  at::Tensor header = at::zeros({6}, options);
  if (me == last) {
    if (outputs.logits.dim() > 4) throw Error("forward_pipelined: logits of more than 4 dimensions");
    std::vector<std::int64_t> values{static_cast<std::int64_t>(outputs.logits.scalar_type()), outputs.logits.dim()};
    for (auto size : outputs.logits.sizes()) values.push_back(size);
    values.resize(6, 0);
    header.copy_(at::tensor(values, at::kLong));
  }
  group.broadcast(header, last).wait();
  const at::Tensor values = header.cpu();
  std::vector<std::int64_t> shape;
  for (std::int64_t d = 0; d < values[1].item<std::int64_t>(); ++d) shape.push_back(values[2 + d].item<std::int64_t>());
  at::Tensor logits = me == last ? outputs.logits.contiguous()
                                 : at::empty(shape, options.dtype(static_cast<at::ScalarType>(values[0].item<std::int64_t>())));
  group.broadcast(logits, last).wait();
  outputs.logits = logits;
  outputs.aux_loss = at::Tensor();
  return outputs;
}

}  // namespace neva
