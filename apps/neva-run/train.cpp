#include "train.h"

#include <malloc.h>
#include <unistd.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/optim/adamw.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <numeric>
#include <iomanip>
#include <optional>
#include <set>
#include <iostream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "neva/io/atomic_file.h"
#include "neva/train/checkpoints.h"
#include "neva/data/dataset.h"
#include "neva/error.h"
#include "neva/io/json.h"
#include "neva/io/hf_config.h"
#include "neva/data/image.h"
#include "neva/train/loss_spike.h"
#include "neva/train/optim.h"
#include "neva/precision.h"
#include "neva/io/safetensors.h"
#include "neva/data/tokenizer.h"
#include "plot.h"

namespace neva {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

// A trained tensor: the model's parameter and the copy the optimizer updates (the same tensor in
// fp32; an fp32 main copy of a bf16 weight under megatron_amp_O2).
struct TrainedTensor {
  std::string name;  // "llm.model.layers.0.mlp.up_proj.weight"
  at::Tensor param;
  at::Tensor main;
};

std::vector<std::pair<std::string, torch::nn::Module*>> components(LlavaModel& model) {
  std::vector<std::pair<std::string, torch::nn::Module*>> parts;
  if (model.encoder()) parts.emplace_back("vision_encoder", model.encoder());
  if (model.connector()) parts.emplace_back("connector", model.connector());
  parts.emplace_back("llm", &model.backbone());
  return parts;
}

// The checkpoint key of a device's random-number generator state: rng.cpu, rng.cuda, ...
std::string rng_key(const c10::Device& device) { return "rng." + c10::DeviceTypeName(device.type(), /*lower_case=*/true); }

std::string format_duration(double seconds) {
  auto total = static_cast<long long>(std::max(0.0, seconds));
  std::ostringstream out;
  if (total >= 3600) out << total / 3600 << ":" << std::setw(2) << std::setfill('0') << (total / 60) % 60;
  else out << total / 60;
  out << ":" << std::setw(2) << std::setfill('0') << total % 60;
  return out.str();
}

// Progress on a terminal (one line, redrawn), plain log lines otherwise.
class Progress {
 public:
  Progress(std::string title, std::int64_t total, std::int64_t log_every)
      : title_(std::move(title)), total_(total), log_every_(log_every), terminal_(::isatty(STDERR_FILENO) != 0) {}

  void update(std::int64_t step, double loss, double lr, double grad_norm, double tokens_per_second, double eta) {
    if (terminal_) {
      constexpr int kWidth = 24;
      int filled = static_cast<int>(kWidth * step / std::max<std::int64_t>(1, total_));
      std::ostringstream line;
      line << "\r" << title_ << " [" << std::string(filled, '#') << std::string(kWidth - filled, '.') << "] " << step
           << "/" << total_ << " loss " << std::fixed << std::setprecision(4) << loss << " " << std::setprecision(0)
           << tokens_per_second << " tok/s ETA " << format_duration(eta) << "   ";
      std::cerr << line.str() << std::flush;
      if (step == total_) std::cerr << "\n";
      return;
    }
    if (step % log_every_ != 0 && step != total_) return;
    std::cout << title_ << ": step " << step << "/" << total_ << " loss " << std::fixed << std::setprecision(4) << loss
              << " lr " << std::scientific << std::setprecision(3) << lr << " grad_norm " << std::fixed
              << std::setprecision(3) << grad_norm << " tokens/s " << std::setprecision(0) << tokens_per_second
              << " eta " << format_duration(eta) << std::defaultfloat << std::endl;
  }
  void message(const std::string& text) {
    if (terminal_) std::cerr << "\r\033[K";
    std::cerr << title_ << ": " << text << std::endl;
  }

 private:
  std::string title_;
  std::int64_t total_, log_every_;
  bool terminal_;
};

// metrics.jsonl: one object per optimizer step. On resume the lines after the resumed step (written
// before a crash, never checkpointed) are dropped so the file reads as one run.
class Metrics {
 public:
  Metrics(const fs::path& path, std::int64_t resumed_step) : path_(path) {
    std::vector<std::string> kept;
    if (fs::exists(path)) {
      std::ifstream in(path);
      std::string line;
      while (std::getline(in, line)) {
        json item;
        try {
          item = parse_json(line, path.string());
        } catch (const Error&) {
          continue;  // a line torn by a crash: never part of a checkpointed run
        }
        if (item.is_object() && item["step"].is_number_integer() && item["loss"].is_number() &&
            item["step"].get<std::int64_t>() <= resumed_step) {
          kept.push_back(line);
          losses_.emplace_back(item.value("step", std::int64_t{0}), item.value("loss", 0.0));
        }
      }
    }
    std::string contents;
    for (const auto& line : kept) contents += line + "\n";
    write_file_atomically(path.string(), contents);
    out_.open(path, std::ios::app);
    if (!out_) throw Error(path.string() + ": cannot append metrics");
  }
  void write(const json& item) {
    out_ << item.dump() << "\n" << std::flush;
    losses_.emplace_back(item["step"].get<std::int64_t>(), item["loss"].get<double>());
  }
  const std::vector<std::pair<std::int64_t, double>>& losses() const { return losses_; }

 private:
  fs::path path_;
  std::ofstream out_;
  std::vector<std::pair<std::int64_t, double>> losses_;
};

// trainer.profile: PyTorch's profiler (Kineto) over a range of steps, saved as a Chrome trace.
class StepProfiler {
 public:
  StepProfiler(const TrainerConfig& config, const RuntimeContext& context, fs::path path)
      : enabled_(config.profile), start_(config.profile_step_start), end_(config.profile_step_end),
        path_(std::move(path)) {
    activities_.insert(torch::profiler::impl::ActivityType::CPU);
    if (context.device.is_cuda()) {
      activities_.insert(torch::profiler::impl::ActivityType::CUDA);
    } else if (enabled_) {
      ::setenv("KINETO_LOG_LEVEL", "5", 0);  // Kineto's "no GPU found" error line means nothing on a CPU run
    }
  }
  ~StepProfiler() {
    if (running_) torch::autograd::profiler::disableProfiler();  // an error unwound the run: no trace
  }
  // Called before each step's work with the number of steps done so far.
  void before(std::int64_t step) {
    if (!enabled_ || running_ || step < start_ || step >= end_) return;
    const torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO,
                                                       /*report_input_shapes=*/true);
    torch::autograd::profiler::prepareProfiler(config, activities_);
    torch::autograd::profiler::enableProfiler(config, activities_);
    running_ = true;
    first_ = step;
  }
  // Called after each step (and once at the end of the run); returns a message when a trace was saved.
  std::optional<std::string> after(std::int64_t step, bool last) {
    if (!running_ || (step < end_ && !last)) return std::nullopt;
    running_ = false;
    torch::autograd::profiler::disableProfiler()->save(path_.string());
    return "profiled steps " + std::to_string(first_) + " to " + std::to_string(step - 1) + " (0-based) into " +
           path_.string() + " (Chrome trace; scripts/profile_summary.py lists operators by self time)";
  }

 private:
  bool enabled_, running_ = false;
  std::int64_t start_, end_, first_ = 0;
  fs::path path_;
  std::set<torch::profiler::impl::ActivityType> activities_;
};

// Each step LibTorch allocates and frees the same large buffers (activations; gradients, e.g. the
// 98 MB [32000, 768] embedding gradient). glibc serves such blocks from a fresh mmap and unmaps them
// on free, so every step page-faults them in again (measured on a 2-core VM: 137 ms per step for
// that one zero-fill; neva 125.9 -> 146.8 tokens/s on the training benchmark). Freed memory is kept
// in the heap for reuse instead, as a caching allocator (jemalloc, PyTorch's CUDA allocator) does.
// A policy set through GLIBC_TUNABLES is left as it is.
void keep_freed_memory() {
  if (std::getenv("GLIBC_TUNABLES")) return;
  ::mallopt(M_MMAP_MAX, 0);
  ::mallopt(M_TRIM_THRESHOLD, std::numeric_limits<int>::max());
}

// SIGTERM (Slurm's pre-emption, a scheduler's stop) and SIGINT (Ctrl-C) while training: the current
// step finishes, a checkpoint is written and the run exits 128 + the signal. A second signal acts as
// if nothing were installed (the handlers reset themselves), for a user who does not want to wait. A
// signal the process was started ignoring (nohup, a background job of a script) stays ignored.
volatile std::sig_atomic_t stop_signal = 0;

class StopSignals {
 public:
  StopSignals() {
    stop_signal = 0;
    for (auto& [signal, previous, installed] : handlers_) {
      struct sigaction action {};
      action.sa_handler = [](int received) { stop_signal = received; };
      sigemptyset(&action.sa_mask);
      action.sa_flags = SA_RESETHAND | SA_RESTART;  // I/O in progress goes on (stdio would not retry EINTR)
      ::sigaction(signal, nullptr, &previous);
      installed = previous.sa_handler != SIG_IGN && ::sigaction(signal, &action, nullptr) == 0;
    }
  }
  ~StopSignals() {
    for (auto& [signal, previous, installed] : handlers_) {
      if (installed) ::sigaction(signal, &previous, nullptr);
    }
  }
  int received() const { return stop_signal; }

 private:
  struct Handler {
    int signal;
    struct sigaction previous;
    bool installed;
  };
  Handler handlers_[2] = {{SIGTERM, {}, false}, {SIGINT, {}, false}};
};

}  // namespace

void warn_if_bf16_emulated(const Recipe& recipe) {
  const RuntimeContext context = recipe.runtime_context();
  const std::string warning = emulated_bf16_warning(context.device, context.dtypes.compute);
  if (!warning.empty()) std::cerr << "neva-run: warning: " << warning << "\n";
}

TrainSummary run_train(const Recipe& recipe, const std::string& title) {
  const auto started = Clock::now();
  keep_freed_memory();
  TrainSummary summary;
  summary.run_dir = recipe.exp_manager.explicit_log_dir;
  fs::create_directories(summary.run_dir);
  auto warn = [&title](const std::string& text) { std::cerr << title << ": warning: " << text << std::endl; };
  const RunDirectoryLock lock(summary.run_dir, warn);  // one run per directory, for the whole run
  CheckpointManager checkpoints(summary.run_dir, warn);
  auto resume_from = checkpoints.find_latest();
  if (resume_from && !recipe.exp_manager.resume_if_exists) {
    throw Error(summary.run_dir.string() + " already holds checkpoints (" + resume_from->filename().string() +
                "); set exp_manager.resume_if_exists = true to continue that run, or choose another explicit_log_dir");
  }

  RuntimeContext context = recipe.runtime_context();
  auto precision = make_precision_recipe(recipe.trainer.precision, recipe.model.megatron_amp_O2);
  LlavaModel model = build_model(recipe, context);
  std::shared_ptr<const Tokenizer> tokenizer = Tokenizer::load(recipe.model.tokenizer);

  // What the optimizer updates.
  std::vector<TrainedTensor> trained;
  const bool main_copies = context.dtypes.params != context.dtypes.main_params;
  for (auto& [prefix, module] : components(model)) {
    module->train();
    for (const auto& item : module->named_parameters()) {
      if (!item.value().requires_grad()) continue;
      at::Tensor main = main_copies ? item.value().detach().to(context.dtypes.main_params).clone() : item.value();
      trained.push_back({prefix + "." + item.key(), item.value(), main});
    }
  }
  if (trained.empty()) throw Error(recipe.source + ": nothing to train: every component is frozen");
  // bf16 mixed: the frozen linear and convolution weights are cast once instead of at every forward;
  // their fp32 originals are kept only for the export, the one reader outside autocast.
  std::vector<torch::nn::Module*> modules;
  for (auto& part : components(model)) modules.push_back(part.second);
  const bool exporting = recipe.exp_manager.export_hf && model.encoder();
  if (exporting) {  // now, not after the run
    try {
      check_exportable(recipe, model);
    } catch (const Error& error) {
      throw Error(recipe.source + ": " + error.what() + " (exp_manager.export_hf = false trains without exporting)");
    }
  }
  FrozenWeightCasts frozen_casts(modules, context.dtypes.params == at::kFloat ? context.dtypes.compute : at::kFloat,
                                 exporting);
  std::vector<at::Tensor> mains;
  for (const auto& t : trained) mains.push_back(t.main);
  auto optimizer = make_adamw(mains, recipe.model.optim);

  // Resume: weights, optimizer moments, step, data position, RNG.
  std::int64_t step = 0;
  std::uint64_t position = 0;
  LossSpikeGuard guard(recipe.trainer.loss_spike);
  if (resume_from) {
    at::NoGradGuard no_grad;
    SafetensorsCheckpoint weights((*resume_from / "model.safetensors").string());
    SafetensorsCheckpoint moments((*resume_from / "optimizer.safetensors").string());
    const std::string state_path = (*resume_from / "trainer_state.json").string();
    const json state = read_json_file(state_path);
    try {
      if (!state.at("step").is_number_unsigned() || !state.at("consumed_samples").is_number_unsigned()) {
        throw Error(state_path + ": malformed trainer state: step and consumed_samples must be non-negative integers");
      }
      step = state.at("step").get<std::int64_t>();
      position = state.at("consumed_samples").get<std::uint64_t>();
      // Older checkpoints kept a running mean instead of the window; their guard starts afresh.
      guard.restore(state.value("loss_window", std::vector<double>{}), state.value("skipped_batches", std::int64_t{0}),
                    state.value("consecutive_spikes", std::int64_t{0}));
    } catch (const json::exception& malformed) {
      throw Error(state_path + ": malformed trainer state: " + json_error_reason(malformed));
    }
    for (const auto& t : trained) {
      if (!weights.contains(t.name)) {
        throw Error(weights.path() + ": has no tensor '" + t.name + "', which this recipe trains; was the checkpoint " +
                    "written by a recipe that froze other components?");
      }
      t.main.copy_(weights.tensor(t.name, t.main.sizes()));
      if (main_copies) t.param.copy_(t.main);
      // A tensor that never had a gradient (an expert no token reached) has no optimizer state yet.
      if (!moments.contains("step." + t.name)) continue;
      auto moment = std::make_unique<torch::optim::AdamWParamState>();
      moment->step(moments.tensor("step." + t.name).item<std::int64_t>());
      moment->exp_avg(moments.tensor("exp_avg." + t.name, t.main.sizes()).to(t.main.options()).clone());
      moment->exp_avg_sq(moments.tensor("exp_avg_sq." + t.name, t.main.sizes()).to(t.main.options()).clone());
      optimizer->state()[t.main.unsafeGetTensorImpl()] = std::move(moment);
    }
    context.generator.set_state(moments.tensor("rng.cpu"));  // the context's generator (CPU)
    // The accelerator's generator too, when the checkpoint was written on the same kind of device.
    if (!context.device.is_cpu() && moments.contains(rng_key(context.device))) {
      at::Generator device = at::globalContext().defaultGenerator(context.device);
      device.set_state(moments.tensor(rng_key(context.device)));
    }
  }

  // Data.
  SampleFormat format;
  format.conversation = conversation_template(recipe.model.data.conv_template);
  format.use_im_start_end = recipe.model.mm_cfg.use_im_start_end;
  format.image_folder = recipe.model.data.image_folder;
  if (model.encoder()) {
    format.processor = with_aspect_ratio(model.encoder()->image_processor(), recipe.model.data.image_aspect_ratio);
  }
  format.max_seq_length = std::min(recipe.model.encoder_seq_length, model.backbone().max_position_embeddings());
  format.image_token_id = model.image_token_id();
  format.tokens_for_image = [&model](std::int64_t h, std::int64_t w) { return model.tokens_for_image(h, w); };
  std::vector<DataSource> sources;
  for (std::size_t i = 0; i < recipe.model.data.data_path.size(); ++i) {
    double weight = recipe.model.data.data_weights.empty() ? 1.0 : recipe.model.data.data_weights[i];
    sources.push_back({recipe.model.data.data_path[i], weight});
  }
  LoaderOptions loader;
  loader.micro_batch_size = recipe.model.micro_batch_size;
  loader.pack = recipe.model.data.packed_sequence;
  loader.seed = recipe.run.seed;
  loader.skip_bad_samples = recipe.model.data.skip_bad_samples;
  loader.prefetch = recipe.model.data.prefetch;
  for (const char* pad : {"<pad>", "<unk>"}) {
    if (auto id = tokenizer->token_id(pad)) {
      loader.pad_id = *id;
      break;
    }
  }
  TrainingData data(sources, tokenizer, format, loader, position);

  const std::int64_t accumulation = recipe.model.global_batch_size / recipe.model.micro_batch_size;
  const std::int64_t max_steps = recipe.trainer.max_steps;
  Progress progress(title, max_steps, recipe.trainer.log_every_n_steps);
  Metrics metrics(summary.run_dir / "metrics.jsonl", step);
  if (resume_from) progress.message("resumed from " + resume_from->string() + " (step " + std::to_string(step) + ")");
  progress.message(std::to_string(trained.size()) + " tensors trained (" +
                   std::to_string(std::accumulate(mains.begin(), mains.end(), std::int64_t{0},
                                                  [](std::int64_t n, const at::Tensor& t) { return n + t.numel(); })) +
                   " parameters), " + std::to_string(data.records()) + " records, micro-batch " +
                   std::to_string(recipe.model.micro_batch_size) + " x " + std::to_string(accumulation) +
                   " accumulation, precision " + recipe.trainer.precision +
                   (recipe.model.megatron_amp_O2 ? " (O2)" : ""));

  auto save = [&](std::int64_t at_step) {
    checkpoints.save(at_step, recipe.exp_manager.save_top_k, [&](const fs::path& directory) {
      std::vector<std::pair<std::string, at::Tensor>> weights, moments;
      for (const auto& t : trained) {
        weights.emplace_back(t.name, t.main.detach());
        auto found = optimizer->state().find(t.main.unsafeGetTensorImpl());
        if (found == optimizer->state().end()) continue;  // never updated: no state to keep
        auto& moment = static_cast<torch::optim::AdamWParamState&>(*found->second);
        moments.emplace_back("step." + t.name, at::scalar_tensor(moment.step(), at::kLong));
        moments.emplace_back("exp_avg." + t.name, moment.exp_avg());
        moments.emplace_back("exp_avg_sq." + t.name, moment.exp_avg_sq());
      }
      moments.emplace_back("rng.cpu", context.generator.get_state());
      if (!context.device.is_cpu()) {
        moments.emplace_back(rng_key(context.device), at::globalContext().defaultGenerator(context.device).get_state());
      }
      write_safetensors((directory / "model.safetensors").string(), weights, {{"format", "pt"}});
      write_safetensors((directory / "optimizer.safetensors").string(), moments);
      json state = {{"step", at_step},
                    {"consumed_samples", position},
                    {"loss_window", guard.window()},
                    {"skipped_batches", guard.skipped()},
                    {"consecutive_spikes", guard.consecutive()},
                    {"lr", learning_rate(recipe.model.optim, at_step)},
                    {"recipe", recipe.source}};
      write_file_atomically((directory / "trainer_state.json").string(), state.dump(2) + "\n");
    });
  };

  const std::int64_t first_step = step;
  StepProfiler profiler(recipe.trainer, context, summary.run_dir / "profile.json");
  // From the first step to the last save: a signal before it (loading) just stops the process, with
  // nothing to lose; during the export after it, too (the export is written atomically).
  std::optional<StopSignals> signals(std::in_place);
  double last_loss = 0;
  std::int64_t saved_step = resume_from ? step : -1;
  while (step < max_steps) {
    profiler.before(step);
    const auto step_started = Clock::now();
    std::vector<TrainingBatch> batches;
    std::int64_t labelled = 0, tokens = 0, samples = 0;
    for (std::int64_t i = 0; i < accumulation; ++i) {
      batches.push_back(data.next());  // prepared ahead by the loader's thread
      labelled += batches.back().labelled_tokens;
      tokens += batches.back().tokens;
      samples += batches.back().samples;
      for (const auto& problem : batches.back().skipped) {
        ++summary.skipped_samples;
        if (summary.skipped_samples <= 5) progress.message("skipped a bad sample: " + problem);
        if (summary.skipped_samples == 5) progress.message("(further skipped samples are only counted)");
      }
    }
    const auto data_ready = Clock::now();
    const double data_wait = std::chrono::duration<double>(data_ready - step_started).count();
    // The loss is the mean over every labelled token of the global batch, whatever the split into
    // micro-batches or packed rows: each micro-batch contributes its share.
    double loss_value = 0;
    for (const auto& batch : batches) {
      if (batch.labelled_tokens == 0) continue;  // nothing to learn from (its share of the loss is 0)
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
        auto scope = precision->enter_forward(context);
        BackboneOutputs outputs = model.forward(inputs);
        loss = labelled_lm_loss(outputs.logits, positions) *
               (static_cast<double>(batch.labelled_tokens) / static_cast<double>(std::max<std::int64_t>(1, labelled)));
        if (outputs.aux_loss.defined()) loss = loss + outputs.aux_loss.to(at::kFloat) / static_cast<double>(accumulation);
      }
      // Text-only samples while only the vision side trains: nothing to differentiate.
      if (loss.requires_grad()) loss.backward();
      loss_value += loss.item<double>();
      if (main_copies) {  // O2: accumulate in fp32 (Megatron's main_grad), not in the bf16 .grad
        at::NoGradGuard no_grad;
        for (auto& t : trained) {
          if (!t.param.grad().defined()) continue;
          if (t.main.grad().defined()) {
            t.main.mutable_grad().add_(t.param.grad());
          } else {
            t.main.mutable_grad() = t.param.grad().to(t.main.scalar_type());
          }
          t.param.mutable_grad().reset();
        }
      }
    }
    if (labelled == 0) {
      throw Error(title + ": step " + std::to_string(step + 1) + ": the global batch holds no labelled token");
    }
    const std::string last_good = checkpoints.latest() ? checkpoints.latest()->string() : "none written yet";
    std::string why;
    const LossSpikeGuard::Verdict verdict = guard.judge(loss_value, &why);
    if (verdict == LossSpikeGuard::Verdict::Stop) {
      throw Error(title + ": step " + std::to_string(step + 1) + ": " + why + "; stopping before the update (last good " +
                  "checkpoint: " + last_good + "). Lower model.optim.lr, raise warmup_steps, or check the data" +
                  (std::isfinite(loss_value) ? " (trainer.loss_spike_* set how spikes are judged)" : ""));
    }
    guard.record(loss_value, verdict);
    const bool skip = verdict == LossSpikeGuard::Verdict::Skip;
    if (skip) {
      progress.message("step " + std::to_string(step + 1) + ": " + why + "; the batch is skipped (no update; " +
                       std::to_string(guard.skipped()) + " skipped so far)");
    }
    const auto computed = Clock::now();
    double grad_norm = 0;
    {
      at::NoGradGuard no_grad;
      // The clipping factor is applied inside the optimizer's fused update (no pass of its own).
      const double lr = learning_rate(recipe.model.optim, step);
      if (!skip) {
        const GradientNorm norm = gradient_norm(mains, recipe.model.optim.clip_grad);
        grad_norm = norm.norm;
        if (!std::isfinite(grad_norm)) {
          throw Error(title + ": step " + std::to_string(step + 1) + ": the gradient norm is " +
                      (std::isnan(grad_norm) ? std::string("NaN") : std::string("infinite")) + " (loss " +
                      std::to_string(loss_value) + "); stopping before the update (last good checkpoint: " + last_good +
                      "). Lower model.optim.lr, or use fp32 to find the overflowing layer");
        }
        set_learning_rate(*optimizer, lr);
        scaled_step(*optimizer, norm.clip_scale);
      }
      optimizer->zero_grad(true);
      if (main_copies) {
        for (auto& t : trained) t.param.copy_(t.main);
      }
      ++step;
      const auto updated = Clock::now();
      position = batches.back().end_position;
      if (!skip) last_loss = loss_value;

      const double seconds = std::chrono::duration<double>(Clock::now() - step_started).count();
      const double elapsed = std::chrono::duration<double>(Clock::now() - started).count();
      const double eta = (max_steps - step) * elapsed / static_cast<double>(std::max<std::int64_t>(1, step - first_step));
      metrics.write({{"step", step},
                     {"loss", loss_value},
                     {"lr", lr},
                     {"grad_norm", grad_norm},
                     {"tokens", tokens},
                     {"labelled_tokens", labelled},
                     {"samples", samples},
                     {"consumed_samples", position},
                     {"tokens_per_second", tokens / seconds},
                     {"step_seconds", seconds},
                     {"data_wait_seconds", data_wait},
                     {"forward_backward_seconds", std::chrono::duration<double>(computed - data_ready).count()},
                     {"optimizer_seconds", std::chrono::duration<double>(updated - computed).count()},
                     {"skipped_samples", summary.skipped_samples},
                     {"skipped_batch", skip},
                     {"skipped_batches", guard.skipped()}});
      progress.update(step, loss_value, lr, grad_norm, tokens / seconds, eta);
    }
    const bool exiting = recipe.trainer.exit_interval > 0 && step % recipe.trainer.exit_interval == 0;
    if (auto saved = profiler.after(step, step == max_steps || exiting)) progress.message(*saved);
    if (exiting || (recipe.exp_manager.every_n_train_steps > 0 && step % recipe.exp_manager.every_n_train_steps == 0)) {
      save(step);
      saved_step = step;
    }
    if (exiting && step < max_steps) {
      progress.message("exit_interval: stopping at step " + std::to_string(step) + " of " + std::to_string(max_steps) +
                       "; run the recipe again to continue");
      break;
    }
    if (signals->received() && step < max_steps) {
      summary.signal = signals->received();
      progress.message(std::string("received ") + (summary.signal == SIGTERM ? "SIGTERM" : "SIGINT") +
                       ": checkpointing step " + std::to_string(step) + " and stopping; run the recipe again to continue");
      break;
    }
  }
  if (saved_step != step) save(step);
  signals.reset();
  summary.skipped_batches = guard.skipped();
  summary.steps = step;
  summary.trained = step - first_step;
  summary.last_loss = last_loss;
  if (step < max_steps) return summary;  // stopped by exit_interval: the run is not finished

  write_loss_plot((summary.run_dir / "loss.png").string(), metrics.losses(), title);

  if (model.connector() && !recipe.model.mm_cfg.connector.freeze) {
    // LLaVA's mm_projector file: what a stage-2 recipe's pretrain_mm_mlp_adapter points at.
    std::vector<std::pair<std::string, at::Tensor>> projector;
    for (const auto& t : trained) {
      if (t.name.rfind("connector.", 0) == 0) projector.emplace_back("model.mm_projector." + t.name.substr(10), t.main);
    }
    write_safetensors((summary.run_dir / "mm_projector.safetensors").string(), projector, {{"format", "pt"}});
  }
  frozen_casts.restore();  // the export writes the frozen components' fp32 weights as loaded
  if (exporting) {
    summary.hf_dir = summary.run_dir / "hf";
    export_hf(recipe, model, summary.hf_dir);
  }
  summary.seconds = std::chrono::duration<double>(Clock::now() - started).count();
  progress.message("done: step " + std::to_string(step) + ", loss " + std::to_string(last_loss) + ", " +
                   std::to_string(summary.skipped_samples) + " bad sample(s) skipped, " +
                   std::to_string(guard.skipped()) + " loss spike(s) skipped, " +
                   format_duration(summary.seconds) + "; run directory " + summary.run_dir.string());
  return summary;
}

}  // namespace neva
