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

class ProcessGroup;

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
  // Pipeline parallelism: -1 runs the whole model (generation and scoring: every stage calls it, the
  // hidden states travel from stage to stage and every stage returns the last's logits); a chunk
  // index runs that chunk of this rank only (a training schedule), on `hidden_states` unless it is
  // the pipeline's first chunk.
  std::int64_t pipeline_chunk = -1;
  at::Tensor hidden_states;
  at::Tensor cache_rows, cache_lengths;  // BackboneInputs::cache_rows / cache_lengths (slots)
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
  // Pipeline parallelism over `pipeline` (build_model sets it): this rank's chunks are the
  // backbone's (DecoderBackbone::placement); any other backbone is refused.
  void set_pipeline(std::shared_ptr<ProcessGroup> pipeline);
  std::int64_t pipeline_chunks() const { return chunks_; }
  // Whether chunk `chunk` of this rank is the pipeline's first / last.
  bool first_chunk(std::int64_t chunk) const;
  bool last_chunk(std::int64_t chunk) const;
  // What a chunk after the first receives for `batch` sequences of `sequence_length` tokens (the
  // input ids' shape): an uninitialised tensor of the hidden states' shape, dtype and device.
  at::Tensor empty_hidden_states(std::int64_t batch, std::int64_t sequence_length) const;
  std::vector<std::int64_t> hidden_states_shape(std::int64_t batch, std::int64_t sequence_length) const;
  at::ScalarType hidden_states_dtype() const { return hidden_dtype_; }

 private:
  std::shared_ptr<VisionEncoder> encoder_;
  std::shared_ptr<Connector> connector_;
  std::shared_ptr<LanguageBackbone> backbone_;
  std::int64_t image_token_id_;
  // Where the weights live (the plugins build them on the context's device): inputs built on the
  // CPU are moved there by forward. Found once here, not by walking the parameters every call.
  at::Device device_ = at::kCPU;
  std::shared_ptr<ProcessGroup> pipeline_;  // null: no pipeline parallelism
  std::int64_t chunks_ = 1, total_chunks_ = 1;
  at::ScalarType hidden_dtype_ = at::kFloat;
  static constexpr int kInferenceTag = 1 << 20;  // point-to-point tags of forward_pipelined
  BackboneOutputs forward_chunk(const MultimodalInputs& inputs, std::int64_t chunk);
  BackboneOutputs forward_pipelined(const MultimodalInputs& inputs);
};

}  // namespace neva
