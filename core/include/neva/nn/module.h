#pragma once
// The base of neva's layers: a torch::nn::Module whose parameters say how they are sharded.
#include <torch/nn/module.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "neva/api.h"

namespace neva {
class ProcessGroup;
}

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
  // Appended in plugin ABI 2.2 (tensor parallelism):
  // The size of tensor_parallel_dim in the whole tensor, when it is less than the local size x the
  // shards: a vocabulary padded to a multiple of the group (make_vocab_size_divisible_by) keeps its
  // real rows. 0: the local size x the shards.
  std::int64_t logical_size = 0;
  // Consecutive tensor-parallel ranks holding the same shard (KV heads fewer than the group's ranks):
  // rank r holds shard r / replicas of tp / replicas, and the gradient is summed over those ranks.
  std::int64_t tensor_parallel_replicas = 1;
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

// This rank's part of `whole` (the unsharded tensor) for a parameter sharded as `sharding` whose
// split dimension holds `local_extent` rows here: rows beyond the whole tensor's (vocabulary
// padding) are zeros. `whole` itself when the parameter is not split.
NEVA_API at::Tensor shard_of(const at::Tensor& whole, const ParameterSharding& sharding, int tp_rank, int tp_size,
                             std::int64_t local_extent);
// The whole tensor from every tensor-parallel rank's shard (a collective over `tensor_group`, which
// every rank of it must call): the inverse of shard_of. `shard` itself when not split.
NEVA_API at::Tensor unshard(const at::Tensor& shard, const ParameterSharding& sharding,
                            const std::shared_ptr<ProcessGroup>& tensor_group);
// Expert parallelism: from this rank's named expert tensors (names holding ".experts.<index>."; every
// rank of `expert_group` the same number of consecutive experts, in the same order), every expert's,
// each broadcast from the rank holding it. Tensors whose names name no expert are not taken. A
// collective over the group.
NEVA_API std::vector<std::pair<std::string, at::Tensor>> gather_experts(
    const std::vector<std::pair<std::string, at::Tensor>>& local, const std::shared_ptr<ProcessGroup>& expert_group);
// Pipeline parallelism: every stage's named tensors on the group's first rank — its own, then each
// later stage's whose names it has not seen (the last stage's copy of tied embeddings is dropped) —
// sent to it point to point; the other ranks get their own back. A collective over `pipeline_group`.
NEVA_API std::vector<std::pair<std::string, at::Tensor>> gather_pipeline_stages(
    const std::vector<std::pair<std::string, at::Tensor>>& local, const std::shared_ptr<ProcessGroup>& pipeline_group);
// The number `key` is followed by in a dotted name, up to the next dot: path_index(
// "llm.model.layers.7.mlp.up_proj.weight", ".layers.") is 7; -1 when `key` is absent or not followed
// by digits and a dot.
NEVA_API std::int64_t path_index(const std::string& name, const std::string& key);
// The expert index a name holds (".experts.<index>."), or -1.
NEVA_API std::int64_t expert_index(const std::string& name);
// The whole tensor's shape.
NEVA_API std::vector<std::int64_t> whole_shape(const at::Tensor& shard, const ParameterSharding& sharding, int tp_size);

// Marks every parameter under `module` as a weight of `expert` (SparseMoE's experts).
NEVA_API void set_expert(torch::nn::Module& module, std::int64_t expert);
// Marks every parameter under `module` as held by pipeline stage `stage`.
NEVA_API void set_pipeline_stage(torch::nn::Module& module, std::int64_t stage);
// Marks every parameter under `module` as applied to sequence-parallel activations (the decoder's
// norms under sequence parallelism): its gradient is summed over the tensor-parallel group.
NEVA_API void set_sequence_parallel(torch::nn::Module& module);
// Marks every parameter under `module` as whole on every tensor-parallel rank (a component built
// for a context without the tensor-parallel group: NeVA's vision encoder and connector). Modules
// not built from neva::nn hold whole parameters already and are left as they are.
NEVA_API void set_replicated(torch::nn::Module& module);

}  // namespace neva::nn
