#include "neva/parallel/context_parallel.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <vector>

#include "neva/context.h"
#include "neva/error.h"
#include "neva/parallel/process_group.h"

namespace neva {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Sends `x` to rank + `step` and returns what rank - `step` sent (both at once: no ordering to deadlock).
at::Tensor shifted(ProcessGroup& group, const at::Tensor& x, int step) {
  const int n = group.size(), me = group.rank();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const std::vector<P2POp> ops{{P2POp::Kind::Send, x.contiguous(), (me + step + n) % n, 17},
                              {P2POp::Kind::Recv, out, (me - step + n) % n, 17}};
  group.batch_isend_irecv(ops).wait();
  return out;
}

struct RingPass : torch::autograd::Function<RingPass> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, ProcessGroup* group) {
    ctx->saved_data["group"] = static_cast<std::int64_t>(reinterpret_cast<std::intptr_t>(group));
    return shifted(*group, x, 1);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto* group = reinterpret_cast<ProcessGroup*>(static_cast<std::intptr_t>(ctx->saved_data["group"].toInt()));
    return {shifted(*group, grads[0], -1), at::Tensor()};
  }
};

}  // namespace

at::Tensor ContextParallelLayout::take(const at::Tensor& x, std::int64_t dim, double pad_value) const {
  if (!x.defined()) return x;
  at::Tensor full = x;
  if (padded > x.size(dim)) {
    std::vector<std::int64_t> shape = x.sizes().vec();
    shape[static_cast<std::size_t>(dim)] = padded - x.size(dim);
    full = at::cat({x, at::full(shape, pad_value, x.options())}, dim);
  }
  return full.index_select(dim, positions.to(x.device()));
}

ContextParallelLayout context_parallel_layout(std::int64_t length, const std::shared_ptr<ProcessGroup>& group,
                                              std::int64_t multiple) {
  const int cp = group_size(group), me = group_rank(group);
  ContextParallelLayout layout;
  layout.length = length;
  const std::int64_t unit = 2 * cp * std::max<std::int64_t>(1, multiple);
  layout.padded = (length + unit - 1) / unit * unit;
  const std::int64_t chunk = layout.padded / (2 * cp);
  for (int r = 0; r < cp; ++r) {
    layout.of_rank.push_back(at::cat({at::arange(r * chunk, (r + 1) * chunk, at::kLong),
                                      at::arange((2 * cp - 1 - r) * chunk, (2 * cp - r) * chunk, at::kLong)}));
  }
  layout.positions = layout.of_rank[static_cast<std::size_t>(me)];
  return layout;
}

at::Tensor ring_pass(const std::shared_ptr<ProcessGroup>& group, const at::Tensor& x) {
  if (!group || group->size() == 1) return x;
  return RingPass::apply(x, group.get());
}

at::Tensor ring_attention(const std::shared_ptr<ProcessGroup>& group, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, double scale, const std::function<at::Tensor(int source)>& visible) {
  const int cp = group_size(group), me = group_rank(group);
  const at::ScalarType dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor query = q.to(dtype);
  const std::int64_t repeat = q.size(1) / k.size(1);
  at::Tensor keys = k, values = v;  // the block in hand: rank `source`'s
  at::Tensor out, lse;
  for (int step = 0; step < cp; ++step) {
    const int source = (me - step + cp) % cp;
    at::Tensor kk = keys.to(dtype), vv = values.to(dtype);
    if (repeat > 1) {  // grouped-query heads
      kk = kk.repeat_interleave(repeat, 1);
      vv = vv.repeat_interleave(repeat, 1);
    }
    // A masked score is finite and very negative: a block a query sees nothing of adds exp(-1e9) = 0
    // to it, with no NaN anywhere (every query sees at least itself over the whole ring).
    at::Tensor scores = at::matmul(query, kk.transpose(-2, -1)) * scale;
    scores = scores.masked_fill(visible(source).logical_not(), -1e9);
    const at::Tensor block_lse = scores.logsumexp(-1);
    const at::Tensor block = at::matmul(at::exp(scores - block_lse.unsqueeze(-1)), vv);
    if (step == 0) {
      out = block;
      lse = block_lse;
    } else {
      const at::Tensor merged = at::logaddexp(lse, block_lse);
      out = out * at::exp(lse - merged).unsqueeze(-1) + block * at::exp(block_lse - merged).unsqueeze(-1);
      lse = merged;
    }
    if (step + 1 < cp) {  // the next rank's keys and values arrive; ours go on
      const at::Tensor both = ring_pass(group, at::cat({keys, values}, 1));
      keys = both.narrow(1, 0, keys.size(1));
      values = both.narrow(1, keys.size(1), values.size(1));
    }
  }
  return out.to(q.scalar_type());
}

}  // namespace neva
