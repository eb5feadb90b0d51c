#pragma once
// The base of neva's layers: a torch::nn::Module whose parameters say how they are sharded.
#include <torch/nn/module.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "neva/api.h"

namespace neva::nn {

// How one parameter is laid out across ranks (Megatron's tensor_model_parallel, partition_dim,
// partition_stride, allreduce and sequence_parallel attributes, plus the pipeline stage). What
// checkpoints, gradient synchronisation and the distributed optimizer read instead of guessing
// from names.
struct ParameterSharding {
  // The dimension split over the tensor-parallel group; -1: every tensor-parallel rank holds all of it.
  std::int64_t tensor_parallel_dim = -1;
  // > 1: the split dimension holds this many interleaved blocks (fused q/k/v or gate/up), each split
  // separately.
  std::int64_t partition_stride = 1;
  // Replicated over the tensor-parallel group but seeing only its rank's tokens under sequence
  // parallelism (norm weights): its gradient is summed over the group.
  bool sequence_parallel = false;
  // >= 0: a weight of this expert (sharded over the expert-parallel group; its gradient averages
  // over the expert-data group instead of the data group). -1: a dense weight.
  std::int64_t expert = -1;
  // The pipeline stage that holds it.
  std::int64_t pipeline_stage = 0;
};

class NEVA_API Module : public torch::nn::Module {
 public:
  using torch::nn::Module::Module;
  ~Module() override;
  using torch::nn::Module::register_parameter;
  // Registers a parameter with its sharding.
  at::Tensor& register_parameter(std::string name, at::Tensor tensor, const ParameterSharding& sharding,
                                 bool requires_grad = true);
  // This module's own parameters that have a sharding other than the default.
  const std::map<std::string, ParameterSharding>& own_shardings() const { return shardings_; }
  std::map<std::string, ParameterSharding>& own_shardings() { return shardings_; }

 private:
  std::map<std::string, ParameterSharding> shardings_;
};

// Every parameter of `root` by its full name (as named_parameters() gives it) with its sharding:
// what a neva::nn::Module registered, the default (replicated, dense, stage 0) for the rest.
NEVA_API std::vector<std::pair<std::string, ParameterSharding>> parameter_shardings(const torch::nn::Module& root);

// Marks every parameter under `module` as a weight of `expert` (SparseMoE's experts).
NEVA_API void set_expert(torch::nn::Module& module, std::int64_t expert);
// Marks every parameter under `module` as held by pipeline stage `stage`.
NEVA_API void set_pipeline_stage(torch::nn::Module& module, std::int64_t stage);

}  // namespace neva::nn
