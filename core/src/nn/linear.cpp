#include "neva/nn/linear.h"

#include <ATen/ATen.h>

#include <cmath>

#include "neva/error.h"

namespace neva::nn {

namespace {

// torch::nn::init::kaiming_uniform_(w, a = sqrt(5)) for fan_in, with LibTorch's exact arithmetic.
double kaiming_uniform_bound(std::int64_t fan_in) {
  const double a = std::sqrt(5.0);
  const double gain = std::sqrt(2.0 / (1 + a * a));
  const double std = gain / std::sqrt(static_cast<double>(fan_in));
  return std::sqrt(3.0) * std;
}

void refuse_split(const RuntimeContext& context, const char* what) {
  if (group_size(context.groups.tensor) > 1) {
    throw Error(std::string(what) + " over a tensor-parallel group of " +
                std::to_string(group_size(context.groups.tensor)) + " ranks is not implemented yet");
  }
}

at::Tensor placed(const RuntimeContext& context, at::Tensor cpu) {
  return context.device.is_cpu() ? cpu : cpu.to(context.device);
}

}  // namespace

at::Tensor uniform_parameter(const RuntimeContext& context, at::IntArrayRef shape, double bound) {
  return placed(context, at::empty(shape, at::kFloat).uniform_(-bound, bound, context.generator));
}

at::Tensor normal_parameter(const RuntimeContext& context, at::IntArrayRef shape, double std) {
  return placed(context, at::empty(shape, at::kFloat).normal_(0.0, std, context.generator));
}

LinearImpl::LinearImpl(const RuntimeContext& context, std::int64_t in_features, std::int64_t out_features,
                       const LinearOptions& options)
    : in_features_(in_features), out_features_(out_features) {
  if (in_features <= 0 || out_features <= 0) {
    throw Error("a linear layer needs positive sizes, got " + std::to_string(in_features) + " -> " +
                std::to_string(out_features));
  }
  if (options.parallel != Parallel::Replicated) refuse_split(context, "a column- or row-parallel linear layer");
  ParameterSharding sharding;
  if (options.parallel == Parallel::Column) {
    sharding.tensor_parallel_dim = 0;
    sharding.partition_stride = options.partition_stride;
  } else if (options.parallel == Parallel::Row) {
    sharding.tensor_parallel_dim = 1;
  }
  // As torch::nn::LinearImpl::reset_parameters: the weight first, then the bias, from one stream.
  weight = register_parameter("weight", uniform_parameter(context, {out_features, in_features},
                                                          kaiming_uniform_bound(in_features)),
                              sharding);
  if (options.bias) {
    ParameterSharding bias_sharding;  // a row-parallel bias is added once, after the sum
    if (options.parallel == Parallel::Column) bias_sharding = sharding;
    bias = register_parameter("bias", uniform_parameter(context, {out_features}, 1.0 / std::sqrt(in_features)),
                              bias_sharding);
  }
}

at::Tensor LinearImpl::forward(const at::Tensor& x) { return at::linear(x, weight, bias); }

EmbeddingImpl::EmbeddingImpl(const RuntimeContext& context, std::int64_t num_embeddings, std::int64_t embedding_dim,
                             bool vocabulary_parallel)
    : num_embeddings_(num_embeddings) {
  if (num_embeddings <= 0 || embedding_dim <= 0) {
    throw Error("an embedding needs positive sizes, got " + std::to_string(num_embeddings) + " x " +
                std::to_string(embedding_dim));
  }
  ParameterSharding sharding;
  if (vocabulary_parallel) {
    refuse_split(context, "a vocabulary-parallel embedding");
    sharding.tensor_parallel_dim = 0;
  }
  weight = register_parameter("weight", normal_parameter(context, {num_embeddings, embedding_dim}), sharding);
}

at::Tensor EmbeddingImpl::forward(const at::Tensor& ids) { return at::embedding(weight, ids); }

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

Linear linear(const RuntimeContext& context, std::int64_t in_features, std::int64_t out_features,
              const LinearOptions& options) {
  return std::make_shared<LinearImpl>(context, in_features, out_features, options);
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
