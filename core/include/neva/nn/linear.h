#pragma once
// The one place where neva's layers and plugins create linear layers, embeddings, the LM head and
// patch convolutions: the swap point for tensor parallelism (column / row / vocabulary-parallel) and
// for precision recipes that replace the matmul (FP8).
//
// At tensor-parallel size 1 each is exactly its torch::nn counterpart: the same parameter names
// (weight, bias), shapes, initialisation formula (kaiming-uniform weights with a = sqrt(5) and
// uniform(+-1/sqrt(fan_in)) biases for Linear and Conv2d, N(0, 1) for Embedding) and the same ATen
// call in forward (at::linear, at::embedding, at::conv2d), so results are bitwise those of torch::nn.
// Weights are drawn from the context's generator on the CPU, in the order layers are built, then
// moved to the context's device.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>

#include "neva/api.h"
#include "neva/context.h"
#include "neva/nn/module.h"

namespace neva::nn {

// How a linear layer is split over the tensor-parallel group (Megatron's ColumnParallelLinear and
// RowParallelLinear).
enum class Parallel {
  Replicated,  // every rank holds the whole weight
  Column,      // the output features are split: weight [out / tp, in]
  Row,         // the input features are split: weight [out, in / tp]; the outputs are summed
};

struct LinearOptions {
  bool bias = true;
  Parallel parallel = Parallel::Replicated;
  // Column: all-gather the output so every rank gets all out features (an LM head returning full logits).
  bool gather_output = false;
  // Row: the input already arrives split along its last dimension (it follows a Column layer).
  bool input_is_parallel = true;
  // Column: the output holds this many interleaved blocks split separately (fused gate/up, q/k/v).
  std::int64_t partition_stride = 1;
};

class NEVA_API LinearImpl : public Module {
 public:
  LinearImpl(const RuntimeContext& context, std::int64_t in_features, std::int64_t out_features,
             const LinearOptions& options);
  at::Tensor forward(const at::Tensor& x);
  std::int64_t in_features() const { return in_features_; }    // of the whole layer
  std::int64_t out_features() const { return out_features_; }  // of the whole layer

  at::Tensor weight;  // [out, in] (this rank's shard)
  at::Tensor bias;    // [out] (this rank's shard), or undefined

 private:
  std::int64_t in_features_, out_features_;
};

class NEVA_API EmbeddingImpl : public Module {
 public:
  // `vocabulary_parallel`: the rows are split over the tensor-parallel group (Megatron's
  // VocabParallelEmbedding).
  EmbeddingImpl(const RuntimeContext& context, std::int64_t num_embeddings, std::int64_t embedding_dim,
                bool vocabulary_parallel);
  at::Tensor forward(const at::Tensor& ids);
  std::int64_t num_embeddings() const { return num_embeddings_; }

  at::Tensor weight;  // [num_embeddings, dim] (this rank's rows)

 private:
  std::int64_t num_embeddings_;
};

// A 2-D convolution with a square kernel and stride (ViT patch embeddings).
class NEVA_API Conv2dImpl : public Module {
 public:
  Conv2dImpl(const RuntimeContext& context, std::int64_t in_channels, std::int64_t out_channels, std::int64_t kernel,
             std::int64_t stride, bool bias);
  at::Tensor forward(const at::Tensor& x);

  at::Tensor weight;  // [out, in, kernel, kernel]
  at::Tensor bias;

 private:
  std::int64_t stride_;
};

using Linear = std::shared_ptr<LinearImpl>;
using Embedding = std::shared_ptr<EmbeddingImpl>;
using Conv2d = std::shared_ptr<Conv2dImpl>;

NEVA_API Linear linear(const RuntimeContext& context, std::int64_t in_features, std::int64_t out_features,
                       const LinearOptions& options = {});
NEVA_API Embedding embedding(const RuntimeContext& context, std::int64_t num_embeddings, std::int64_t embedding_dim,
                             bool vocabulary_parallel = false);
NEVA_API Conv2d conv2d(const RuntimeContext& context, std::int64_t in_channels, std::int64_t out_channels,
                       std::int64_t kernel, std::int64_t stride, bool bias = true);

// A parameter initialised from the context's generator: uniform(-bound, bound) or N(0, std).
NEVA_API at::Tensor uniform_parameter(const RuntimeContext& context, at::IntArrayRef shape, double bound);
NEVA_API at::Tensor normal_parameter(const RuntimeContext& context, at::IntArrayRef shape, double std = 1.0);

}  // namespace neva::nn
