#include "neva/model/decoder.h"

#include <ATen/ATen.h>
#include <torch/nn/modules/container/modulelist.h>

#include <algorithm>
#include <cctype>

#include "neva/error.h"
#include "neva/nn/attention.h"
#include "neva/nn/linear.h"
#include "neva/nn/recompute.h"
#include "neva/nn/mlp.h"
#include "neva/nn/norm.h"
#include "neva/parallel/context_parallel.h"
#include "neva/parallel/mappings.h"
#include "neva/io/safetensors.h"

namespace neva {

namespace {

// A norm of the residual stream: under sequence parallelism it sees this rank's part of the sequence,
// and its gradient is summed over the tensor-parallel group.
std::shared_ptr<Norm> sequence_parallel_norm(const RuntimeContext& context, const DecoderConfig& config) {
  auto norm = make_norm(context, config.norm, config.hidden_size, config.norm_eps);
  if (context.sequence_parallel && group_size(context.groups.tensor) > 1) nn::set_sequence_parallel(*norm);
  return norm;
}

class DecoderLayer : public torch::nn::Module {
 public:
  DecoderLayer(const RuntimeContext& context, const DecoderConfig& config, bool recompute_attention_core) {
    auto norm = [&] { return sequence_parallel_norm(context, config); };
    input_layernorm_ = register_module("input_layernorm", norm());
    self_attn_ = register_module("self_attn", std::make_shared<SelfAttention>(context, AttentionConfig{
                                                  config.hidden_size, config.num_heads, config.num_kv_heads,
                                                  config.head_dim, config.attention_bias, config.attention_output_bias,
                                                  recompute_attention_core}));
    post_attention_layernorm_ = register_module("post_attention_layernorm", norm());
    if (config.mlp == "moe") {
      moe_ = std::make_shared<SparseMoE>(context, config.hidden_size, config.intermediate_size, config.num_experts,
                                         config.experts_per_token, config.activation);
      moe_->set_capacity(config.moe_capacity_factor, config.moe_drop_policy);
      mlp_ = register_module("block_sparse_moe", moe_);
    } else if (config.mlp == "plain") {
      mlp_ = register_module("mlp", std::make_shared<PlainMLP>(context, config.hidden_size, config.intermediate_size,
                                                               config.mlp_bias, config.activation));
    } else {
      mlp_ = register_module("mlp", std::make_shared<GatedMLP>(context, config.hidden_size, config.intermediate_size,
                                                               config.mlp_bias, config.activation));
    }
  }

  // `rows` (optional): [batch, count] positions; only their outputs are computed ([batch, count, hidden]).
  // An MoE layer appends its router logits to `router_logits`.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const AttentionMask& mask,
                     LayerCache* cache, const at::Tensor& rows, std::vector<at::Tensor>& router_logits) {
    at::Tensor residual = rows.defined() ? take_positions(x, rows) : x;
    at::Tensor h = residual + self_attn_->forward(input_layernorm_->forward(x), cos, sin, mask, cache, rows);
    const at::Tensor normed = post_attention_layernorm_->forward(h);
    if (!moe_) return h + mlp_->forward(normed);
    auto [out, logits] = moe_->forward_with_router(normed);
    router_logits.push_back(logits);
    return h + out;
  }

  bool is_moe() const { return moe_ != nullptr; }

 private:
  std::shared_ptr<Norm> input_layernorm_, post_attention_layernorm_;
  std::shared_ptr<SelfAttention> self_attn_;
  std::shared_ptr<FeedForward> mlp_;
  std::shared_ptr<SparseMoE> moe_;
};

struct DecoderCache : KVCache {
  std::vector<LayerCache> layers;
  std::int64_t length = 0;
  std::int64_t rows = 0, capacity = 0;
};

// Validated slot rows and lengths (BackboneInputs::cache_rows / cache_lengths), both int64 on the CPU.
std::pair<at::Tensor, at::Tensor> checked_slots(const BackboneInputs& inputs, const DecoderCache* cache,
                                                std::int64_t batch, std::int64_t seq) {
  if (!cache) throw Error("cache_lengths (slots) were given without a KV cache");
  if (inputs.attention_mask.defined() || inputs.segment_ids.defined()) {
    throw Error("cache_lengths (slots) cannot be combined with an attention_mask or segment_ids");
  }
  auto vector_of = [batch](const at::Tensor& t, const char* name) {
    if (t.dim() != 1 || t.size(0) != batch || t.scalar_type() != at::kLong) {
      throw Error(std::string(name) + " has shape " + c10::str(t.sizes()) + " and dtype " + c10::str(t.scalar_type()) +
                  ", expected [" + std::to_string(batch) + "] int64 (one per row of the batch)");
    }
    return t.cpu().contiguous();
  };
  at::Tensor lengths = vector_of(inputs.cache_lengths, "cache_lengths");
  at::Tensor rows = inputs.cache_rows.defined() ? vector_of(inputs.cache_rows, "cache_rows") : at::arange(batch, at::kLong);
  const std::int64_t* row = rows.data_ptr<std::int64_t>();
  const std::int64_t* length = lengths.data_ptr<std::int64_t>();
  std::vector<bool> used(static_cast<std::size_t>(cache->rows), false);
  for (std::int64_t b = 0; b < batch; ++b) {
    if (row[b] < 0 || row[b] >= cache->rows || used[static_cast<std::size_t>(row[b])]) {
      throw Error("cache_rows[" + std::to_string(b) + "] = " + std::to_string(row[b]) + ": expected a distinct row of the " +
                  std::to_string(cache->rows) + " in the KV cache");
    }
    used[static_cast<std::size_t>(row[b])] = true;
    if (length[b] < 0 || length[b] + seq > cache->capacity) {
      throw Error("cache_lengths[" + std::to_string(b) + "] = " + std::to_string(length[b]) + " plus " + std::to_string(seq) +
                  " new tokens does not fit the KV cache's " + std::to_string(cache->capacity) + " tokens per row");
    }
  }
  return {rows, lengths};
}

}  // namespace

PipelinePlacement pipeline_placement(const RuntimeContext& context, std::int64_t num_layers) {
  const int p = group_size(context.groups.pipeline), rank = group_rank(context.groups.pipeline);
  const std::int64_t v = std::max<std::int64_t>(1, context.virtual_pipeline_chunks);
  PipelinePlacement placement;
  placement.total_chunks = p * v;
  std::vector<std::int64_t> split = context.pipeline_layer_split;
  if (split.empty()) {
    if (num_layers % placement.total_chunks != 0) {
      throw Error(std::to_string(num_layers) + " decoder layers do not split evenly into " +
                  std::to_string(placement.total_chunks) + " pipeline chunks (pipeline_model_parallel_size x " +
                  "virtual_pipeline_model_parallel_size); give model.pipeline_layer_split");
    }
    split.assign(static_cast<std::size_t>(placement.total_chunks), num_layers / placement.total_chunks);
  }
  std::int64_t total = 0;
  for (auto layers : split) total += layers;
  if (static_cast<std::int64_t>(split.size()) != placement.total_chunks || total != num_layers ||
      std::any_of(split.begin(), split.end(), [](std::int64_t layers) { return layers < 1; })) {
    throw Error("model.pipeline_layer_split must give each of the " + std::to_string(placement.total_chunks) +
                " pipeline chunks at least one layer, " + std::to_string(num_layers) + " in all");
  }
  std::vector<std::int64_t> starts(split.size() + 1, 0);
  for (std::size_t c = 0; c < split.size(); ++c) starts[c + 1] = starts[c] + split[c];
  for (std::int64_t chunk = 0; chunk < v; ++chunk) {
    const std::int64_t index = chunk * p + rank;
    placement.chunks.push_back({index, starts[static_cast<std::size_t>(index)], starts[static_cast<std::size_t>(index) + 1]});
  }
  placement.first_stage = placement.chunks.front().index == 0;
  placement.last_stage = placement.chunks.back().index == placement.total_chunks - 1;
  return placement;
}

// Every part of the decoder draws from its own generator, seeded from one draw of the context's
// stream: a pipeline stage builds its parts with the weights they have in one process.
class DecoderModel : public torch::nn::Module {
 public:
  DecoderModel(const RuntimeContext& context, const DecoderConfig& config, bool recompute_attention_core,
               const PipelinePlacement& placement, std::uint64_t base) {
    if (placement.first_stage || (placement.last_stage && config.tie_word_embeddings)) {
      embed_tokens = register_module("embed_tokens", nn::embedding(substream(context, base, 0), config.vocab_size,
                                                                   config.hidden_size, /*vocabulary_parallel=*/true));
    }
    layers = register_module("layers", std::make_shared<torch::nn::Module>("Layers"));
    by_index.resize(static_cast<std::size_t>(config.num_layers));
    for (const auto& chunk : placement.chunks) {
      for (std::int64_t i = chunk.first_layer; i < chunk.end_layer; ++i) {
        auto layer = std::make_shared<DecoderLayer>(substream(context, base, static_cast<std::uint64_t>(i) + 1), config,
                                                    recompute_attention_core);
        layers->register_module(std::to_string(i), layer);  // by its index in the whole decoder
        if (group_size(context.groups.pipeline) > 1) nn::set_pipeline_stage(*layer, chunk.index);
        by_index[static_cast<std::size_t>(i)] = layer;
      }
    }
    if (placement.last_stage) norm = register_module("norm", sequence_parallel_norm(context, config));
  }
  nn::Embedding embed_tokens;                          // first stage (and the last, for a tied LM head)
  std::shared_ptr<torch::nn::Module> layers;           // this rank's
  std::vector<std::shared_ptr<DecoderLayer>> by_index;  // every layer's slot, null where not here
  std::shared_ptr<Norm> norm;                           // last stage
};

DecoderBackbone::DecoderBackbone(const DecoderConfig& config, const RuntimeContext& context)
    : config_(config), context_(context), rotary_(config.rope), region_(context),
      vocabulary_(nn::vocabulary_shard(context, config.vocab_size)),
      placement_(pipeline_placement(context, config.num_layers)) {
  check_tensor_parallel_split(config, region_.size());  // before anything is built
  if (group_size(context.groups.expert) > 1 && config.mlp != "moe") {
    throw Error(config.source + ": expert_model_parallel_size = " + std::to_string(group_size(context.groups.expert)) +
                " needs a mixture-of-experts language model (Mixtral); this one has no experts");
  }
  if (placement_.total_chunks > 1 && config.mlp == "moe" && config.router_aux_loss_coef > 0) {
    throw Error(config.source + ": the load-balancing loss (router_aux_loss_coef) is taken over every layer's routing "
                "at once (transformers' formula), which pipeline stages cannot share within a micro-batch; set "
                "router_aux_loss_coef = 0 to train this model with pipeline_model_parallel_size > 1");
  }
  const auto& recompute = context.activations_checkpoint;
  const std::uint64_t base = draw_seed(context);
  model_ = register_module("model", std::make_shared<DecoderModel>(context, config, recompute.granularity == "selective",
                                                                   placement_, base));
  if (!config.tie_word_embeddings && placement_.last_stage) {
    // The vocabulary split over the tensor-parallel group (padded to make_vocab_size_divisible_by x
    // the group); the logits are gathered unless a vocabulary-parallel loss takes them split.
    lm_head_ = register_module("lm_head", nn::linear(substream(context, base, static_cast<std::uint64_t>(config.num_layers) + 1),
                                                     config.hidden_size, config.vocab_size, {false, nn::Parallel::Column},
                                                     nn::ColumnLayout{1, true}));
  }
  if (group_size(context.groups.pipeline) > 1) {
    const std::int64_t last = placement_.total_chunks - 1;
    if (model_->embed_tokens) nn::set_pipeline_stage(*model_->embed_tokens, placement_.first_stage ? 0 : last);
    if (model_->norm) nn::set_pipeline_stage(*model_->norm, last);
    if (lm_head_) nn::set_pipeline_stage(*lm_head_, last);
  }
  to(context.device, context.dtypes.params);
}

DecoderBackbone::~DecoderBackbone() = default;

at::Tensor DecoderBackbone::pipeline_tied_embedding() const {
  if (!config_.tie_word_embeddings || placement_.total_chunks == 1 || !model_->embed_tokens) return {};
  return model_->embed_tokens->weight;
}

at::Tensor DecoderBackbone::embed(const at::Tensor& token_ids) {
  if (!placement_.first_stage) throw Error("the token embedding lives on the first pipeline stage");
  if (token_ids.numel() > 0) {
    auto [low, high] = at::aminmax(token_ids);
    std::int64_t lowest = low.item<std::int64_t>(), highest = high.item<std::int64_t>();
    if (lowest < 0 || highest >= config_.vocab_size) {
      throw Error("token id " + std::to_string(lowest < 0 ? lowest : highest) + " is outside the vocabulary of " +
                  std::to_string(config_.vocab_size));
    }
  }
  return model_->embed_tokens->forward(token_ids.to(context_.device));
}

namespace {

// The sequence (dim 1) of `x` padded with `pad` copies of `value` (or zeros) at its end.
at::Tensor pad_sequence(const at::Tensor& x, std::int64_t pad, double value = 0) {
  if (!x.defined() || pad == 0) return x;
  std::vector<std::int64_t> shape = x.sizes().vec();
  shape[1] = pad;
  return at::cat({x, at::full(shape, value, x.options())}, 1);
}

}  // namespace

std::vector<std::int64_t> DecoderBackbone::pipeline_hidden_shape(std::int64_t batch, std::int64_t sequence_length) const {
  const bool split_sequence = region_.group && region_.sequence_parallel;
  const std::int64_t tp = split_sequence ? region_.size() : 1;
  std::int64_t local = sequence_length;
  if (group_size(context_.groups.context) > 1) {
    local = context_parallel_layout(sequence_length, context_.groups.context, tp).positions.size(0) / tp;
  } else if (split_sequence) {
    local = (sequence_length + (tp - sequence_length % tp) % tp) / tp;
  }
  return {batch, local, config_.hidden_size};
}

BackboneOutputs DecoderBackbone::forward(const BackboneInputs& inputs) {
  // Pipeline parallelism: one of this rank's chunks runs; all but the pipeline's first take the
  // previous chunk's hidden states, all but its last return theirs.
  if (inputs.pipeline_chunk < 0 || inputs.pipeline_chunk >= static_cast<std::int64_t>(placement_.chunks.size())) {
    throw Error("pipeline chunk " + std::to_string(inputs.pipeline_chunk) + " is not one of this rank's " +
                std::to_string(placement_.chunks.size()));
  }
  const PipelinePlacement::Chunk& part = placement_.chunks[static_cast<std::size_t>(inputs.pipeline_chunk)];
  const bool first = part.index == 0, last = part.index == placement_.total_chunks - 1;
  const bool final_chunk_here = inputs.pipeline_chunk + 1 == static_cast<std::int64_t>(placement_.chunks.size());
  const at::Tensor& embeddings = inputs.embeddings;
  if (embeddings.dim() != 3 || embeddings.size(2) != config_.hidden_size) {
    throw Error("embeddings have shape " + std::string(c10::str(embeddings.sizes())) + ", expected [batch, seq, " +
                std::to_string(config_.hidden_size) + "]");
  }
  if (!first && inputs.sequence_length <= 0) {
    throw Error("a pipeline chunk after the first needs the whole sequence's length (BackboneInputs::sequence_length)");
  }
  const std::int64_t batch = embeddings.size(0), seq = first ? embeddings.size(1) : inputs.sequence_length;
  auto* cache = dynamic_cast<DecoderCache*>(inputs.cache);
  if (inputs.cache && !cache) throw Error("the KV cache was not made by this backbone");
  if (inputs.logits_mask.defined() &&
      (inputs.logits_mask.dim() != 2 || inputs.logits_mask.size(0) != batch || inputs.logits_mask.size(1) != seq)) {
    throw Error("logits_mask has shape " + std::string(c10::str(inputs.logits_mask.sizes())) + ", expected [" +
                std::to_string(batch) + ", " + std::to_string(seq) + "] (the embeddings' batch and sequence)");
  }
  // Sequence parallelism: the residual stream holds this rank's 1/tp of the sequence, padded at its
  // end to a multiple of tp (Megatron pads the combined text and image sequence the same way). The
  // padding comes last, so causal attention keeps it out of every real token's view; it gets its
  // own segment and no attention_mask entry where the batch has those.
  const bool split_sequence = region_.group && region_.sequence_parallel;
  if (split_sequence && cache) throw Error("sequence parallelism is for training; generation runs without it");
  // Context parallelism: this rank holds two of the 2 x cp chunks of the padded sequence (zig-zag;
  // the local length then splits over the tensor-parallel ranks too, with sequence parallelism), and
  // attention runs around the ring.
  const int cp = group_size(context_.groups.context);
  if (cp > 1 && cache) throw Error("context parallelism is for training; generation runs without it");
  std::shared_ptr<const ContextParallelLayout> layout;
  if (cp > 1) {
    layout = std::make_shared<const ContextParallelLayout>(
        context_parallel_layout(seq, context_.groups.context, split_sequence ? region_.size() : 1));
  }
  const std::int64_t padded_seq =
      layout ? layout->padded : seq + (split_sequence ? (region_.size() - seq % region_.size()) % region_.size() : 0);
  const std::int64_t pad = padded_seq - seq;
  const bool slots = inputs.cache_lengths.defined();
  at::Tensor slot_rows, slot_lengths;
  if (slots) std::tie(slot_rows, slot_lengths) = checked_slots(inputs, cache, batch, seq);
  const std::int64_t past = cache && !slots ? cache->length : 0;
  at::Tensor positions;
  if (inputs.positions.defined()) {
    positions = inputs.positions.to(context_.device);
  } else if (slots) {
    positions = (slot_lengths.view({batch, 1}) + at::arange(seq, slot_lengths.options()).view({1, seq})).to(context_.device);
  } else {
    positions = at::arange(past, past + seq, at::TensorOptions().dtype(at::kLong).device(context_.device)).expand({batch, seq});
  }
  at::Tensor attention_mask = inputs.attention_mask, segment_ids = inputs.segment_ids;
  if (pad > 0) {
    positions = at::cat({positions, positions.narrow(1, seq - 1, 1) + at::arange(1, pad + 1, positions.options())}, 1);
    attention_mask = pad_sequence(attention_mask.defined() ? attention_mask.to(context_.device) : attention_mask, pad);
    if (segment_ids.defined()) {
      segment_ids = segment_ids.to(context_.device);
      segment_ids = pad_sequence(segment_ids, pad, segment_ids.max().item<double>() + 1);
    }
  }
  auto mask = slots ? AttentionMask::build_slots(slot_rows, slot_lengths, seq, config_.sliding_window, context_.device)
                   : AttentionMask::build(batch, padded_seq, past, attention_mask, segment_ids, config_.sliding_window,
                                          context_.device);
  if (layout) {
    mask.context_group = context_.groups.context;
    mask.context_layout = layout;
    positions = layout->take(positions, 1);
  }
  // Named tensors, not a structured binding: lambdas below capture them (C++17 cannot capture bindings).
  const auto cos_sin = rotary_.cos_sin(positions, embeddings.scalar_type());
  const at::Tensor cos = cos_sin.first, sin = cos_sin.second;

  // With a logits mask, the last layer computes its outputs only where logits are wanted (its keys
  // and values still cover every position): for training, with labels on a few answer tokens, this
  // skips most of that layer's work. Not for an MoE layer, whose load-balancing loss counts every
  // token's routing, nor under sequence parallelism (each rank holds other positions).
  at::Tensor rows, wanted;  // [batch, count] positions, and which of them are in the mask
  const std::size_t layers = static_cast<std::size_t>(config_.num_layers);
  const std::size_t begin = static_cast<std::size_t>(part.first_layer), end_layer = static_cast<std::size_t>(part.end_layer);
  const at::Tensor logits_mask =
      inputs.logits_mask.defined() ? inputs.logits_mask.to(context_.device).to(at::kBool) : at::Tensor();
  if (logits_mask.defined() && last && !cache && !split_sequence && !layout && layers > 0 &&
      !model_->by_index[layers - 1]->is_moe()) {
    const std::int64_t count = logits_mask.sum(1).max().item<std::int64_t>();
    if (count > 0 && count < seq) {
      // Each row's wanted positions in order, then unwanted ones to fill the rows to one length.
      at::Tensor order = at::arange(seq, positions.options()).expand({batch, seq});
      rows = at::argsort(at::where(logits_mask, order, order + seq), /*dim=*/1, /*descending=*/false).narrow(1, 0, count);
      wanted = logits_mask.gather(1, rows);
    }
  }
  at::Tensor h = embeddings;  // a later chunk's input is already split and padded
  if (first) {
    h = layout ? layout->take(embeddings, 1) : pad_sequence(embeddings, split_sequence ? pad : 0);
    if (split_sequence) h = scatter_to_sequence_parallel_region(region_.group, h, 1);
  }
  std::vector<at::Tensor> router_logits;
  const auto& recompute = context_.activations_checkpoint;
  const bool full = recompute.granularity == "full" && !cache && at::GradMode::is_enabled();
  // Full recomputation (Megatron): "uniform" checkpoints chunks of num_layers layers, "block" the
  // first num_layers layers one by one. A chunk returns its hidden state and its routers' logits
  // (MoE), so that the load-balancing loss still reaches the routers.
  const std::size_t chunk = full && recompute.method == "uniform" ? static_cast<std::size_t>(recompute.num_layers) : 1;
  for (std::size_t i = begin; i < end_layer;) {
    const std::size_t end = std::min(end_layer, i + chunk);
    const bool checkpoint = full && (recompute.method == "uniform" || i < static_cast<std::size_t>(recompute.num_layers));
    if (!checkpoint) {
      auto layer = model_->by_index[i];
      h = layer->forward(h, cos, sin, mask, cache ? &cache->layers[i] : nullptr, i + 1 == layers ? rows : at::Tensor(),
                         router_logits);
      ++i;
      continue;
    }
    auto run = [this, i, end, layers, cos, sin, mask, rows](const std::vector<at::Tensor>& inputs) {
      std::vector<at::Tensor> outputs{inputs[0]};
      for (std::size_t j = i; j < end; ++j) {
        auto layer = model_->by_index[j];
        std::vector<at::Tensor> logits;
        outputs[0] = layer->forward(outputs[0], cos, sin, mask, nullptr, j + 1 == layers ? rows : at::Tensor(), logits);
        outputs.insert(outputs.end(), logits.begin(), logits.end());
      }
      return outputs;
    };
    auto outputs = recomputed(run, {h});
    h = outputs[0];
    router_logits.insert(router_logits.end(), outputs.begin() + 1, outputs.end());
    i = end;
  }
  if (cache && final_chunk_here && !slots) cache->length += seq;
  if (!last) {  // the next chunk's input
    BackboneOutputs outputs;
    outputs.logits = h;
    return outputs;
  }
  h = model_->norm->forward(h);
  // The LM head is column-parallel over the vocabulary: its input enters the tensor-parallel region
  // (f; under sequence parallelism the all-gather of the sequence, which also drops the padding).
  h = region_.enter(h);
  if (layout) {  // this rank's positions (padding among them): the logits where the local mask says
    if (logits_mask.defined()) h = h.index({layout->take(logits_mask, 1, 0).to(at::kBool)});
  } else {
    if (pad > 0) h = h.narrow(1, 0, seq);
    if (logits_mask.defined()) h = h.index({rows.defined() ? wanted : logits_mask});
  }
  BackboneOutputs outputs;
  nn::LinearImpl* head = lm_head_.get();
  outputs.logits = head ? head->forward_entered(h) : nn::linear_product(h, model_->embed_tokens->weight);
  if (region_.group && !inputs.vocab_parallel_logits) {
    outputs.logits = gather_from_tensor_parallel_region(region_.group, outputs.logits);
    if (vocabulary_.padded != config_.vocab_size) outputs.logits = outputs.logits.narrow(-1, 0, config_.vocab_size);
  }
  if (is_training() && !router_logits.empty() && config_.router_aux_loss_coef > 0) {
    double share = 1;
    if (layout) {
      // Every rank's routing, back in sequence order (a gather whose backward reduce-scatters: each
      // rank's copy of the loss sends its gradient to every token), the loss counted 1/cp per rank.
      at::Tensor order = at::empty({layout->padded}, at::kLong);
      order.index_copy_(0, at::cat(layout->of_rank), at::arange(layout->padded, at::kLong));
      order = order.to(context_.device);
      for (auto& logits : router_logits) {
        logits = gather_from_sequence_parallel_region(context_.groups.context, logits.view({batch, -1, logits.size(-1)}), 1)
                     .index_select(1, order)
                     .reshape({batch * padded_seq, -1});
      }
      share = 1.0 / cp;
    }
    if (pad > 0) {  // the padding's routing is no token's
      for (auto& logits : router_logits) {
        logits = logits.view({batch, padded_seq, -1}).narrow(1, 0, seq).reshape({batch * seq, -1});
      }
    }
    outputs.aux_loss = config_.router_aux_loss_coef * share *
                       load_balancing_loss(router_logits, config_.num_experts, config_.experts_per_token);
  }
  return outputs;
}

std::unique_ptr<KVCache> DecoderBackbone::new_cache(std::int64_t batch, std::int64_t max_tokens) {
  auto cache = std::make_unique<DecoderCache>();
  cache->rows = batch;
  cache->capacity = max_tokens;
  // A bf16 model on the CPU keeps its keys and values in fp32 (each already rounded to bf16 by its
  // projection) and attends over them in fp32 (SelfAttention): the wheel's bf16 SDPA runs MKL's
  // generic bf16 GEMV on AMD processors, 2-8x slower than fp32 SDPA over the same keys, and widening a
  // bf16 cache at every step costs more than the attention itself at 1024 keys (docs/benchmarks.md).
  // Twice the cache's memory, for decode steps that stay fast as the context grows.
  const bool fp32_cache = context_.device.is_cpu() && context_.dtypes.compute == at::kBFloat16;
  auto options = at::TensorOptions().device(context_.device).dtype(fp32_cache ? at::kFloat : context_.dtypes.compute);
  const std::int64_t kv_heads = split_heads(config_.num_heads, config_.num_kv_heads, region_.size()).kv_heads;
  for (std::int64_t i = 0; i < config_.num_layers; ++i) {
    if (!model_->by_index[static_cast<std::size_t>(i)]) {  // another pipeline stage's layer
      cache->layers.emplace_back();
      continue;
    }
    // Zeros, not garbage: a slot's keys past its length are masked, and a masked NaN would still
    // reach the output through a zero attention weight.
    cache->layers.push_back({at::zeros({batch, kv_heads, max_tokens, config_.head_dim}, options),
                             at::zeros({batch, kv_heads, max_tokens, config_.head_dim}, options)});
  }
  return cache;
}

void check_tensor_parallel_split(const DecoderConfig& config, int tp) {
  if (tp == 1) return;
  try {
    split_heads(config.num_heads, config.num_kv_heads, tp);
  } catch (const Error& error) {
    throw Error(config.source + ": " + error.what());
  }
  if (config.intermediate_size % tp != 0) {
    throw Error(config.source + ": intermediate_size " + std::to_string(config.intermediate_size) +
                " does not split over " + std::to_string(tp) +
                " tensor-parallel ranks (it must be a multiple of tensor_model_parallel_size)");
  }
}

DecoderPluginConfig::~DecoderPluginConfig() = default;

void read_decoder_shape(const HfConfig& hf, const DecoderDefaults& defaults, DecoderConfig& d) {
  d.vocab_size = hf.positive("vocab_size", defaults.vocab_size);
  d.hidden_size = hf.positive("hidden_size", defaults.hidden_size);
  d.intermediate_size = hf.positive("intermediate_size", defaults.intermediate_size);
  d.num_layers = hf.positive("num_hidden_layers", defaults.num_layers);
  d.num_heads = hf.positive("num_attention_heads", defaults.num_heads);
  if (defaults.num_kv_heads < 0) {
    d.num_kv_heads = hf.require<std::int64_t>("num_key_value_heads");
  } else {
    d.num_kv_heads = hf.positive("num_key_value_heads", defaults.num_kv_heads ? defaults.num_kv_heads : d.num_heads);
  }
  if (d.num_kv_heads <= 0 || d.num_heads % d.num_kv_heads != 0) {
    hf.fail("num_key_value_heads", "expected a positive divisor of num_attention_heads (" + std::to_string(d.num_heads) + ")");
  }
  d.head_dim = hf.positive("head_dim", d.hidden_size / d.num_heads);
  d.activation = hf.get<std::string>("hidden_act", defaults.activation);
  check_activation(d.activation, hf.source() + ": hidden_act");
  d.tie_word_embeddings = hf.get<bool>("tie_word_embeddings", false);
  d.rope = hf.rope(d.head_dim, defaults.rope_theta, defaults.max_position_embeddings);
}

DecoderPluginConfig* parse_decoder_plugin_config(const ConfigSection& section, const std::string& architecture,
                                                 const std::string& model_type,
                                                 void (*read)(const HfConfig&, DecoderConfig&)) {
  HfSource source = read_hf_source(section, "text_config");
  auto config = std::make_unique<DecoderPluginConfig>();
  config->architecture = architecture;
  try {
    std::string found = source.config.get<std::string>("model_type", model_type);
    if (found != model_type) source.config.fail("model_type", "expected \"" + model_type + "\", got \"" + found + "\"");
    config->decoder.source = source.config.source();
    read(source.config, config->decoder);
  } catch (const Error& error) {
    section.fail(source.key, error.what());
  }
  // Token dropping for an MoE (Megatron / NeMo's keys; transformers' Mixtral is dropless).
  if (auto factor = section.optional<double>("moe_expert_capacity_factor")) {
    if (config->decoder.mlp != "moe") {
      section.fail("moe_expert_capacity_factor", "this " + architecture + " model has no experts");
    }
    if (!(*factor > 0)) section.fail("moe_expert_capacity_factor", "expected a number > 0 (leave it out: dropless)");
    config->decoder.moe_capacity_factor = *factor;
  }
  if (auto policy = section.optional<std::string>("moe_token_drop_policy")) {
    if (*policy != "probs" && *policy != "position") {
      section.fail("moe_token_drop_policy", "expected \"probs\" or \"position\", got \"" + *policy + "\"");
    }
    if (config->decoder.moe_capacity_factor == 0) {
      section.fail("moe_token_drop_policy", "needs moe_expert_capacity_factor (without it nothing is dropped)");
    }
    config->decoder.moe_drop_policy = *policy;
  }
  config->weights = source.weights;
  config->hidden_size = config->decoder.hidden_size;
  config->vocab_size = config->decoder.vocab_size;
  return config.release();
}

Component* create_decoder_backbone(const ComponentConfig& config, const RuntimeContext& context) {
  const auto& plugin = dynamic_cast<const DecoderPluginConfig&>(config);
  std::unique_ptr<DecoderBackbone> backbone;
  {
    nn::UninitialisedParameters loaded_next(!plugin.weights.empty());  // load() fills every parameter
    backbone = std::make_unique<DecoderBackbone>(plugin.decoder, context);
  }
  if (!plugin.weights.empty()) backbone->load(plugin.weights, plugin.architecture);
  return backbone.release();
}

void DecoderBackbone::load(const std::string& checkpoint_path, const std::string& what) {
  SafetensorsCheckpoint checkpoint(checkpoint_path);
  const bool tied = config_.tie_word_embeddings;
  auto map = detect_layout(
      checkpoint,
      {{"model.embed_tokens.weight", {{"model.", "model."}, {"lm_head.", "lm_head."}}},
       {"language_model.model.embed_tokens.weight", {{"model.", "language_model.model."}, {"lm_head.", "language_model.lm_head."}}},
       {"model.language_model.embed_tokens.weight", {{"model.", "model.language_model."}, {"lm_head.", "lm_head."}}}},
      what, [tied, this](const std::string& name) {
        // Pipeline parallelism: other stages' parts.
        const std::string prefix = "model.layers.";
        if (name.compare(0, prefix.size(), prefix) == 0) {
          const auto dot = name.find('.', prefix.size());
          const std::string index = name.substr(prefix.size(), dot - prefix.size());
          if (!index.empty() && std::all_of(index.begin(), index.end(), ::isdigit) &&
              std::stoll(index) < config_.num_layers && !model_->by_index[static_cast<std::size_t>(std::stoll(index))]) {
            return true;
          }
        }
        if (!model_->embed_tokens && name.compare(0, 19, "model.embed_tokens.") == 0) return true;
        if (!model_->norm && name.compare(0, 11, "model.norm.") == 0) return true;
        if (!lm_head_ && !tied && name.compare(0, 8, "lm_head.") == 0) return true;  // not the last stage
        // Expert parallelism: other ranks' experts.
        const std::int64_t expert = nn::expert_index(name);
        const int ep = group_size(context_.groups.expert);
        const std::int64_t per_rank = config_.num_experts / std::max(1, ep);
        if (expert >= 0 && ep > 1 && expert / per_rank != group_rank(context_.groups.expert)) return true;
        return (tied && name == "lm_head.weight") ||
               (name.size() > 9 && name.compare(name.size() - 9, 9, ".inv_freq") == 0);
      });
  load_weights(*this, checkpoint, map, what + " language model (" + config_.source + ")", context_.groups.tensor);
}

}  // namespace neva
