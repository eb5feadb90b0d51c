#include "neva/train/loss.h"

#include <ATen/ATen.h>

#include <string>

#include "neva/error.h"
#include "neva/parallel/context_parallel.h"
#include "neva/parallel/mappings.h"

namespace neva {

namespace {

// The loss is computed in fp32 at least: bf16 logits are widened, fp64 ones (the float64
// equivalence tests of the parallel layouts) stay fp64.
at::ScalarType loss_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

at::Tensor causal_lm_loss(const at::Tensor& logits, const at::Tensor& labels) {
  if (logits.dim() != 3 || labels.dim() != 2 || logits.size(0) != labels.size(0) || logits.size(1) != labels.size(1)) {
    throw Error("causal_lm_loss: logits " + std::string(c10::str(logits.sizes())) + " and labels " +
                std::string(c10::str(labels.sizes())) + " do not line up ([B, S, V] and [B, S])");
  }
  at::Tensor scores = logits.narrow(1, 0, logits.size(1) - 1).to(loss_dtype(logits)).reshape({-1, logits.size(2)});
  at::Tensor targets = labels.narrow(1, 1, labels.size(1) - 1).reshape({-1}).to(logits.device());
  return at::cross_entropy_loss(scores, targets, {}, at::Reduction::Mean, kIgnoreIndex);
}

LabelledPositions labelled_positions(const at::Tensor& labels) {
  if (labels.dim() != 2) throw Error("labels must be [batch, seq], got " + std::string(c10::str(labels.sizes())));
  at::Tensor next = labels.narrow(1, 1, labels.size(1) - 1);
  at::Tensor mask = at::cat({next != kIgnoreIndex, at::zeros({labels.size(0), 1}, labels.options().dtype(at::kBool))}, 1);
  return {mask, next.masked_select(next != kIgnoreIndex)};
}

namespace {

at::Tensor labelled_rows(const at::Tensor& logits, const LabelledPositions& positions) {
  at::Tensor selected = logits.dim() == 3 ? logits.index({positions.mask.to(logits.device())}) : logits;
  if (selected.size(0) != positions.targets.size(0)) {
    throw Error("labelled_lm_loss: " + std::to_string(selected.size(0)) + " logits rows for " +
                std::to_string(positions.targets.size(0)) + " labelled positions");
  }
  return selected;
}

}  // namespace

at::Tensor labelled_lm_loss(const at::Tensor& logits, const LabelledPositions& positions,
                            const std::shared_ptr<ProcessGroup>& tensor_group, std::int64_t vocab_start,
                            std::int64_t vocab_size) {
  const at::Tensor selected = labelled_rows(logits, positions);
  return vocab_parallel_cross_entropy(tensor_group, selected, positions.targets, vocab_start, vocab_size).mean();
}

LabelledPositions labelled_positions(const at::Tensor& labels, const ContextParallelLayout& layout) {
  if (labels.dim() != 2) throw Error("labels must be [batch, seq], got " + std::string(c10::str(labels.sizes())));
  // The label each position predicts (the next one), then this rank's positions of it.
  at::Tensor next = at::cat({labels.narrow(1, 1, labels.size(1) - 1),
                             at::full({labels.size(0), 1}, kIgnoreIndex, labels.options())}, 1);
  next = layout.take(next, 1, kIgnoreIndex);
  const at::Tensor mask = next != kIgnoreIndex;
  return {mask, next.masked_select(mask)};
}

at::Tensor labelled_lm_loss(const at::Tensor& logits, const LabelledPositions& positions) {
  const at::Tensor selected = labelled_rows(logits, positions);
  return at::cross_entropy_loss(selected.to(loss_dtype(selected)), positions.targets.to(logits.device()), {}, at::Reduction::Mean,
                                kIgnoreIndex);
}

}  // namespace neva
