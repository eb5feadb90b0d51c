#include "neva/train/trainer.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <nlohmann/json.hpp>

#include "neva/error.h"
#include "neva/io/atomic_file.h"
#include "neva/io/json.h"
#include "neva/io/safetensors.h"
#include "neva/parallel/process_group.h"
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
  double run(std::size_t micro_batches, const std::function<double(std::size_t)>& forward_backward) const override {
    double total = 0;
    for (std::size_t i = 0; i < micro_batches; ++i) total += forward_backward(i);
    return total;
  }
};

}  // namespace

Schedule::~Schedule() = default;
std::unique_ptr<Schedule> sequential_schedule() { return std::make_unique<SequentialSchedule>(); }

std::function<void(std::vector<TrainedTensor>&)> all_reduce_gradients(std::shared_ptr<ProcessGroup> group,
                                                                      std::chrono::milliseconds timeout) {
  return [group = std::move(group), timeout](std::vector<TrainedTensor>& trained) {
    if (!group || group->size() == 1) return;
    at::NoGradGuard no_grad;
    // One buffer per dtype (fp32 main gradients; fp64 in the equivalence tests), in trained order:
    // the same layout on every replica.
    std::map<at::ScalarType, std::vector<TrainedTensor*>> by_dtype;
    for (auto& t : trained) by_dtype[t.main.scalar_type()].push_back(&t);
    for (auto& [dtype, tensors] : by_dtype) {
      std::vector<at::Tensor> flat;
      for (TrainedTensor* t : tensors) {
        const at::Tensor& grad = t->main.grad();
        flat.push_back(grad.defined() ? grad.reshape({-1}) : at::zeros({t->main.numel()}, t->main.options()));
      }
      at::Tensor buffer = at::cat(flat);
      group->all_reduce(buffer).wait(timeout);
      std::int64_t offset = 0;
      for (TrainedTensor* t : tensors) {
        at::Tensor summed = buffer.narrow(0, offset, t->main.numel()).view(t->main.sizes());
        offset += t->main.numel();
        if (t->main.grad().defined()) {
          t->main.mutable_grad().copy_(summed);
        } else {
          t->main.mutable_grad() = summed.clone();
        }
      }
    }
  };
}

std::unique_ptr<Schedule> schedule_for(const ParallelGroups& groups) {
  const int stages = group_size(groups.pipeline);
  if (stages > 1) {
    throw Error("pipeline parallelism over " + std::to_string(stages) +
                " stages needs a pipeline schedule (1F1B), which is not implemented yet");
  }
  return sequential_schedule();
}

Trainer::Trainer(LlavaModel& model, const PrecisionRecipe& precision, RuntimeContext& context, TrainerOptions options,
                 std::unique_ptr<Schedule> schedule)
    : model_(model),
      precision_(precision),
      context_(context),
      options_(std::move(options)),
      schedule_(schedule ? std::move(schedule) : schedule_for(context.groups)),
      guard_(options_.loss_spike) {
  main_copies_ = context_.dtypes.params != context_.dtypes.main_params;
  std::vector<torch::nn::Module*> modules;
  for (auto& [prefix, module] : components(model_)) {
    modules.push_back(module);
    module->train();
    for (const auto& item : module->named_parameters()) {
      if (!item.value().requires_grad()) continue;
      at::Tensor main =
          main_copies_ ? item.value().detach().to(context_.dtypes.main_params).clone() : item.value();
      trained_.push_back({prefix + "." + item.key(), item.value(), main});
      mains_.push_back(main);
    }
  }
  if (trained_.empty()) throw Error(options_.source + ": nothing to train: every component is frozen");
  // bf16 mixed: the frozen linear and convolution weights are cast once instead of at every forward.
  frozen_casts_ = std::make_unique<FrozenWeightCasts>(
      modules, context_.dtypes.params == at::kFloat ? context_.dtypes.compute : at::kFloat,
      options_.keep_frozen_originals);
  optimizer_ = make_adamw(mains_, options_.optim);
  if (group_size(context_.groups.data) > 1) {
    sync_gradients = all_reduce_gradients(context_.groups.data, options_.collective_timeout);
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
  // The loss is the mean over every labelled token of the global batch, whatever the split into
  // micro-batches or packed rows: each micro-batch contributes its share.
  auto forward_backward = [&](std::size_t index) -> double {
    const TrainingBatch& batch = batches[index];
    if (batch.labelled_tokens == 0) return 0;  // nothing to learn from (its share of the loss is 0)
    MultimodalInputs inputs;
    inputs.input_ids = batch.input_ids;  // the model moves its inputs to its device
    inputs.images = batch.images;
    inputs.attention_mask = batch.attention_mask;
    inputs.positions = batch.positions;
    inputs.segment_ids = batch.segment_ids;
    // The LM head runs only where a labelled token follows (stage 2: the answers).
    LabelledPositions positions = labelled_positions(batch.labels);
    inputs.logits_mask = positions.mask;
    at::Tensor loss;
    {
      auto scope = precision_.enter_forward(context_);
      BackboneOutputs outputs = model_.forward(inputs);
      loss = labelled_lm_loss(outputs.logits, positions) *
             (static_cast<double>(batch.labelled_tokens) / static_cast<double>(std::max<std::int64_t>(1, labelled)));
      if (outputs.aux_loss.defined()) loss = loss + outputs.aux_loss.to(loss.scalar_type()) / accumulation;
    }
    // Text-only samples while only the vision side trains: nothing to differentiate.
    if (loss.requires_grad()) loss.backward();
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
    return loss.item<double>();
  };
  const std::string at_step = options_.title + ": step " + std::to_string(step_ + 1) + ": ";
  report.loss = schedule_->run(batches.size(), forward_backward);
  if (replica_count > 1) {  // the replicas' shares of the global loss
    at::Tensor loss = at::tensor({report.loss}, at::TensorOptions(at::kDouble).device(context_.device));
    replicas->all_reduce(loss).wait(options_.collective_timeout);
    report.loss = loss.item<double>();
  }
  if (labelled == 0) throw Error(at_step + "the global batch holds no labelled token");
  if (sync_gradients) sync_gradients(trained_);
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
    const GradientNorm norm = gradient_norm(mains_, options_.optim.clip_grad);
    report.grad_norm = norm.norm;
    if (!std::isfinite(report.grad_norm)) {
      throw Error(at_step + "the gradient norm is " +
                  (std::isnan(report.grad_norm) ? std::string("NaN") : std::string("infinite")) + " (loss " +
                  std::to_string(loss_value) + "); stopping before the update (last good checkpoint: " +
                  options_.last_checkpoint() + "). Lower model.optim.lr, or use fp32 to find the overflowing layer");
    }
    set_learning_rate(*optimizer_, report.lr);
    scaled_step(*optimizer_, norm.clip_scale);
  } else {
    report.skip_reason = why;
  }
  optimizer_->zero_grad(true);
  if (main_copies_) {
    for (auto& t : trained_) t.param.copy_(t.main);
  }
  ++step_;
  report.optimizer_seconds = seconds_since(computed);
  return report;
}

void Trainer::save(const fs::path& directory, const std::vector<std::uint64_t>& consumed_samples) const {
  if (consumed_samples.empty()) throw Error("Trainer::save: no data position given");
  std::vector<std::pair<std::string, at::Tensor>> weights, moments;
  for (const auto& t : trained_) {
    weights.emplace_back(t.name, t.main.detach());
    auto found = optimizer_->state().find(t.main.unsafeGetTensorImpl());
    if (found == optimizer_->state().end()) continue;  // never updated: no state to keep
    auto& moment = static_cast<torch::optim::AdamWParamState&>(*found->second);
    moments.emplace_back("step." + t.name, at::scalar_tensor(moment.step(), at::kLong));
    moments.emplace_back("exp_avg." + t.name, moment.exp_avg());
    moments.emplace_back("exp_avg_sq." + t.name, moment.exp_avg_sq());
  }
  moments.emplace_back("rng.cpu", context_.generator.get_state());
  if (!context_.device.is_cpu()) {
    moments.emplace_back(rng_key(context_.device), at::globalContext().defaultGenerator(context_.device).get_state());
  }
  write_safetensors((directory / "model.safetensors").string(), weights, {{"format", "pt"}});
  write_safetensors((directory / "optimizer.safetensors").string(), moments);
  json state = {{"step", step_},
                {"consumed_samples", consumed_samples.front()},
                {"loss_window", guard_.window()},
                {"skipped_batches", guard_.skipped()},
                {"consecutive_spikes", guard_.consecutive()},
                {"lr", learning_rate(options_.optim, step_)},
                {"recipe", options_.source}};
  if (consumed_samples.size() > 1) state["consumed_samples_per_replica"] = consumed_samples;
  write_file_atomically((directory / "trainer_state.json").string(), state.dump(2) + "\n");
}

std::vector<std::uint64_t> Trainer::restore(const fs::path& directory) {
  at::NoGradGuard no_grad;
  SafetensorsCheckpoint weights((directory / "model.safetensors").string());
  SafetensorsCheckpoint moments((directory / "optimizer.safetensors").string());
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
  for (const auto& t : trained_) {
    if (!weights.contains(t.name)) {
      throw Error(weights.path() + ": has no tensor '" + t.name + "', which this recipe trains; was the checkpoint " +
                  "written by a recipe that froze other components?");
    }
    t.main.copy_(weights.tensor(t.name, t.main.sizes()));
    if (main_copies_) t.param.copy_(t.main);
    // A tensor that never had a gradient (an expert no token reached) has no optimizer state yet.
    if (!moments.contains("step." + t.name)) continue;
    auto moment = std::make_unique<torch::optim::AdamWParamState>();
    moment->step(moments.tensor("step." + t.name).item<std::int64_t>());
    moment->exp_avg(moments.tensor("exp_avg." + t.name, t.main.sizes()).to(t.main.options()).clone());
    moment->exp_avg_sq(moments.tensor("exp_avg_sq." + t.name, t.main.sizes()).to(t.main.options()).clone());
    optimizer_->state()[t.main.unsafeGetTensorImpl()] = std::move(moment);
  }
  context_.generator.set_state(moments.tensor("rng.cpu"));  // the context's generator (CPU)
  // The accelerator's generator too, when the checkpoint was written on the same kind of device.
  if (!context_.device.is_cpu() && moments.contains(rng_key(context_.device))) {
    at::Generator device = at::globalContext().defaultGenerator(context_.device);
    device.set_state(moments.tensor(rng_key(context_.device)));
  }
  return positions;
}

}  // namespace neva
