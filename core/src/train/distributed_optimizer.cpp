#include "neva/train/distributed_optimizer.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "neva/error.h"
#include "neva/parallel/process_group.h"

namespace neva {

DistributedOptimizer::DistributedOptimizer(std::vector<TrainedTensor>& trained, const GradientBuckets& buckets,
                                           std::shared_ptr<ProcessGroup> data, const OptimizerConfig& config,
                                           at::ScalarType main_dtype, std::chrono::milliseconds timeout)
    : trained_(trained), buckets_(buckets), data_(std::move(data)), timeout_(timeout) {
  at::NoGradGuard no_grad;
  const int rank = data_ ? data_->rank() : 0;
  for (const auto& t : trained_) copies_ = copies_ || t.param.scalar_type() != main_dtype;
  std::vector<at::Tensor> decayed, plain;
  for (std::size_t b = 0; b < buckets_.buckets().size(); ++b) {
    const GradientBucket& bucket = buckets_.buckets()[b];
    if (!bucket.shard.defined()) throw Error("the distributed optimizer needs sharded gradient buckets");
    const std::int64_t first = rank * bucket.shard_size, last = first + bucket.shard_size;
    if (copies_) main_shares_.push_back(at::zeros({bucket.shard_size}, bucket.shard.options().dtype(main_dtype)));
    for (std::size_t k = 0; k < bucket.members.size(); ++k) {
      const std::size_t i = bucket.members[k];
      const std::int64_t begin = bucket.offsets[k], end = begin + trained_[i].main.numel();
      const std::int64_t low = std::max(begin, first), high = std::min(end, last);
      if (low >= high) continue;
      const Piece piece{i, b, low - begin, low - first, high - low};
      at::Tensor own = trained_[i].param.detach().reshape({-1}).narrow(0, piece.tensor_offset, piece.length);
      at::Tensor main = own;
      if (copies_) {
        main = main_shares_[b].narrow(0, piece.shard_offset, piece.length);
        main.copy_(own);
      }
      main.mutable_grad() = bucket.shard.narrow(0, piece.shard_offset, piece.length);
      // Megatron's rule, by the parameter the piece belongs to: no decay on vectors (norms, biases).
      (trained_[i].param.dim() >= 2 ? decayed : plain).push_back(main);
      pieces_.push_back(piece);
      piece_mains_.push_back(main);
    }
  }
  // A rank whose shares hold no piece (more ranks than elements in a bucket) has nothing to update.
  if (!decayed.empty() || !plain.empty()) optimizer_ = make_adamw(decayed, plain, config);
}

DistributedOptimizer::~DistributedOptimizer() = default;

void DistributedOptimizer::finalize_tensor_parallel(const std::shared_ptr<ProcessGroup>& tensor_group) {
  std::vector<GradientPiece> fixes;
  for (const Piece& piece : pieces_) {
    const auto& sharding = trained_[piece.tensor].sharding;
    fixes.push_back({&sharding, buckets_.buckets()[piece.bucket].shard.narrow(0, piece.shard_offset, piece.length)});
  }
  sum_over_tensor_parallel(fixes, tensor_group);
}

GradientNorm DistributedOptimizer::gradient_norm(double max_norm, const std::vector<double>& weights,
                                                 const std::vector<std::shared_ptr<ProcessGroup>>& model_groups) const {
  at::NoGradGuard no_grad;
  at::Tensor total = at::zeros({1}, buckets_.buckets().empty() ? at::TensorOptions(at::kDouble)
                                                               : buckets_.buckets().front().shard.options().dtype(at::kDouble));
  for (const Piece& piece : pieces_) {
    const double weight = weights.at(piece.tensor);
    if (weight == 0) continue;
    const at::Tensor grad = buckets_.buckets()[piece.bucket].shard.narrow(0, piece.shard_offset, piece.length);
    const at::ScalarType dtype = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    total += at::linalg_vector_norm(grad, 2, {}, false, dtype).square().to(at::kDouble) * weight;
  }
  if (data_) data_->all_reduce(total).wait(timeout_);
  for (const auto& group : model_groups) {
    if (group && group->size() > 1) group->all_reduce(total).wait(timeout_);
  }
  const double norm = std::sqrt(total.item<double>());
  const double scale = max_norm / (norm + 1e-6);
  return {norm, max_norm > 0 && scale < 1 ? scale : 1.0};
}

at::Tensor DistributedOptimizer::gather_bucket(std::size_t b, const at::Tensor& share, at::ScalarType dtype) const {
  const GradientBucket& bucket = buckets_.buckets()[b];
  at::Tensor whole = at::empty({bucket.buffer.numel()}, share.options().dtype(dtype));
  if (!data_) return whole.copy_(share);
  data_->all_gather_into_tensor(whole, share.to(dtype).contiguous()).wait(timeout_);
  return whole;
}

void DistributedOptimizer::step(double lr, double gradient_scale) {
  if (optimizer_) {
    set_learning_rate(*optimizer_, lr);
    scaled_step(*optimizer_, gradient_scale);
  }
  ++steps_;
  at::NoGradGuard no_grad;
  // The updated shares, gathered in the parameters' dtype (bf16 under O2), into every parameter.
  for (std::size_t b = 0; b < buckets_.buckets().size(); ++b) {
    const GradientBucket& bucket = buckets_.buckets()[b];
    const at::ScalarType dtype = trained_[bucket.members.front()].param.scalar_type();
    const at::Tensor whole = gather_bucket(b, share(b), dtype);
    for (std::size_t k = 0; k < bucket.members.size(); ++k) {
      at::Tensor param = trained_[bucket.members[k]].param.detach();
      param.view({-1}).copy_(whole.narrow(0, bucket.offsets[k], param.numel()));
    }
  }
}

at::Tensor DistributedOptimizer::share(std::size_t b) const {
  if (copies_) return main_shares_[b];
  const GradientBucket& bucket = buckets_.buckets()[b];
  at::Tensor out = at::zeros({bucket.shard_size}, bucket.shard.options().dtype(trained_[bucket.members.front()].param.scalar_type()));
  for (std::size_t p = 0; p < pieces_.size(); ++p) {
    if (pieces_[p].bucket == b) out.narrow(0, pieces_[p].shard_offset, pieces_[p].length).copy_(piece_mains_[p]);
  }
  return out;
}

std::int64_t DistributedOptimizer::state_bytes() const {
  std::int64_t bytes = 0;
  for (const auto& piece : piece_mains_) bytes += piece.numel() * static_cast<std::int64_t>(piece.element_size());
  return (copies_ ? 3 : 2) * bytes;  // (main weights,) exp_avg, exp_avg_sq
}

std::vector<at::Tensor> DistributedOptimizer::gather_pieces(const std::vector<at::Tensor>& shares) const {
  std::vector<at::Tensor> out(trained_.size());
  for (std::size_t b = 0; b < buckets_.buckets().size(); ++b) {
    const GradientBucket& bucket = buckets_.buckets()[b];
    const at::Tensor whole = gather_bucket(b, shares[b], shares[b].scalar_type());
    for (std::size_t k = 0; k < bucket.members.size(); ++k) {
      const at::Tensor& main = trained_[bucket.members[k]].main;
      out[bucket.members[k]] = whole.narrow(0, bucket.offsets[k], main.numel()).view(main.sizes()).clone();
    }
  }
  return out;
}

std::vector<at::Tensor> DistributedOptimizer::gather_gradients() const {
  std::vector<at::Tensor> shares;
  for (const auto& bucket : buckets_.buckets()) shares.push_back(bucket.shard);
  return gather_pieces(shares);
}

DistributedOptimizer::Whole DistributedOptimizer::gather() const {
  at::NoGradGuard no_grad;
  Whole whole;
  whole.steps = steps_;
  std::vector<at::Tensor> mains, first, second;
  for (std::size_t b = 0; b < buckets_.buckets().size(); ++b) {
    mains.push_back(share(b));
    first.push_back(at::zeros({buckets_.buckets()[b].shard_size}, piece_mains_.empty() ? mains.back().options() : piece_mains_.front().options()));
    second.push_back(at::zeros_like(first.back()));
  }
  whole.main = gather_pieces(mains);
  for (std::size_t p = 0; p < pieces_.size() && optimizer_; ++p) {
    auto found = optimizer_->state().find(piece_mains_[p].unsafeGetTensorImpl());
    if (found == optimizer_->state().end()) continue;
    const auto& moment = static_cast<const torch::optim::AdamWParamState&>(*found->second);
    first[pieces_[p].bucket].narrow(0, pieces_[p].shard_offset, pieces_[p].length).copy_(moment.exp_avg());
    second[pieces_[p].bucket].narrow(0, pieces_[p].shard_offset, pieces_[p].length).copy_(moment.exp_avg_sq());
  }
  whole.exp_avg = gather_pieces(first);
  whole.exp_avg_sq = gather_pieces(second);
  return whole;
}

void DistributedOptimizer::restore(const std::vector<at::Tensor>& main, const std::vector<at::Tensor>& exp_avg,
                                   const std::vector<at::Tensor>& exp_avg_sq, std::int64_t steps) {
  at::NoGradGuard no_grad;
  steps_ = steps;
  for (std::size_t i = 0; i < trained_.size(); ++i) trained_[i].param.detach().copy_(main.at(i));
  for (std::size_t p = 0; p < pieces_.size(); ++p) {
    const Piece& piece = pieces_[p];
    auto slice = [&piece](const at::Tensor& whole) {
      return whole.reshape({-1}).narrow(0, piece.tensor_offset, piece.length);
    };
    if (copies_) piece_mains_[p].copy_(slice(main.at(piece.tensor)));  // else the parameter's own piece, just copied
    if (steps == 0) continue;
    auto moment = std::make_unique<torch::optim::AdamWParamState>();
    moment->step(steps);
    moment->exp_avg(slice(exp_avg.at(piece.tensor)).to(piece_mains_[p].options()).clone());
    moment->exp_avg_sq(slice(exp_avg_sq.at(piece.tensor)).to(piece_mains_[p].options()).clone());
    optimizer_->state()[piece_mains_[p].unsafeGetTensorImpl()] = std::move(moment);
  }
}

std::vector<DistributedOptimizer::Share> DistributedOptimizer::shares() const {
  std::vector<Share> out;
  for (std::size_t p = 0; p < pieces_.size(); ++p) {
    Share share{pieces_[p].tensor, pieces_[p].tensor_offset, pieces_[p].length, piece_mains_[p], {}, {}};
    if (optimizer_) {
      auto found = optimizer_->state().find(piece_mains_[p].unsafeGetTensorImpl());
      if (found != optimizer_->state().end()) {
        const auto& moment = static_cast<const torch::optim::AdamWParamState&>(*found->second);
        share.exp_avg = moment.exp_avg();
        share.exp_avg_sq = moment.exp_avg_sq();
      }
    }
    out.push_back(std::move(share));
  }
  return out;
}

void DistributedOptimizer::reset_state(std::int64_t steps) {
  at::NoGradGuard no_grad;
  steps_ = steps;
  if (!optimizer_) return;
  optimizer_->state().clear();
  if (steps == 0) return;
  for (const auto& main : piece_mains_) {
    auto moment = std::make_unique<torch::optim::AdamWParamState>();
    moment->step(steps);
    moment->exp_avg(at::zeros_like(main, at::MemoryFormat::Contiguous));
    moment->exp_avg_sq(at::zeros_like(main, at::MemoryFormat::Contiguous));
    optimizer_->state()[main.unsafeGetTensorImpl()] = std::move(moment);
  }
}

}  // namespace neva
