#pragma once
#include <torch/nn/module.h>

#include <cstdint>
#include <memory>

#include "neva/component.h"

namespace neva {

struct NEVA_API LanguageBackboneConfig : ComponentConfig {
  // Filled by the plugin when it parses its config, so the host can wire the connector to it.
  std::int64_t hidden_size = 0;
  std::int64_t vocab_size = 0;
  ~LanguageBackboneConfig() override;
};

// Per-sequence decoding state a backbone keeps between calls (keys and values of past tokens).
// Opaque to the host; made by the backbone that reads it.
class NEVA_API KVCache {
 public:
  virtual ~KVCache();
};

struct BackboneInputs {
  at::Tensor embeddings;      // [batch, seq, hidden]: token embeddings with image features spliced in
  at::Tensor positions;       // [batch, seq] int64; restarts at 0 for each packed sample
  at::Tensor attention_mask;  // optional [batch, seq]: 1 for real tokens, 0 for padding
  at::Tensor segment_ids;     // optional [batch, seq]: packed sample index; attention stays inside one
  KVCache* cache = nullptr;   // optional: incremental decoding; the new tokens follow the cached ones
  // Optional [batch, seq] bool (plugin ABI 1.1): the positions whose logits are wanted (training:
  // those followed by a labelled token). When given, logits are [count, vocab] for the true
  // positions in row-major order, so the LM head runs only where the loss needs it. A backbone may
  // ignore it and return [batch, seq, vocab]; callers accept both.
  at::Tensor logits_mask;
  // Plugin ABI 2.2: under tensor parallelism, return this rank's shard of the vocabulary (columns
  // [rank x V'/tp, (rank + 1) x V'/tp) of the padded vocabulary V') instead of gathering every
  // rank's: what a vocabulary-parallel loss takes. Ignored without tensor parallelism.
  bool vocab_parallel_logits = false;
  // Pipeline parallelism (plugin ABI 2.3): which of this rank's model chunks runs, and — for every
  // chunk but the pipeline's first, whose `embeddings` are the previous chunk's output — the length
  // of the whole sequence. A chunk other than the pipeline's last returns its hidden states in
  // BackboneOutputs::logits, for the next.
  std::int64_t pipeline_chunk = 0;
  std::int64_t sequence_length = 0;
  // Continuous batching (plugin ABI 2.5): each row of the cache is a slot holding one sequence of
  // its own length. With `cache_lengths` ([batch] int64, on the CPU) row b of this call continues
  // row cache_rows[b] of the cache ([batch] int64, distinct; default 0..batch-1) after its
  // cache_lengths[b] cached tokens, and positions default to those lengths onward. The cache's own
  // length is then neither read nor advanced: the caller keeps each slot's. Not combinable with
  // attention_mask or segment_ids (a slot holds no padding).
  at::Tensor cache_rows;
  at::Tensor cache_lengths;
};

struct BackboneOutputs {
  at::Tensor logits;    // [batch, seq, vocab], or [count, vocab] for a logits_mask
  at::Tensor aux_loss;  // optional scalar added to the training loss (e.g. MoE load balancing)
};

// A decoder-only language model (Llama, Mistral, Mixtral, Nemotron, ...).
class NEVA_API LanguageBackbone : public torch::nn::Module, public Component {
 public:
  static constexpr const char* kKind = "language_backbone";
  ~LanguageBackbone() override;

  // token ids [batch, seq] int64 -> embeddings [batch, seq, hidden_size()]
  virtual at::Tensor embed(const at::Tensor& token_ids) = 0;
  virtual BackboneOutputs forward(const BackboneInputs& inputs) = 0;
  virtual std::unique_ptr<KVCache> new_cache(std::int64_t batch, std::int64_t max_tokens) = 0;
  virtual std::int64_t hidden_size() const = 0;
  virtual std::int64_t vocab_size() const = 0;
  // The longest sequence (prompt plus generated tokens) the model was trained for.
  virtual std::int64_t max_position_embeddings() const = 0;
};

}  // namespace neva
