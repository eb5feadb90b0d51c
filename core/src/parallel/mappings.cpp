#include "neva/parallel/mappings.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <limits>
#include <string>

#include "neva/error.h"
#include "neva/parallel/process_group.h"

namespace neva {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool trivial(const Group& group) { return !group || group->size() == 1; }

// The group travels through the autograd context as its address: the process groups are owned by
// the RuntimeContext, which outlives every graph built from the model it made.
void keep(AutogradContext* ctx, ProcessGroup* group, std::int64_t dim = 0) {
  ctx->saved_data["group"] = static_cast<std::int64_t>(reinterpret_cast<std::intptr_t>(group));
  ctx->saved_data["dim"] = dim;
}
ProcessGroup* group_of(AutogradContext* ctx) {
  return reinterpret_cast<ProcessGroup*>(static_cast<std::intptr_t>(ctx->saved_data["group"].toInt()));
}
std::int64_t dim_of(AutogradContext* ctx) { return ctx->saved_data["dim"].toInt(); }

std::string where(const ProcessGroup& group) {
  return "process group '" + group.name() + "' (rank " + std::to_string(group.rank()) + " of " +
         std::to_string(group.size()) + ")";
}

at::Tensor all_reduced(ProcessGroup& group, const at::Tensor& x) {
  at::Tensor sum = x.contiguous().clone();
  group.all_reduce(sum).wait();
  return sum;
}

at::Tensor gathered(ProcessGroup& group, const at::Tensor& x, std::int64_t dim) {
  // all_gather_into_tensor concatenates along dim 0: move `dim` there and back.
  at::Tensor front = x.movedim(dim, 0).contiguous();
  std::vector<std::int64_t> shape = front.sizes().vec();
  shape[0] *= group.size();
  at::Tensor out = at::empty(shape, front.options());
  group.all_gather_into_tensor(out, front).wait();
  return out.movedim(0, dim);
}

at::Tensor reduce_scattered(ProcessGroup& group, const at::Tensor& x, std::int64_t dim) {
  if (x.size(dim) % group.size() != 0) {
    throw Error(where(group) + ": reduce-scatter of a tensor shaped " + std::string(c10::str(x.sizes())) +
                " along dimension " + std::to_string(dim) + ": its size must divide by " + std::to_string(group.size()));
  }
  at::Tensor front = x.movedim(dim, 0).contiguous();
  std::vector<std::int64_t> shape = front.sizes().vec();
  shape[0] /= group.size();
  at::Tensor out = at::empty(shape, front.options());
  group.reduce_scatter_tensor(out, front).wait();
  return out.movedim(0, dim);
}

at::Tensor chunk_of(ProcessGroup& group, const at::Tensor& x, std::int64_t dim) {
  if (x.size(dim) % group.size() != 0) {
    throw Error(where(group) + ": splitting a tensor shaped " + std::string(c10::str(x.sizes())) + " along dimension " +
                std::to_string(dim) + ": its size must divide by " + std::to_string(group.size()));
  }
  const std::int64_t share = x.size(dim) / group.size();
  return x.narrow(dim, group.rank() * share, share).contiguous();
}

std::int64_t positive_dim(const at::Tensor& x, std::int64_t dim) { return dim < 0 ? dim + x.dim() : dim; }

struct CopyToRegion : torch::autograd::Function<CopyToRegion> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, ProcessGroup* group) {
    keep(ctx, group);
    return x.view_as(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {all_reduced(*group_of(ctx), grads[0]), at::Tensor()};
  }
};

struct ReduceFromRegion : torch::autograd::Function<ReduceFromRegion> {
  static at::Tensor forward(AutogradContext*, const at::Tensor& x, ProcessGroup* group) { return all_reduced(*group, x); }
  static variable_list backward(AutogradContext*, variable_list grads) { return {grads[0], at::Tensor()}; }
};

// Split forward, gather backward (and the reverse), along one dimension.
struct SplitAlong : torch::autograd::Function<SplitAlong> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, ProcessGroup* group, std::int64_t dim) {
    keep(ctx, group, dim);
    return chunk_of(*group, x, dim);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {gathered(*group_of(ctx), grads[0], dim_of(ctx)), at::Tensor(), at::Tensor()};
  }
};

struct GatherAlong : torch::autograd::Function<GatherAlong> {
  // reduce_grad: the backward pass reduce-scatters (partial gradients) instead of splitting.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, ProcessGroup* group, std::int64_t dim,
                            bool reduce_grad) {
    keep(ctx, group, dim);
    ctx->saved_data["reduce"] = reduce_grad;
    return gathered(*group, x, dim);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    ProcessGroup& group = *group_of(ctx);
    const std::int64_t dim = dim_of(ctx);
    at::Tensor grad = ctx->saved_data["reduce"].toBool() ? reduce_scattered(group, grads[0], dim)
                                                         : chunk_of(group, grads[0], dim);
    return {grad, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct ReduceScatterAlong : torch::autograd::Function<ReduceScatterAlong> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, ProcessGroup* group, std::int64_t dim) {
    keep(ctx, group, dim);
    return reduce_scattered(*group, x, dim);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {gathered(*group_of(ctx), grads[0], dim_of(ctx)), at::Tensor(), at::Tensor()};
  }
};

at::Tensor exchanged(ProcessGroup& group, const at::Tensor& x, const std::vector<std::int64_t>& output_splits,
                     const std::vector<std::int64_t>& input_splits) {
  std::int64_t rows = 0;
  for (std::int64_t r : output_splits) rows += r;
  std::vector<std::int64_t> shape = x.sizes().vec();
  shape[0] = rows;
  at::Tensor out = at::empty(shape, x.options());
  group.all_to_all_single(out, x.contiguous(), output_splits, input_splits).wait();
  return out;
}

struct AllToAll : torch::autograd::Function<AllToAll> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, ProcessGroup* group,
                            const std::vector<std::int64_t>& output_splits, const std::vector<std::int64_t>& input_splits) {
    keep(ctx, group);
    ctx->saved_data["output_splits"] = output_splits;
    ctx->saved_data["input_splits"] = input_splits;
    return exchanged(*group, x, output_splits, input_splits);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto sent = ctx->saved_data["input_splits"].toIntVector();
    const auto received = ctx->saved_data["output_splits"].toIntVector();
    return {exchanged(*group_of(ctx), grads[0], sent, received), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Megatron's _VocabParallelCrossEntropy. Saved for backward: the local softmax and where the target
// falls in this rank's columns.
struct VocabParallelCrossEntropy : torch::autograd::Function<VocabParallelCrossEntropy> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& targets,
                            ProcessGroup* group, std::int64_t vocab_start, std::int64_t vocab_size) {
    const at::ScalarType dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor z = logits.to(dtype).clone();
    const std::int64_t local = z.size(1);
    if (vocab_start + local > vocab_size) {  // padding columns: no probability
      const std::int64_t real = std::max<std::int64_t>(0, vocab_size - vocab_start);
      z.narrow(1, real, local - real).fill_(-std::numeric_limits<double>::infinity());
    }
    at::Tensor max = std::get<0>(z.max(1));
    if (group) group->all_reduce(max, ReduceOp::Max).wait();
    z.sub_(max.unsqueeze(1));
    at::Tensor local_target = targets - vocab_start;
    at::Tensor outside = (local_target < 0) | (local_target >= local);
    local_target = local_target.masked_fill(outside, 0);
    at::Tensor target_logit = z.gather(1, local_target.unsqueeze(1)).squeeze(1).masked_fill(outside, 0);
    at::Tensor exp = z.exp_();
    at::Tensor sums = exp.sum(1);
    at::Tensor reduced = at::stack({target_logit, sums});  // one all-reduce for both
    if (group) group->all_reduce(reduced).wait();
    at::Tensor loss = reduced[1].log() - reduced[0];
    exp.div_(reduced[1].unsqueeze(1));  // the softmax over the whole vocabulary, this rank's columns
    ctx->save_for_backward({exp, local_target, outside});
    ctx->saved_data["dtype"] = static_cast<std::int64_t>(logits.scalar_type());
    return loss;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    at::Tensor grad = saved[0].clone();
    const at::Tensor& local_target = saved[1];
    at::Tensor hit = saved[2].logical_not().to(grad.scalar_type());
    grad.scatter_add_(1, local_target.unsqueeze(1), -hit.unsqueeze(1));
    grad.mul_(grads[0].to(grad.scalar_type()).unsqueeze(1));
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    return {grad.to(dtype), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor copy_to_tensor_parallel_region(const Group& group, const at::Tensor& x) {
  return trivial(group) ? x : CopyToRegion::apply(x, group.get());
}

at::Tensor reduce_from_tensor_parallel_region(const Group& group, const at::Tensor& x) {
  return trivial(group) ? x : ReduceFromRegion::apply(x, group.get());
}

at::Tensor scatter_to_tensor_parallel_region(const Group& group, const at::Tensor& x) {
  return trivial(group) ? x : SplitAlong::apply(x, group.get(), x.dim() - 1);
}

at::Tensor gather_from_tensor_parallel_region(const Group& group, const at::Tensor& x) {
  return trivial(group) ? x : GatherAlong::apply(x, group.get(), x.dim() - 1, false);
}

at::Tensor scatter_to_sequence_parallel_region(const Group& group, const at::Tensor& x, std::int64_t dim) {
  return trivial(group) ? x : SplitAlong::apply(x, group.get(), positive_dim(x, dim));
}

at::Tensor gather_from_sequence_parallel_region(const Group& group, const at::Tensor& x, std::int64_t dim,
                                                bool tensor_parallel_output_grad) {
  return trivial(group) ? x : GatherAlong::apply(x, group.get(), positive_dim(x, dim), tensor_parallel_output_grad);
}

at::Tensor reduce_scatter_to_sequence_parallel_region(const Group& group, const at::Tensor& x, std::int64_t dim) {
  return trivial(group) ? x : ReduceScatterAlong::apply(x, group.get(), positive_dim(x, dim));
}

at::Tensor all_to_all(const Group& group, const at::Tensor& x, const std::vector<std::int64_t>& output_splits,
                      const std::vector<std::int64_t>& input_splits) {
  return trivial(group) ? x : AllToAll::apply(x, group.get(), output_splits, input_splits);
}

at::Tensor all_gather_along(const Group& group, const at::Tensor& x, std::int64_t dim) {
  return trivial(group) ? x : gathered(*group, x, positive_dim(x, dim));
}

at::Tensor reduce_scatter_along(const Group& group, const at::Tensor& x, std::int64_t dim) {
  return trivial(group) ? x : reduce_scattered(*group, x, positive_dim(x, dim));
}

at::Tensor vocab_parallel_cross_entropy(const Group& group, const at::Tensor& logits, const at::Tensor& targets,
                                        std::int64_t vocab_start, std::int64_t vocab_size) {
  if (logits.dim() != 2 || targets.dim() != 1 || logits.size(0) != targets.size(0)) {
    throw Error("vocab_parallel_cross_entropy: logits " + std::string(c10::str(logits.sizes())) + " and targets " +
                std::string(c10::str(targets.sizes())) + " do not line up ([N, V_local] and [N])");
  }
  return VocabParallelCrossEntropy::apply(logits, targets.to(logits.device()), trivial(group) ? nullptr : group.get(),
                                          vocab_start, vocab_size);
}

}  // namespace neva
