#pragma once
// Causal self-attention with grouped-query heads, RoPE, a per-layer KV cache, padding masks, packed
// segments and an optional sliding window, computed with the fused scaled-dot-product kernel.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "neva/api.h"
#include "neva/context.h"
#include "neva/nn/linear.h"
#include "neva/nn/rotary.h"

namespace neva {

// Keys and values of one layer for every token seen so far: [batch, kv_heads, capacity, head_dim].
struct LayerCache {
  at::Tensor keys;
  at::Tensor values;
};

struct ContextParallelLayout;  // neva/parallel/context_parallel.h

// Which keys each query may see, shared by all layers of one forward call.
struct AttentionMask {
  // Boolean [batch, 1, queries, keys] (true = visible), or undefined when plain causal attention
  // over exactly the new tokens applies (the fast path: is_causal in the kernel).
  at::Tensor visible;
  std::int64_t past = 0;  // tokens already in the cache before this call
  // Context parallelism: the ring's group and where every rank's tokens lie. The queries, keys and
  // values of a forward call are this rank's; `visible`, when defined, covers the whole padded
  // sequence ([batch, 1, padded, padded]) and attention runs as ring attention.
  std::shared_ptr<ProcessGroup> context_group;
  std::shared_ptr<const ContextParallelLayout> context_layout;
  // Slots (BackboneInputs::cache_lengths): row b's new tokens go to cache row cache_rows[b] after
  // its row_past[b] cached ones ([batch] int64 on the device); `past` is then their maximum and the
  // keys of a call are the first past + seq of each row (the rest masked). first_cache_row >= 0
  // when the rows are consecutive from there (the keys are then a view, not a gather).
  at::Tensor cache_rows, row_past;
  std::int64_t first_cache_row = -1;

  // `attention_mask`: optional [batch, past + seq] (1 = real token); `segment_ids`: optional
  // [batch, seq] packed-sample ids; `window`: 0 for none, else a key is visible iff q - window < k <= q.
  NEVA_API static AttentionMask build(std::int64_t batch, std::int64_t seq, std::int64_t past,
                                      const at::Tensor& attention_mask, const at::Tensor& segment_ids,
                                      std::int64_t window, c10::Device device);
  // Slots: `cache_rows` and `lengths` are [batch] int64 on the CPU (see BackboneInputs).
  NEVA_API static AttentionMask build_slots(const at::Tensor& cache_rows, const at::Tensor& lengths, std::int64_t seq,
                                            std::int64_t window, c10::Device device);
};

// x [batch, seq, ...] at positions rows [batch, count] (int64): [batch, count, ...].
NEVA_API at::Tensor take_positions(const at::Tensor& x, const at::Tensor& rows);

// The query and KV heads one tensor-parallel rank holds, and over how many consecutive ranks its KV
// heads are replicated (1 unless there are fewer KV heads than ranks). Throws naming the counts when
// the heads do not split over `tp` ranks.
struct HeadSplit {
  std::int64_t heads, kv_heads, kv_replicas;
};
NEVA_API HeadSplit split_heads(std::int64_t num_heads, std::int64_t num_kv_heads, int tp);

struct AttentionConfig {
  std::int64_t hidden_size = 0;
  std::int64_t num_heads = 0;
  std::int64_t num_kv_heads = 0;
  std::int64_t head_dim = 0;
  bool bias = false;         // q/k/v/o biases (Llama attention_bias)
  bool output_bias = false;  // o_proj bias
  // Selective activation checkpointing: the attention core (softmax(QK^T)V) is recomputed in the
  // backward pass instead of being kept.
  bool recompute_core = false;
};

// Parameter names match transformers: q_proj, k_proj, v_proj, o_proj. Under tensor parallelism q/k/v
// split their outputs (whole heads: num_heads / tp query heads per rank, num_kv_heads / tp KV heads —
// or, with fewer KV heads than ranks, the one KV head its query heads read, replicated over
// tp / num_kv_heads ranks) and o_proj its input. Head counts and sizes come from the config, never
// from the input's shape.
class NEVA_API SelfAttention : public nn::Module {
 public:
  SelfAttention(const RuntimeContext& context, const AttentionConfig& config);
  // x [batch, seq, hidden]; cos/sin from RotaryEmbedding::cos_sin; cache appended in place when given.
  // `rows` (optional, no cache): [batch, count] int64 positions; only their queries are computed and
  // the output is [batch, count, hidden] (keys and values still cover every position).
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const AttentionMask& mask,
                     LayerCache* cache, const at::Tensor& rows = {});

 private:
  AttentionConfig config_;
  std::int64_t heads_, kv_heads_;  // on this rank
  nn::TensorParallelRegion region_;
  nn::Linear q_proj_, k_proj_, v_proj_, o_proj_;
};

}  // namespace neva
