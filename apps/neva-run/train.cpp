#include "train.h"

#include <malloc.h>
#include <sys/resource.h>
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
#include <future>
#include <optional>
#include <set>
#include <iostream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include "neva/io/atomic_file.h"
#include "neva/nn/mlp.h"
#include "neva/nn/module.h"
#include "neva/train/checkpoints.h"
#include "neva/data/dataset.h"
#include "neva/error.h"
#include "neva/io/json.h"
#include "neva/io/hf_config.h"
#include "neva/data/image.h"
#include "neva/train/loss_spike.h"
#include "neva/train/trainer.h"
#include "neva/parallel/process_group.h"
#include "tensorboard.h"
#include "neva/precision.h"
#include "neva/io/safetensors.h"
#include "neva/data/tokenizer.h"
#include "plot.h"

namespace neva {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

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
  // A quiet one prints nothing on the console (data-parallel ranks other than 0); `log`, when given
  // (a multi-process run: the rank's own file), receives every message and logged step.
  Progress(std::string title, std::int64_t total, std::int64_t log_every, bool quiet = false, std::ostream* log = nullptr)
      : title_(std::move(title)), total_(total), log_every_(log_every), terminal_(::isatty(STDERR_FILENO) != 0),
        quiet_(quiet), log_(log) {}

  void update(std::int64_t step, double loss, double lr, double grad_norm, double tokens_per_second, double eta) {
    const bool logged = step % log_every_ == 0 || step == total_;
    if (log_ && logged) {
      *log_ << title_ << ": step " << step << "/" << total_ << " loss " << std::fixed << std::setprecision(4) << loss
            << " lr " << std::scientific << std::setprecision(3) << lr << " grad_norm " << std::fixed
            << std::setprecision(3) << grad_norm << std::defaultfloat << std::endl;
    }
    if (quiet_) return;
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
    if (log_) *log_ << title_ << ": " << text << std::endl;
    if (quiet_) return;
    if (terminal_) std::cerr << "\r\033[K";
    std::cerr << title_ << ": " << text << std::endl;
  }

 private:
  std::string title_;
  std::int64_t total_, log_every_;
  bool terminal_;
  bool quiet_;
  std::ostream* log_;
};

// metrics.jsonl: one object per optimizer step. On resume the lines after the resumed step (written
// before a crash, never checkpointed) are dropped so the file reads as one run.
class Metrics {
 public:
  // Beside the file, the same records as TensorBoard events (a new event file per launch; what a
  // resumed run logs past its checkpoint replaces what an earlier launch logged there).
  Metrics(const fs::path& path, std::int64_t resumed_step) : path_(path), events_(path.parent_path(), resumed_step) {
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
    events_.scalars(item["step"].get<std::int64_t>(), item);
    losses_.emplace_back(item["step"].get<std::int64_t>(), item["loss"].get<double>());
  }
  const std::vector<std::pair<std::int64_t, double>>& losses() const { return losses_; }

 private:
  fs::path path_;
  TensorBoardWriter events_;
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

std::string mib(std::int64_t bytes) {
  std::ostringstream out;
  out << std::fixed << std::setprecision(1) << static_cast<double>(bytes) / (1 << 20);
  return out.str();
}

// This process's peak resident memory so far (getrusage).
double peak_rss_mib() {
  struct rusage usage {};
  ::getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024.0;  // kilobytes on Linux
}

// /proc/self/status's VmRSS or VmHWM (the peak since start, or since reset_peak_rss), MiB; 0 when unknown.
double status_mib(const std::string& field) {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind(field + ":", 0) == 0) return std::stod(line.substr(field.size() + 1)) / 1024.0;  // kB
  }
  return 0;
}
// Starts VmHWM afresh from the current resident size (Linux's clear_refs 5); false when refused.
bool reset_peak_rss() {
  std::ofstream clear("/proc/self/clear_refs");
  clear << "5";
  clear.flush();
  return static_cast<bool>(clear);
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
  // Before the launcher's world is joined: only rank 0 (or a single process) warns.
  const char* rank = std::getenv("RANK");
  if (rank && std::string(rank) != "0") return;
  const std::string warning = emulated_bf16_warning(c10::Device(recipe.run.device), recipe.dtype_policy().compute);
  if (!warning.empty()) std::cerr << "neva-run: warning: " << warning << "\n";
}

namespace {

// The other ranks of a multi-process run, seen through the rendezvous store: each rank increments a
// heartbeat counter every second and publishes the first error it raises. When a collective fails,
// the survivor names the rank that stopped (killed, stopped, unreachable) or that failed first,
// instead of only the group whose operation broke.
class PeerWatch {
 public:
  explicit PeerWatch(const World& world) : world_(world) {
    if (world_.size == 1 || !world_.store) return;
    heartbeat_ = std::thread([this] {
      std::unique_lock<std::mutex> lock(mutex_);
      while (!stopping_) {
        try {
          world_.store->add(key("alive", world_.rank), 1);
        } catch (...) {
          return;  // the store is gone (rank 0 ended): nothing left to tell
        }
        wake_.wait_for(lock, std::chrono::seconds(1), [this] { return stopping_; });
      }
    });
  }
  ~PeerWatch() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    if (heartbeat_.joinable()) heartbeat_.join();
  }
  void publish_error(const std::string& message) {
    if (!world_.store) return;
    try {
      const std::string text = message.substr(0, 1000);
      world_.store->set(key("error", world_.rank), std::vector<std::uint8_t>(text.begin(), text.end()));
    } catch (...) {
    }
  }
  // "rank 1 stopped responding ..." / "rank 1 failed first: ..." / "" when nothing is known.
  std::string diagnose() const {
    if (!world_.store) return "";
    std::string out;
    auto add = [&out](const std::string& part) { out += (out.empty() ? "" : "; ") + part; };
    try {
      std::vector<std::int64_t> before(world_.size);
      for (int r = 0; r < world_.size; ++r) before[r] = world_.store->add(key("alive", r), 0);
      std::this_thread::sleep_for(std::chrono::milliseconds(2500));
      for (int r = 0; r < world_.size; ++r) {
        if (r == world_.rank) continue;
        const std::string error = key("error", r);
        if (world_.store->check({error})) {
          const auto bytes = world_.store->get(error);
          const std::string text(bytes.begin(), bytes.end());
          // A peer that only saw the same breakage is not the cause.
          if (text.find("process group '") == std::string::npos) add("rank " + std::to_string(r) + " failed first: " + text);
        } else if (world_.store->add(key("alive", r), 0) == before[r]) {
          add("rank " + std::to_string(r) + " stopped responding (no heartbeat for 2.5 s: killed, stopped or unreachable)");
        }
      }
    } catch (const std::exception&) {
      return "the rendezvous store held by rank 0 at " + world_.master_addr + ":" + std::to_string(world_.master_port) +
             " is gone: rank 0 stopped";
    }
    return out;
  }

 private:
  static std::string key(const char* what, int rank) { return std::string("neva/") + what + "/" + std::to_string(rank); }
  const World& world_;
  std::thread heartbeat_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
};

TrainSummary train_replica(const Recipe& recipe, const std::string& title, const World& world,
                           std::chrono::milliseconds collective, std::ostream* log) {
  const auto started = Clock::now();
  keep_freed_memory();
  TrainSummary summary;
  summary.run_dir = recipe.exp_manager.explicit_log_dir;
  RuntimeContext context = recipe.runtime_context(world);
  const std::shared_ptr<ProcessGroup>& everyone = context.groups.world;
  const bool leader = world.rank == 0;
  const int replicas = group_size(context.groups.data);
  const int replica = group_rank(context.groups.data);
  auto warn = [&title, log](const std::string& text) {
    std::cerr << title << ": warning: " << text << std::endl;
    if (log) *log << title << ": warning: " << text << std::endl;
  };
  if (recipe.model.global_batch_size % (recipe.model.micro_batch_size * replicas) != 0) {
    throw RecipeError(recipe.source + ": model.global_batch_size (" + std::to_string(recipe.model.global_batch_size) +
                      ") must be a multiple of micro_batch_size x the data-parallel size (" +
                      std::to_string(recipe.model.micro_batch_size) + " x " + std::to_string(replicas) + ")");
  }
  // The small tensors of the run's own collectives live on the device (NCCL takes only CUDA tensors).
  const at::TensorOptions on_device = at::TensorOptions(at::kLong).device(context.device);
  if (everyone) {  // one run: every process must have read the same recipe (file and --set overrides)
    at::Tensor mine = at::tensor({static_cast<std::int64_t>(recipe.fingerprint)}, on_device);
    at::Tensor all = at::zeros({world.size}, on_device);
    everyone->all_gather_into_tensor(all, mine).wait(collective);
    for (int rank = 1; rank < world.size; ++rank) {
      if (all[rank].item<std::int64_t>() != all[0].item<std::int64_t>()) {
        throw RecipeError(recipe.source + ": rank " + std::to_string(rank) + " runs another recipe than rank 0 (the " +
                          "file or its --set overrides differ); every process of a run must run the same recipe");
      }
    }
  }
  std::optional<RunDirectoryLock> lock;
  std::optional<CheckpointManager> checkpoints;
  std::optional<fs::path> resume_from;
  // Rank 0 finds the checkpoint to resume from and tells the others its step (-1: none; -2: rank 0
  // failed, and reports why).
  std::int64_t resume_step = -1;
  try {
    if (leader) {
      fs::create_directories(summary.run_dir);
      lock.emplace(summary.run_dir, warn);  // one run per directory, for the whole run
      checkpoints.emplace(summary.run_dir, warn);
      resume_from = checkpoints->find_latest();
      if (resume_from && !recipe.exp_manager.resume_if_exists) {
        throw Error(summary.run_dir.string() + " already holds checkpoints (" + resume_from->filename().string() +
                    "); set exp_manager.resume_if_exists = true to continue that run, or choose another explicit_log_dir");
      }
      if (resume_from) resume_step = CheckpointManager::parse_step(resume_from->filename().string());
    }
  } catch (...) {
    if (everyone) {
      at::Tensor failed = at::tensor({std::int64_t{-2}}, on_device);
      everyone->broadcast(failed, 0).wait(collective);
    }
    throw;
  }
  if (everyone) {
    at::Tensor step = at::tensor({resume_step}, on_device);
    everyone->broadcast(step, 0).wait(collective);
    resume_step = step.item<std::int64_t>();
    if (resume_step == -2) throw Error("rank 0 could not open the run directory " + summary.run_dir.string() + " (its error says why)");
    if (!leader && resume_step >= 0) resume_from = summary.run_dir / "checkpoints" / CheckpointManager::step_name(resume_step);
  }

  LlavaModel model = build_model(recipe, context);
  std::shared_ptr<const Tokenizer> tokenizer = Tokenizer::load(recipe.model.tokenizer);
  const bool exporting = leader && recipe.exp_manager.export_hf && model.encoder();
  if (exporting) {  // now, not after the run
    try {
      check_hf_exportable(recipe.hf_export_source(), model);
    } catch (const Error& error) {
      throw Error(recipe.source + ": " + error.what() + " (exp_manager.export_hf = false trains without exporting)");
    }
  }
  TrainerOptions options;
  options.optim = recipe.model.optim;
  options.loss_spike = recipe.trainer.loss_spike;
  options.title = title;
  options.keep_frozen_originals = exporting;  // the export is the one reader outside autocast
  options.last_checkpoint = [&checkpoints] {
    return checkpoints && checkpoints->latest() ? checkpoints->latest()->string() : std::string("none written yet");
  };
  options.collective_timeout = collective;
  options.gradient_buckets.bucket_bytes = recipe.model.optim.bucket_cap_mb << 20;
  options.gradient_buckets.overlap = recipe.model.optim.overlap_grad_sync;
  options.source = recipe.source;
  Trainer trainer(model, *recipe.precision, context, options);  // with several replicas: gradients all-reduced

  // Resume: weights, optimizer moments, step, every replica's data position, RNG.
  std::uint64_t position = 0;
  std::string progress_message_later;
  if (resume_from) {
    const std::vector<std::uint64_t> positions = trainer.restore(*resume_from);
    if (static_cast<int>(positions.size()) == replicas) {
      position = positions[replica];
    } else {
      // Another data-parallel size: every replica starts where the first sample no replica has read
      // lies, and reads its share of the stream from there (the global batches then follow as an
      // uninterrupted run of this size would read them).
      const ResumePoint point = resume_point(positions);
      position = point.position;
      progress_message_later = "the checkpoint was saved by " + std::to_string(positions.size()) +
                               " data-parallel replica(s), this run has " + std::to_string(replicas) +
                               ": every replica resumes at data position " + std::to_string(point.position) +
                               (point.repeated > 0 ? " (" + std::to_string(point.repeated) +
                                                         " sample(s) a replica had read beyond it are read again)"
                                                   : "");
    }
    if (!trainer.restore_note().empty()) progress_message_later += (progress_message_later.empty() ? "" : "; ") + trainer.restore_note();
  }
  std::int64_t step = trainer.step();

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
  loader.shard_rank = group_rank(context.groups.data);  // each data-parallel replica its own samples
  loader.shard_count = group_size(context.groups.data);
  for (const char* pad : {"<pad>", "<unk>"}) {
    if (auto id = tokenizer->token_id(pad)) {
      loader.pad_id = *id;
      break;
    }
  }
  TrainingData data(sources, tokenizer, format, loader, position);

  // Micro-batches per replica and step: the global batch is every replica's.
  const std::int64_t accumulation = recipe.model.global_batch_size / (recipe.model.micro_batch_size * replicas);
  const std::int64_t max_steps = recipe.trainer.max_steps;
  Progress progress(title, max_steps, recipe.trainer.log_every_n_steps, !leader, log);
  std::optional<Metrics> metrics;
  if (leader) metrics.emplace(summary.run_dir / "metrics.jsonl", step);
  if (resume_from) progress.message("resumed from " + resume_from->string() + " (step " + std::to_string(step) + ")");
  if (!progress_message_later.empty()) progress.message(progress_message_later);
  const int stages = group_size(context.groups.pipeline);
  const bool model_parallel = group_size(context.groups.tensor) * stages * group_size(context.groups.expert) > 1;
  progress.message(std::to_string(trainer.trained().size()) + " tensors trained (" +
                   std::to_string(trainer.parameter_count()) +
                   " parameters" + (model_parallel ? " on rank 0" : "") + "), " + std::to_string(data.records()) + " records, micro-batch " +
                   std::to_string(recipe.model.micro_batch_size) + " x " + std::to_string(accumulation) +
                   " accumulation" + (replicas > 1 ? " x " + std::to_string(replicas) + " data-parallel replicas" : "") +
                   ", precision " + recipe.trainer.precision +
                   (trainer.main_copies() ? " (O2: fp32 main weights)" : "") +
                   (group_size(context.groups.tensor) > 1
                        ? ", tensor-parallel over " + std::to_string(group_size(context.groups.tensor)) + " ranks" +
                              (context.sequence_parallel ? " with sequence parallelism" : "")
                        : "") +
                   (stages > 1 ? ", pipeline over " + std::to_string(stages) + " stages (" +
                                     (context.virtual_pipeline_chunks > 1
                                          ? std::to_string(context.virtual_pipeline_chunks) + " chunks each, interleaved 1F1B)"
                                          : "1F1B)")
                               : "") +
                   ", optimizer state " + mib(trainer.optimizer_state_bytes()) + " MiB per rank" +
                   (trainer.distributed_optimizer() ? " (ZeRO-1: 1/" + std::to_string(replicas) + " of it)" : ""));

  // A distributed checkpoint: rank 0 prepares the step's directory, every rank writes what it owns
  // (with every replica's data position in rank 0's trainer state), rank 0 commits once all are on disk.
  // With async_save the state is copied at the step and a thread writes this rank's file while
  // training goes on; the commit (a collective) waits for the next save or the end of the run.
  struct PendingSave {
    std::int64_t step;
    fs::path directory;
    std::shared_ptr<const Trainer::Snapshot> snapshot;
    std::future<json> description;  // this rank's file, written
  };
  std::optional<PendingSave> pending;
  auto commit = [&](std::int64_t at_step, const fs::path& directory, const json& description, const Trainer::Snapshot& snapshot) {
    const json content = trainer.finish_save(directory, description, snapshot);  // a collective
    if (leader) checkpoints->commit(at_step, recipe.exp_manager.save_top_k, content);
  };
  auto finish_pending = [&] {
    if (!pending) return;
    PendingSave save = std::move(*pending);
    pending.reset();
    commit(save.step, save.directory, save.description.get(), *save.snapshot);
  };
  auto save = [&](std::int64_t at_step) {
    finish_pending();  // a second save waits for the first
    std::vector<std::uint64_t> positions{position};
    if (replicas > 1) {
      at::Tensor all = at::zeros({replicas}, on_device);
      context.groups.data->all_gather_into_tensor(all, at::tensor({static_cast<std::int64_t>(position)}, on_device))
          .wait(collective);
      all = all.cpu();
      positions.assign(all.data_ptr<std::int64_t>(), all.data_ptr<std::int64_t>() + replicas);
    }
    const fs::path directory = summary.run_dir / "checkpoints" / CheckpointManager::step_name(at_step);
    if (leader) checkpoints->prepare(at_step);
    if (everyone) everyone->barrier().wait(collective);
    const bool async = recipe.exp_manager.async_save;
    auto snapshot = std::make_shared<const Trainer::Snapshot>(trainer.snapshot(positions, /*copy=*/async));
    auto write = [directory, snapshot] {
      return write_rank_shard(directory, snapshot->rank, snapshot->pieces, snapshot->own);
    };
    if (!async) {
      commit(at_step, directory, write(), *snapshot);
      return;
    }
    pending = PendingSave{at_step, directory, snapshot, std::async(std::launch::async, write)};
  };

  // Token dropping (moe_expert_capacity_factor): the MoE layers that drop, whose counts each step
  // reports, summed over every rank routing its own tokens (a tensor-parallel group routes the same).
  std::vector<SparseMoE*> dropping;
  for (const auto& module : model.backbone().modules(/*include_self=*/false)) {
    auto* moe = dynamic_cast<SparseMoE*>(module.get());
    if (moe && moe->capacity_factor() > 0) dropping.push_back(moe);
  }
  const std::int64_t first_step = step;
  // Every rank traces its own work (a pipeline stage's passes, its waits): rank 0 into profile.json,
  // rank R into profile-rank-R.json.
  StepProfiler profiler(recipe.trainer, context,
                        summary.run_dir / (world.rank == 0 ? std::string("profile.json")
                                                           : "profile-rank-" + std::to_string(world.rank) + ".json"));
  // From the first step to the last save: a signal before it (loading) just stops the process, with
  // nothing to lose; during the export after it, too (the export is written atomically).
  std::optional<StopSignals> signals(std::in_place);
  double last_loss = 0;
  std::int64_t saved_step = resume_from ? step : -1;
  while (step < max_steps) {
    profiler.before(step);
    const auto step_started = Clock::now();
    const TrafficByGroup traffic_before = traffic(context.groups);
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
    const StepReport report = trainer.train_step(batches);
    if (report.skipped) {
      progress.message("step " + std::to_string(step + 1) + ": " + report.skip_reason +
                       "; the batch is skipped (no update; " + std::to_string(trainer.guard().skipped()) +
                       " skipped so far)");
    }
    step = trainer.step();
    position = batches.back().end_position;
    std::int64_t tokens_all = report.tokens, labelled_all = report.labelled_tokens, samples_all = report.samples;
    int stop = signals->received();
    if (everyone) {  // the step's tokens over every replica, and whether any rank was asked to stop
      at::Tensor counts = at::tensor({tokens_all, labelled_all, samples_all, static_cast<std::int64_t>(stop)}, on_device);
      at::Tensor sums = counts.narrow(0, 0, 3).clone();
      at::Tensor signal = counts.narrow(0, 3, 1).clone();
      // The ranks of one replica (tensor parallelism) read the same batch: summed over the replicas.
      if (context.groups.data) context.groups.data->all_reduce(sums).wait(collective);
      everyone->all_reduce(signal, ReduceOp::Max).wait(collective);
      tokens_all = sums[0].item<std::int64_t>();
      labelled_all = sums[1].item<std::int64_t>();
      samples_all = sums[2].item<std::int64_t>();
      stop = static_cast<int>(signal.item<std::int64_t>());
    }
    std::int64_t dropped = 0;
    for (auto* moe : dropping) dropped += moe->take_dropped();
    if (!dropping.empty() && everyone) {
      at::Tensor count = at::tensor({dropped}, on_device);
      everyone->all_reduce(count).wait(collective);
      dropped = count.item<std::int64_t>() / group_size(context.groups.tensor);
    }
    if (!report.skipped) last_loss = report.loss;
    const double seconds = std::chrono::duration<double>(Clock::now() - step_started).count();
    // This rank's collectives of the step, per group and operation (docs/parallelism.md compares
    // them with Megatron's formulas).
    json communication = json::object();
    for (const auto& [kind, operations] : traffic_since(traffic_before, traffic(context.groups))) {
      for (const auto& [operation, t] : operations) {
        communication[kind][operation] = {{"calls", t.calls}, {"bytes", t.bytes}, {"seconds", t.seconds}};
      }
    }
    const double elapsed = std::chrono::duration<double>(Clock::now() - started).count();
    const double eta = (max_steps - step) * elapsed / static_cast<double>(std::max<std::int64_t>(1, step - first_step));
    json item = {{"step", step},
                   {"loss", report.loss},
                   {"lr", report.lr},
                   {"grad_norm", report.grad_norm},
                   {"tokens", tokens_all},
                   {"labelled_tokens", labelled_all},
                   {"positions", report.positions},  // this replica's batch x sequence, padding included
                   {"samples", samples_all},
                   {"consumed_samples", position},
                   {"data_parallel_size", replicas},
                   {"tensor_model_parallel_size", group_size(context.groups.tensor)},
                   {"pipeline_model_parallel_size", group_size(context.groups.pipeline)},
                   {"tokens_per_second", tokens_all / seconds},
                   {"step_seconds", seconds},
                   {"data_wait_seconds", data_wait},
                   {"forward_backward_seconds", report.forward_backward_seconds},
                   {"optimizer_seconds", report.optimizer_seconds},
                   {"skipped_samples", summary.skipped_samples},
                   {"skipped_batch", report.skipped},
                   {"skipped_batches", trainer.guard().skipped()},
                   {"peak_rss_mib", peak_rss_mib()},
                   {"optimizer_state_mib", static_cast<double>(trainer.optimizer_state_bytes()) / (1 << 20)},
                   {"communication", communication}};
    // (token, expert) assignments over an expert's capacity, dropped this step.
    if (!dropping.empty()) item["moe_dropped_assignments"] = dropped;
    // The precision recipe's kernel layers (model.fp8): how many compute how ("fp8", "bf16"), and
    // this step's changes (a layer falling back), which the log shows too.
    if (!report.linear_modes.empty()) item["linear_layers"] = report.linear_modes;
    if (!report.linear_notes.empty()) item["linear_layer_changes"] = report.linear_notes;
    if (metrics) metrics->write(item);
    for (const auto& note : report.linear_notes) progress.message("step " + std::to_string(step) + ": " + note);
    progress.update(step, report.loss, report.lr, report.grad_norm, tokens_all / seconds, eta);
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
    if (stop && step < max_steps) {
      summary.signal = stop;
      progress.message(std::string("received ") + (summary.signal == SIGTERM ? "SIGTERM" : "SIGINT") +
                       ": checkpointing step " + std::to_string(step) + " and stopping; run the recipe again to continue");
      break;
    }
  }
  // Before the last save, which gathers whole tensors for the checkpoint.
  if (log) *log << title << ": peak resident memory while training " << std::fixed << std::setprecision(1)
                << peak_rss_mib() << " MiB" << std::defaultfloat << std::endl;
  if (saved_step != step) save(step);
  finish_pending();  // async_save: the last checkpoint committed before the export and the exit
  signals.reset();
  summary.skipped_batches = trainer.guard().skipped();
  summary.steps = step;
  summary.trained = step - first_step;
  summary.last_loss = last_loss;
  if (step < max_steps) return summary;  // stopped by exit_interval: not finished
  // The export streams the language model's tensors whole to rank 0, one at a time, from whichever
  // ranks hold them (every rank takes part: a later stage's or another rank's experts are sent).
  std::optional<WholeParameterStream> whole_llm;
  if (recipe.exp_manager.export_hf && model.encoder()) {
    trainer.restore_frozen_weights();  // the export writes the frozen components' fp32 weights as loaded
    whole_llm.emplace(model.backbone(), context.groups, context.device);
    if (!leader) {
      whole_llm->serve();
      return summary;
    }
  }
  if (!leader) return summary;

  write_loss_plot((summary.run_dir / "loss.png").string(), metrics->losses(), title);

  if (model.connector() && !recipe.model.mm_cfg.connector.freeze) {
    // LLaVA's mm_projector file: what a stage-2 recipe's pretrain_mm_mlp_adapter points at.
    std::vector<std::pair<std::string, at::Tensor>> projector;
    for (const auto& t : trainer.trained()) {
      if (t.name.rfind("connector.", 0) == 0) projector.emplace_back("model.mm_projector." + t.name.substr(10), t.main);
    }
    write_safetensors((summary.run_dir / "mm_projector.safetensors").string(), projector, {{"format", "pt"}});
  }
  trainer.restore_frozen_weights();  // the export writes the frozen components' fp32 weights as loaded
  if (exporting) {
    summary.hf_dir = summary.run_dir / "hf";
    // What the export costs in memory on top of this rank's model: about its largest tensor (streamed).
    const bool measured = reset_peak_rss();
    const double before = status_mib("VmRSS");
    export_hf(recipe.hf_export_source(), model, summary.hf_dir, &*whole_llm);
    if (measured && before > 0) {
      progress.message("exported " + summary.hf_dir.string() + " (a tensor at a time: peak resident memory " +
                       std::to_string(static_cast<long>(status_mib("VmHWM") - before)) + " MiB above the " +
                       std::to_string(static_cast<long>(before)) + " MiB before it)");
    }
  }
  summary.seconds = std::chrono::duration<double>(Clock::now() - started).count();
  progress.message("done: step " + std::to_string(step) + ", loss " + std::to_string(last_loss) + ", " +
                   std::to_string(summary.skipped_samples) + " bad sample(s) skipped, " +
                   std::to_string(trainer.guard().skipped()) + " loss spike(s) skipped, " +
                   format_duration(summary.seconds) + "; run directory " + summary.run_dir.string());
  return summary;
}

}  // namespace

TrainSummary run_train(const Recipe& recipe, const std::string& title) {
  // The processes a launcher started (torchrun, srun, --nproc-per-node), each a data-parallel
  // replica; a world of one without a launcher. Rank 0 owns the run directory (lock, checkpoints,
  // metrics, the console, the export); with several, every rank also logs to
  // <run>/logs/rank-<R>.log, its errors included.
  const auto collective = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::duration<double, std::ratio<60>>(recipe.trainer.distributed_timeout_minutes));
  const World world = World::from_environment(collective);
  std::optional<std::ofstream> log;
  PeerWatch peers(world);
  try {
    if (world.size > 1) {
      const fs::path directory = fs::path(recipe.exp_manager.explicit_log_dir) / "logs";
      fs::create_directories(directory);
      const fs::path path = directory / ("rank-" + std::to_string(world.rank) + ".log");
      log.emplace(path, std::ios::app);
      if (!*log) {
        log.reset();
        throw Error(path.string() + ": cannot open this rank's log");
      }
      *log << title << ": rank " << world.rank << " of " << world.size << " (local rank " << world.local_rank
           << ", pid " << ::getpid() << ")" << std::endl;
    }
    return train_replica(recipe, title, world, collective, log ? &*log : nullptr);
  } catch (const RecipeError& error) {  // the same on every rank: nobody else to blame
    if (log) *log << title << ": error: " << error.what() << std::endl;
    throw;
  } catch (const std::exception& error) {
    // A collective that failed names its group; the store tells which rank is gone or failed first.
    std::string message = error.what();
    peers.publish_error(message);
    if (message.find("process group '") != std::string::npos) {
      const std::string cause = peers.diagnose();
      if (!cause.empty()) message += "; " + cause;
    }
    if (log) *log << title << ": error: " << message << std::endl;
    if (message == error.what()) throw;
    throw Error(message);
  }
}

}  // namespace neva
