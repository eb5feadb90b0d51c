#pragma once
// Activation checkpointing: run a piece of the network without keeping its intermediate
// activations, and run it again in the backward pass to get them (PyTorch's reentrant
// torch.utils.checkpoint, which LibTorch does not offer from C++). The gradients equal those of the
// plain computation; memory falls to the piece's inputs. The piece must be deterministic (no
// dropout): it is computed twice. Autocast state is replayed in the recomputation.
#include <ATen/core/Tensor.h>

#include <functional>
#include <vector>

#include "neva/api.h"

namespace neva {

using RecomputedFunction = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>;

// fn(inputs) with checkpointing when autograd is recording, plainly otherwise. Gradients flow to
// `inputs` that require them and to every parameter `fn` uses.
NEVA_API std::vector<at::Tensor> recomputed(const RecomputedFunction& fn, const std::vector<at::Tensor>& inputs);

}  // namespace neva
