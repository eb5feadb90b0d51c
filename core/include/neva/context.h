#pragma once
// What every layer is built from: where it runs, in which dtypes, with which process groups,
// precision recipe and random generator. Passed explicitly to everything a plugin builds; there is
// no global state behind it.
#include <ATen/core/Generator.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "neva/api.h"

namespace neva {

class ProcessGroup;  // neva/parallel/process_group.h

// Which dtype each kind of tensor uses, decided by the PrecisionRecipe.
struct DTypePolicy {
  c10::ScalarType params = c10::ScalarType::Float;       // weights as the model holds them
  c10::ScalarType compute = c10::ScalarType::Float;      // matmuls and activations
  c10::ScalarType main_params = c10::ScalarType::Float;  // optimizer's master copy (bf16-O2: fp32)
};

// Activation checkpointing (Megatron's names): recompute activations in the backward pass instead
// of keeping them. "full" recomputes whole decoder layers (method uniform: every num_layers-th
// layer boundary is kept; block: the first num_layers layers are recomputed, the rest keep theirs);
// "selective" recomputes only the attention core.
struct ActivationCheckpointConfig {
  std::string granularity;  // "" (off) | full | selective
  std::string method = "uniform";
  std::int64_t num_layers = 1;
};

// The process groups a rank belongs to (Megatron's parallel_state). A null group means "this rank
// alone" (size 1): every layer works unchanged at size 1. Append-only: new groups go at the end
// (a minor plugin ABI version).
struct ParallelGroups {
  std::shared_ptr<ProcessGroup> tensor;             // tp: splits weights and activations within a layer
  std::shared_ptr<ProcessGroup> pipeline;           // pp: one rank per stage
  std::shared_ptr<ProcessGroup> data;               // dp: replicas of the same shard
  std::shared_ptr<ProcessGroup> context;            // cp: splits the sequence for attention
  std::shared_ptr<ProcessGroup> expert;             // ep: splits the experts of an MoE layer
  std::shared_ptr<ProcessGroup> expert_data;        // dp of expert weights (the dp x cp ranks sharing an expert shard)
  std::shared_ptr<ProcessGroup> tensor_and_data;    // tp x dp (x cp): gradient norms, loss averaging
  std::shared_ptr<ProcessGroup> data_and_context;   // dp x cp: what gradients of dense weights average over
  std::shared_ptr<ProcessGroup> tensor_and_expert;  // tp x ep: the token dispatch of expert parallelism
  std::shared_ptr<ProcessGroup> embedding;          // first and last pipeline stage: tied embedding gradients
  std::shared_ptr<ProcessGroup> position_embedding; // first pipeline stage (and the encoder's)
  std::shared_ptr<ProcessGroup> world;              // every rank
};

NEVA_API int group_size(const std::shared_ptr<ProcessGroup>& group);
NEVA_API int group_rank(const std::shared_ptr<ProcessGroup>& group);

// A CPU generator seeded with `seed` (mt19937, as at::manual_seed seeds the default one).
NEVA_API at::Generator make_generator(std::uint64_t seed);

// Everything a layer needs to know about where and how it runs. Later fields (a precision recipe's
// hooks for the FP8 linear) are appended at the end as a minor ABI version.
//
// Parameters are initialised from `generator`, on the CPU, then moved to `device` (Megatron's
// use_cpu_initialization): the same seed gives the same weights on every device. Copies of a context
// share its generator: a model built from one context draws one stream, in construction order.
struct RuntimeContext {
  c10::Device device{c10::DeviceType::CPU};
  DTypePolicy dtypes;
  at::Generator generator = make_generator(0);  // its seed: generator.current_seed()
  ActivationCheckpointConfig activations_checkpoint;
  ParallelGroups groups;
  // Appended in plugin ABI 2.2.
  // Megatron's sequence parallelism (model.sequence_parallel, with a tensor-parallel group of more
  // than one rank): the decoder's activations outside its tensor-parallel blocks (norms, residuals)
  // are split along the sequence over groups.tensor.
  bool sequence_parallel = false;
  // Under tensor parallelism a vocabulary is padded to a multiple of this x the group's size
  // (Megatron's make_vocab_size_divisible_by); the padding rows take no part in any result.
  std::int64_t make_vocab_size_divisible_by = 128;
  // Appended in plugin ABI 2.3. Pipeline parallelism (groups.pipeline of p ranks): each rank holds this many model chunks
  // (Megatron's virtual_pipeline_model_parallel_size; chunk c of rank r is the pipeline's chunk
  // c x p + r), and the decoder layers of each of the p x chunks pipeline chunks (empty: split evenly).
  std::int64_t virtual_pipeline_chunks = 1;
  std::vector<std::int64_t> pipeline_layer_split;

  // A context for a fresh run: a generator seeded with `seed`.
  NEVA_API static RuntimeContext seeded(std::uint64_t seed, c10::Device device = c10::Device(c10::DeviceType::CPU));
};

// One 64-bit draw from `context`'s generator (consuming it), to seed substreams.
NEVA_API std::uint64_t draw_seed(const RuntimeContext& context);
// `context` with a generator of its own, seeded from (`base`, `index`): a part (a layer, an expert)
// initialised from it has the same weights whichever other parts this rank builds (pipeline and
// expert parallelism build some parts only).
NEVA_API RuntimeContext substream(const RuntimeContext& context, std::uint64_t base, std::uint64_t index);

}  // namespace neva
