#pragma once
// The one place where neva's layers and plugins create linear layers, embeddings, the LM head and
// patch convolutions: the swap point for tensor parallelism (column / row / vocabulary-parallel) and
// for precision recipes that replace the matmul (FP8).
//
// At tensor-parallel size 1 each is exactly its torch::nn counterpart: the same parameter names
// (weight, bias), shapes, initialisation formula (kaiming-uniform weights with a = sqrt(5) and
// uniform(+-1/sqrt(fan_in)) biases for Linear and Conv2d, N(0, 1) for Embedding) and the same ATen
// call in forward (at::linear, at::embedding, at::conv2d), so results are bitwise those of torch::nn
// whenever autograd records. Without autograd (generation, scoring, serving), products of a few rows on
// the CPU go through neva's GEMV and larger fp32 ones through OpenBLAS (linear_product): the same product
// to fp32 rounding, 2x faster to decode on AMD processors.
// Weights are drawn from the context's generator on the CPU, in the order layers are built, then
// moved to the context's device.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "neva/api.h"
#include "neva/context.h"
#include "neva/nn/module.h"

namespace neva::nn {

// How a linear layer is split over the tensor-parallel group (Megatron's ColumnParallelLinear and
// RowParallelLinear). Weights are drawn whole, from the same stream at every size, and each rank keeps
// its shard: a model built under tensor parallelism holds slices of the one built without it.
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

// Column layers whose shards are not an even split of the output features (plugin ABI 2.2).
struct ColumnLayout {
  // Consecutive tensor-parallel ranks holding the same shard: KV heads fewer than the ranks are
  // replicated (each rank keeps the group its query heads read), their gradients summed over those ranks.
  std::int64_t replicas = 1;
  // The output features are a vocabulary (the LM head): padded to a multiple of
  // make_vocab_size_divisible_by x the shards; the padding rows are zeros and their outputs unused.
  bool vocabulary = false;
};

// What computes a linear layer's product in place of at::linear (plugin ABI 2.4): a precision
// recipe installs one on the layers it changes (the fp8 recipe's FP8 GEMMs, with their scaling
// state). Every LinearImpl forward path (replicated, column, row, forward_entered,
// forward_unreduced) calls it for its own rank's product; the tensor-parallel collectives around it
// are unchanged. The trainer drives it once per optimizer step (step_finished), after reducing each
// kernel's shared_maxima() with MAX over the ranks that hold copies of its layer (the
// tensor-parallel and data-parallel replicas; for an expert's layers, the expert-data group), and
// checkpoints its state().
class NEVA_API LinearKernel {
 public:
  virtual ~LinearKernel();
  // x @ weight^T, plus bias when defined, differentiable in x, weight and bias.
  virtual at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) = 0;
  // float32 tensors this kernel records during the step that must agree over its layer's replicas
  // (amaxes, measured errors): the trainer reduces them in place with MAX before step_finished.
  virtual std::vector<at::Tensor> shared_maxima() = 0;
  // After each optimizer step (skipped ones too). Returns a line for the log when the kernel changed
  // how it computes (e.g. fell back from FP8), else "".
  virtual std::string step_finished() = 0;
  // The tensors that are its state (not parameters), by name, live: a checkpoint saves them and a
  // resume reads into them in place. Equal on every replica after step_finished.
  virtual std::vector<std::pair<std::string, at::Tensor>> state() = 0;
  // How it computes now, one word for metrics ("fp8", "bf16", ...).
  virtual std::string mode() const = 0;
};

// x @ weight^T (+ bias): at::linear, except for CPU tensors that autograd does not record:
//  - fp32 and bf16 products of at most 8 rows (decoding) go through neva's own GEMV (AVX-512, AVX512-BF16
//    or AVX2; fp32 sums): it reads weights faster than OpenBLAS's sgemv and about 2x faster than the
//    wheel's MKL and oneDNN one-row products on AMD processors (docs/benchmarks.md); bf16 results are
//    rounded once, to nearest even;
//  - larger fp32 products go through OpenBLAS's cblas_sgemm (opened with RTLD_LOCAL beside LibTorch's
//    MKL, whose GEMM is 1.2-1.5x slower on AMD processors), each split over LibTorch's OpenMP threads
//    (OpenBLAS's own pool unused).
// at::linear when NEVA_CPU_BLAS=aten, inside an AtenLinearScope, under CPU autocast (which casts
// at::linear's inputs), for larger fp32 products when OpenBLAS is not installed, larger bf16 ones, and
// other dtypes, shapes and devices.
NEVA_API at::Tensor linear_product(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias = {});
// Which library computes linear_product's larger fp32 CPU products: "OpenBLAS (<its build config>)", or
// "ATen (MKL)" with the reason.
NEVA_API std::string cpu_blas_name();
// Which kernels compute linear_product's fp32 CPU products: "neva's GEMV (<instructions>) up to 8 rows,
// <cpu_blas_name()> beyond", or "ATen (MKL): NEVA_CPU_BLAS=aten".
NEVA_API std::string cpu_fp32_gemv_name();
// Which kernels compute linear_product's bf16 CPU products: "neva's GEMV (<instructions>) up to 8 rows,
// ATen (oneDNN) beyond", or "ATen (oneDNN): NEVA_CPU_BLAS=aten".
NEVA_API std::string cpu_bf16_gemv_name();
// While one lives on this thread, linear_product is at::linear: for what runs without autograd but
// is computed again with it (activation recomputation's first pass), so that both passes agree bitwise.
class NEVA_API AtenLinearScope {
 public:
  AtenLinearScope();
  ~AtenLinearScope();
  AtenLinearScope(const AtenLinearScope&) = delete;
  AtenLinearScope& operator=(const AtenLinearScope&) = delete;
};

class NEVA_API LinearImpl : public Module {
 public:
  LinearImpl(const RuntimeContext& context, std::int64_t in_features, std::int64_t out_features,
             const LinearOptions& options);
  LinearImpl(const RuntimeContext& context, std::int64_t in_features, std::int64_t out_features,
             const LinearOptions& options, const ColumnLayout& layout);
  // Column: f (identity forward, all-reduce of the input gradient backward), then this rank's outputs.
  // Row: this rank's part of the product, summed over the group (g; a reduce-scatter along the
  // sequence under sequence parallelism), then the bias. Replicated: at::linear.
  at::Tensor forward(const at::Tensor& x);
  // Column, for an input the caller passed through TensorParallelRegion::enter once for several layers
  // (q, k and v; gate and up): no f of its own.
  at::Tensor forward_entered(const at::Tensor& x);
  // Row: this rank's partial product, neither summed over the group nor biased (an MoE layer sums
  // every expert's output at once, then adds what it must).
  at::Tensor forward_unreduced(const at::Tensor& x);
  std::int64_t in_features() const { return in_features_; }    // of the whole layer
  std::int64_t out_features() const { return out_features_; }  // of the whole layer
  const LinearOptions& options() const { return options_; }
  // The kernel computing this layer's product (null: at::linear). Plugin ABI 2.4.
  void set_kernel(std::shared_ptr<LinearKernel> kernel) { kernel_ = std::move(kernel); }
  const std::shared_ptr<LinearKernel>& kernel() const { return kernel_; }

  at::Tensor weight;  // [out, in] (this rank's shard)
  at::Tensor bias;    // [out] (this rank's shard), or undefined

 private:
  at::Tensor column_output(const at::Tensor& x);
  at::Tensor product(const at::Tensor& x, const at::Tensor& bias);
  std::int64_t in_features_, out_features_;
  LinearOptions options_;
  std::shared_ptr<ProcessGroup> group_;  // the tensor-parallel group, when split over more than one rank
  bool sequence_parallel_ = false;
  std::shared_ptr<LinearKernel> kernel_;  // appended in plugin ABI 2.4
};

// Every LinearImpl under `root` (itself included) by its path from `root` ("" for root itself), in
// named_modules() order.
NEVA_API std::vector<std::pair<std::string, LinearImpl*>> linear_layers(torch::nn::Module& root);

// This rank's rows of a vocabulary under tensor parallelism: the vocabulary padded to a multiple of
// make_vocab_size_divisible_by x the group's size, split evenly. Without it: [0, vocabulary).
struct VocabularyShard {
  std::int64_t start = 0, rows = 0, padded = 0;
};
NEVA_API VocabularyShard vocabulary_shard(const RuntimeContext& context, std::int64_t vocabulary);

// Where a tensor-parallel block (attention, MLP) takes its input: once for every column-parallel
// layer that reads it (forward_entered), f — or, under sequence parallelism, the all-gather along the
// sequence (dim 1) whose backward reduce-scatters. The identity without tensor parallelism.
struct NEVA_API TensorParallelRegion {
  TensorParallelRegion() = default;
  explicit TensorParallelRegion(const RuntimeContext& context);
  at::Tensor enter(const at::Tensor& x) const;
  int size() const;
  int rank() const;

  std::shared_ptr<ProcessGroup> group;  // null: no tensor parallelism
  bool sequence_parallel = false;
};

class NEVA_API EmbeddingImpl : public Module {
 public:
  // `vocabulary_parallel`: the rows are split over the tensor-parallel group (Megatron's
  // VocabParallelEmbedding): each rank looks up the ids in its rows, zeros for the others, and the
  // results are summed over the group.
  EmbeddingImpl(const RuntimeContext& context, std::int64_t num_embeddings, std::int64_t embedding_dim,
                bool vocabulary_parallel);
  at::Tensor forward(const at::Tensor& ids);
  std::int64_t num_embeddings() const { return num_embeddings_; }  // of the whole table (unpadded)

  at::Tensor weight;  // [num_embeddings, dim] (this rank's rows, padding included)

 private:
  std::int64_t num_embeddings_;
  VocabularyShard shard_;
  std::shared_ptr<ProcessGroup> group_;
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
NEVA_API Linear linear(const RuntimeContext& context, std::int64_t in_features, std::int64_t out_features,
                       const LinearOptions& options, const ColumnLayout& layout);
NEVA_API Embedding embedding(const RuntimeContext& context, std::int64_t num_embeddings, std::int64_t embedding_dim,
                             bool vocabulary_parallel = false);
NEVA_API Conv2d conv2d(const RuntimeContext& context, std::int64_t in_channels, std::int64_t out_channels,
                       std::int64_t kernel, std::int64_t stride, bool bias = true);

// A parameter initialised from the context's generator: uniform(-bound, bound) or N(0, std). Inside an
// UninitialisedParameters scope: allocated only, nothing drawn.
NEVA_API at::Tensor uniform_parameter(const RuntimeContext& context, at::IntArrayRef shape, double bound);
NEVA_API at::Tensor normal_parameter(const RuntimeContext& context, at::IntArrayRef shape, double std = 1.0);

// While one lives on this thread, uniform_parameter / normal_parameter allocate without drawing: for a
// part built only to be loaded from a checkpoint, which load_weights fills wholly or refuses. Saves the
// draws (single-threaded: seconds for a 1B model) and, in fp32 on the CPU, the memory of weights that
// the checkpoint's mapped pages replace (untouched until then). The context's generator is not
// advanced, so parts built after it draw what the skipped part would have drawn: a connector built
// after a loaded vision tower starts from other weights than in versions before this scope existed.
class NEVA_API UninitialisedParameters {
 public:
  explicit UninitialisedParameters(bool active = true);
  ~UninitialisedParameters();
  UninitialisedParameters(const UninitialisedParameters&) = delete;
  UninitialisedParameters& operator=(const UninitialisedParameters&) = delete;

 private:
  bool active_;
};

}  // namespace neva::nn
