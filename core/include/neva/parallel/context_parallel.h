#pragma once
// Context parallelism (Megatron's context_parallel_size; ring attention, Liu et al. 2023): the
// sequence split into 2 x cp chunks, rank r holding chunks r and 2cp - 1 - r ("zig-zag", so that every
// rank has as much causal attention work), and attention computed by passing keys and values around
// the ring of ranks, merging each block's result with the online-softmax rule.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "neva/api.h"

namespace neva {

class ProcessGroup;

// Where a rank's tokens lie in a sequence of `length` under context parallelism over `group`: the
// sequence padded at its end to a multiple of 2 x cp x `multiple` (sequence parallelism inside
// needs the local length to split over the tensor-parallel ranks too), and each rank's positions.
struct ContextParallelLayout {
  std::int64_t length = 0, padded = 0;
  at::Tensor positions;               // [padded / cp] int64: this rank's positions, in local order
  std::vector<at::Tensor> of_rank;    // every rank's positions (the keys a ring step brings)
  // This rank's part of `x` along `dim` (padded with `pad_value` to `padded` first): an index_select,
  // whose backward puts the gradient back at those positions (zeros elsewhere).
  at::Tensor take(const at::Tensor& x, std::int64_t dim, double pad_value = 0) const;
};
NEVA_API ContextParallelLayout context_parallel_layout(std::int64_t length, const std::shared_ptr<ProcessGroup>& group,
                                                       std::int64_t multiple = 1);

// Ring attention of this rank's queries q [B, H, Lq, d] over the keys and values of every rank of
// `group` (k, v [B, Hkv, Lk, d]: this rank's; Hkv dividing H), `visible(source)` giving the boolean
// [B or 1, 1, Lq, Lk] mask against rank `source`'s keys. Keys and values travel the ring with batched
// send/recv (cp - 1 steps); each step's block result joins the running one by its log-sum-exp; the
// backward pass sends their gradients back around the ring. Computed in fp32 at least.
NEVA_API at::Tensor ring_attention(const std::shared_ptr<ProcessGroup>& group, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, double scale,
                                   const std::function<at::Tensor(int source)>& visible);

// `x` from the previous rank of the ring (rank r receives rank r - 1's), this rank's sent to the
// next; the backward pass sends the gradient the other way.
NEVA_API at::Tensor ring_pass(const std::shared_ptr<ProcessGroup>& group, const at::Tensor& x);

}  // namespace neva
