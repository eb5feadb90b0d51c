#include "neva/nn/attention.h"

#include <ATen/ATen.h>
#include <ATen/TensorIndexing.h>

#include "neva/error.h"
#include "neva/nn/recompute.h"
#include "neva/parallel/context_parallel.h"

namespace neva {

AttentionMask AttentionMask::build(std::int64_t batch, std::int64_t seq, std::int64_t past,
                                   const at::Tensor& attention_mask, const at::Tensor& segment_ids,
                                   std::int64_t window, c10::Device device) {
  AttentionMask mask;
  mask.past = past;
  const std::int64_t keys = past + seq;
  if (!attention_mask.defined() && !segment_ids.defined() && window <= 0 && past == 0) return mask;  // plain causal

  at::Tensor query_position = at::arange(past, keys, at::TensorOptions().dtype(at::kLong).device(device)).view({seq, 1});
  at::Tensor key_position = at::arange(0, keys, at::TensorOptions().dtype(at::kLong).device(device)).view({1, keys});
  at::Tensor visible = key_position <= query_position;  // [seq, keys]
  if (window > 0) visible = visible & (key_position > query_position - window);
  visible = visible.view({1, 1, seq, keys}).expand({batch, 1, seq, keys});
  if (attention_mask.defined()) {
    if (attention_mask.dim() != 2 || attention_mask.size(0) != batch || attention_mask.size(1) != keys) {
      throw Error("attention_mask has shape " + std::string(c10::str(attention_mask.sizes())) + ", expected [" +
                  std::to_string(batch) + ", " + std::to_string(keys) + "] (past and new tokens)");
    }
    visible = visible & attention_mask.to(device).to(at::kBool).view({batch, 1, 1, keys});
  }
  if (segment_ids.defined()) {
    if (past != 0) throw Error("packed segments cannot be combined with a KV cache");
    at::Tensor ids = segment_ids.to(device);
    visible = visible & (ids.view({batch, 1, seq, 1}) == ids.view({batch, 1, 1, seq}));
  }
  // A query that sees nothing (a padding token) would give NaN, which then leaks through zero-weight
  // products; let such rows see themselves. Only padding rows are affected.
  at::Tensor diagonal = (key_position == query_position).view({1, 1, seq, keys});
  at::Tensor empty_rows = visible.any(-1, true).logical_not();
  mask.visible = visible | (empty_rows & diagonal);
  return mask;
}

AttentionMask AttentionMask::build_slots(const at::Tensor& cache_rows, const at::Tensor& lengths, std::int64_t seq,
                                         std::int64_t window, c10::Device device) {
  const std::int64_t batch = lengths.size(0);
  const at::Tensor rows = cache_rows.contiguous(), past = lengths.contiguous();
  const std::int64_t* row = rows.data_ptr<std::int64_t>();
  AttentionMask mask;
  mask.past = past.max().item<std::int64_t>();
  mask.first_cache_row = row[0];
  for (std::int64_t b = 1; b < batch; ++b) {
    if (row[b] != row[0] + b) mask.first_cache_row = -1;
  }
  mask.cache_rows = rows.to(device);
  mask.row_past = past.to(device);
  const std::int64_t keys = mask.past + seq;
  auto options = at::TensorOptions().dtype(at::kLong).device(device);
  // Row b's i-th new token is at position row_past[b] + i; keys past it are another sequence's
  // leftovers or not written yet, and causality already hides them.
  at::Tensor query_position = mask.row_past.view({batch, 1, 1, 1}) + at::arange(seq, options).view({1, 1, seq, 1});
  at::Tensor key_position = at::arange(keys, options).view({1, 1, 1, keys});
  at::Tensor visible = key_position <= query_position;
  if (window > 0) visible = visible & (key_position > query_position - window);
  mask.visible = visible;
  return mask;
}

at::Tensor take_positions(const at::Tensor& x, const at::Tensor& rows) {
  std::vector<std::int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[1] = rows.size(1);
  at::Tensor index = rows.view({rows.size(0), rows.size(1)});
  for (std::int64_t d = 2; d < x.dim(); ++d) index = index.unsqueeze(-1);
  return x.gather(1, index.expand(shape));
}

HeadSplit split_heads(std::int64_t num_heads, std::int64_t num_kv_heads, int tp) {
  if (num_heads % tp != 0) {
    throw Error(std::to_string(num_heads) + " attention heads do not split over " + std::to_string(tp) +
                " tensor-parallel ranks (num_attention_heads must be a multiple of tensor_model_parallel_size)");
  }
  if (num_kv_heads % tp == 0) return {num_heads / tp, num_kv_heads / tp, 1};
  if (tp % num_kv_heads != 0) {
    throw Error(std::to_string(num_kv_heads) + " KV heads do not split over " + std::to_string(tp) +
                " tensor-parallel ranks (num_key_value_heads must be a multiple or a divisor of "
                "tensor_model_parallel_size)");
  }
  return {num_heads / tp, 1, tp / num_kv_heads};
}

SelfAttention::SelfAttention(const RuntimeContext& context, const AttentionConfig& config)
    : config_(config), region_(context) {
  const HeadSplit split = split_heads(config.num_heads, config.num_kv_heads, region_.size());
  heads_ = split.heads;
  kv_heads_ = split.kv_heads;
  const std::int64_t q = config.num_heads * config.head_dim, kv = config.num_kv_heads * config.head_dim;
  const nn::ColumnLayout kv_layout{split.kv_replicas, false};
  q_proj_ = register_module("q_proj", nn::linear(context, config.hidden_size, q, {config.bias, nn::Parallel::Column}));
  k_proj_ = register_module("k_proj", nn::linear(context, config.hidden_size, kv, {config.bias, nn::Parallel::Column}, kv_layout));
  v_proj_ = register_module("v_proj", nn::linear(context, config.hidden_size, kv, {config.bias, nn::Parallel::Column}, kv_layout));
  o_proj_ = register_module("o_proj", nn::linear(context, q, config.hidden_size, {config.output_bias, nn::Parallel::Row}));
}

at::Tensor SelfAttention::forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                  const AttentionMask& mask, LayerCache* cache, const at::Tensor& rows) {
  const std::int64_t batch = x.size(0), hd = config_.head_dim;
  if (rows.defined() && cache) throw Error("attention rows cannot be combined with a KV cache");
  // With `rows`, queries only there, each seeing the keys its row of the mask allows; keys and
  // values for every position.
  // One f (or one sequence-parallel all-gather) for q, k and v.
  const at::Tensor input = region_.enter(x);
  const std::int64_t seq = input.size(1);
  const at::Tensor query_input = rows.defined() ? take_positions(input, rows) : input;
  const std::int64_t queries = query_input.size(1);
  at::Tensor q = q_proj_->forward_entered(query_input).view({batch, queries, heads_, hd}).transpose(1, 2);
  at::Tensor k = k_proj_->forward_entered(input).view({batch, seq, kv_heads_, hd}).transpose(1, 2);
  at::Tensor v = v_proj_->forward_entered(input).view({batch, seq, kv_heads_, hd}).transpose(1, 2);
  at::Tensor visible = mask.visible;
  if (rows.defined()) {
    // cos/sin may broadcast over the batch ([1, seq, rotary_dim]); the gather needs every row.
    const std::vector<std::int64_t> rotary_shape{batch, seq, cos.size(-1)};
    q = apply_rotary(q, take_positions(cos.expand(rotary_shape), rows), take_positions(sin.expand(rotary_shape), rows));
    k = apply_rotary(k, cos, sin);
    const at::Tensor query_rows = rows.view({batch, 1, queries, 1});
    visible = visible.defined() ? visible.gather(2, query_rows.expand({batch, 1, queries, visible.size(3)}))
                                : at::arange(seq, rows.options()).view({1, 1, 1, seq}) <= query_rows;
  } else {
    std::tie(q, k) = apply_rotary(q, k, cos, sin);
  }

  if (cache) {
    const std::int64_t capacity = cache->keys.size(2);
    if (mask.past + seq > capacity) {
      throw Error("KV cache holds " + std::to_string(capacity) + " tokens; this step needs " +
                  std::to_string(mask.past + seq));
    }
    if (mask.row_past.defined()) {  // slots: each row writes after its own tokens
      using at::indexing::Slice;
      const at::Tensor at_row = mask.cache_rows.view({batch, 1}).expand({batch, seq});
      const at::Tensor at_position = mask.row_past.view({batch, 1}) + at::arange(seq, mask.row_past.options()).view({1, seq});
      cache->keys.index_put_({at_row, Slice(), at_position}, k.transpose(1, 2).to(cache->keys.scalar_type()));
      cache->values.index_put_({at_row, Slice(), at_position}, v.transpose(1, 2).to(cache->values.scalar_type()));
      const at::Tensor keys = cache->keys.narrow(2, 0, mask.past + seq), values = cache->values.narrow(2, 0, mask.past + seq);
      if (mask.first_cache_row >= 0) {
        k = keys.narrow(0, mask.first_cache_row, batch);
        v = values.narrow(0, mask.first_cache_row, batch);
      } else {
        k = keys.index_select(0, mask.cache_rows);
        v = values.index_select(0, mask.cache_rows);
      }
    } else {
      cache->keys.narrow(2, mask.past, seq).copy_(k);
      cache->values.narrow(2, mask.past, seq).copy_(v);
      k = cache->keys.narrow(2, 0, mask.past + seq);
      v = cache->values.narrow(2, 0, mask.past + seq);
    }
  }
  const bool plain_causal = !visible.defined();
  const bool grouped = heads_ != kv_heads_;
  const double scale = std::pow(static_cast<double>(hd), -0.5);
  if (mask.context_layout) {  // context parallelism: ring attention over this rank's tokens
    if (cache || rows.defined()) throw Error("context parallelism runs without a KV cache or selected rows");
    const ContextParallelLayout& layout = *mask.context_layout;
    const at::Tensor local = layout.positions.to(q.device());
    auto seen = [&](int source) {
      const at::Tensor keys = layout.of_rank[static_cast<std::size_t>(source)].to(q.device());
      if (!plain_causal) return visible.index_select(2, local).index_select(3, keys);
      return (keys.view({1, 1, 1, -1}) <= local.view({1, 1, -1, 1}));
    };
    at::Tensor out = ring_attention(mask.context_group, q, k, v, scale, seen);
    return o_proj_->forward(out.transpose(1, 2).reshape({batch, queries, heads_ * hd}));
  }
  auto core = [plain_causal, grouped, scale](const std::vector<at::Tensor>& qkv) -> std::vector<at::Tensor> {
    return {at::scaled_dot_product_attention(qkv[0], qkv[1], qkv[2],
                                             plain_causal ? std::optional<at::Tensor>() : qkv[3], 0.0, plain_causal,
                                             scale, grouped)};
  };
  // A cache kept in fp32 for a bf16 model (DecoderBackbone::new_cache on the CPU): attention runs in
  // fp32 over it (the queries widened, fp32 sums either way) and its output is rounded to bf16 once.
  const bool widen = cache && k.scalar_type() == at::kFloat && q.scalar_type() == at::kBFloat16;
  std::vector<at::Tensor> operands{q, k, v};
  if (widen) operands = {q.to(at::kFloat), k, v};
  if (!plain_causal) operands.push_back(visible);
  at::Tensor out = (config_.recompute_core && !cache) ? recomputed(core, operands)[0] : core(operands)[0];
  if (widen) out = out.to(at::kBFloat16);
  return o_proj_->forward(out.transpose(1, 2).reshape({batch, queries, heads_ * hd}));
}

}  // namespace neva
