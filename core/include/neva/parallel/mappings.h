#pragma once
// Megatron's communication mappings for tensor and sequence parallelism, as autograd functions: each
// does one collective in the forward pass and its conjugate in the backward pass
// (megatron/core/tensor_parallel/mappings.py; Shoeybi et al. 2019 §3 "f" and "g", Korthikanti et al.
// 2022 §4.2.2 "g" and "g-bar").
//
// A null group, or a group of one rank, makes every mapping the identity. Sequence-parallel mappings
// split and gather along `dim` (neva's activations are [batch, seq, hidden]: dim 1); its size must
// divide by the group's size. The forward passes of these functions are collectives: every rank of
// the group must call them in the same order.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "neva/api.h"

namespace neva {

class ProcessGroup;
using Group = std::shared_ptr<ProcessGroup>;

// f: identity forward, all-reduce (sum) of the gradient backward. Before column-parallel layers.
NEVA_API at::Tensor copy_to_tensor_parallel_region(const Group& group, const at::Tensor& x);
// g: all-reduce (sum) forward, identity backward. After row-parallel layers.
NEVA_API at::Tensor reduce_from_tensor_parallel_region(const Group& group, const at::Tensor& x);
// This rank's slice of the last dimension forward; all-gather of the gradient backward.
NEVA_API at::Tensor scatter_to_tensor_parallel_region(const Group& group, const at::Tensor& x);
// All-gather along the last dimension forward (rank order); this rank's slice of the gradient backward.
NEVA_API at::Tensor gather_from_tensor_parallel_region(const Group& group, const at::Tensor& x);

// This rank's chunk of `dim` forward; all-gather of the gradient backward.
NEVA_API at::Tensor scatter_to_sequence_parallel_region(const Group& group, const at::Tensor& x, std::int64_t dim);
// All-gather along `dim` forward. Backward: reduce-scatter of the gradient when the consumer is
// tensor-parallel (each rank holds a partial gradient: the default), else this rank's chunk of it
// (every rank holds the whole gradient: a replicated consumer such as an MoE router).
NEVA_API at::Tensor gather_from_sequence_parallel_region(const Group& group, const at::Tensor& x, std::int64_t dim,
                                                         bool tensor_parallel_output_grad = true);
// Reduce-scatter (sum) along `dim` forward; all-gather of the gradient backward. After row-parallel
// layers under sequence parallelism, instead of g.
NEVA_API at::Tensor reduce_scatter_to_sequence_parallel_region(const Group& group, const at::Tensor& x,
                                                               std::int64_t dim);

// Megatron's all_to_all (expert parallelism's token dispatch): rows of `x` go to the ranks in order,
// `input_splits[r]` rows to rank r; the result holds `output_splits[r]` rows from each rank r. The
// backward pass sends the gradient back the same way, with the splits swapped.
NEVA_API at::Tensor all_to_all(const Group& group, const at::Tensor& x, const std::vector<std::int64_t>& output_splits,
                               const std::vector<std::int64_t>& input_splits);

// Without autograd: every rank's `x` concatenated along `dim` in rank order, and the sum over the
// group of `x` with this rank's chunk of `dim` kept.
NEVA_API at::Tensor all_gather_along(const Group& group, const at::Tensor& x, std::int64_t dim);
NEVA_API at::Tensor reduce_scatter_along(const Group& group, const at::Tensor& x, std::int64_t dim);

// Megatron's vocabulary-parallel cross entropy (megatron/core/tensor_parallel/cross_entropy.py):
// `logits` [N, V_local] hold this rank's columns [vocab_start, vocab_start + V_local) of the
// (padded) vocabulary; columns at or beyond `vocab_size` (padding) take no part. Returns the
// per-token loss [N] (the same on every rank), computed in fp32 (fp64 for fp64 logits) with three
// all-reduces of N values; the full logits are never gathered. The backward pass needs no
// communication. `targets` [N] must lie in [0, vocab_size).
NEVA_API at::Tensor vocab_parallel_cross_entropy(const Group& group, const at::Tensor& logits, const at::Tensor& targets,
                                                 std::int64_t vocab_start, std::int64_t vocab_size);

}  // namespace neva
