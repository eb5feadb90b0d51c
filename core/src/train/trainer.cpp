#include "neva/train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <set>
#include <nlohmann/json.hpp>

#include "neva/error.h"
#include "neva/io/atomic_file.h"
#include "neva/io/json.h"
#include "neva/model/decoder.h"
#include "neva/nn/linear.h"
#include "neva/parallel/context_parallel.h"
#include "neva/parallel/process_group.h"
#include "neva/train/distributed_checkpoint.h"
#include "neva/train/loss.h"

namespace neva {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

std::vector<std::pair<std::string, torch::nn::Module*>> components(LlavaModel& model) {
  std::vector<std::pair<std::string, torch::nn::Module*>> parts;
  if (model.encoder()) parts.emplace_back("vision_encoder", model.encoder());
  if (model.connector()) parts.emplace_back("connector", model.connector());
  parts.emplace_back("llm", &model.backbone());
  return parts;
}

// The checkpoint key of a device's random-number generator state: rng.cpu, rng.cuda, ...
std::string rng_key(const c10::Device& device) { return "rng." + c10::DeviceTypeName(device.type(), /*lower_case=*/true); }

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

class SequentialSchedule : public Schedule {
 public:
  std::vector<ScheduledPass> order(std::size_t micro_batches) const override {
    std::vector<ScheduledPass> passes;
    for (std::size_t i = 0; i < micro_batches; ++i) {
      passes.push_back({true, 0, i});
      passes.push_back({false, 0, i});
    }
    return passes;
  }
};

class PipelineSchedule : public Schedule {
 public:
  PipelineSchedule(int stages, int rank, std::int64_t chunks) : stages_(stages), rank_(rank), chunks_(chunks) {}
  std::vector<ScheduledPass> order(std::size_t micro_batches) const override {
    const auto m = static_cast<std::int64_t>(micro_batches), p = static_cast<std::int64_t>(stages_);
    const std::int64_t v = chunks_;
    std::vector<ScheduledPass> passes;
    if (v == 1) {  // 1F1B
      const std::int64_t warmup = std::min<std::int64_t>(p - rank_ - 1, m);
      for (std::int64_t i = 0; i < warmup; ++i) passes.push_back({true, 0, static_cast<std::size_t>(i)});
      for (std::int64_t i = 0; i < m - warmup; ++i) {
        passes.push_back({true, 0, static_cast<std::size_t>(warmup + i)});
        passes.push_back({false, 0, static_cast<std::size_t>(i)});
      }
      for (std::int64_t i = m - warmup; i < m; ++i) passes.push_back({false, 0, static_cast<std::size_t>(i)});
      return passes;
    }
    // Interleaved: virtual micro-batch k is micro-batch (k / (p v)) p + k % p of chunk (k % (p v)) / p
    // (counted from the last chunk backwards for the backward passes).
    if (m % p != 0) {
      throw Error("the interleaved pipeline schedule (virtual_pipeline_model_parallel_size = " + std::to_string(v) +
                  ") needs the micro-batches of a step on each replica to be a multiple of "
                  "pipeline_model_parallel_size = " + std::to_string(p) + "; got " + std::to_string(m) +
                  " (global_batch_size / (micro_batch_size x data-parallel size))");
    }
    const std::int64_t total = m * v;
    const std::int64_t warmup = m == p ? total : std::min(total, (p - rank_ - 1) * 2 + (v - 1) * p);
    auto pass = [&](std::int64_t k, bool forward) {
      std::int64_t chunk = (k % (p * v)) / p;
      if (!forward) chunk = v - 1 - chunk;
      return ScheduledPass{forward, chunk, static_cast<std::size_t>((k / (p * v)) * p + k % p)};
    };
    for (std::int64_t k = 0; k < warmup; ++k) passes.push_back(pass(k, true));
    for (std::int64_t k = 0; k < total - warmup; ++k) {
      passes.push_back(pass(warmup + k, true));
      passes.push_back(pass(k, false));
    }
    for (std::int64_t k = total - warmup; k < total; ++k) passes.push_back(pass(k, false));
    return passes;
  }

 private:
  int stages_, rank_;
  std::int64_t chunks_;
};

}  // namespace

Schedule::~Schedule() = default;
std::unique_ptr<Schedule> sequential_schedule() { return std::make_unique<SequentialSchedule>(); }

std::unique_ptr<Schedule> pipeline_schedule(int stages, int rank, std::int64_t chunks) {
  if (stages < 1 || rank < 0 || rank >= stages || chunks < 1) {
    throw Error("pipeline_schedule: rank " + std::to_string(rank) + " of " + std::to_string(stages) + " stages with " +
                std::to_string(chunks) + " chunks each");
  }
  return std::make_unique<PipelineSchedule>(stages, rank, chunks);
}

std::unique_ptr<Schedule> schedule_for(const ParallelGroups& groups, std::int64_t virtual_chunks) {
  const int stages = group_size(groups.pipeline);
  if (stages > 1) return pipeline_schedule(stages, group_rank(groups.pipeline), virtual_chunks);
  return sequential_schedule();
}

Trainer::Trainer(LlavaModel& model, const PrecisionRecipe& precision, RuntimeContext& context, TrainerOptions options,
                 std::unique_ptr<Schedule> schedule)
    : model_(model),
      precision_(precision),
      context_(context),
      options_(std::move(options)),
      schedule_(schedule ? std::move(schedule) : schedule_for(context.groups, model.pipeline_chunks())),
      guard_(options_.loss_spike) {
  // ZeRO-1 keeps the main weights in its shares only: no whole main copies then.
  const bool zero = options_.optim.distributed &&
                    group_size(context_.groups.data) * group_size(context_.groups.context) > 1;
  main_copies_ = !zero && context_.dtypes.params != context_.dtypes.main_params;
  std::vector<torch::nn::Module*> modules;
  for (auto& [prefix, module] : components(model_)) {
    modules.push_back(module);
    module->train();
    for (auto& [path, layer] : nn::linear_layers(*module)) {
      if (!layer->kernel()) continue;
      const auto found = layer->own_shardings().find("weight");
      kernel_layers_.push_back({prefix + "." + path, layer, found != layer->own_shardings().end() && found->second.expert >= 0});
    }
    std::map<std::string, nn::ParameterSharding> shardings;
    for (auto& [name, sharding] : nn::parameter_shardings(*module)) shardings.emplace(name, sharding);
    for (const auto& item : module->named_parameters()) {
      if (!item.value().requires_grad()) continue;
      at::Tensor main =
          main_copies_ ? item.value().detach().to(context_.dtypes.main_params).clone() : item.value();
      trained_.push_back({prefix + "." + item.key(), item.value(), main, shardings.at(item.key())});
      mains_.push_back(main);
    }
  }
  // The gradient norm counts each parameter once over the model-parallel ranks: a shard with its
  // share, a tensor replicated over the tensor-parallel group on its first rank; under expert
  // parallelism an expert where it lives, a dense tensor on the expert group's first rank.
  const int tp_rank = group_rank(context_.groups.tensor), ep = group_size(context_.groups.expert);
  const int ep_rank = group_rank(context_.groups.expert);
  if (ep > 1 && group_size(context_.groups.tensor) > 1) {
    throw Error(options_.source + ": expert parallelism together with tensor parallelism is not implemented yet");
  }
  // Pipeline parallelism: each stage counts its own parts; the last stage's copy of tied embeddings
  // (its gradient summed with the first stage's over groups.embedding) is counted on the first.
  norm_groups_ = {ep > 1 ? context_.groups.expert : context_.groups.tensor, context_.groups.pipeline};
  const auto* decoder = dynamic_cast<const DecoderBackbone*>(&model_.backbone());
  const at::Tensor tied = decoder ? decoder->pipeline_tied_embedding() : at::Tensor();
  for (std::size_t i = 0; i < trained_.size(); ++i) {
    const auto& sharding = trained_[i].sharding;
    double weight = sharding.tensor_parallel_dim >= 0 ? 1.0 / static_cast<double>(sharding.tensor_parallel_replicas)
                                                      : (tp_rank == 0 ? 1.0 : 0.0);
    if (ep > 1 && sharding.expert < 0 && ep_rank != 0) weight = 0;
    if (tied.defined() && trained_[i].param.is_same(tied) && group_size(context_.groups.embedding) > 1) {
      tied_embeddings_.push_back(i);
      if (sharding.pipeline_stage != 0) weight = 0;
    }
    norm_weights_.push_back(weight);
  }
  if (trained_.empty()) throw Error(options_.source + ": nothing to train: every component is frozen");
  // bf16 mixed: the frozen linear and convolution weights are cast once instead of at every forward.
  frozen_casts_ = std::make_unique<FrozenWeightCasts>(
      modules, context_.dtypes.params == at::kFloat ? context_.dtypes.compute : at::kFloat,
      options_.keep_frozen_originals);
  if (!zero) optimizer_ = make_adamw(mains_, options_.optim);
  if (zero && !tied_embeddings_.empty()) {
    throw Error(options_.source + ": distributed_fused_adam (ZeRO-1) with pipeline parallelism and tied embeddings "
                "(the first and last stages' copies summed) is not implemented yet; use fused_adam or untie them");
  }
  if (zero && ep > 1) {
    throw Error(options_.source + ": distributed_fused_adam (ZeRO-1) with expert parallelism is not implemented yet");
  }
  GradientBucketOptions bucket_options = options_.gradient_buckets;
  bucket_options.timeout = options_.collective_timeout;
  // Expert parallelism: an expert's gradient already holds every expert-parallel rank's tokens; it is
  // summed over the ranks holding the same expert (the expert-data group), the dense ones over the
  // data-parallel group.
  if (ep > 1) {  // (a group of one rank: the buckets only hold the gradients)
    expert_buckets_ = std::make_unique<GradientBuckets>(trained_, context_.groups.expert_data, bucket_options,
                                                        [](const TrainedTensor& t) { return t.sharding.expert >= 0; });
  }
  // Context parallelism: each rank's gradients hold its part of the sequence's tokens, summed over
  // the data x context group (Megatron's dp-cp group).
  const std::shared_ptr<ProcessGroup>& dense_group =
      group_size(context_.groups.context) > 1 ? context_.groups.data_and_context : context_.groups.data;
  if (group_size(dense_group) > 1) {
    bucket_options.shard = zero;
    if (zero) bucket_options.grad_dtype = context_.dtypes.main_params;  // fp32 gradients of bf16 weights
    std::function<bool(const TrainedTensor&)> dense;
    if (ep > 1) dense = [](const TrainedTensor& t) { return t.sharding.expert < 0; };
    buckets_ = std::make_unique<GradientBuckets>(trained_, dense_group, bucket_options, dense);
    if (zero) {
      distributed_ = std::make_unique<DistributedOptimizer>(trained_, *buckets_, dense_group, options_.optim,
                                                            context_.dtypes.main_params, options_.collective_timeout);
    }
  }
}

Trainer::~Trainer() = default;

std::int64_t Trainer::parameter_count() const {
  std::int64_t count = 0;
  for (const auto& tensor : mains_) count += tensor.numel();
  return count;
}

void Trainer::restore_frozen_weights() { frozen_casts_->restore(); }

StepReport Trainer::train_step(const std::vector<TrainingBatch>& batches) {
  StepReport report;
  const auto started = Clock::now();
  for (const auto& batch : batches) {
    report.labelled_tokens += batch.labelled_tokens;
    report.tokens += batch.tokens;
    report.samples += batch.samples;
    report.positions += batch.input_ids.numel();
  }
  // Data parallelism: the global batch's labelled tokens (every replica's micro-batches).
  const std::shared_ptr<ProcessGroup>& replicas = context_.groups.data;
  const int replica_count = group_size(replicas);
  std::int64_t labelled = report.labelled_tokens;
  if (replica_count > 1) {
    // NCCL takes only device tensors.
    at::Tensor count = at::tensor({labelled}, at::TensorOptions(at::kLong).device(context_.device));
    replicas->all_reduce(count).wait(options_.collective_timeout);
    labelled = count.item<std::int64_t>();
  }
  const auto accumulation = static_cast<double>(batches.size()) * replica_count;  // micro-batches in the global batch
  // Tensor parallelism: the LM head's logits stay split over the vocabulary, and so does the loss.
  const bool tensor_parallel = group_size(context_.groups.tensor) > 1;
  const bool context_parallel = group_size(context_.groups.context) > 1;
  const std::int64_t sequence_split = context_.sequence_parallel ? group_size(context_.groups.tensor) : 1;
  const nn::VocabularyShard vocabulary = nn::vocabulary_shard(context_, model_.backbone().vocab_size());
  // Pipeline parallelism: this rank's chunks, the neighbours its hidden states come from and go to.
  const std::shared_ptr<ProcessGroup>& pipeline = context_.groups.pipeline;
  const int stages = group_size(pipeline), stage = group_rank(pipeline);
  const std::int64_t total_chunks = stages * model_.pipeline_chunks();
  // What a forward pass leaves for its backward pass: the received input (a leaf whose gradient goes
  // back to the previous stage) and the output (the loss on the last chunk, the hidden states elsewhere).
  struct Activations {
    at::Tensor input, output;
  };
  std::map<std::pair<std::int64_t, std::size_t>, Activations> activations;
  // Point-to-point traffic: hidden states forward, their gradients backward, tagged by micro-batch,
  // receiving chunk and direction. Under 1F1B the sends a pass produces go out with the next receive
  // in one batch (Megatron's send_forward_recv_backward and send_backward_recv_forward: a pair of
  // stages exchanging both ways must post both at once on NCCL); the interleaved schedule posts them
  // at once. A receive blocks; every send is waited for before the update.
  std::vector<P2POp> outgoing;
  std::vector<Work> sends;
  std::vector<at::Tensor> in_transit;
  const bool batch_sends = model_.pipeline_chunks() == 1;
  auto tag = [&](std::size_t micro_batch, std::int64_t chunk, bool gradient) {
    return static_cast<int>(((static_cast<std::int64_t>(micro_batch) * total_chunks + chunk) * 2) + (gradient ? 1 : 0));
  };
  auto send = [&](const at::Tensor& tensor, int peer, int message) {
    in_transit.push_back(tensor.detach().contiguous());
    outgoing.push_back({P2POp::Kind::Send, in_transit.back(), peer, message});
    if (!batch_sends) {
      sends.push_back(pipeline->batch_isend_irecv(outgoing));
      outgoing.clear();
    }
  };
  auto flush = [&]() {
    if (outgoing.empty()) return;
    sends.push_back(pipeline->batch_isend_irecv(outgoing));
    outgoing.clear();
  };
  auto receive = [&](at::Tensor& tensor, int peer, int message) {
    std::vector<P2POp> ops = std::move(outgoing);
    outgoing.clear();
    ops.push_back({P2POp::Kind::Recv, tensor, peer, message});
    RECORD_USER_SCOPE("pipeline receive");
    pipeline->batch_isend_irecv(ops).wait(options_.collective_timeout);
    if (batch_sends) in_transit.clear();  // what went with it has been sent
  };
  const int previous = (stage - 1 + stages) % std::max(stages, 1), next = (stage + 1) % std::max(stages, 1);
  // The loss is the mean over every labelled token of the global batch, whatever the split into
  // micro-batches or packed rows: each micro-batch contributes its share.
  auto forward = [&](std::int64_t chunk, std::size_t index) -> double {
    const TrainingBatch& batch = batches[index];
    if (batch.labelled_tokens == 0) return 0;  // nothing to learn from (its share of the loss is 0)
    const std::int64_t whole_chunk = chunk * stages + stage;  // in the whole pipeline
    const bool first = whole_chunk == 0, last = whole_chunk == total_chunks - 1;
    MultimodalInputs inputs;
    inputs.input_ids = batch.input_ids;  // the model moves its inputs to its device
    inputs.images = batch.images;
    inputs.attention_mask = batch.attention_mask;
    inputs.positions = batch.positions;
    inputs.segment_ids = batch.segment_ids;
    // The LM head runs only where a labelled token follows (stage 2: the answers). Under context
    // parallelism the backbone takes this rank's positions of that mask, and the loss its labels.
    LabelledPositions positions = labelled_positions(batch.labels);
    inputs.logits_mask = positions.mask;
    inputs.vocab_parallel_logits = tensor_parallel;
    std::int64_t local_labelled = batch.labelled_tokens;
    if (context_parallel) {
      positions = labelled_positions(batch.labels, context_parallel_layout(batch.labels.size(1), context_.groups.context,
                                                                           sequence_split));
      local_labelled = positions.targets.numel();
    }
    Activations& saved = activations[{chunk, index}];
    if (stages > 1) {
      inputs.pipeline_chunk = chunk;
      if (!first) {
        saved.input = model_.empty_hidden_states(batch.input_ids.size(0), batch.input_ids.size(1));
        receive(saved.input, previous, tag(index, whole_chunk, false));
        saved.input.requires_grad_(true);
        inputs.hidden_states = saved.input;
      }
    }
    auto scope = precision_.enter_forward(context_);
    BackboneOutputs outputs = model_.forward(inputs);
    if (!last) {
      saved.output = outputs.logits;
      // What the next stage allocates without being told: a mismatch would corrupt or hang it.
      const std::vector<std::int64_t> expected = model_.hidden_states_shape(batch.input_ids.size(0), batch.input_ids.size(1));
      if (saved.output.sizes() != at::IntArrayRef(expected) || saved.output.scalar_type() != model_.hidden_states_dtype()) {
        throw Error("pipeline chunk " + std::to_string(whole_chunk) + " returned hidden states of shape " +
                    c10::str(saved.output.sizes()) + " (" + c10::toString(saved.output.scalar_type()) +
                    "); the next stage expects " + c10::str(at::IntArrayRef(expected)) + " (" +
                    c10::toString(model_.hidden_states_dtype()) + ")");
      }
      send(saved.output, next, tag(index, whole_chunk + 1, false));
      return 0;
    }
    at::Tensor loss;
    if (local_labelled == 0) {  // none of this micro-batch's labels lie in this rank's part
      loss = outputs.logits.sum() * 0.0;
    } else {
      loss = tensor_parallel ? labelled_lm_loss(outputs.logits, positions, context_.groups.tensor, vocabulary.start,
                                                model_.backbone().vocab_size())
                             : labelled_lm_loss(outputs.logits, positions);
    }
    loss = loss * (static_cast<double>(local_labelled) / static_cast<double>(std::max<std::int64_t>(1, labelled)));
    if (outputs.aux_loss.defined()) loss = loss + outputs.aux_loss.to(loss.scalar_type()) / accumulation;
    saved.output = loss;
    return loss.item<double>();
  };
  auto backward = [&](std::int64_t chunk, std::size_t index) {
    if (batches[index].labelled_tokens == 0) return;
    const std::int64_t whole_chunk = chunk * stages + stage;
    const bool first = whole_chunk == 0, last = whole_chunk == total_chunks - 1;
    Activations saved = std::move(activations.at({chunk, index}));
    activations.erase({chunk, index});
    if (last) {
      // Text-only samples while only the vision side trains: nothing to differentiate.
      if (saved.output.requires_grad()) saved.output.backward();
    } else {
      at::Tensor gradient = at::empty_like(saved.output, at::MemoryFormat::Contiguous);
      receive(gradient, next, tag(index, whole_chunk, true));
      if (saved.output.requires_grad()) torch::autograd::backward({saved.output}, {gradient});
    }
    if (!first) {
      const at::Tensor& gradient = saved.input.grad();
      send(gradient.defined() ? gradient : at::zeros_like(saved.input), previous, tag(index, whole_chunk - 1, true));
    }
    if (main_copies_) {  // O2: accumulate in fp32 (Megatron's main_grad), not in the bf16 .grad
      at::NoGradGuard no_grad;
      for (auto& t : trained_) {
        if (!t.param.grad().defined()) continue;
        if (t.main.grad().defined()) {
          t.main.mutable_grad().add_(t.param.grad());
        } else {
          t.main.mutable_grad() = t.param.grad().to(t.main.scalar_type());
        }
        t.param.mutable_grad().reset();
      }
    }
  };
  const std::string at_step = options_.title + ": step " + std::to_string(step_ + 1) + ": ";
  const std::vector<ScheduledPass> passes = schedule_->order(batches.size());
  std::size_t last_backward = passes.size();
  for (std::size_t k = 0; k < passes.size(); ++k) {
    if (!passes[k].forward) last_backward = k;
  }
  for (std::size_t k = 0; k < passes.size(); ++k) {
    const ScheduledPass& pass = passes[k];
    if (pass.micro_batch >= batches.size() || pass.chunk < 0 || pass.chunk >= model_.pipeline_chunks()) {
      throw Error(options_.title + ": the schedule asked for micro-batch " + std::to_string(pass.micro_batch) +
                  " of chunk " + std::to_string(pass.chunk) + "; the step has " + std::to_string(batches.size()) +
                  " micro-batches and this rank " + std::to_string(model_.pipeline_chunks()) + " chunks");
    }
    // The schedule's timeline in a profile trace (trainer.profile): one user scope per pass, named
    // after it, on each rank's trace (receives inside it show as "pipeline receive").
    RECORD_USER_SCOPE(std::string(pass.forward ? "forward" : "backward") + " chunk " +
                      std::to_string(pass.chunk * stages + stage) + " micro-batch " + std::to_string(pass.micro_batch));
    if (pass.forward) {
      report.loss += forward(pass.chunk, pass.micro_batch);
      continue;
    }
    if (k == last_backward) {  // the step's last backward pass on this rank
      if (buckets_) buckets_->arm();
      if (expert_buckets_) expert_buckets_->arm();
    }
    backward(pass.chunk, pass.micro_batch);
  }
  flush();
  for (auto& work : sends) work.wait(options_.collective_timeout);
  sends.clear();
  in_transit.clear();
  if (!activations.empty()) {
    throw Error(options_.title + ": the schedule left " + std::to_string(activations.size()) +
                " forward pass(es) without their backward pass");
  }
  if (labelled == 0) throw Error(at_step + "the global batch holds no labelled token");
  // Data parallelism's reduction first — on the data-parallel group right after the backward pass,
  // whose gradient buckets every replica finishes in the same order before any other collective
  // there — then tensor parallelism's fix-up, on the whole gradients or on ZeRO-1's shares.
  if (buckets_) report.gradient_sync = buckets_->finish();
  if (expert_buckets_) {
    const GradientSyncReport experts = expert_buckets_->finish();
    report.gradient_sync.buckets += experts.buckets;
    report.gradient_sync.bytes += experts.bytes;
    report.gradient_sync.started_in_backward += experts.started_in_backward;
  }
  if (distributed_) {
    distributed_->finalize_tensor_parallel(context_.groups.tensor);
  } else {
    finalize_tensor_parallel_gradients(trained_, context_.groups.tensor);
  }
  // Tied embeddings under pipeline parallelism: the first stage's embedding and the last stage's
  // LM head are one tensor held twice; each copy takes the sum of both gradients (Megatron's
  // _allreduce_embedding_grads), so that they stay equal.
  for (std::size_t i : tied_embeddings_) {
    TrainedTensor& t = trained_[i];
    if (!t.main.grad().defined()) t.main.mutable_grad() = at::zeros_like(t.main);
    at::Tensor gradient = t.main.mutable_grad();
    context_.groups.embedding->all_reduce(gradient).wait(options_.collective_timeout);
  }
  if (gradients_ready) gradients_ready(trained_);
  // The replicas' (and, with context parallelism, the sequence parts') shares of the global loss.
  if (stages > 1) {  // the last stage's (the others add 0)
    at::Tensor loss = at::tensor({report.loss}, at::TensorOptions(at::kDouble).device(context_.device));
    pipeline->all_reduce(loss).wait(options_.collective_timeout);
    report.loss = loss.item<double>();
  }
  const std::shared_ptr<ProcessGroup>& shares = context_parallel ? context_.groups.data_and_context : replicas;
  if (group_size(shares) > 1) {
    at::Tensor loss = at::tensor({report.loss}, at::TensorOptions(at::kDouble).device(context_.device));
    shares->all_reduce(loss).wait(options_.collective_timeout);
    report.loss = loss.item<double>();
  }
  report.forward_backward_seconds = seconds_since(started);

  const double loss_value = report.loss;
  std::string why;
  const LossSpikeGuard::Verdict verdict = guard_.judge(loss_value, &why);
  if (verdict == LossSpikeGuard::Verdict::Stop) {
    throw Error(at_step + why + "; stopping before the update (last good checkpoint: " + options_.last_checkpoint() +
                "). Lower model.optim.lr, raise warmup_steps, or check the data" +
                (std::isfinite(loss_value) ? " (trainer.loss_spike_* set how spikes are judged)" : ""));
  }
  guard_.record(loss_value, verdict);
  report.skipped = verdict == LossSpikeGuard::Verdict::Skip;
  const auto computed = Clock::now();
  at::NoGradGuard no_grad;
  // The clipping factor is applied inside the optimizer's fused update (no pass of its own).
  report.lr = learning_rate(options_.optim, step_);
  if (!report.skipped) {
    const GradientNorm norm =
        distributed_ ? distributed_->gradient_norm(options_.optim.clip_grad, norm_weights_,
                                                   {context_.groups.tensor, context_.groups.pipeline})
                     : gradient_norm(mains_, options_.optim.clip_grad, norm_weights_, norm_groups_);
    report.grad_norm = norm.norm;
    if (!std::isfinite(report.grad_norm)) {
      throw Error(at_step + "the gradient norm is " +
                  (std::isnan(report.grad_norm) ? std::string("NaN") : std::string("infinite")) + " (loss " +
                  std::to_string(loss_value) + "); stopping before the update (last good checkpoint: " +
                  options_.last_checkpoint() + "). Lower model.optim.lr, or use fp32 to find the overflowing layer");
    }
    if (distributed_) {
      distributed_->step(report.lr, norm.clip_scale);
    } else {
      set_learning_rate(*optimizer_, report.lr);
      scaled_step(*optimizer_, norm.clip_scale);
    }
  } else {
    report.skip_reason = why;
  }
  if (buckets_ || expert_buckets_) {
    if (buckets_) buckets_->zero();  // the gradients are views into the buckets
    if (expert_buckets_) expert_buckets_->zero();
  } else {
    optimizer_->zero_grad(true);
  }
  if (main_copies_) {
    for (auto& t : trained_) t.param.copy_(t.main);
  }
  finish_linear_kernels(report);
  ++step_;
  report.optimizer_seconds = seconds_since(computed);
  return report;
}

void Trainer::finish_linear_kernels(StepReport& report) {
  if (kernel_layers_.empty()) return;
  // Dense layers' copies: the tensor-parallel ranks (each its shard) and the data-parallel (and
  // context-parallel) replicas, which see other tokens (TE's amax reduction group). An expert's: the
  // ranks holding that expert (expert-data), then its tensor-parallel shards. MAX is associative:
  // reducing over one group and then another reduces over their product.
  for (const bool experts : {false, true}) {
    std::vector<at::Tensor> maxima;
    for (const auto& k : kernel_layers_) {
      if (k.expert != experts) continue;
      for (auto& tensor : k.layer->kernel()->shared_maxima()) maxima.push_back(tensor);
    }
    if (maxima.empty()) continue;
    std::vector<at::Tensor> flat;
    for (const auto& tensor : maxima) flat.push_back(tensor.reshape({-1}).to(context_.device, at::kFloat));
    at::Tensor joined = at::cat(flat);
    const std::vector<std::shared_ptr<ProcessGroup>> groups =
        experts ? std::vector<std::shared_ptr<ProcessGroup>>{context_.groups.expert_data, context_.groups.tensor}
                : std::vector<std::shared_ptr<ProcessGroup>>{context_.groups.tensor_and_data};
    bool reduced = false;
    for (const auto& group : groups) {
      if (group_size(group) <= 1) continue;
      group->all_reduce(joined, ReduceOp::Max).wait(options_.collective_timeout);
      reduced = true;
    }
    if (!reduced) continue;
    std::int64_t offset = 0;
    for (auto& tensor : maxima) {
      tensor.copy_(joined.narrow(0, offset, tensor.numel()).view(tensor.sizes()));
      offset += tensor.numel();
    }
  }
  for (const auto& k : kernel_layers_) {
    std::string note = k.layer->kernel()->step_finished();
    if (!note.empty()) report.linear_notes.push_back(k.name + ": " + note);
    ++report.linear_modes[k.layer->kernel()->mode()];
  }
}

std::int64_t Trainer::optimizer_state_bytes() const {
  if (distributed_) return distributed_->state_bytes();
  std::int64_t bytes = 0;
  for (const auto& t : trained_) {
    const std::int64_t main = t.main.numel() * static_cast<std::int64_t>(t.main.element_size());
    bytes += (main_copies_ ? 3 : 2) * main;
  }
  return bytes;
}

std::vector<at::Tensor> Trainer::gradients() const {
  if (distributed_) return distributed_->gather_gradients();
  std::vector<at::Tensor> out;
  for (const auto& t : trained_) out.push_back(t.main.grad().defined() ? t.main.grad().detach().clone() : at::zeros_like(t.main));
  return out;
}

Trainer::State Trainer::gather_state() const {
  State state;
  const std::shared_ptr<ProcessGroup>& tp = context_.groups.tensor;
  if (distributed_) {  // ZeRO-1: whole over the replicas first, then over the tensor-parallel group
    const DistributedOptimizer::Whole whole = distributed_->gather();
    for (std::size_t i = 0; i < trained_.size(); ++i) {
      const TrainedTensor& t = trained_[i];
      state.weights.emplace_back(t.name, nn::unshard(whole.main[i], t.sharding, tp));
      if (whole.steps == 0) continue;
      state.moments.emplace_back("step." + t.name, at::scalar_tensor(whole.steps, at::kLong));
      state.moments.emplace_back("exp_avg." + t.name, nn::unshard(whole.exp_avg[i], t.sharding, tp));
      state.moments.emplace_back("exp_avg_sq." + t.name, nn::unshard(whole.exp_avg_sq[i], t.sharding, tp));
    }
  }
  for (const auto& t : trained_) {
    if (distributed_) break;
    state.weights.emplace_back(t.name, nn::unshard(t.main.detach(), t.sharding, tp));
    // A tensor that never had a gradient (an expert no token reached) has no state yet; under tensor
    // parallelism every rank of the group holds the same tensors' states (each of its shards was
    // updated in the same steps), so they gather together.
    auto found = optimizer_->state().find(t.main.unsafeGetTensorImpl());
    if (found == optimizer_->state().end()) continue;
    auto& moment = static_cast<torch::optim::AdamWParamState&>(*found->second);
    state.moments.emplace_back("step." + t.name, at::scalar_tensor(moment.step(), at::kLong));
    state.moments.emplace_back("exp_avg." + t.name, nn::unshard(moment.exp_avg(), t.sharding, tp));
    state.moments.emplace_back("exp_avg_sq." + t.name, nn::unshard(moment.exp_avg_sq(), t.sharding, tp));
  }
  // Expert parallelism: every expert's tensors, from the ranks holding them.
  if (group_size(context_.groups.expert) > 1) {
    for (auto* list : {&state.weights, &state.moments}) {
      std::vector<std::pair<std::string, at::Tensor>> whole;
      for (auto& entry : *list) {
        if (nn::expert_index(entry.first) < 0) whole.push_back(entry);
      }
      for (auto& entry : nn::gather_experts(*list, context_.groups.expert)) whole.push_back(std::move(entry));
      *list = std::move(whole);
    }
  }
  // Pipeline parallelism: every stage's tensors, on the first stage.
  if (group_size(context_.groups.pipeline) > 1) {
    state.weights = nn::gather_pipeline_stages(state.weights, context_.groups.pipeline);
    state.moments = nn::gather_pipeline_stages(state.moments, context_.groups.pipeline);
  }
  state.moments.emplace_back("rng.cpu", context_.generator.get_state());
  if (!context_.device.is_cpu()) {
    state.moments.emplace_back(rng_key(context_.device), at::globalContext().defaultGenerator(context_.device).get_state());
  }
  return state;
}

bool Trainer::writes(const TrainedTensor& t, std::size_t index) const {
  // One owner per replicated piece: the first rank of the replicas (the data-parallel ranks, or
  // the expert-data ones for an expert), of the tensor-parallel ranks holding the same shard, and the
  // first stage for tied embeddings.
  const int tp = group_size(context_.groups.tensor), tp_rank = group_rank(context_.groups.tensor);
  const auto& s = t.sharding;
  const bool split = s.tensor_parallel_dim >= 0 && tp > 1;
  if (split ? tp_rank % s.tensor_parallel_replicas != 0 : tp_rank != 0) return false;
  if (std::find(tied_embeddings_.begin(), tied_embeddings_.end(), index) != tied_embeddings_.end() &&
      s.pipeline_stage != 0) {
    return false;
  }
  return true;
}

std::vector<CheckpointPiece> Trainer::state_pieces(bool owned) const {
  std::vector<CheckpointPiece> out;
  const int tp = group_size(context_.groups.tensor), tp_rank = group_rank(context_.groups.tensor);
  const std::shared_ptr<ProcessGroup>& dense_group =
      group_size(context_.groups.context) > 1 ? context_.groups.data_and_context : context_.groups.data;
  const bool first_dense = group_rank(dense_group) == 0, first_expert = group_rank(context_.groups.expert_data) == 0;
  auto add = [&out](const std::string& name, const std::vector<std::int64_t>& shape, TensorRegion region, at::Tensor data,
                    const nn::ParameterSharding* sharding = nullptr) {
    out.push_back({name, shape, std::move(region), std::move(data)});
    if (sharding && sharding->tensor_parallel_dim >= 0) {
      out.back().split_dim = sharding->tensor_parallel_dim;
      out.back().split_blocks = sharding->partition_stride;
    }
  };
  // The precision recipe's kernels' state (FP8 amax histories and scales), equal on every replica
  // of its layer: written whole by the first.
  for (const auto& k : kernel_layers_) {
    if (owned && !(tp_rank == 0 && (k.expert ? first_expert : first_dense))) continue;
    for (auto& [name, tensor] : k.layer->kernel()->state()) {
      add(k.name + "." + name, tensor.sizes().vec(), whole_region(tensor.sizes().vec()), tensor);
    }
  }
  std::vector<std::vector<ShardSegment>> segments;
  for (const auto& t : trained_) segments.push_back(shard_segments(t.main.sizes().vec(), t.sharding, tp_rank, tp));
  if (distributed_) {  // ZeRO-1: each data-parallel rank its shares (flat runs of its tensor-parallel shards)
    for (const auto& share : distributed_->shares()) {
      const TrainedTensor& t = trained_[share.tensor];
      if (owned && !writes(t, share.tensor)) continue;
      const std::vector<std::int64_t> shape = nn::whole_shape(t.main, t.sharding, tp);
      for (const auto& [region, start] : flat_regions(segments[share.tensor], t.main.sizes().vec(), share.offset, share.length)) {
        add(t.name, shape, region, share.main.narrow(0, start, region.numel()), &t.sharding);
        if (!share.exp_avg.defined()) continue;
        add("exp_avg." + t.name, shape, region, share.exp_avg.narrow(0, start, region.numel()), &t.sharding);
        add("exp_avg_sq." + t.name, shape, region, share.exp_avg_sq.narrow(0, start, region.numel()), &t.sharding);
      }
    }
    for (std::size_t i = 0; i < trained_.size() && distributed_->steps() > 0; ++i) {
      if (owned && !(first_dense && tp_rank == 0 && writes(trained_[i], i))) continue;
      add("step." + trained_[i].name, {}, whole_region({}), at::scalar_tensor(distributed_->steps(), at::kLong));
    }
    return out;
  }
  for (std::size_t i = 0; i < trained_.size(); ++i) {
    const TrainedTensor& t = trained_[i];
    if (owned && !((t.sharding.expert >= 0 ? first_expert : first_dense) && writes(t, i))) continue;
    const std::vector<std::int64_t> shape = nn::whole_shape(t.main, t.sharding, tp);
    auto found = optimizer_->state().find(t.main.unsafeGetTensorImpl());
    const auto* moment = found == optimizer_->state().end()
                             ? nullptr
                             : static_cast<const torch::optim::AdamWParamState*>(found->second.get());
    for (const ShardSegment& segment : segments[i]) {
      auto part = [&segment](const at::Tensor& local) {
        return local.dim() == 0 ? local : local.narrow(segment.dim, segment.local_begin, segment.length);
      };
      add(t.name, shape, segment.box, part(t.main), &t.sharding);
      if (!moment) continue;
      add("exp_avg." + t.name, shape, segment.box, part(moment->exp_avg()), &t.sharding);
      add("exp_avg_sq." + t.name, shape, segment.box, part(moment->exp_avg_sq()), &t.sharding);
    }
    // A tensor that never had a gradient (an expert no token reached) has no optimizer state yet.
    if (moment && (!owned || tp_rank == 0)) add("step." + t.name, {}, whole_region({}), at::scalar_tensor(moment->step(), at::kLong));
  }
  return out;
}

Trainer::Snapshot Trainer::snapshot(const std::vector<std::uint64_t>& consumed_samples, bool copy) const {
  if (consumed_samples.empty()) throw Error("Trainer::save: no data position given");
  at::NoGradGuard no_grad;
  const std::shared_ptr<ProcessGroup>& world = context_.groups.world;
  const auto& g = context_.groups;
  for (const auto* group : {&g.data, &g.tensor, &g.pipeline, &g.context, &g.expert}) {
    if (group_size(*group) > group_size(world)) {
      throw Error("Trainer::save: the runtime context's groups.world is not set while other groups span " +
                  std::to_string(group_size(*group)) + " ranks; every rank writes its part of the checkpoint and rank 0 "
                  "of the world commits it");
    }
  }
  Snapshot out;
  out.rank = group_rank(world);
  out.pieces = state_pieces(/*owned=*/true);
  out.own = {{"rng.cpu", context_.generator.get_state()}};
  if (!context_.device.is_cpu()) {
    out.own.emplace_back(rng_key(context_.device), at::globalContext().defaultGenerator(context_.device).get_state());
  }
  if (copy) {  // off the live tensors, into host memory
    for (auto& piece : out.pieces) piece.data = piece.data.to(at::kCPU, /*non_blocking=*/false, /*copy=*/true).contiguous();
    for (auto& entry : out.own) entry.second = entry.second.to(at::kCPU, false, true);
  }
  out.trainer_state = {{"step", step_},
                       {"consumed_samples", consumed_samples.front()},
                       {"loss_window", guard_.window()},
                       {"skipped_batches", guard_.skipped()},
                       {"consecutive_spikes", guard_.consecutive()},
                       {"lr", learning_rate(options_.optim, step_)},
                       {"recipe", options_.source}};
  if (consumed_samples.size() > 1) out.trainer_state["consumed_samples_per_replica"] = consumed_samples;
  out.layout = {{"world_size", group_size(world)},
                {"tensor_model_parallel_size", group_size(g.tensor)},
                {"pipeline_model_parallel_size", group_size(g.pipeline)},
                {"virtual_pipeline_model_parallel_size", model_.pipeline_chunks()},
                {"context_parallel_size", group_size(g.context)},
                {"expert_model_parallel_size", group_size(g.expert)},
                {"data_parallel_size", group_size(g.data)},
                {"distributed_optimizer", distributed_ != nullptr}};
  return out;
}

json Trainer::finish_save(const fs::path& directory, const json& description, const Snapshot& snapshot) const {
  // Every rank's file is on disk (fsynced) before rank 0 learns of it: the manifest, written after
  // this, commits only complete checkpoints.
  const std::vector<std::string> every = all_gather_text(context_.groups.world, description.dump(), context_.device);
  if (snapshot.rank != 0) return nullptr;
  std::vector<json> ranks;
  for (const auto& text : every) ranks.push_back(json::parse(text));
  json manifest = merge_rank_shards(ranks);
  write_file_atomically((directory / "trainer_state.json").string(), snapshot.trainer_state.dump(2) + "\n");
  manifest["layout"] = snapshot.layout;
  return manifest;
}

json Trainer::save(const fs::path& directory, const std::vector<std::uint64_t>& consumed_samples) const {
  const Snapshot state = snapshot(consumed_samples, /*copy=*/false);
  return finish_save(directory, write_rank_shard(directory, state.rank, state.pieces, state.own), state);
}

std::vector<std::uint64_t> Trainer::restore(const fs::path& directory) {
  at::NoGradGuard no_grad;
  const CheckpointReader checkpoint(directory);
  const std::string state_path = (directory / "trainer_state.json").string();
  const json state = read_json_file(state_path);
  std::vector<std::uint64_t> positions;
  try {
    if (!state.at("step").is_number_unsigned() || !state.at("consumed_samples").is_number_unsigned()) {
      throw Error(state_path + ": malformed trainer state: step and consumed_samples must be non-negative integers");
    }
    step_ = state.at("step").get<std::int64_t>();
    positions = {state.at("consumed_samples").get<std::uint64_t>()};
    if (state.contains("consumed_samples_per_replica")) {
      const json& per_replica = state.at("consumed_samples_per_replica");
      bool valid = per_replica.is_array() && !per_replica.empty();
      for (const auto& value : per_replica) valid = valid && value.is_number_unsigned();
      if (!valid) {
        throw Error(state_path + ": malformed trainer state: consumed_samples_per_replica must be a non-empty list " +
                    "of non-negative integers");
      }
      positions = per_replica.get<std::vector<std::uint64_t>>();
    }
    // Older checkpoints kept a running mean instead of the window; their guard starts afresh.
    guard_.restore(state.value("loss_window", std::vector<double>{}), state.value("skipped_batches", std::int64_t{0}),
                   state.value("consecutive_spikes", std::int64_t{0}));
  } catch (const json::exception& malformed) {
    throw Error(state_path + ": malformed trainer state: " + json_error_reason(malformed));
  }
  const int tp = group_size(context_.groups.tensor), tp_rank = group_rank(context_.groups.tensor);
  // Whatever layout wrote it: every tensor there, whole shapes as this model's.
  std::int64_t steps = 0;
  std::map<std::string, std::int64_t> tensor_steps;  // AdamW's step of each tensor that has state
  for (const auto& t : trained_) {
    if (!checkpoint.contains(t.name)) {
      throw Error(directory.string() + ": the checkpoint has no tensor '" + t.name + "', which this recipe trains; was " +
                  "it written by a recipe that froze other components, or by another model?");
    }
    const std::vector<std::int64_t> whole = nn::whole_shape(t.main, t.sharding, tp);
    if (checkpoint.shape(t.name) != whole) {
      throw Error(directory.string() + ": tensor '" + t.name + "' has shape " + c10::str(at::IntArrayRef(checkpoint.shape(t.name))) +
                  " in the checkpoint, this model's is " + c10::str(at::IntArrayRef(whole)) + " (another model?)");
    }
    if (checkpoint.contains("step." + t.name)) {
      const std::int64_t step = checkpoint.read_whole("step." + t.name).item<std::int64_t>();
      tensor_steps[t.name] = step;
      steps = std::max(steps, step);
    }
  }
  // The moments the pieces are read into: zeros first, for the tensors that have them.
  if (distributed_) {
    distributed_->reset_state(steps);
    for (const auto& t : trained_) {  // the parameters whole (the shares below take the main weights)
      for (const ShardSegment& segment : shard_segments(t.main.sizes().vec(), t.sharding, tp_rank, tp)) {
        checkpoint.read(t.name, segment.box, t.param.detach().narrow(segment.dim, segment.local_begin, segment.length));
      }
    }
  } else {
    optimizer_->state().clear();
    for (const auto& t : trained_) {
      const auto found = tensor_steps.find(t.name);
      if (found == tensor_steps.end()) continue;
      auto moment = std::make_unique<torch::optim::AdamWParamState>();
      moment->step(found->second);
      moment->exp_avg(at::zeros_like(t.main, at::MemoryFormat::Contiguous));
      moment->exp_avg_sq(at::zeros_like(t.main, at::MemoryFormat::Contiguous));
      optimizer_->state()[t.main.unsafeGetTensorImpl()] = std::move(moment);
    }
  }
  std::map<std::string, at::Tensor> parameters;
  for (const auto& t : trained_) parameters.emplace(t.name, t.param);
  std::set<std::string> kernel_states;
  std::vector<std::string> fresh_kernel_states;
  for (const auto& k : kernel_layers_) {
    for (const auto& entry : k.layer->kernel()->state()) kernel_states.insert(k.name + "." + entry.first);
  }
  for (auto& piece : state_pieces(/*owned=*/false)) {
    if (piece.name.rfind("step.", 0) == 0) continue;
    // ZeRO-1 with main weights in the parameters' dtype: a share's main weight is a view of the
    // parameter, read whole just above.
    const auto parameter = parameters.find(piece.name);
    if (distributed_ && parameter != parameters.end() && piece.data.is_alias_of(parameter->second)) continue;
    if (!checkpoint.contains(piece.name)) {
      // Moments of a tensor the writer had not updated yet stay zero.
      if (piece.name.rfind("exp_avg", 0) == 0) continue;
      if (kernel_states.count(piece.name)) {  // written without this recipe's kernels (bf16 before FP8)
        fresh_kernel_states.push_back(piece.name);
        continue;
      }
      throw Error(directory.string() + ": the checkpoint has no tensor '" + piece.name + "'");
    }
    checkpoint.read(piece.name, piece.region, piece.data);
  }
  if (main_copies_) {
    for (auto& t : trained_) t.param.detach().copy_(t.main);
  }
  restore_note_.clear();
  if (!fresh_kernel_states.empty()) {
    if (fresh_kernel_states.size() != kernel_states.size()) {
      throw Error(directory.string() + ": the checkpoint has part of the precision recipe's layer state, not '" +
                  fresh_kernel_states.front() + "' (written by another model?)");
    }
    restore_note_ = "the checkpoint holds no state of the precision recipe's " + std::to_string(kernel_layers_.size()) +
                    " kernel layers (written without model.fp8?): their scaling starts afresh";
  }
  const int rank = group_rank(context_.groups.world);
  const at::Tensor cpu = checkpoint.own_tensor(rank, "rng.cpu");
  if (!cpu.defined()) throw Error(directory.string() + ": the checkpoint holds no generator state (rng.cpu)");
  context_.generator.set_state(cpu);  // the context's generator (CPU)
  // The accelerator's generator too, when the checkpoint was written on the same kind of device.
  if (!context_.device.is_cpu()) {
    const at::Tensor device_state = checkpoint.own_tensor(rank, rng_key(context_.device));
    if (device_state.defined()) {
      at::Generator generator = at::globalContext().defaultGenerator(context_.device);
      generator.set_state(device_state);
    }
  }
  return positions;
}

}  // namespace neva
