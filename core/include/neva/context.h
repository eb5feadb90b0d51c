#pragma once
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <memory>
#include <string>

#include "neva/api.h"

namespace neva {

class ProcessGroup;  // neva/distributed.h

// Which dtype each kind of tensor uses, decided by the PrecisionRecipe.
struct DTypePolicy {
  c10::ScalarType params = c10::ScalarType::Float;       // weights as the model holds them
  c10::ScalarType compute = c10::ScalarType::Float;      // matmuls and activations
  c10::ScalarType main_params = c10::ScalarType::Float;  // optimizer's master copy (bf16-O2: fp32)
};

// The process groups a rank belongs to, one per parallel dimension (Megatron's tp/pp/dp/ep/cp).
// A null group means "this rank alone" (size 1): every layer works unchanged at size 1.
struct ParallelGroups {
  std::shared_ptr<ProcessGroup> tensor;
  std::shared_ptr<ProcessGroup> pipeline;
  std::shared_ptr<ProcessGroup> data;
  std::shared_ptr<ProcessGroup> expert;
  std::shared_ptr<ProcessGroup> context;
};

NEVA_API int group_size(const std::shared_ptr<ProcessGroup>& group);
NEVA_API int group_rank(const std::shared_ptr<ProcessGroup>& group);

// Activation checkpointing (Megatron's names): recompute activations in the backward pass instead
// of keeping them. "full" recomputes whole decoder layers (method uniform: every num_layers-th
// layer boundary is kept; block: the first num_layers layers are recomputed, the rest keep theirs);
// "selective" recomputes only the attention core.
struct ActivationCheckpointConfig {
  std::string granularity;  // "" (off) | full | selective
  std::string method = "uniform";
  std::int64_t num_layers = 1;
};

// Everything a layer needs to know about where and how it runs. Passed explicitly to every component
// a plugin builds; there is no global state behind it.
struct RuntimeContext {
  c10::Device device{c10::DeviceType::CPU};
  DTypePolicy dtypes;
  ParallelGroups groups;
  std::uint64_t seed = 0;
  ActivationCheckpointConfig activations_checkpoint;  // plugin ABI 1.1
};

}  // namespace neva
