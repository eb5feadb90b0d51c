#pragma once
// The optimizer with NeMo/Megatron's conventions: AdamW whose weight decay skips norms and biases,
// linear warmup then cosine decay to min_lr, and global gradient-norm clipping. (The loss: loss.h.)
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/optim/adamw.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "neva/api.h"

namespace neva {

struct OptimizerConfig {
  double lr = 2e-3;
  double min_lr = 2e-5;
  double weight_decay = 0.0;
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  std::int64_t warmup_steps = 0;
  std::int64_t max_steps = 1;
  double clip_grad = 1.0;  // 0: no clipping
  // Data parallelism (NeMo's distributed optimizer keys): the size of a gradient bucket, whether the
  // buckets are all-reduced while the backward pass runs, and ZeRO-1 (distributed_fused_adam: the
  // optimizer state and fp32 main weights sharded over the data-parallel ranks).
  std::int64_t bucket_cap_mb = 25;
  bool overlap_grad_sync = true;
  bool distributed = false;
};

// Learning rate at optimizer step `step` (0-based): linear warmup from lr / warmup_steps to lr over
// warmup_steps, then cosine from lr down to min_lr at max_steps, min_lr after.
NEVA_API double learning_rate(const OptimizerConfig& config, std::int64_t step);

// AdamW over the trainable parameters of `modules`: two groups, with weight decay for matrices and
// without for vectors (norm weights, biases) — Megatron's rule of no decay on 1-D parameters.
NEVA_API std::unique_ptr<torch::optim::AdamW> make_adamw(const std::vector<torch::nn::Module*>& modules,
                                                          const OptimizerConfig& config);
// The same over given tensors (e.g. fp32 main copies of bf16 weights); the group is chosen by dim().
NEVA_API std::unique_ptr<torch::optim::AdamW> make_adamw(const std::vector<at::Tensor>& parameters,
                                                          const OptimizerConfig& config);
// The same with the two groups given: `decayed` with weight decay, `plain` without.
NEVA_API std::unique_ptr<torch::optim::AdamW> make_adamw(const std::vector<at::Tensor>& decayed,
                                                          const std::vector<at::Tensor>& plain,
                                                          const OptimizerConfig& config);
// Parameters of `modules` that require gradients.
NEVA_API std::vector<at::Tensor> trainable_parameters(const std::vector<torch::nn::Module*>& modules);
NEVA_API void set_learning_rate(torch::optim::Optimizer& optimizer, double lr);

// The global L2 norm of the parameters' gradients, and the factor that clips it to `max_norm`:
// PyTorch's clip_grad_norm_ rule, max_norm / (norm + 1e-6) when that is below 1, else 1 (also for
// max_norm 0: no clipping).
struct GradientNorm {
  double norm = 0;
  double clip_scale = 1;
};
NEVA_API GradientNorm gradient_norm(const std::vector<at::Tensor>& parameters, double max_norm);
class ProcessGroup;
// The same over a model split across `groups` (tensor, expert, pipeline parallelism: axes of one
// grid, summed over one after the other): each parameter's square counted with its weight (1 for a
// shard only this rank holds, 1/n for one n ranks hold, 0 for a copy another rank counts;
// Megatron's param_is_not_tensor_parallel_duplicate). A collective: every rank of the groups calls it.
NEVA_API GradientNorm gradient_norm(const std::vector<at::Tensor>& parameters, double max_norm,
                                    const std::vector<double>& weights,
                                    const std::vector<std::shared_ptr<ProcessGroup>>& groups);
// optimizer.step() with every gradient multiplied by `gradient_scale` first: with gradient_norm's
// clip_scale, clip_grad_norm_ then step(). For an optimizer from make_adamw the scaling is done
// inside the fused update (the gradients are left scaled, as clip_grad_norm_ leaves them), saving
// a pass over them.
NEVA_API void scaled_step(torch::optim::Optimizer& optimizer, double gradient_scale);

}  // namespace neva
