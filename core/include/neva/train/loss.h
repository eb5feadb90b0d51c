#pragma once
// The causal-LM loss over labelled tokens only (NeMo/LLaVA: prompt, image and padding positions
// carry kIgnoreIndex), in fp32 (fp64 for fp64 logits).
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>

#include "neva/api.h"
#include "neva/data/labels.h"

namespace neva {

// Mean next-token cross entropy over positions whose label is not kIgnoreIndex: logits [B, S, V]
// predict labels [B, S] shifted by one (logits at t score label t + 1), computed in fp32.
NEVA_API at::Tensor causal_lm_loss(const at::Tensor& logits, const at::Tensor& labels);

// The positions whose next token is labelled (mask [B, S] bool, true at t when labels[t + 1] counts)
// and those labels in row-major order (targets [N]): what the LM head and the loss need in training.
struct LabelledPositions {
  at::Tensor mask;
  at::Tensor targets;
};
NEVA_API LabelledPositions labelled_positions(const at::Tensor& labels);
struct ContextParallelLayout;
// Under context parallelism: the same for this rank's positions of the padded sequence (`layout`),
// in its local order — what the backbone's logits cover there.
NEVA_API LabelledPositions labelled_positions(const at::Tensor& labels, const ContextParallelLayout& layout);
// causal_lm_loss over logits computed at `positions.mask` only ([N, V], or [B, S, V] from a backbone
// that ignored the mask): the same value.
NEVA_API at::Tensor labelled_lm_loss(const at::Tensor& logits, const LabelledPositions& positions);

class ProcessGroup;
// The same loss over vocabulary-parallel logits ([N, rows] or [B, S, rows]: this rank's columns
// [vocab_start, vocab_start + rows) of the padded vocabulary) with Megatron's vocabulary-parallel
// cross entropy over `tensor_group`: the full logits are never gathered. Columns at or beyond
// `vocab_size` (padding) take no part. The same value on every rank of the group.
NEVA_API at::Tensor labelled_lm_loss(const at::Tensor& logits, const LabelledPositions& positions,
                                     const std::shared_ptr<ProcessGroup>& tensor_group, std::int64_t vocab_start,
                                     std::int64_t vocab_size);

}  // namespace neva
