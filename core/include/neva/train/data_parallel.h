#pragma once
// Data parallelism's gradient reduction: gradients live in flat buckets (the parameters' .grad are
// views into them) that are all-reduced over the data-parallel group while the backward pass of the
// step's last micro-batch still runs (Megatron-core's DistributedDataParallel with
// overlap_grad_reduce, PyTorch DDP's Reducer), and never during the micro-batches before it.
//
// Buckets hold the trained tensors in reverse order (the order the backward pass finishes them) up
// to a size, and are started strictly in order on every rank — a bucket whose gradients are complete
// waits for the ones before it — so the collectives match across ranks whatever order each rank's
// backward pass takes (images or not, experts reached or not). A tensor whose gradient never comes
// (a frozen path, an idle expert) counts as zeros; what is not started when the backward pass ends is
// started then, in order.
#include <ATen/core/Tensor.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "neva/api.h"
#include "neva/nn/module.h"

namespace neva {

class ProcessGroup;

// A trained tensor: the model's parameter and the copy the optimizer updates (the same tensor in
// fp32; an fp32 main copy of a bf16 weight under megatron_amp_O2).
struct TrainedTensor {
  std::string name;  // "llm.model.layers.0.mlp.up_proj.weight"
  at::Tensor param;
  at::Tensor main;
  nn::ParameterSharding sharding;  // how the parameter is split over the ranks (neva::nn's record)
};

// A gradient, or a part of one (a distributed optimizer's share), of a parameter sharded as `sharding`.
struct GradientPiece {
  const nn::ParameterSharding* sharding;
  at::Tensor gradient;  // written in place
};

// Tensor parallelism's gradient fix-up (Megatron's _allreduce_non_tensor_model_parallel_grads) on
// `pieces`: those of parameters that saw only this rank's part of the sequence (sequence_parallel:
// norms, row-parallel biases) are summed over `tensor_group`, and those of shards several ranks hold
// (KV heads fewer than the ranks) over the ranks holding them; one all-reduce per dtype for all. Every
// rank of the group passes the same pieces' shapes in the same order. Nothing without a group.
NEVA_API void sum_over_tensor_parallel(std::vector<GradientPiece>& pieces, const std::shared_ptr<ProcessGroup>& tensor_group);

// The same over every trained tensor's main gradient (a missing gradient counts as zeros).
NEVA_API void finalize_tensor_parallel_gradients(std::vector<TrainedTensor>& trained,
                                                 const std::shared_ptr<ProcessGroup>& tensor_group);

struct GradientBucketOptions {
  std::int64_t bucket_bytes = 25 << 20;  // model.optim.bucket_cap_mb (PyTorch DDP's 25 MB)
  bool overlap = true;                   // model.optim.overlap_grad_sync: start buckets during backward
  std::chrono::milliseconds timeout{std::chrono::minutes(5)};  // one bucket's wait
  // ZeRO-1 (the distributed optimizer): each bucket is reduce-scattered instead of all-reduced, so
  // that rank r keeps the sum of its 1/size of it (the bucket padded to a multiple of the size).
  bool shard = false;
  // The gradients' dtype; default each main tensor's (a distributed optimizer over bf16 weights
  // keeps fp32 gradients, as Megatron's main_grad).
  std::optional<at::ScalarType> grad_dtype;
};

// One bucket: its flat buffer of gradients, the trained tensors in it and where, and under
// sharding this rank's reduced share ([shard_size] elements from shard_size x rank).
struct GradientBucket {
  at::Tensor buffer;
  std::vector<std::size_t> members;    // indices into the trained tensors
  std::vector<std::int64_t> offsets;   // each member's first element in the buffer
  at::Tensor shard;                    // sharded: this rank's share of the buffer (a view), reduced
  std::int64_t shard_size = 0;
};

// What one step's reduction did, for the communication accounting.
struct GradientSyncReport {
  std::int64_t buckets = 0;
  std::int64_t bytes = 0;               // logical payload of the all-reduces
  std::int64_t started_in_backward = 0;  // buckets started before the backward pass ended
};

class NEVA_API GradientBuckets {
 public:
  // `trained` must outlive the buckets. Their main tensors' gradients become views into the buckets
  // (zeros) where the dtypes agree; where a parameter's dtype is not its bucket's (bf16 weights with
  // fp32 gradients: megatron_amp_O2), its gradient is added into the bucket as soon as the backward
  // pass produces it (and a main copy of that dtype, O2's fp32 main weights, takes the view).
  // `include` picks the tensors these buckets reduce (default every one): expert parallelism reduces
  // the dense tensors over the data-parallel group and the experts over the expert-data group.
  GradientBuckets(std::vector<TrainedTensor>& trained, std::shared_ptr<ProcessGroup> group,
                  GradientBucketOptions options, std::function<bool(const TrainedTensor&)> include = nullptr);
  ~GradientBuckets();
  GradientBuckets(const GradientBuckets&) = delete;
  GradientBuckets& operator=(const GradientBuckets&) = delete;

  // The next backward pass is the step's last: each bucket is all-reduced once its tensors' gradients
  // are complete (with overlap). Until finish(), nothing else may run on the group: a replica whose
  // backward pass started fewer buckets would pair another collective with one of them.
  void arm();
  // After the last backward pass: starts the buckets not started yet, in order, and waits for all.
  // Every main gradient then holds the sum over the group.
  GradientSyncReport finish();
  // Zeroes every bucket for the next step (the gradients stay views into them).
  void zero();
  std::size_t size() const;
  const std::vector<GradientBucket>& buckets() const;
  // Trained tensor i's gradient: its view into its bucket (the whole sum after finish(), unless sharded).
  const at::Tensor& gradient(std::size_t i) const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace neva
