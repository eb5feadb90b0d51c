#pragma once
// The trainer: one optimizer step at a time over a LlavaModel, with its state saved to and restored
// from a checkpoint directory. What calls it (neva-run's train mode, a test, another program) owns
// the loop around it: data, logging, checkpoint cadence, signals, the export.
//
// A step is: the schedule runs forward and backward over the step's micro-batches (inside the
// precision recipe's forward scope), the gradients are reduced over the data-parallel replicas and
// fixed up over the tensor-parallel group, the loss-spike guard judges the loss, then the gradients
// are clipped and the optimizer updates the main weights
// (fp32 copies of bf16 weights under megatron_amp_O2, copied back after the update).
#include <ATen/core/Tensor.h>
#include <torch/optim/adamw.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "neva/api.h"
#include "neva/context.h"
#include "neva/data/dataset.h"
#include "neva/model/llava.h"
#include "neva/nn/linear.h"
#include "neva/nn/module.h"
#include "neva/train/data_parallel.h"
#include "neva/train/distributed_checkpoint.h"
#include "neva/train/distributed_optimizer.h"
#include "neva/precision.h"
#include "neva/precision_recipe.h"
#include "neva/train/loss_spike.h"
#include "neva/train/optim.h"

namespace neva {

class Trainer;
class ProcessGroup;

// One forward or backward pass of one micro-batch through one of this rank's model chunks.
struct ScheduledPass {
  bool forward = true;
  std::int64_t chunk = 0;  // this rank's chunk (pipeline parallelism with interleaving: 0 .. v - 1)
  std::size_t micro_batch = 0;
};

// Which micro-batch runs forward and backward when, within one optimizer step, on this rank. The
// sequential schedule runs them one after the other (gradient accumulation; one micro-batch: a
// plain step); a pipeline schedule (1F1B, interleaved 1F1B) interleaves them across stages. The
// trainer runs the passes in order; a forward pass of a chunk after the pipeline's first receives
// its input from the previous stage, a backward pass of one before the last its gradient.
class NEVA_API Schedule {
 public:
  virtual ~Schedule();
  // Every micro-batch's forward pass before its backward pass, each chunk's exactly once.
  virtual std::vector<ScheduledPass> order(std::size_t micro_batches) const = 0;
};
NEVA_API std::unique_ptr<Schedule> sequential_schedule();
// Megatron-core's schedules for rank `rank` of `stages` pipeline stages holding `chunks` model
// chunks each: with one chunk, 1F1B (forward_backward_pipelining_without_interleaving: p - r - 1
// warm-up forward passes, then one forward and one backward, then the remaining backward passes);
// with more, the interleaved 1F1B (forward_backward_pipelining_with_interleaving), which needs the
// micro-batches to come in multiples of `stages` (order() throws otherwise).
NEVA_API std::unique_ptr<Schedule> pipeline_schedule(int stages, int rank, std::int64_t chunks);
// The schedule the parallel layout calls for, as Megatron-core's get_forward_backward_func picks
// it: sequential without pipeline parallelism, pipeline_schedule over groups.pipeline with it.
NEVA_API std::unique_ptr<Schedule> schedule_for(const ParallelGroups& groups, std::int64_t virtual_chunks = 1);

struct TrainerOptions {
  OptimizerConfig optim;       // AdamW, the learning-rate schedule, clipping
  LossSpikeConfig loss_spike;  // the guard
  std::string title = "train";  // prefixes error messages ("stage 1: step 3: ...")
  // Keep the fp32 originals of frozen weights cast once to bf16 (bf16 mixed), for a reader outside
  // autocast after training (the export); restore_frozen_weights() puts them back.
  bool keep_frozen_originals = false;
  // What the error of a step that stops the run names as the last good checkpoint.
  std::function<std::string()> last_checkpoint = [] { return std::string("none written yet"); };
  // Written into trainer_state.json ("recipe").
  std::string source;
  // How long a collective of data parallelism may take before the step fails naming the group
  // (a lost replica ends the run instead of hanging it).
  std::chrono::milliseconds collective_timeout = std::chrono::minutes(5);
  // Data parallelism: the gradient buckets' size and whether they are all-reduced during the
  // backward pass (model.optim.bucket_cap_mb, overlap_grad_sync). Their timeout is collective_timeout.
  GradientBucketOptions gradient_buckets;
};

// What one step did.
struct StepReport {
  double loss = 0;  // mean over the labelled tokens of the global batch, every replica's (plus MoE aux losses)
  double grad_norm = 0;
  double lr = 0;
  bool skipped = false;     // a loss spike the guard skipped: no update
  std::string skip_reason;  // the guard's words, when skipped
  std::int64_t tokens = 0, labelled_tokens = 0, samples = 0;  // this replica's micro-batches
  std::int64_t positions = 0;  // batch x sequence over this replica's micro-batches, padding included
  double forward_backward_seconds = 0, optimizer_seconds = 0;
  GradientSyncReport gradient_sync;  // data parallelism's buckets this step
  // Linear layers computed by a precision recipe's kernel (nn::LinearKernel), by how they compute
  // after this step ("fp8": 12, "bf16": 2), and what changed this step (a layer falling back), as the
  // kernels said it. Empty without kernels.
  std::map<std::string, std::int64_t> linear_modes;
  std::vector<std::string> linear_notes;
};

class NEVA_API Trainer {
 public:
  // Trains every parameter of `model` that requires grad (throws Error when none does). `model`,
  // `precision` and `context` must outlive the trainer; the context's generator is part of its state.
  // Without a schedule, the trainer runs schedule_for(context.groups).
  Trainer(LlavaModel& model, const PrecisionRecipe& precision, RuntimeContext& context, TrainerOptions options,
          std::unique_ptr<Schedule> schedule = nullptr);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  // Called once the step's gradients are final — summed over the data-parallel replicas (gradient
  // buckets, overlapped with the last micro-batch's backward pass) and fixed up over the
  // tensor-parallel group — before the loss-spike guard, the norm and the update; it may read or
  // change them (main gradients; under ZeRO-1 gradients() gathers them from the shares). Null by default.
  //
  // Under data parallelism each replica passes train_step its own micro-batches (as many on every
  // replica); the trainer sums the labelled tokens over the group first, so the loss is the mean
  // over every labelled token of the global batch, exactly as one process running all of them.
  std::function<void(std::vector<TrainedTensor>&)> gradients_ready;

  // One optimizer step over the micro-batches of one global batch. Throws Error (naming the step and
  // the last good checkpoint) when the batch holds no labelled token, the guard stops the run or the
  // gradient norm is not finite; nothing is updated then.
  StepReport train_step(const std::vector<TrainingBatch>& batches);

  // The trainer's state in `directory`, as a distributed checkpoint (distributed_checkpoint.h; the
  // format is docs/checkpoint-format.md): every rank writes rank-R.safetensors with the pieces of the
  // trained tensors (main weights), AdamW's moments and steps that it owns — each replicated piece
  // once — and its generators' states; rank 0 also trainer_state.json (step, the data position of
  // every data-parallel replica — `consumed_samples`, and `consumed_samples_per_replica` beside it
  // when there are several — the guard's window). A collective over groups.world: returns, on rank 0,
  // the manifest's content (files with digests, tensors with their pieces, the layout) for
  // CheckpointManager::commit, null elsewhere.
  //
  // restore() reads a checkpoint written under any layout (tensor, pipeline, expert, context and
  // data parallelism, with or without ZeRO-1; or the whole-tensor files of format 1): each rank
  // reads only the rows its own shards need. It returns the positions, one per replica that saved;
  // errors name the file and the tensor.
  nlohmann::json save(const std::filesystem::path& directory, const std::vector<std::uint64_t>& consumed_samples) const;
  // save() in two halves, for a save written while training goes on (async_save): snapshot() takes
  // this rank's pieces and generators' states (`copy`: cloned into host memory, so training may
  // change the live tensors), write_rank_shard() writes them (any thread), and finish_save() — a
  // collective over groups.world — sends each rank's description to rank 0, which writes
  // trainer_state.json and returns the manifest's content.
  struct Snapshot {
    int rank = 0;
    std::vector<CheckpointPiece> pieces;
    std::vector<std::pair<std::string, at::Tensor>> own;
    nlohmann::json trainer_state, layout;
  };
  Snapshot snapshot(const std::vector<std::uint64_t>& consumed_samples, bool copy) const;
  nlohmann::json finish_save(const std::filesystem::path& directory, const nlohmann::json& description,
                             const Snapshot& snapshot) const;
  std::vector<std::uint64_t> restore(const std::filesystem::path& directory);

  // The whole state, as one process would hold it (tensors gathered from their shards, shares,
  // experts and stages onto the pipeline's first rank): a collective; for tests and tools.
  struct State {
    std::vector<std::pair<std::string, at::Tensor>> weights, moments;
  };
  State gather_state() const;

  // The frozen weights' fp32 originals back (see TrainerOptions::keep_frozen_originals).
  void restore_frozen_weights();

  std::int64_t step() const { return step_; }
  // What the last restore() wants the user told ("" when nothing): a checkpoint without the
  // precision recipe's kernel state (FP8 scaling starting afresh).
  const std::string& restore_note() const { return restore_note_; }
  const std::vector<TrainedTensor>& trained() const { return trained_; }
  const LossSpikeGuard& guard() const { return guard_; }
  bool main_copies() const { return main_copies_; }  // megatron_amp_O2: fp32 main weights
  std::int64_t parameter_count() const;
  // This rank's optimizer state: main weights (where they are copies) and AdamW's two moments; under
  // ZeRO-1 (model.optim.name = distributed_fused_adam with data parallelism) its 1/d share.
  std::int64_t optimizer_state_bytes() const;
  bool distributed_optimizer() const { return distributed_ != nullptr; }
  // Every trained tensor's gradient of the last step before its update, summed over the replicas
  // (under ZeRO-1 gathered from the shares: a collective over the data-parallel group). For tests,
  // inside gradients_ready.
  std::vector<at::Tensor> gradients() const;

 private:
  // Whether this rank writes trained tensor `index`'s pieces (the rest of its replicas do not).
  bool writes(const TrainedTensor& t, std::size_t index) const;
  // This rank's state as checkpoint pieces, views of the live tensors: what it owns (to write), or
  // everything it holds (to read into).
  std::vector<CheckpointPiece> state_pieces(bool owned) const;
  // After each step: the kernels' shared maxima reduced over their layers' replicas, then
  // step_finished (see nn::LinearKernel); fills report.linear_modes and linear_notes.
  void finish_linear_kernels(StepReport& report);

  // A linear layer a precision recipe's kernel computes: its checkpoint name prefix
  // ("llm.model.layers.0.self_attn.q_proj") and whether it is an expert's.
  struct KernelLayer {
    std::string name;
    nn::LinearImpl* layer;
    bool expert;
  };

  LlavaModel& model_;
  const PrecisionRecipe& precision_;
  RuntimeContext& context_;
  TrainerOptions options_;
  std::unique_ptr<Schedule> schedule_;
  std::vector<TrainedTensor> trained_;
  std::vector<KernelLayer> kernel_layers_;
  std::vector<at::Tensor> mains_;
  std::vector<double> norm_weights_;  // each main's weight in the gradient norm (tensor parallelism)
  bool main_copies_ = false;
  std::unique_ptr<FrozenWeightCasts> frozen_casts_;
  std::unique_ptr<torch::optim::AdamW> optimizer_;
  std::unique_ptr<GradientBuckets> buckets_;  // data parallelism
  std::unique_ptr<GradientBuckets> expert_buckets_;  // expert parallelism: experts over the expert-data group
  std::vector<std::shared_ptr<ProcessGroup>> norm_groups_;  // what the gradient norm sums over
  std::vector<std::size_t> tied_embeddings_;  // trained tensors whose gradients sum over groups.embedding
  std::unique_ptr<DistributedOptimizer> distributed_;  // ZeRO-1 (instead of optimizer_)
  LossSpikeGuard guard_;
  std::int64_t step_ = 0;
  std::string restore_note_;
};

}  // namespace neva
