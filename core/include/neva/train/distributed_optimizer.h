#pragma once
// ZeRO-1: AdamW whose state — the fp32 main weights and both moments — is split over the
// data-parallel ranks (Megatron-core's DistributedOptimizer, NeMo's distributed_fused_adam; Rajbhandari
// et al. 2019, stage 1).
//
// The gradient buckets (data_parallel.h) are reduce-scattered instead of all-reduced: rank r keeps
// the sum of its 1/d of every bucket. It holds the main weights and moments of exactly that share
// (the pieces of the parameters that fall in it), updates them with the same fused AdamW kernel as
// the replicated optimizer (per piece: weight decay by the parameter it belongs to), and the updated
// weights are all-gathered back into every replica's parameters. Per rank that is 1/d of the
// optimizer state; the parameters themselves and one step's gradients stay whole.
#include <ATen/core/Tensor.h>
#include <torch/optim/adamw.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "neva/api.h"
#include "neva/train/data_parallel.h"
#include "neva/train/optim.h"

namespace neva {

class ProcessGroup;
class SafetensorsCheckpoint;

class NEVA_API DistributedOptimizer {
 public:
  // `buckets` must shard (GradientBucketOptions::shard) over `data`. The main weights are `main_dtype`
  // (fp32; fp64 in the equivalence tests): copies of this rank's pieces of bf16 parameters, or the
  // parameters' pieces themselves when they have that dtype.
  DistributedOptimizer(std::vector<TrainedTensor>& trained, const GradientBuckets& buckets,
                       std::shared_ptr<ProcessGroup> data, const OptimizerConfig& config, at::ScalarType main_dtype,
                       std::chrono::milliseconds timeout);
  ~DistributedOptimizer();

  // Tensor parallelism's fix-up (finalize_tensor_parallel_gradients) on this rank's shares.
  void finalize_tensor_parallel(const std::shared_ptr<ProcessGroup>& tensor_group);
  // The whole model's gradient norm: each piece's square with its parameter's weight (see
  // gradient_norm), summed over the data-parallel group and then over `model_groups` (tensor, pipeline).
  GradientNorm gradient_norm(double max_norm, const std::vector<double>& weights,
                             const std::vector<std::shared_ptr<ProcessGroup>>& model_groups) const;
  // One AdamW step of this rank's shares at `lr`, the gradients multiplied by `gradient_scale`
  // (clipping), then every parameter all-gathered from the ranks that updated its pieces.
  void step(double lr, double gradient_scale);

  // Bytes of optimizer state on this rank (main weights and moments of its shares).
  std::int64_t state_bytes() const;
  // Every trained tensor's whole gradient of the step (all-gathered from the shares): for tests.
  std::vector<at::Tensor> gather_gradients() const;

  // The whole state, as Trainer::save writes it: each trained tensor's main weight and moments,
  // all-gathered over the data-parallel group (then over the tensor-parallel one by the caller).
  struct Whole {
    std::vector<at::Tensor> main, exp_avg, exp_avg_sq;  // per trained tensor, this rank's TP shard
    std::int64_t steps = 0;
  };
  Whole gather() const;
  // Restores this rank's shares from whole (TP-local) tensors, one per trained tensor; the
  // parameters take `main` too.
  void restore(const std::vector<at::Tensor>& main, const std::vector<at::Tensor>& exp_avg,
               const std::vector<at::Tensor>& exp_avg_sq, std::int64_t steps);

  // This rank's shares, piece by piece: elements [offset, offset + length) of trained tensor `tensor`
  // (its tensor-parallel shard, row-major), as views of the optimizer's own state — the main weights
  // and, after a step (or reset_state), both moments. What a distributed checkpoint writes and reads.
  struct Share {
    std::size_t tensor;
    std::int64_t offset, length;
    at::Tensor main, exp_avg, exp_avg_sq;
  };
  std::vector<Share> shares() const;
  std::int64_t steps() const { return steps_; }
  // Before reading a checkpoint into shares(): `steps` steps taken, and (steps > 0) zero moments for
  // every piece, to be overwritten.
  void reset_state(std::int64_t steps);

 private:
  struct Piece {
    std::size_t tensor, bucket;
    std::int64_t tensor_offset, shard_offset, length;
  };
  at::Tensor gather_bucket(std::size_t bucket, const at::Tensor& share, at::ScalarType dtype) const;
  std::vector<at::Tensor> gather_pieces(const std::vector<at::Tensor>& shares) const;

  std::vector<TrainedTensor>& trained_;
  const GradientBuckets& buckets_;
  std::shared_ptr<ProcessGroup> data_;
  std::chrono::milliseconds timeout_;
  std::vector<Piece> pieces_;
  at::Tensor share(std::size_t bucket) const;  // this rank's main weights of a bucket, [shard_size]
  // Main weights in another dtype than the parameters' (bf16 weights, fp32 main weights): a share per
  // bucket. In the parameters' dtype the pieces are views into the parameters themselves.
  bool copies_ = false;
  std::vector<at::Tensor> main_shares_;  // per bucket [shard_size], with copies_
  std::vector<at::Tensor> piece_mains_;  // per piece: the optimizer's parameter (a view)
  std::unique_ptr<torch::optim::AdamW> optimizer_;
  std::int64_t steps_ = 0;
};

}  // namespace neva
