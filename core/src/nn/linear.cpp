#include "neva/nn/linear.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>

#include "neva/error.h"
#include "neva/parallel/mappings.h"
#include "neva/parallel/process_group.h"

namespace neva::nn {

namespace {

// torch::nn::init::kaiming_uniform_(w, a = sqrt(5)) for fan_in, with LibTorch's exact arithmetic.
double kaiming_uniform_bound(std::int64_t fan_in) {
  const double a = std::sqrt(5.0);
  const double gain = std::sqrt(2.0 / (1 + a * a));
  const double std = gain / std::sqrt(static_cast<double>(fan_in));
  return std::sqrt(3.0) * std;
}

std::string layer_sizes(std::int64_t in, std::int64_t out) {
  return "a linear layer " + std::to_string(in) + " -> " + std::to_string(out);
}

at::Tensor placed(const RuntimeContext& context, at::Tensor cpu) {
  return context.device.is_cpu() ? cpu : cpu.to(context.device);
}

}  // namespace

namespace {
thread_local int uninitialised_scopes = 0;

// On the meta device (a part another pipeline stage holds, built for its shapes only) and in an
// UninitialisedParameters scope nothing is drawn. The latter's memory is allocated in the dtype the
// model holds its weights in, so that the module's conversion to it is a no-op and the memory stays
// untouched until the checkpoint's copy fills it (load_weights asks for huge pages first).
std::optional<at::Tensor> undrawn(const RuntimeContext& context, at::IntArrayRef shape) {
  if (context.device.is_meta()) return at::empty(shape, at::TensorOptions(at::kFloat).device(at::kMeta));
  if (uninitialised_scopes > 0) {
    const c10::ScalarType dtype = at::isFloatingType(context.dtypes.params) ? context.dtypes.params : at::kFloat;
    return at::empty(shape, at::TensorOptions(dtype).device(context.device));
  }
  return std::nullopt;
}
}  // namespace

UninitialisedParameters::UninitialisedParameters(bool active) : active_(active) {
  if (active_) ++uninitialised_scopes;
}
UninitialisedParameters::~UninitialisedParameters() {
  if (active_) --uninitialised_scopes;
}

at::Tensor uniform_parameter(const RuntimeContext& context, at::IntArrayRef shape, double bound) {
  if (auto empty = undrawn(context, shape)) return *std::move(empty);
  return placed(context, at::empty(shape, at::kFloat).uniform_(-bound, bound, context.generator));
}

at::Tensor normal_parameter(const RuntimeContext& context, at::IntArrayRef shape, double std) {
  if (auto empty = undrawn(context, shape)) return *std::move(empty);
  return placed(context, at::empty(shape, at::kFloat).normal_(0.0, std, context.generator));
}

VocabularyShard vocabulary_shard(const RuntimeContext& context, std::int64_t vocabulary) {
  const int tp = group_size(context.groups.tensor);
  if (tp == 1) return {0, vocabulary, vocabulary};
  const std::int64_t multiple = std::max<std::int64_t>(1, context.make_vocab_size_divisible_by) * tp;
  const std::int64_t padded = (vocabulary + multiple - 1) / multiple * multiple;
  const std::int64_t rows = padded / tp;
  return {group_rank(context.groups.tensor) * rows, rows, padded};
}

TensorParallelRegion::TensorParallelRegion(const RuntimeContext& context) {
  if (group_size(context.groups.tensor) == 1) return;
  group = context.groups.tensor;
  sequence_parallel = context.sequence_parallel;
}

at::Tensor TensorParallelRegion::enter(const at::Tensor& x) const {
  if (!group) return x;
  return sequence_parallel ? gather_from_sequence_parallel_region(group, x, 1) : copy_to_tensor_parallel_region(group, x);
}

int TensorParallelRegion::size() const { return group_size(group); }
int TensorParallelRegion::rank() const { return group_rank(group); }

LinearImpl::LinearImpl(const RuntimeContext& context, std::int64_t in_features, std::int64_t out_features,
                       const LinearOptions& options)
    : LinearImpl(context, in_features, out_features, options, ColumnLayout{}) {}

LinearImpl::LinearImpl(const RuntimeContext& context, std::int64_t in_features, std::int64_t out_features,
                       const LinearOptions& options, const ColumnLayout& layout)
    : in_features_(in_features), out_features_(out_features), options_(options) {
  if (in_features <= 0 || out_features <= 0) {
    throw Error("a linear layer needs positive sizes, got " + std::to_string(in_features) + " -> " +
                std::to_string(out_features));
  }
  const bool split = options.parallel != Parallel::Replicated && group_size(context.groups.tensor) > 1;
  const int tp = split ? group_size(context.groups.tensor) : 1;
  const int rank = split ? group_rank(context.groups.tensor) : 0;
  if (split) {
    group_ = context.groups.tensor;
    sequence_parallel_ = context.sequence_parallel;
  }
  ParameterSharding sharding;
  std::int64_t local_out = out_features, local_in = in_features;
  if (options.parallel == Parallel::Column) {
    sharding.tensor_parallel_dim = 0;
    sharding.partition_stride = options.partition_stride;
    sharding.tensor_parallel_replicas = split ? layout.replicas : 1;
    if (sharding.tensor_parallel_replicas < 1 || tp % sharding.tensor_parallel_replicas != 0) {
      throw Error(layer_sizes(in_features, out_features) + ": " + std::to_string(layout.replicas) +
                  " ranks per shard do not divide the tensor-parallel group of " + std::to_string(tp));
    }
    const std::int64_t shards = tp / sharding.tensor_parallel_replicas;
    if (layout.vocabulary && split) {
      if (options.partition_stride != 1 || sharding.tensor_parallel_replicas != 1) {
        throw Error(layer_sizes(in_features, out_features) + ": a vocabulary is split evenly, unstrided");
      }
      local_out = vocabulary_shard(context, out_features).rows;
      sharding.logical_size = out_features;
    } else if (out_features % (shards * options.partition_stride) != 0) {
      throw Error(layer_sizes(in_features, out_features) + " splits its " + std::to_string(out_features) +
                  " output features over " + std::to_string(shards) + " tensor-parallel shards" +
                  (options.partition_stride > 1 ? " in " + std::to_string(options.partition_stride) + " blocks" : "") +
                  ": they must divide evenly");
    } else {
      local_out = out_features / shards;
    }
  } else if (options.parallel == Parallel::Row) {
    sharding.tensor_parallel_dim = 1;
    if (in_features % tp != 0) {
      throw Error(layer_sizes(in_features, out_features) + " splits its " + std::to_string(in_features) +
                  " input features over " + std::to_string(tp) + " tensor-parallel ranks: they must divide evenly");
    }
    local_in = in_features / tp;
  }
  // As torch::nn::LinearImpl::reset_parameters: the weight first, then the bias, from one stream,
  // whole (Megatron's CPU initialisation): each rank then keeps its shard.
  at::Tensor full = uniform_parameter(context, {out_features, in_features}, kaiming_uniform_bound(in_features));
  const std::int64_t extent = sharding.tensor_parallel_dim == 0 ? local_out : local_in;
  // clone(): a shard of dimension 0 is a view that would keep the whole weight's memory alive.
  weight = register_parameter("weight", split ? shard_of(full, sharding, rank, tp, extent).clone() : full, sharding);
  if (options.bias) {
    ParameterSharding bias_sharding;  // a row-parallel bias is added once, after the sum
    if (options.parallel == Parallel::Column) bias_sharding = sharding;
    // Under sequence parallelism it is added to this rank's part of the sequence: its gradient
    // holds that part's share.
    if (options.parallel == Parallel::Row && sequence_parallel_) bias_sharding.sequence_parallel = true;
    at::Tensor whole = uniform_parameter(context, {out_features}, 1.0 / std::sqrt(in_features));
    bias = register_parameter(
        "bias", split && options.parallel == Parallel::Column ? shard_of(whole, bias_sharding, rank, tp, local_out).clone() : whole,
        bias_sharding);
  }
}

LinearKernel::~LinearKernel() = default;

at::Tensor LinearImpl::product(const at::Tensor& x, const at::Tensor& b) {
  return kernel_ ? kernel_->linear(x, weight, b) : linear_product(x, weight, b);
}

at::Tensor LinearImpl::column_output(const at::Tensor& x) {
  at::Tensor y = product(x, bias);
  if (!options_.gather_output) return y;
  y = gather_from_tensor_parallel_region(group_, y);
  return y.size(-1) == out_features_ ? y : y.narrow(-1, 0, out_features_);  // a padded vocabulary
}

at::Tensor LinearImpl::forward(const at::Tensor& x) {
  if (!group_) return product(x, bias);
  if (options_.parallel == Parallel::Column) return column_output(copy_to_tensor_parallel_region(group_, x));
  const at::Tensor input = options_.input_is_parallel ? x : scatter_to_tensor_parallel_region(group_, x);
  at::Tensor y = product(input, at::Tensor());
  y = sequence_parallel_ ? reduce_scatter_to_sequence_parallel_region(group_, y, 1) : reduce_from_tensor_parallel_region(group_, y);
  return bias.defined() ? y + bias : y;
}

at::Tensor LinearImpl::forward_entered(const at::Tensor& x) {
  if (options_.parallel != Parallel::Column) throw Error("forward_entered is for column-parallel layers");
  return group_ ? column_output(x) : product(x, bias);
}

at::Tensor LinearImpl::forward_unreduced(const at::Tensor& x) {
  if (options_.parallel != Parallel::Row) throw Error("forward_unreduced is for row-parallel layers");
  return product(x, at::Tensor());
}

EmbeddingImpl::EmbeddingImpl(const RuntimeContext& context, std::int64_t num_embeddings, std::int64_t embedding_dim,
                             bool vocabulary_parallel)
    : num_embeddings_(num_embeddings), shard_{0, num_embeddings, num_embeddings} {
  if (num_embeddings <= 0 || embedding_dim <= 0) {
    throw Error("an embedding needs positive sizes, got " + std::to_string(num_embeddings) + " x " +
                std::to_string(embedding_dim));
  }
  ParameterSharding sharding;
  at::Tensor full = normal_parameter(context, {num_embeddings, embedding_dim});
  if (vocabulary_parallel) {
    sharding.tensor_parallel_dim = 0;
    if (group_size(context.groups.tensor) > 1) {
      group_ = context.groups.tensor;
      shard_ = vocabulary_shard(context, num_embeddings);
      sharding.logical_size = num_embeddings;
      full = shard_of(full, sharding, group_rank(group_), group_size(group_), shard_.rows).clone();
    }
  }
  weight = register_parameter("weight", full, sharding);
}

at::Tensor EmbeddingImpl::forward(const at::Tensor& ids) {
  if (!group_) return at::embedding(weight, ids);
  // Ids outside this rank's rows look up row 0 and are zeroed; the sum over the group has each id's row.
  at::Tensor outside = (ids < shard_.start) | (ids >= shard_.start + shard_.rows);
  at::Tensor local = (ids - shard_.start).masked_fill(outside, 0);
  at::Tensor rows = at::embedding(weight, local).masked_fill(outside.unsqueeze(-1), 0);
  return reduce_from_tensor_parallel_region(group_, rows);
}

Conv2dImpl::Conv2dImpl(const RuntimeContext& context, std::int64_t in_channels, std::int64_t out_channels,
                       std::int64_t kernel, std::int64_t stride, bool bias)
    : stride_(stride) {
  if (in_channels <= 0 || out_channels <= 0 || kernel <= 0 || stride <= 0) {
    throw Error("a convolution needs positive channels, kernel and stride");
  }
  const std::int64_t fan_in = in_channels * kernel * kernel;
  weight = register_parameter("weight",
                              uniform_parameter(context, {out_channels, in_channels, kernel, kernel},
                                                kaiming_uniform_bound(fan_in)));
  if (bias) this->bias = register_parameter("bias", uniform_parameter(context, {out_channels}, 1.0 / std::sqrt(fan_in)));
}

at::Tensor Conv2dImpl::forward(const at::Tensor& x) { return at::conv2d(x, weight, bias, {stride_, stride_}); }

std::vector<std::pair<std::string, LinearImpl*>> linear_layers(torch::nn::Module& root) {
  std::vector<std::pair<std::string, LinearImpl*>> out;
  if (auto* layer = dynamic_cast<LinearImpl*>(&root)) out.emplace_back("", layer);
  // Without root itself: named_modules() would need root held by a shared_ptr.
  for (const auto& item : root.named_modules("", /*include_self=*/false)) {
    if (auto* layer = dynamic_cast<LinearImpl*>(item.value().get())) out.emplace_back(item.key(), layer);
  }
  return out;
}

Linear linear(const RuntimeContext& context, std::int64_t in_features, std::int64_t out_features,
              const LinearOptions& options) {
  return std::make_shared<LinearImpl>(context, in_features, out_features, options);
}

Linear linear(const RuntimeContext& context, std::int64_t in_features, std::int64_t out_features,
              const LinearOptions& options, const ColumnLayout& layout) {
  return std::make_shared<LinearImpl>(context, in_features, out_features, options, layout);
}

Embedding embedding(const RuntimeContext& context, std::int64_t num_embeddings, std::int64_t embedding_dim,
                    bool vocabulary_parallel) {
  return std::make_shared<EmbeddingImpl>(context, num_embeddings, embedding_dim, vocabulary_parallel);
}

Conv2d conv2d(const RuntimeContext& context, std::int64_t in_channels, std::int64_t out_channels, std::int64_t kernel,
              std::int64_t stride, bool bias) {
  return std::make_shared<Conv2dImpl>(context, in_channels, out_channels, kernel, stride, bias);
}

}  // namespace neva::nn
