#include "neva/train/data_parallel.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <optional>

#include "neva/error.h"
#include "neva/parallel/process_group.h"

namespace neva {

namespace {

// Runs `fn` after a parameter's AccumulateGrad node: its gradient for this backward pass is complete.
class AfterAccumulation : public torch::autograd::FunctionPostHook {
 public:
  AfterAccumulation(const void* owner, std::function<void()> fn) : owner_(owner), fn_(std::move(fn)) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list& /*inputs*/) override {
    fn_();
    return outputs;
  }
  const void* owner() const { return owner_; }

 private:
  const void* owner_;  // the buckets that installed it
  std::function<void()> fn_;
};

}  // namespace

void sum_over_tensor_parallel(std::vector<GradientPiece>& pieces, const std::shared_ptr<ProcessGroup>& group) {
  const int tp = group ? group->size() : 1;
  if (tp == 1) return;
  at::NoGradGuard no_grad;
  // One buffer per dtype: a sequence-parallel piece as it is; a shared shard's piece placed at its
  // shard's slot (zeros elsewhere), so that the sum over the group adds exactly the ranks holding it.
  struct Place {
    GradientPiece* piece;
    std::int64_t offset;
  };
  std::map<at::ScalarType, std::pair<std::vector<Place>, std::int64_t>> by_dtype;
  for (auto& piece : pieces) {
    const auto& s = *piece.sharding;
    const bool shared = s.tensor_parallel_dim >= 0 && s.tensor_parallel_replicas > 1;
    if (!s.sequence_parallel && !shared) continue;
    auto& [places, length] = by_dtype[piece.gradient.scalar_type()];
    const std::int64_t shards = shared ? tp / s.tensor_parallel_replicas : 1;
    const std::int64_t slot = shared ? group->rank() / s.tensor_parallel_replicas : 0;
    places.push_back({&piece, length + slot * piece.gradient.numel()});
    length += piece.gradient.numel() * shards;
  }
  for (auto& [dtype, entry] : by_dtype) {
    auto& [places, length] = entry;
    at::Tensor buffer = at::zeros({length}, places.front().piece->gradient.options());
    for (const Place& p : places) buffer.narrow(0, p.offset, p.piece->gradient.numel()).copy_(p.piece->gradient.reshape({-1}));
    group->all_reduce(buffer).wait();
    for (const Place& p : places) {
      p.piece->gradient.copy_(buffer.narrow(0, p.offset, p.piece->gradient.numel()).view(p.piece->gradient.sizes()));
    }
  }
}

void finalize_tensor_parallel_gradients(std::vector<TrainedTensor>& trained, const std::shared_ptr<ProcessGroup>& group) {
  if (!group || group->size() == 1) return;
  std::vector<GradientPiece> pieces;
  for (auto& t : trained) {
    if (!t.sharding.sequence_parallel && t.sharding.tensor_parallel_replicas == 1) continue;
    if (!t.main.grad().defined()) t.main.mutable_grad() = at::zeros_like(t.main);
    pieces.push_back({&t.sharding, t.main.grad()});
  }
  sum_over_tensor_parallel(pieces, group);
}

struct GradientBuckets::State {
  struct Bucket : GradientBucket {
    std::size_t pending = 0;  // members whose gradient has not come yet (armed pass)
    std::optional<Work> work;
  };
  std::vector<TrainedTensor>* trained = nullptr;
  std::shared_ptr<ProcessGroup> group;
  GradientBucketOptions options;
  std::vector<Bucket> buckets;
  std::vector<std::size_t> bucket_of;  // per trained tensor
  std::vector<at::Tensor> views;       // per trained tensor: its gradient in its bucket
  std::vector<bool> adds;              // per trained tensor: its parameter's gradient is added into the view
  std::vector<GradientBucket> public_buckets;
  std::vector<bool> seen;              // per trained tensor, in the armed pass
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators;  // kept alive: they hold the hooks
  std::mutex mutex;                    // hooks may run on the autograd engine's device threads
  bool armed = false;
  std::size_t next = 0;                // the first bucket not started
  std::int64_t started_in_backward = 0;
  std::string late;                    // a gradient that came after its bucket was started

  void start_ready() {
    while (next < buckets.size() && buckets[next].pending == 0) start(next++);
  }
  void start(std::size_t index) {
    Bucket& bucket = buckets[index];
    if (!group || group->size() == 1) return;  // nothing to reduce over
    // Gloo has no reduce-scatter of its own: c10d emulates it with an all-reduce of a copy of the
    // input, a bucket-sized temporary per bucket in flight. The same all-reduce in place (this rank's
    // share is then already in place) moves the same bytes without the copies.
    bucket.work.emplace(options.shard && !emulated_reduce_scatter ? group->reduce_scatter_tensor(bucket.shard, bucket.buffer)
                                                                   : group->all_reduce(bucket.buffer));
  }
  bool emulated_reduce_scatter = false;
  void gradient_ready(std::size_t index) {
    std::lock_guard<std::mutex> lock(mutex);
    if (adds[index]) {  // O2: the bf16 gradient into the fp32 bucket, at once
      TrainedTensor& t = (*trained)[index];
      if (t.param.grad().defined()) {
        views[index].add_(t.param.grad());
        t.param.mutable_grad().reset();
      }
    }
    if (!armed) return;
    Bucket& bucket = buckets[bucket_of[index]];
    if (bucket.work || (armed && &bucket - buckets.data() < static_cast<std::ptrdiff_t>(next))) {
      if (late.empty()) late = (*trained)[index].name;
      return;
    }
    if (seen[index]) return;
    seen[index] = true;
    if (--bucket.pending == 0) {
      const std::size_t before = next;
      start_ready();
      started_in_backward += static_cast<std::int64_t>(next - before);
    }
  }
};

GradientBuckets::GradientBuckets(std::vector<TrainedTensor>& trained, std::shared_ptr<ProcessGroup> group,
                                 GradientBucketOptions options, std::function<bool(const TrainedTensor&)> include)
    : state_(std::make_unique<State>()) {
  State& s = *state_;
  s.trained = &trained;
  s.group = std::move(group);
  s.options = options;
  s.emulated_reduce_scatter = s.group && s.group->backend_name() == "gloo";
  s.bucket_of.assign(trained.size(), 0);
  s.seen.assign(trained.size(), false);
  // Reverse order (the backward pass finishes the last layers first), one dtype per bucket.
  std::map<at::ScalarType, std::size_t> open;  // dtype -> the bucket being filled
  std::vector<std::int64_t> filled;            // bytes per bucket
  auto dtype_of = [&s](const TrainedTensor& t) { return s.options.grad_dtype.value_or(t.main.scalar_type()); };
  for (std::size_t i = trained.size(); i-- > 0;) {
    if (include && !include(trained[i])) continue;
    const at::Tensor& main = trained[i].main;
    const std::int64_t bytes = main.numel() * static_cast<std::int64_t>(c10::elementSize(dtype_of(trained[i])));
    auto found = open.find(dtype_of(trained[i]));
    if (found == open.end() || filled[found->second] + bytes > s.options.bucket_bytes) {
      s.buckets.emplace_back();
      filled.push_back(0);
      found = open.insert_or_assign(dtype_of(trained[i]), s.buckets.size() - 1).first;
    }
    s.buckets[found->second].members.push_back(i);
    filled[found->second] += bytes;
    s.bucket_of[i] = found->second;
  }
  s.views.resize(trained.size());
  s.adds.assign(trained.size(), false);
  const std::int64_t ranks = s.group ? s.group->size() : 1;
  if (s.options.shard && ranks == 1) throw Error("sharded gradient buckets need a group of more than one rank");
  for (auto& bucket : s.buckets) {
    std::int64_t length = 0;
    for (std::size_t i : bucket.members) length += trained[i].main.numel();
    if (s.options.shard) length = (length + ranks - 1) / ranks * ranks;  // an equal share per rank
    const TrainedTensor& first = trained[bucket.members.front()];
    const auto options = first.main.options().dtype(dtype_of(first)).requires_grad(false);
    bucket.buffer = at::zeros({length}, options);
    if (s.options.shard) {
      // This rank's share, in place in the bucket: the all-reduce leaves it there, and NCCL's
      // reduce-scatter writes it in place (its output at the input's rank offset).
      bucket.shard_size = length / ranks;
      bucket.shard = bucket.buffer.narrow(0, s.group->rank() * bucket.shard_size, bucket.shard_size);
    }
    std::int64_t offset = 0;
    for (std::size_t i : bucket.members) {
      TrainedTensor& t = trained[i];
      at::Tensor view = bucket.buffer.narrow(0, offset, t.main.numel()).view(t.main.sizes());
      bucket.offsets.push_back(offset);
      s.views[i] = view;
      if (t.param.scalar_type() == view.scalar_type()) {
        t.param.mutable_grad() = view;  // the backward pass accumulates into the bucket itself
      } else {
        s.adds[i] = true;
        if (t.main.scalar_type() == view.scalar_type()) t.main.mutable_grad() = view;  // O2's fp32 main copies
      }
      offset += t.main.numel();
    }
    s.public_buckets.push_back(bucket);
  }
  std::vector<bool> member(trained.size(), false);
  for (const auto& bucket : s.buckets) {
    for (std::size_t i : bucket.members) member[i] = true;
  }
  for (std::size_t i = 0; i < trained.size(); ++i) {
    if (!member[i]) continue;
    auto accumulator = torch::autograd::impl::grad_accumulator(trained[i].param);
    if (!accumulator) throw Error("data parallelism: " + trained[i].name + " is not a leaf that accumulates gradients");
    State* raw = &s;
    accumulator->add_post_hook(std::make_unique<AfterAccumulation>(raw, [raw, i] { raw->gradient_ready(i); }));
    s.accumulators.push_back(std::move(accumulator));
  }
}

GradientBuckets::~GradientBuckets() {
  // The parameters outlive the buckets (another trainer may train them): take this one's hooks off
  // their accumulators, leaving any other.
  for (auto& accumulator : state_->accumulators) {
    auto& hooks = accumulator->post_hooks();
    hooks.erase(std::remove_if(hooks.begin(), hooks.end(),
                               [this](const std::unique_ptr<torch::autograd::FunctionPostHook>& hook) {
                                 const auto* ours = dynamic_cast<const AfterAccumulation*>(hook.get());
                                 return ours && ours->owner() == state_.get();
                               }),
                hooks.end());
  }
}

std::size_t GradientBuckets::size() const { return state_->buckets.size(); }
const std::vector<GradientBucket>& GradientBuckets::buckets() const { return state_->public_buckets; }
const at::Tensor& GradientBuckets::gradient(std::size_t i) const { return state_->views[i]; }

void GradientBuckets::arm() {
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  if (!s.options.overlap) return;
  s.armed = true;
  s.next = 0;
  s.started_in_backward = 0;
  s.late.clear();
  std::fill(s.seen.begin(), s.seen.end(), false);
  for (auto& bucket : s.buckets) {
    bucket.pending = bucket.members.size();
    bucket.work.reset();
  }
}

GradientSyncReport GradientBuckets::finish() {
  State& s = *state_;
  GradientSyncReport report;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    if (!s.armed) {  // no overlap, or no backward pass armed: everything now
      s.next = 0;
      for (auto& bucket : s.buckets) bucket.work.reset();
    }
    while (s.next < s.buckets.size()) s.start(s.next++);
    report.started_in_backward = s.armed ? s.started_in_backward : 0;
    s.armed = false;
  }
  for (auto& bucket : s.buckets) {
    if (!bucket.work) continue;  // a group of one rank
    bucket.work->wait(s.options.timeout);
    bucket.work.reset();

    report.bytes += bucket.buffer.numel() * static_cast<std::int64_t>(bucket.buffer.element_size());
  }
  report.buckets = static_cast<std::int64_t>(s.buckets.size());
  if (!s.late.empty()) {
    throw Error("data parallelism: the gradient of " + s.late + " grew after its bucket was all-reduced (a parameter " +
                "the backward pass reached twice); set model.optim.overlap_grad_sync = false");
  }
  return report;
}

void GradientBuckets::zero() {
  for (auto& bucket : state_->buckets) bucket.buffer.zero_();
}

}  // namespace neva
