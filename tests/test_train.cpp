// neva-run's train mode end to end, on the demo's data and tiny base model (neva-run demo
// --prepare-only): exact resume, crash safety of checkpoints, the NaN stop, bad samples, precisions,
// activation checkpointing and packing through the trainer, and recipe checks.
#include <doctest/doctest.h>

#include <signal.h>
#include <unistd.h>

#include <fstream>
#include <functional>
#include <chrono>
#include <algorithm>
#include <sstream>
#include <thread>
#include <numeric>
#include <random>
#include <set>
#include <nlohmann/json.hpp>

#include "neva/train/checkpoints.h"
#include "neva/data/image.h"
#include "neva/io/safetensors.h"
#include "neva/train/distributed_checkpoint.h"
#include "test_support.h"

using neva::test::run_command;
using neva::test::TempDir;

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// One intra-op thread: CTest runs two tests at once on two cores, and OpenMP threads that spin while
// another process holds the cores slow both down tenfold.
const std::string kNevaRunPrefix = "env -u NEVA_PLUGIN_PATH OMP_NUM_THREADS=1 ";
neva::test::CommandResult neva_run(const std::string& arguments, const std::string& environment = "") {
  return run_command(kNevaRunPrefix + environment + " " + neva::test::binary("neva-run").string() + " " + arguments, 300);
}

// The demo's files (data, tiny Llama + CLIP, tokenizer, recipes) in a fresh directory.
struct Workspace {
  TempDir dir;
  fs::path root = dir.path() / "demo";
  Workspace() {
    auto prepared = neva_run("demo --prepare-only --dir " + root.string());
    REQUIRE_MESSAGE(prepared.exit_code == 0, prepared.err);
  }
  // Stage 2 (connector + LLM, v1 template) shrunk to a few small steps.
  std::string train_arguments(const std::string& run, const std::string& overrides) const {
    return (root / "stage2.toml").string() + " --set exp_manager.explicit_log_dir=" + (root / run).string() +
           " --set model.optim.sched.warmup_steps=2 --set exp_manager.export_hf=false"
           " --set model.micro_batch_size=4 --set model.global_batch_size=8"
           " --set model.mm_cfg.pretrain_mm_mlp_adapter=\"\" " +
           overrides;
  }
  neva::test::CommandResult train(const std::string& run, const std::string& overrides,
                                  const std::string& environment = "") const {
    return neva_run(train_arguments(run, overrides), environment);
  }
  // The command line of train(), to start it in the background.
  std::string train_command(const std::string& run, const std::string& overrides) const {
    return kNevaRunPrefix + neva::test::binary("neva-run").string() + " " + train_arguments(run, overrides);
  }
  // The losses of metrics.jsonl as written (17 significant digits: equal text = equal bits).
  std::vector<std::string> losses(const std::string& run) const {
    std::ifstream in(root / run / "metrics.jsonl");
    std::vector<std::string> out;
    for (std::string line; std::getline(in, line);) out.push_back(json::parse(line)["loss"].dump());
    return out;
  }
};

}  // namespace

TEST_CASE("fp32 resume is exact: 10 straight steps and 5 + resume + 5 give bitwise-identical losses") {
  Workspace ws;
  auto straight = ws.train("straight", "--set trainer.max_steps=10");
  REQUIRE_MESSAGE(straight.exit_code == 0, straight.err);
  auto first = ws.train("split", "--set trainer.max_steps=10 --set trainer.exit_interval=5");
  REQUIRE_MESSAGE(first.exit_code == 0, first.err);
  CHECK(contains(first.err, "exit_interval: stopping at step 5 of 10"));
  CHECK(ws.losses("split").size() == 5);
  auto second = ws.train("split", "--set trainer.max_steps=10");
  REQUIRE_MESSAGE(second.exit_code == 0, second.err);
  CHECK(contains(second.err, "resumed from " + (ws.root / "split/checkpoints/step-0000005").string() + " (step 5)"));
  auto expected = ws.losses("straight");
  REQUIRE(expected.size() == 10);
  CHECK(ws.losses("split") == expected);
  CHECK(expected.front() != expected.back());  // it trained
  // The run's products: a loss curve, LLaVA's projector file, the checkpoint layout.
  CHECK_NOTHROW(neva::load_image((ws.root / "straight/loss.png").string()));
  neva::SafetensorsCheckpoint projector((ws.root / "straight/mm_projector.safetensors").string());
  CHECK(projector.contains("model.mm_projector.0.weight"));
  std::ifstream latest(ws.root / "straight/checkpoints/latest");
  std::string name;
  std::getline(latest, name);
  CHECK(name == "step-0000010");
  // async_save: checkpoints every 2 steps written by a background thread while training goes on,
  // each committed at the next save (or the end): the same losses, and a resume from them as exact.
  const std::string async = "--set exp_manager.checkpoint_callback_params.async_save=true "
                            "--set exp_manager.checkpoint_callback_params.every_n_train_steps=2 "
                            "--set exp_manager.checkpoint_callback_params.save_top_k=10 ";
  auto background = ws.train("async", async + "--set trainer.max_steps=10 --set trainer.exit_interval=5");
  REQUIRE_MESSAGE(background.exit_code == 0, background.err);
  for (const char* step : {"step-0000002", "step-0000004", "step-0000005"}) {
    CHECK(neva::CheckpointManager::verify(ws.root / "async/checkpoints" / step).empty());
  }
  auto rest = ws.train("async", async + "--set trainer.max_steps=10");
  REQUIRE_MESSAGE(rest.exit_code == 0, rest.err);
  CHECK(contains(rest.err, "resumed from " + (ws.root / "async/checkpoints/step-0000005").string() + " (step 5)"));
  CHECK(ws.losses("async") == expected);
  CHECK(neva::CheckpointManager::verify(ws.root / "async/checkpoints/step-0000010").empty());
}

TEST_CASE("kill -9 at 20 random points inside checkpoint saves: every run resumes from a committed checkpoint, "
          "losses bitwise those of the uninterrupted run") {
  Workspace ws;
  const std::string settings = "--set trainer.max_steps=4 --set exp_manager.checkpoint_callback_params.every_n_train_steps=2";
  auto straight = ws.train("straight", settings);
  REQUIRE_MESSAGE(straight.exit_code == 0, straight.err);
  const auto expected = ws.losses("straight");
  REQUIRE(expected.size() == 4);
  // Every file operation of the two saves (steps 2 and 4), listed by the LD_PRELOAD shim.
  const fs::path trace = ws.dir.path() / "trace.txt";
  // (Under ASan the shim precedes its runtime: told not to mind, keeping the other options.)
  const std::string shim = "LD_PRELOAD=" + neva::test::kill_shim().string() + " ASAN_OPTIONS=\"$ASAN_OPTIONS:verify_asan_link_order=0\"";
  auto traced = ws.train("traced", settings, shim + " NEVA_KILL_TRACE=" + trace.string());
  REQUIRE_MESSAGE(traced.exit_code == 0, traced.err);
  std::vector<std::string> events;
  {
    std::ifstream in(trace);
    for (std::string line; std::getline(in, line);) events.push_back(line);
  }
  REQUIRE(events.size() >= 20);
  std::mt19937 random(20261203);
  std::vector<std::size_t> points(events.size());
  std::iota(points.begin(), points.end(), 1);
  std::shuffle(points.begin(), points.end(), random);
  points.resize(20);
  for (std::size_t point : points) {
    CAPTURE(events[point - 1]);  // "N call path": the operation the kill preceded
    const std::string run = "killed-" + std::to_string(point);
    auto killed = ws.train(run, settings, shim + " NEVA_KILL_AT=" + std::to_string(point));
    CHECK(killed.exit_code == 128 + 9);
    auto resumed = ws.train(run, settings);
    REQUIRE_MESSAGE(resumed.exit_code == 0, resumed.err);
    CHECK(ws.losses(run) == expected);
  }
}

TEST_CASE("kill -9 of one rank at 20 random points inside two-process saves: every relaunch resumes from a committed "
          "checkpoint, losses bitwise those of the uninterrupted run") {
  Workspace ws;
  const fs::path torchrun = neva::test::source_directory() / ".venv" / "bin" / "torchrun";
  REQUIRE(fs::exists(torchrun));
  const std::string settings = "--set trainer.max_steps=4 --set model.micro_batch_size=2 --set model.global_batch_size=4 "
                               "--set exp_manager.checkpoint_callback_params.every_n_train_steps=2 "
                               "--set trainer.distributed_timeout_minutes=1";
  auto launch = [&](const std::string& run, const std::string& environment) {
    return run_command(environment + " " + kNevaRunPrefix + torchrun.string() + " --no-python --standalone --nproc-per-node 2 " +
                           neva::test::binary("neva-run").string() + " " + ws.train_arguments(run, settings),
                       300);
  };
  auto straight = launch("straight", "");
  REQUIRE_MESSAGE(straight.exit_code == 0, straight.err);
  const auto expected = ws.losses("straight");
  REQUIRE(expected.size() == 4);
  const std::string shim = "LD_PRELOAD=" + neva::test::kill_shim().string() + " ASAN_OPTIONS=\"$ASAN_OPTIONS:verify_asan_link_order=0\"";
  std::mt19937 random(20261207);
  for (int rank = 0; rank < 2; ++rank) {
    // The file operations of rank `rank` in the two saves (steps 2 and 4): its shard, and on rank 0
    // the directory, the trainer state, the manifest and `latest`.
    const fs::path trace = ws.dir.path() / ("trace-" + std::to_string(rank) + ".txt");
    auto traced = launch("traced-" + std::to_string(rank), shim + " NEVA_KILL_RANK=" + std::to_string(rank) +
                                                               " NEVA_KILL_TRACE=" + trace.string());
    REQUIRE_MESSAGE(traced.exit_code == 0, traced.err);
    std::vector<std::string> events;
    std::ifstream in(trace);
    for (std::string line; std::getline(in, line);) events.push_back(line);
    REQUIRE(events.size() >= 10);
    std::vector<std::size_t> points(events.size());
    std::iota(points.begin(), points.end(), 1);
    std::shuffle(points.begin(), points.end(), random);
    points.resize(10);
    for (std::size_t point : points) {
      CAPTURE(rank);
      CAPTURE(events[point - 1]);  // "N call path": the operation the kill preceded
      const std::string run = "killed-" + std::to_string(rank) + "-" + std::to_string(point);
      auto killed = launch(run, shim + " NEVA_KILL_RANK=" + std::to_string(rank) + " NEVA_KILL_AT=" + std::to_string(point));
      CHECK(killed.exit_code != 0);
      auto resumed = launch(run, "");
      REQUIRE_MESSAGE(resumed.exit_code == 0, resumed.err);
      CHECK(ws.losses(run) == expected);
    }
  }
}

TEST_CASE("a damaged checkpoint is detected by its SHA-256 and the run falls back to the previous intact one") {
  Workspace ws;
  const std::string settings = "--set trainer.max_steps=6 --set exp_manager.checkpoint_callback_params.every_n_train_steps=2";
  auto straight = ws.train("straight", settings);
  REQUIRE_MESSAGE(straight.exit_code == 0, straight.err);
  auto first = ws.train("damaged", "--set trainer.max_steps=6 --set trainer.exit_interval=4 "
                                   "--set exp_manager.checkpoint_callback_params.every_n_train_steps=2");
  REQUIRE_MESSAGE(first.exit_code == 0, first.err);
  // One flipped bit in step 4's weights.
  const fs::path weights = ws.root / "damaged/checkpoints/step-0000004/rank-00000.safetensors";
  {
    std::fstream file(weights, std::ios::in | std::ios::out | std::ios::binary);
    file.seekg(-5, std::ios::end);
    char byte = 0;
    file.read(&byte, 1);
    byte ^= 0x10;
    file.seekp(-5, std::ios::end);
    file.write(&byte, 1);
  }
  auto resumed = ws.train("damaged", settings);
  REQUIRE_MESSAGE(resumed.exit_code == 0, resumed.err);
  CHECK(contains(resumed.err, "checkpoint step-0000004 is damaged and is skipped: " + weights.string() + ": SHA-256 "));
  CHECK(contains(resumed.err, "step-0000004 is set aside as step-0000004.damaged"));
  CHECK(fs::exists(ws.root / "damaged/checkpoints/step-0000004.damaged/rank-00000.safetensors"));  // kept for the user
  CHECK(contains(resumed.err, "resumed from " + (ws.root / "damaged/checkpoints/step-0000002").string() + " (step 2)"));
  CHECK(ws.losses("damaged") == ws.losses("straight"));
  auto inspected = neva_run("checkpoint inspect " + (ws.root / "damaged/checkpoints/step-0000004.damaged").string());
  CHECK(inspected.exit_code == 1);
  CHECK(contains(inspected.err, "rank-00000.safetensors: SHA-256 "));
  // Every checkpoint damaged: refused, naming the files, instead of silently starting over.
  for (const char* step : {"step-0000004", "step-0000006"}) {
    std::ofstream(ws.root / "damaged/checkpoints" / step / "rank-00000.safetensors", std::ios::app) << "x";
  }
  auto refused = ws.train("damaged", "--set trainer.max_steps=8");
  CHECK(refused.exit_code == 1);
  CHECK(contains(refused.err, "no intact checkpoint to resume from"));
  CHECK(contains(refused.err, "step-0000006/rank-00000.safetensors has "));
}

TEST_CASE("a run directory takes one run at a time, and a lock left by a dead process is taken over") {
  Workspace ws;
  const fs::path run = ws.root / "locked";
  fs::create_directories(run);
  {
    neva::RunDirectoryLock held(run);  // this test process is the live holder
    auto refused = ws.train("locked", "--set trainer.max_steps=2");
    CHECK(refused.exit_code == 1);
    CHECK(contains(refused.err, run.string() + " is in use by another run (pid " + std::to_string(::getpid()) + " on "));
  }
  // The note of a holder that died (its flock went with it).
  std::ofstream(run / "run.lock") << "pid 999999 on elsewhere, started 2026-01-01T00:00:00Z\n";
  auto taken = ws.train("locked", "--set trainer.max_steps=2");
  CHECK_MESSAGE(taken.exit_code == 0, taken.err);
}

TEST_CASE("SIGTERM and SIGINT finish the step, checkpoint and exit 143 / 130, and the run then resumes exactly") {
  Workspace ws;
  const std::string settings = "--set trainer.max_steps=30 --set model.micro_batch_size=2 --set model.global_batch_size=2";
  auto straight = ws.train("straight", settings);
  REQUIRE_MESSAGE(straight.exit_code == 0, straight.err);
  for (auto [signal, name] : {std::pair{SIGTERM, "SIGTERM"}, std::pair{SIGINT, "SIGINT"}}) {
    CAPTURE(name);
    const std::string run = std::string("signal-") + name;
    // The signal arrives once a few steps are in metrics.jsonl, from outside, as Slurm sends it.
    const fs::path metrics = ws.root / run / "metrics.jsonl", err = ws.dir.path() / (run + ".err");
    neva::test::Process training(ws.train_command(run, settings) + " 2>" + err.string());
    auto lines = [&] {
      std::ifstream in(metrics);
      return std::count(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>(), '\n');
    };
    for (int i = 0; i < 1200 && lines() < 3; ++i) ::usleep(50000);
    training.signal(signal);
    CHECK(training.wait() == 128 + signal);
    std::ifstream log(err);
    const std::string stopped((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
    CHECK(contains(stopped, std::string("received ") + name + ": checkpointing step "));
    const auto partial = ws.losses(run);
    CHECK(partial.size() < 30);
    CHECK(fs::exists(ws.root / run / "checkpoints" / ("step-" + std::string(7 - std::to_string(partial.size()).size(), '0') +
                                                     std::to_string(partial.size())) / "manifest.json"));
    auto resumed = ws.train(run, settings);
    REQUIRE_MESSAGE(resumed.exit_code == 0, resumed.err);
    CHECK(ws.losses(run) == ws.losses("straight"));
  }
}

TEST_CASE("a NaN loss stops the run before the update and names the last good checkpoint") {
  Workspace ws;
  auto result = ws.train("nan", "--set trainer.max_steps=6 --set model.optim.lr=1e30 "
                                "--set exp_manager.checkpoint_callback_params.every_n_train_steps=1");
  CHECK(result.exit_code == 1);
  INFO(result.err);
  CHECK(contains(result.err, "stopping before the update (last good checkpoint: " +
                                 (ws.root / "nan/checkpoints/step-0000001").string() + ")"));
  CHECK(fs::exists(ws.root / "nan/checkpoints/step-0000001/trainer_state.json"));
}

TEST_CASE("a loss spike is skipped and counted by default, and stops the run under loss_spike_action = \"stop\"") {
  // One record repeated, which the model learns, blended 799:1 with a record whose answer is long
  // and new: Megatron's blending rule first takes the rare source at position 400, in step 51 of 8
  // samples, where the loss jumps to ~30x the running median (measured: 3.17 against 0.099).
  Workspace ws;
  json easy = json::parse(std::ifstream(ws.root / "data/stage2.json"))[0];
  json hard = easy;
  hard["id"] = "hard";
  hard["conversations"][1]["value"] =
      "the red circle is in the top left the blue square is in the bottom right the green triangle is in the "
      "top right and the yellow shape is in the bottom left";  // the demo's words, so its tokenizer knows them
  {
    std::ofstream out(ws.root / "data/easy.jsonl");
    for (int i = 0; i < 200; ++i) {
      easy["id"] = "easy-" + std::to_string(i);
      out << easy.dump() << "\n";
    }
    std::ofstream(ws.root / "data/hard.jsonl") << hard.dump() << "\n";
  }
  const std::string settings = "--set trainer.max_steps=60 --set exp_manager.checkpoint_callback_params.every_n_train_steps=25"
                               " --set 'model.data.data_path=[\"" + (ws.root / "data/easy.jsonl").string() + "\",\"" +
                               (ws.root / "data/hard.jsonl").string() + "\"]' --set model.data.data_weights=[799,1]";
  auto skipped = ws.train("skip", settings);
  INFO(skipped.err);
  REQUIRE(skipped.exit_code == 0);
  CHECK(contains(skipped.err, "step 51: the loss spiked to "));
  CHECK(contains(skipped.err, "the batch is skipped (no update; 1 skipped so far)"));
  CHECK(contains(skipped.err, "1 loss spike(s) skipped"));
  std::ifstream metrics(ws.root / "skip/metrics.jsonl");
  std::vector<json> lines;
  for (std::string line; std::getline(metrics, line);) lines.push_back(json::parse(line));
  REQUIRE(lines.size() == 60);
  CHECK(lines[50]["skipped_batch"] == true);
  CHECK(lines[49]["skipped_batch"] == false);
  CHECK(lines[59]["skipped_batches"] == 1);

  auto stopped = ws.train("stop", settings + " --set trainer.loss_spike_action=stop");
  INFO(stopped.err);
  CHECK(stopped.exit_code == 1);
  CHECK(contains(stopped.err, "step 51: the loss spiked to "));
  CHECK(contains(stopped.err, "stopping before the update (last good checkpoint: " +
                                  (ws.root / "stop/checkpoints/step-0000050").string() + ")"));
  CHECK(ws.losses("stop").size() == 50);
  CHECK(fs::exists(ws.root / "stop/checkpoints/step-0000050/manifest.json"));
}

TEST_CASE("bad samples are skipped and counted, or stop the run when bad_samples = \"fail\"") {
  Workspace ws;
  json good = json::parse(std::ifstream(ws.root / "data/stage2.json"))[0];
  json lost = good;
  lost["id"] = "lost";
  lost["image"] = "train/missing.png";
  std::ofstream(ws.root / "data/mixed.jsonl") << good.dump() << "\n{not json\n" << lost.dump() << "\n" << good.dump() << "\n";
  const std::string data = " --set model.data.data_path=" + (ws.root / "data/mixed.jsonl").string() + " --set trainer.max_steps=2";
  auto skipped = ws.train("skip", data);
  REQUIRE_MESSAGE(skipped.exit_code == 0, skipped.err);
  INFO(skipped.err);
  CHECK(contains(skipped.err, "skipped a bad sample: " + (ws.root / "data/mixed.jsonl").string() + ":2:3: invalid JSON"));
  CHECK(contains(skipped.err, "(id lost)"));
  CHECK(contains(skipped.err, "missing.png"));
  auto failed = ws.train("fail", data + " --set model.data.bad_samples=fail");
  CHECK(failed.exit_code == 1);
  CHECK(contains(failed.err, "neva-run: " + (ws.root / "data/mixed.jsonl").string() + ":"));  // the first bad one met
}

TEST_CASE("bf16 mixed and bf16 O2 train, and O2 keeps fp32 main weights and resumes exactly") {
  Workspace ws;
  auto mixed = ws.train("mixed", "--set trainer.max_steps=4 --set trainer.precision=bf16-mixed");
  REQUIRE_MESSAGE(mixed.exit_code == 0, mixed.err);
  CHECK(ws.losses("mixed").size() == 4);
  const std::string o2 = "--set trainer.max_steps=4 --set trainer.precision=bf16 --set model.megatron_amp_O2=true";
  auto straight = ws.train("o2", o2 + " --set exp_manager.export_hf=true");
  REQUIRE_MESSAGE(straight.exit_code == 0, straight.err);
  CHECK(contains(straight.err, "precision bf16 (O2: fp32 main weights)"));
  // The checkpoint holds the fp32 main weights; the model itself ran in bf16 (its export is bf16).
  const neva::CheckpointReader weights(ws.root / "o2/checkpoints/step-0000004");
  CHECK((weights.dtype("llm.model.norm.weight") == at::kFloat));
  CHECK((weights.dtype("llm.model.layers.0.mlp.up_proj.weight") == at::kFloat));
  neva::SafetensorsCheckpoint exported((ws.root / "o2/hf/model.safetensors").string());
  at::Tensor live = exported.tensor("language_model.model.layers.0.mlp.up_proj.weight");
  CHECK((live.scalar_type() == at::kBFloat16));
  // ... and is the main weight rounded to bf16.
  CHECK(at::equal(live, weights.read_whole("llm.model.layers.0.mlp.up_proj.weight").to(at::kBFloat16)));
  CHECK(json::parse(std::ifstream(ws.root / "o2/hf/config.json"))["dtype"] == "bfloat16");
  auto first = ws.train("o2-split", o2 + " --set trainer.exit_interval=2");
  REQUIRE_MESSAGE(first.exit_code == 0, first.err);
  auto second = ws.train("o2-split", o2);
  REQUIRE_MESSAGE(second.exit_code == 0, second.err);
  CHECK(ws.losses("o2-split") == ws.losses("o2"));
}

TEST_CASE("activation checkpointing and sequence packing run through the trainer with the same losses") {
  Workspace ws;
  // Short samples (captions, plain template) so that several share a packed row.
  const std::string stage1 = " --set model.data.data_path=" + (ws.root / "data/stage1.json").string() +
                             " --set model.data.conv_template=plain --set trainer.max_steps=3";
  auto plain = ws.train("plain", stage1);
  REQUIRE_MESSAGE(plain.exit_code == 0, plain.err);
  auto recomputed = ws.train("recomputed", stage1 + " --set model.activations_checkpoint_granularity=full");
  REQUIRE_MESSAGE(recomputed.exit_code == 0, recomputed.err);
  CHECK(ws.losses("recomputed") == ws.losses("plain"));
  // Under autocast, with the language model trained (stage 2), recomputation changes nothing either.
  const std::string stage2 = " --set trainer.max_steps=3 --set trainer.precision=bf16-mixed";
  auto mixed = ws.train("mixed", stage2);
  REQUIRE_MESSAGE(mixed.exit_code == 0, mixed.err);
  auto mixed_recomputed = ws.train("mixed-recomputed", stage2 + " --set model.activations_checkpoint_granularity=full");
  REQUIRE_MESSAGE(mixed_recomputed.exit_code == 0, mixed_recomputed.err);
  CHECK(ws.losses("mixed-recomputed") == ws.losses("mixed"));
  auto packed = ws.train("packed", stage1 + " --set model.data.packed_sequence=true");
  REQUIRE_MESSAGE(packed.exit_code == 0, packed.err);
  std::ifstream in(ws.root / "packed/metrics.jsonl");
  std::string line;
  std::getline(in, line);
  const json first = json::parse(line);
  const int samples = first["samples"].get<int>();
  CHECK(samples > 8);  // 8 rows of up to 128 tokens hold more than 8 captions
  // The same samples unpacked, one per row, in one micro-batch: the first step's loss (before any
  // update) is the same mean over the same labelled tokens.
  auto unpacked = ws.train("unpacked", stage1 + " --set trainer.max_steps=2 --set model.micro_batch_size=" +
                                           std::to_string(samples) + " --set model.global_batch_size=" + std::to_string(samples));
  REQUIRE_MESSAGE(unpacked.exit_code == 0, unpacked.err);
  std::ifstream unpacked_in(ws.root / "unpacked/metrics.jsonl");
  std::getline(unpacked_in, line);
  const json reference = json::parse(line);
  CHECK(reference["samples"].get<int>() == samples);
  CHECK(reference["labelled_tokens"].get<int>() == first["labelled_tokens"].get<int>());
  CHECK(first["loss"].get<double>() == doctest::Approx(reference["loss"].get<double>()).epsilon(1e-5));
}

TEST_CASE("trainer.profile writes a Chrome trace of the chosen steps, and metrics split each step into phases") {
  Workspace ws;
  auto result = ws.train("profiled", "--set trainer.max_steps=4 --set trainer.profile=true"
                                     " --set trainer.profile_step_start=1 --set trainer.profile_step_end=3");
  REQUIRE_MESSAGE(result.exit_code == 0, result.err);
  CHECK(contains(result.err, "profiled steps 1 to 2 (0-based) into " + (ws.root / "profiled/profile.json").string()));
  json trace = json::parse(std::ifstream(ws.root / "profiled/profile.json"));
  std::set<std::string> operators;
  for (const auto& event : trace["traceEvents"]) {
    if (event.value("cat", "") == "cpu_op") operators.insert(event["name"].get<std::string>());
  }
  CHECK(operators.count("aten::mm") == 1);
  CHECK(operators.count("aten::_fused_adamw_") == 1);
  std::ifstream in(ws.root / "profiled/metrics.jsonl");
  std::string line;
  std::getline(in, line);
  json step = json::parse(line);
  for (const char* key : {"data_wait_seconds", "forward_backward_seconds", "optimizer_seconds", "step_seconds"}) {
    CAPTURE(key);
    CHECK(step[key].get<double>() >= 0);
  }
  CHECK(step["forward_backward_seconds"].get<double>() + step["optimizer_seconds"].get<double>() <=
        step["step_seconds"].get<double>());
  auto backwards = ws.train("x", "--set trainer.max_steps=4 --set trainer.profile_step_start=3 --set trainer.profile_step_end=3");
  CHECK(backwards.exit_code == 2);
  CHECK(contains(backwards.err, "trainer.profile_step_end: expected a step after profile_step_start (3)"));
}

TEST_CASE("train recipes are checked before anything runs, and a finished run is not overwritten by accident") {
  Workspace ws;
  auto no_data = ws.train("x", "--set model.data.data_path=[] --set trainer.max_steps=1");
  CHECK(no_data.exit_code == 2);
  CHECK(contains(no_data.err, "model.data.data_path: missing: mode 'train' needs LLaVA data"));
  auto warmup = ws.train("x", "--set trainer.max_steps=1 --set model.optim.sched.warmup_steps=5");
  CHECK(warmup.exit_code == 2);
  CHECK(contains(warmup.err, "warmup_steps: longer than trainer.max_steps (1)"));
  auto done = ws.train("done", "--set trainer.max_steps=2");
  REQUIRE_MESSAGE(done.exit_code == 0, done.err);
  auto again = ws.train("done", "--set trainer.max_steps=2 --set exp_manager.resume_if_exists=false");
  CHECK(again.exit_code == 1);
  CHECK(contains(again.err, "already holds checkpoints (step-0000002); set exp_manager.resume_if_exists = true"));
  // A model the export cannot write (a linear connector) fails before the first step, not after the run.
  auto unexportable = ws.train("linear", "--set trainer.max_steps=2 --set model.mm_cfg.mm_mlp_adapter_type=linear"
                                         " --set exp_manager.export_hf=true");
  CHECK(unexportable.exit_code == 1);
  CHECK(contains(unexportable.err, "projector is two linear layers with a GELU between"));
  CHECK(contains(unexportable.err, "exp_manager.export_hf = false trains without exporting"));
  CHECK(!contains(unexportable.err, "step 1/"));
  CHECK(!fs::exists(ws.root / "linear/checkpoints/latest"));
  // A vision config.json without patch_size loads (CLIP's own default, 32, fits these weights), but
  // LlavaProcessor would count image tokens with transformers' class default: refused before training.
  fs::path vision = ws.root / "vision-no-patch-size";
  fs::create_directories(vision);
  json config = json::parse(std::ifstream(ws.root / "model/vision/config.json"));
  config.erase("patch_size");
  config["image_size"] = 64;  // 2 x 2 patches of 32
  std::ofstream(vision / "config.json") << config.dump();
  neva::SafetensorsFile weights((ws.root / "model/vision/model.safetensors").string());
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& entry : weights.entries()) {
    at::Tensor value = weights.tensor(entry.name);
    const std::int64_t width = config["hidden_size"].get<std::int64_t>();
    if (entry.name == "vision_model.embeddings.patch_embedding.weight") value = at::randn({width, 3, 32, 32}) * 0.02;
    if (entry.name == "vision_model.embeddings.position_embedding.weight") value = at::randn({5, width}) * 0.02;
    tensors.emplace_back(entry.name, value);
  }
  neva::write_safetensors((vision / "model.safetensors").string(), tensors);
  auto no_patch = ws.train("no-patch", "--set trainer.max_steps=2 --set exp_manager.export_hf=true"
                                       " --set model.mm_cfg.vision_encoder.from_pretrained=" + vision.string());
  CHECK(no_patch.exit_code == 1);
  CHECK(contains(no_patch.err, "export: the vision encoder's config.json (" + vision.string() +
                                   ") has no integer patch_size, which LlavaProcessor needs"));
  CHECK(!contains(no_patch.err, "step 1/"));
  // The same model trains when it is not exported: the check belongs to the export alone.
  auto unexported = ws.train("no-patch-plain", "--set trainer.max_steps=2 --set model.mm_cfg.vision_encoder.from_pretrained=" +
                                                   vision.string());
  CHECK_MESSAGE(unexported.exit_code == 0, unexported.err);
}

TEST_CASE("gradient accumulation: 2 micro-batches of 4 make the same step as one micro-batch of 8") {
  Workspace ws;
  auto whole = ws.train("whole", "--set trainer.max_steps=3 --set model.micro_batch_size=8");
  REQUIRE_MESSAGE(whole.exit_code == 0, whole.err);
  auto split = ws.train("split", "--set trainer.max_steps=3");  // micro 4, global 8
  REQUIRE_MESSAGE(split.exit_code == 0, split.err);
  CHECK(contains(split.err, "micro-batch 4 x 2 accumulation"));
  auto a = ws.losses("whole"), b = ws.losses("split");
  REQUIRE(a.size() == 3);
  REQUIRE(b.size() == 3);
  // The loss is the mean over the global batch's labelled tokens either way; only rounding differs.
  for (std::size_t i = 0; i < 3; ++i) CHECK(std::stod(a[i]) == doctest::Approx(std::stod(b[i])).epsilon(1e-5));
}

TEST_CASE("data parallelism under the real torchrun: two replicas train what one process trains, and resume exactly") {
  Workspace ws;
  // One process runs micro-batches of 2 twice per step; each of two replicas runs one of 2: the same
  // global batch of 4 (the replicas read the even and the odd positions of the same stream).
  const std::string sizes = "--set trainer.max_steps=4 --set model.micro_batch_size=2 --set model.global_batch_size=4";
  auto one = ws.train("one", sizes);
  REQUIRE_MESSAGE(one.exit_code == 0, one.err);
  const fs::path torchrun = neva::test::source_directory() / ".venv" / "bin" / "torchrun";
  REQUIRE(fs::exists(torchrun));
  auto launch = [&](const std::string& run, const std::string& overrides) {
    return run_command(kNevaRunPrefix + torchrun.string() + " --no-python --standalone --nproc-per-node 2 " +
                           neva::test::binary("neva-run").string() + " " + ws.train_arguments(run, sizes + " " + overrides),
                       300);
  };
  auto two = launch("two", "");
  REQUIRE_MESSAGE(two.exit_code == 0, two.err);
  CHECK(contains(two.err, "x 2 data-parallel replicas"));
  const auto single = ws.losses("one"), replicated = ws.losses("two");
  REQUIRE(single.size() == 4);
  REQUIRE(replicated.size() == 4);
  for (std::size_t i = 0; i < single.size(); ++i) {
    // fp32, other batch shapes (padding) and another summation order: close, not bitwise.
    CHECK(std::stod(replicated[i]) == doctest::Approx(std::stod(single[i])).epsilon(1e-5));
  }
  std::ifstream metrics(ws.root / "two" / "metrics.jsonl"), reference(ws.root / "one" / "metrics.jsonl");
  for (std::string a, b; std::getline(metrics, a) && std::getline(reference, b);) {
    const json got = json::parse(a), expected = json::parse(b);
    CHECK(got["data_parallel_size"] == 2);
    CHECK(got["tokens"] == expected["tokens"]);  // every replica's tokens: the same global batch
    CHECK(got["labelled_tokens"] == expected["labelled_tokens"]);
  }
  // Every rank logs to its own file; only rank 0 to the console.
  for (int rank = 0; rank < 2; ++rank) {
    std::ifstream in(ws.root / "two" / "logs" / ("rank-" + std::to_string(rank) + ".log"));
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    CHECK(contains(text, "rank " + std::to_string(rank) + " of 2"));
    CHECK(contains(text, "step 4/4 loss"));
  }
  // Each rank wrote its own file; the tool reads the manifest and checks the files.
  auto inspected = neva_run("checkpoint inspect " + (ws.root / "two").string());
  REQUIRE_MESSAGE(inspected.exit_code == 0, inspected.err);
  CHECK(contains(inspected.out, "step-0000004: checkpoint format 2, step 4"));
  CHECK(contains(inspected.out, "layout: 2 rank(s): tensor 1, pipeline 1 (virtual 1), context 1, expert 1, data 2"));
  CHECK(contains(inspected.out, "3 file(s)"));  // rank-00000, rank-00001, trainer_state.json
  CHECK(contains(inspected.out, "intact: every file matches"));
  // ... and converts it to one file of whole tensors, from which one process resumes (below: as it
  // resumes from the two ranks' files, bit for bit).
  auto converted = neva_run("checkpoint convert " + (ws.root / "two").string() + " --to " +
                            (ws.root / "converted" / "checkpoints" / "step-0000004").string());
  REQUIRE_MESSAGE(converted.exit_code == 0, converted.err);
  CHECK(contains(converted.out, "tensors whole in one file"));
  auto converted_inspected = neva_run("checkpoint inspect " + (ws.root / "converted" / "checkpoints" / "step-0000004").string());
  CHECK(converted_inspected.exit_code == 0);
  CHECK(contains(converted_inspected.out, "layout: 1 rank(s)"));
  const json state = json::parse(std::ifstream(ws.root / "two" / "checkpoints" / "step-0000004" / "trainer_state.json"));
  REQUIRE(state["consumed_samples_per_replica"].size() == 2);
  CHECK(state["consumed_samples_per_replica"][0] == state["consumed_samples"]);

  // Stopped at step 2 and relaunched: the same losses, bit for bit, as the uninterrupted launch.
  auto first = launch("split", "--set trainer.exit_interval=2");
  REQUIRE_MESSAGE(first.exit_code == 0, first.err);
  auto second = launch("split", "");
  REQUIRE_MESSAGE(second.exit_code == 0, second.err);
  CHECK(ws.losses("split") == replicated);

  // neva-run's own launcher starts the same two workers: the same losses, bit for bit.
  auto own = neva_run("--nproc-per-node 2 " + ws.train_arguments("own", sizes));
  REQUIRE_MESSAGE(own.exit_code == 0, own.err);
  CHECK(ws.losses("own") == replicated);

  // A global batch the replicas cannot share evenly: every rank refuses it, naming the key.
  auto uneven = launch("uneven", "--set model.global_batch_size=6");
  CHECK(uneven.exit_code != 0);
  CHECK(contains(uneven.err, "model.global_batch_size (6) must be a multiple of micro_batch_size x the data-parallel size (2 x 2)"));

  // Two processes that read different recipes (here one more --set) are one run only by mistake.
  {
    const int port = neva::test::free_port();
    std::string script = "status=0\n";
    for (int rank = 0; rank < 2; ++rank) {
      script += "RANK=" + std::to_string(rank) + " LOCAL_RANK=" + std::to_string(rank) +
                " WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port) + " " + ws.train_command("mixed", sizes) +
                (rank == 1 ? " --set trainer.log_every_n_steps=3" : "") + " &\npid" + std::to_string(rank) + "=$!\n";
    }
    script += "wait $pid0 || status=$?\nwait $pid1 || status=$?\nexit $status\n";
    auto mixed = run_command(script, 120);
    CHECK(mixed.exit_code == 2);
    CHECK(contains(mixed.err, "rank 1 runs another recipe than rank 0"));
    CHECK(!fs::exists(ws.root / "mixed" / "checkpoints"));
  }

  // Another data-parallel size: the checkpoint of two replicas resumed by one process, and one
  // process's by two replicas. Every replica starts where no replica had read (4 steps x 4 samples),
  // and the steps go on as the uninterrupted runs' (fp32, other summation orders: close).
  fs::create_directories(ws.root / "one-then-two" / "checkpoints");
  fs::copy(ws.root / "one" / "checkpoints" / "step-0000004", ws.root / "one-then-two" / "checkpoints" / "step-0000004",
           fs::copy_options::recursive);
  auto longer = ws.train("one", sizes + " --set trainer.max_steps=8");
  REQUIRE_MESSAGE(longer.exit_code == 0, longer.err);
  fs::copy(ws.root / "two", ws.root / "two-then-one", fs::copy_options::recursive);
  auto alone = ws.train("two-then-one", sizes + " --set trainer.max_steps=8");
  REQUIRE_MESSAGE(alone.exit_code == 0, alone.err);
  CHECK(contains(alone.err, "the checkpoint was saved by 2 data-parallel replica(s), this run has 1: every replica "
                            "resumes at data position 16"));
  CHECK(!contains(alone.err, "read again"));
  const auto reference_losses = ws.losses("one"), resumed_alone = ws.losses("two-then-one");
  REQUIRE(reference_losses.size() == 8);
  REQUIRE(resumed_alone.size() == 8);
  for (std::size_t i = 4; i < 8; ++i) CHECK(std::stod(resumed_alone[i]) == doctest::Approx(std::stod(reference_losses[i])).epsilon(1e-5));
  auto from_converted = ws.train("converted", sizes + " --set trainer.max_steps=8");
  REQUIRE_MESSAGE(from_converted.exit_code == 0, from_converted.err);
  const auto converted_losses = ws.losses("converted");  // steps 5 to 8
  REQUIRE(converted_losses.size() == 4);
  for (std::size_t i = 0; i < 4; ++i) CHECK(converted_losses[i] == resumed_alone[4 + i]);
  auto replicas = launch("one-then-two", "--set trainer.max_steps=8");
  REQUIRE_MESSAGE(replicas.exit_code == 0, replicas.err);
  CHECK(contains(replicas.err, "the checkpoint was saved by 1 data-parallel replica(s), this run has 2: every replica "
                               "resumes at data position 16"));
  const auto tail = ws.losses("one-then-two");  // steps 5 to 8
  REQUIRE(tail.size() == 4);
  for (std::size_t i = 0; i < 4; ++i) CHECK(std::stod(tail[i]) == doctest::Approx(std::stod(reference_losses[4 + i])).epsilon(1e-5));
}

namespace {

std::string read_text(const fs::path& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// `neva-run ARGUMENTS` as two ranks started by the real torchrun of the venv (--no-python).
neva::test::CommandResult torchrun_two(const std::string& arguments) {
  const fs::path torchrun = neva::test::source_directory() / ".venv" / "bin" / "torchrun";
  REQUIRE(fs::exists(torchrun));
  return run_command(kNevaRunPrefix + torchrun.string() + " --no-python --standalone --nproc-per-node 2 " +
                         neva::test::binary("neva-run").string() + " " + arguments,
                     600);
}

// The worst relative difference between two runs' losses (as metrics.jsonl wrote them), which must
// have `steps` each.
double worst_relative_loss(const std::vector<std::string>& expected, const std::vector<std::string>& got,
                           std::size_t steps) {
  REQUIRE(expected.size() == steps);
  REQUIRE(got.size() == steps);
  double worst = 0;
  for (std::size_t i = 0; i < steps; ++i) {
    const double reference = std::stod(expected[i]);
    worst = std::max(worst, std::abs(std::stod(got[i]) - reference) / reference);
  }
  return worst;
}

// The largest difference between two runs' exports, which must hold the same names and shapes.
double export_difference(const fs::path& expected_run, const fs::path& got_run) {
  neva::SafetensorsCheckpoint got((got_run / "hf" / "model.safetensors").string());
  neva::SafetensorsCheckpoint expected((expected_run / "hf" / "model.safetensors").string());
  REQUIRE(got.names() == expected.names());
  double difference = 0;
  for (const auto& name : expected.names()) {
    const at::Tensor a = expected.tensor(name), b = got.tensor(name);
    REQUIRE_MESSAGE(a.sizes() == b.sizes(), name);
    difference = std::max(difference, (a - b).abs().max().item<double>());
  }
  return difference;
}

// Two `score` outputs: `requests` lines, the same log-probabilities within 1e-5.
void check_same_scores(const fs::path& expected_file, const fs::path& got_file, int requests) {
  std::ifstream a(expected_file), b(got_file);
  int lines = 0;
  for (std::string x, y; std::getline(a, x) && std::getline(b, y); ++lines) {
    const json expected = json::parse(x), got = json::parse(y);
    REQUIRE(got["token_logprobs"].size() == expected["token_logprobs"].size());
    for (std::size_t i = 0; i < expected["token_logprobs"].size(); ++i) {
      CHECK(std::abs(got["token_logprobs"][i].get<double>() - expected["token_logprobs"][i].get<double>()) < 1e-5);
    }
  }
  CHECK(lines == requests);
}

// Two score requests about the demo's test images, written into the workspace.
fs::path write_score_requests(const Workspace& ws) {
  const fs::path path = ws.root / "score-requests.jsonl";
  std::ofstream requests(path);
  requests << R"({"prompt": "What shape is in the image?", "image": "test/0.png", "continuation": "a red circle"})" << "\n"
           << R"({"prompt": "Where is the shape?", "image": "test/1.png", "continuation": "top left"})" << "\n";
  return path;
}

// The workspace's stage-2 recipe with another [model.mm_cfg.llm] table, saved as `name`; returns
// Workspace::train_arguments for it.
std::function<std::string(const std::string&, const std::string&)> with_llm(const Workspace& ws, const std::string& name,
                                                                            const std::string& llm_table) {
  std::string text = read_text(ws.root / "stage2.toml");
  const auto from = text.find("[model.mm_cfg.llm]"), to = text.find("[model.mm_cfg.vision_encoder]");
  REQUIRE(from != std::string::npos);
  REQUIRE(to != std::string::npos);
  text.replace(from, to - from, llm_table + "\n");
  std::ofstream(ws.root / name) << text;
  return [&ws, name](const std::string& run, const std::string& extra) {
    std::string arguments = ws.train_arguments(run, extra);
    const std::string original = (ws.root / "stage2.toml").string();
    return arguments.replace(arguments.find(original), original.size(), (ws.root / name).string());
  };
}

// Starts `neva-run --nproc-per-node 2` on run `run`, waits until rank 0 wrote a step, sends
// `signal` to the rank-1 worker, and waits for the launcher: its status, its stderr, the seconds
// from the signal to its end, and the two workers' pids.
struct WorkerFault {
  int status = -1;
  std::string err;
  double seconds = 0;
  std::vector<int> workers;
};
WorkerFault fault_one_worker(const Workspace& ws, const std::string& run, const std::string& overrides, int signal) {
  WorkerFault out;
  const fs::path log = ws.root / (run + ".launcher.err");
  neva::test::Process launcher(ws.train_command(run, "--set trainer.max_steps=100000 " + overrides) +
                               " --nproc-per-node 2 2> " + log.string());
  const fs::path metrics = ws.root / run / "metrics.jsonl";
  for (int i = 0; i < 600 && !(fs::exists(metrics) && fs::file_size(metrics) > 0); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  REQUIRE(fs::exists(metrics));
  std::istringstream pids(run_command("pgrep -P " + std::to_string(launcher.pid())).out);
  for (int pid; pids >> pid;) out.workers.push_back(pid);
  REQUIRE(out.workers.size() == 2);
  std::sort(out.workers.begin(), out.workers.end());  // rank 0 was started first
  const auto signalled_at = std::chrono::steady_clock::now();
  ::kill(out.workers[1], signal);
  out.status = launcher.wait(120);
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - signalled_at).count();
  out.err = read_text(log);
  return out;
}

}  // namespace

TEST_CASE("neva-run --nproc-per-node: a worker killed mid-run ends the launch at once, naming it, with no worker left") {
  Workspace ws;
  const WorkerFault fault = fault_one_worker(ws, "killed", "", SIGKILL);
  INFO("launcher stderr:\n" << fault.err);
  CHECK(fault.status == 128 + SIGKILL);  // the first failure's status
  CHECK(contains(fault.err, "worker 1 (rank 1 of 2) was killed by signal 9"));
  CHECK(contains(fault.err, "worker 0 (rank 0 of 2) exited with status 1"));  // its collective saw the peer gone
  // Its error, in its own log: whichever collective met the dead peer first (data.0 or world.0).
  const std::string rank0_log = read_text(ws.root / "killed" / "logs" / "rank-0.log");
  CHECK(contains(rank0_log, "error: process group '"));
  CHECK(contains(rank0_log, "(rank 0 of 2)"));
  CHECK(contains(rank0_log, "rank 1 stopped responding"));  // the survivor names the lost rank
  CHECK(fault.seconds < 60);
  for (int pid : fault.workers) CHECK(::kill(pid, 0) != 0);  // reaped: nothing left running
}

TEST_CASE("a stopped worker: the other fails within trainer.distributed_timeout_minutes, naming the group, and the launch ends") {
  Workspace ws;
  // Alive, holding its connections, answering nothing.
  const WorkerFault fault = fault_one_worker(ws, "stopped", "--set trainer.distributed_timeout_minutes=0.05", SIGSTOP);
  INFO("launcher stderr:\n" << fault.err);
  CHECK(fault.status == 1);
  CHECK(contains(fault.err, "(rank 0 of 2)"));
  // 0.05 minutes: our wait or Gloo's own (the group was created with the same timeout), whichever first.
  CHECK((contains(fault.err, "did not complete within 3000 ms") || contains(fault.err, "Timed out waiting 3000ms")));
  CHECK(contains(fault.err, "worker 0 (rank 0 of 2) exited with status 1"));
  CHECK(contains(fault.err, "rank 1 stopped responding"));
  CHECK(contains(fault.err, "worker 1 still running 30 s after a worker failed: killing it"));
  CHECK(fault.seconds < 90);
  for (int pid : fault.workers) CHECK(::kill(pid, 0) != 0);
}

TEST_CASE("tensor parallelism under torchrun: TP2, TP2 + SP and CP2 train what one process trains, resume, export, answer") {
  Workspace ws;
  // 20 fp32 steps of the demo's stage 2 (Llama 4 heads / 2 KV heads, hidden 128, FFN 384 + CLIP):
  // one process, and two ranks splitting every layer (the same global batch, one replica).
  const std::string sizes = "--set trainer.max_steps=20 --set model.micro_batch_size=2 --set model.global_batch_size=4 "
                            "--set exp_manager.export_hf=true";
  auto one = ws.train("one", sizes);
  REQUIRE_MESSAGE(one.exit_code == 0, one.err);
  const auto launch = &torchrun_two;
  const std::string tp2 = sizes + " --set model.tensor_model_parallel_size=2";
  auto split = launch(ws.train_arguments("tp2", tp2));
  REQUIRE_MESSAGE(split.exit_code == 0, split.err);
  auto sequence = launch(ws.train_arguments("tp2sp", tp2 + " --set model.sequence_parallel=true"));
  REQUIRE_MESSAGE(sequence.exit_code == 0, sequence.err);
  auto ring = launch(ws.train_arguments("cp2", sizes + " --set model.context_parallel_size=2"));
  REQUIRE_MESSAGE(ring.exit_code == 0, ring.err);
  const auto single = ws.losses("one"), tensor = ws.losses("tp2");
  // fp32 sums in another order (the split matmuls, the all-reduces): close, not bitwise.
  const double worst = std::max({worst_relative_loss(single, tensor, 20), worst_relative_loss(single, ws.losses("tp2sp"), 20),
                                 worst_relative_loss(single, ws.losses("cp2"), 20)});
  MESSAGE("20 fp32 steps, TP2, TP2 + SP and CP2 against one process: worst relative loss difference " << worst);
  CHECK(worst < 1e-6);
  std::ifstream metrics(ws.root / "tp2" / "metrics.jsonl"), reference(ws.root / "one" / "metrics.jsonl");
  for (std::string a, b; std::getline(metrics, a) && std::getline(reference, b);) {
    const json got = json::parse(a);
    CHECK(got["tokens"] == json::parse(b)["tokens"]);
    CHECK(got["tensor_model_parallel_size"] == 2);
    // The accounting: TP's all-reduces (forward g, backward f) on the tensor-parallel group.
    CHECK(got["communication"]["tensor"]["all_reduce"]["calls"].get<int>() > 8);
    CHECK(got["communication"]["tensor"]["all_reduce"]["bytes"].get<double>() > 0);
  }

  // Two data-parallel replicas, and with ZeRO-1 (distributed_fused_adam): the same 20 steps.
  auto replicas = launch(ws.train_arguments("dp2", sizes));
  REQUIRE_MESSAGE(replicas.exit_code == 0, replicas.err);
  auto zero = launch(ws.train_arguments("zero", sizes + " --set model.optim.name=distributed_fused_adam"));
  REQUIRE_MESSAGE(zero.exit_code == 0, zero.err);
  CHECK(contains(zero.err, "(ZeRO-1: 1/2 of it)"));
  const double worst_data =
      std::max(worst_relative_loss(single, ws.losses("dp2"), 20), worst_relative_loss(single, ws.losses("zero"), 20));
  MESSAGE("20 fp32 steps, DP2 and DP2 with ZeRO-1 against one process: worst relative loss difference " << worst_data);
  CHECK(worst_data < 1e-6);

  // A tensor-parallel size the heads do not split over: every rank refuses it, with the same words.
  auto three = run_command(kNevaRunPrefix + neva::test::binary("neva-run").string() + " --nproc-per-node 3 " +
                               ws.train_arguments("tp3", sizes + " --set model.tensor_model_parallel_size=3"),
                           300);
  CHECK(three.exit_code != 0);
  CHECK(contains(three.err, "4 attention heads do not split over 3 tensor-parallel ranks"));

  // The export holds whole tensors, as one process writes them (gathered from the shards).
  CHECK(export_difference(ws.root / "one", ws.root / "tp2") < 1e-4);

  // Stopped at step 10 and relaunched under TP2: bitwise the uninterrupted TP2 run. The checkpoint
  // holds whole tensors: one process resumes it too.
  auto first = launch(ws.train_arguments("resumed", tp2 + " --set trainer.exit_interval=10"));
  REQUIRE_MESSAGE(first.exit_code == 0, first.err);
  fs::copy(ws.root / "resumed", ws.root / "resharded", fs::copy_options::recursive);
  // The step-10 checkpoint converted offline into a TP2 x PP2 layout's files, then into TP2's.
  const fs::path step10 = ws.root / "resumed" / "checkpoints" / "step-0000010";
  auto to_four = neva_run("checkpoint convert " + step10.string() + " --to " + (ws.root / "tp2pp2-step").string() +
                          " --tp 2 --pp 2");
  REQUIRE_MESSAGE(to_four.exit_code == 0, to_four.err);
  CHECK(contains(to_four.out, "in the files of 4 ranks (tensor-parallel 2 x pipeline 2)"));
  auto to_two = neva_run("checkpoint convert " + (ws.root / "tp2pp2-step").string() + " --to " +
                         (ws.root / "converted" / "checkpoints" / "step-0000010").string() + " --tp 2");
  REQUIRE_MESSAGE(to_two.exit_code == 0, to_two.err);
  CHECK(contains(neva_run("checkpoint inspect " + (ws.root / "converted" / "checkpoints" / "step-0000010").string()).out,
                 "layout: 2 rank(s)"));
  auto second = launch(ws.train_arguments("resumed", tp2));
  REQUIRE_MESSAGE(second.exit_code == 0, second.err);
  CHECK(ws.losses("resumed") == tensor);
  // TP2 resumes from the converted checkpoint bit for bit as from its own.
  auto from_converted = launch(ws.train_arguments("converted", tp2));
  REQUIRE_MESSAGE(from_converted.exit_code == 0, from_converted.err);
  const auto converted_losses = ws.losses("converted");  // steps 11 to 20
  REQUIRE(converted_losses.size() == 10);
  for (std::size_t i = 0; i < 10; ++i) CHECK(converted_losses[i] == tensor[10 + i]);
  auto alone = ws.train("resharded", sizes);
  REQUIRE_MESSAGE(alone.exit_code == 0, alone.err);
  const auto resharded = ws.losses("resharded");
  REQUIRE(resharded.size() == 20);
  for (std::size_t i = 10; i < 20; ++i) CHECK(std::abs(std::stod(resharded[i]) - std::stod(tensor[i])) < 1e-5);

  // Generation and scoring over the TP2 export: two ranks give one process's tokens and scores.
  const std::string answer = (ws.root / "eval.toml").string() + " --set model.mm_cfg.llm.from_pretrained=" +
                             (ws.root / "tp2" / "hf").string() + " --set model.mm_cfg.vision_encoder.from_pretrained=" +
                             (ws.root / "tp2" / "hf").string() + " --set model.mm_cfg.mm_mlp_adapter.from_pretrained=" +
                             (ws.root / "tp2" / "hf").string() + " --set inference.input_file=" +
                             write_score_requests(ws).string();
  for (const std::string mode : {"generate", "score"}) {
    const std::string common = answer + " --set run.mode=" + mode;
    auto alone_run = neva_run(common + " --set inference.output_file=" + (ws.root / (mode + "-1.jsonl")).string());
    REQUIRE_MESSAGE(alone_run.exit_code == 0, alone_run.err);
    auto split_run = launch(common + " --set model.tensor_model_parallel_size=2 --set inference.output_file=" +
                            (ws.root / (mode + "-2.jsonl")).string());
    REQUIRE_MESSAGE(split_run.exit_code == 0, split_run.err);
    if (mode == "score") {
      check_same_scores(ws.root / "score-1.jsonl", ws.root / "score-2.jsonl", 2);
      continue;
    }
    std::ifstream a(ws.root / "generate-1.jsonl"), b(ws.root / "generate-2.jsonl");
    int lines = 0;
    for (std::string x, y; std::getline(a, x) && std::getline(b, y); ++lines) {
      CHECK(json::parse(y)["answer"] == json::parse(x)["answer"]);  // greedy: the same tokens
    }
    CHECK(lines == 2);
  }
  // Launched as more processes than the tensor-parallel group: refused, naming the sizes.
  auto too_many = launch(answer + " --set run.mode=generate");
  CHECK(too_many.exit_code != 0);  // torchrun reports its worker's failure as its own
  CHECK(contains(too_many.err, "2 processes were launched for model.tensor_model_parallel_size = 1"));
}

TEST_CASE("pipeline parallelism under torchrun: PP2 (1F1B) trains what one process trains, resumes alone, exports, answers") {
  Workspace ws;
  // 20 fp32 steps of the demo's stage 2 (2 decoder layers: one per stage; the vision tower and the
  // connector on stage 0), four micro-batches a step: one process, and two pipeline stages.
  const std::string sizes = "--set trainer.max_steps=20 --set model.micro_batch_size=1 --set model.global_batch_size=4 "
                            "--set exp_manager.export_hf=true";
  auto one = ws.train("one", sizes);
  REQUIRE_MESSAGE(one.exit_code == 0, one.err);
  const auto launch = &torchrun_two;
  const std::string pp2 = sizes + " --set model.pipeline_model_parallel_size=2";
  auto staged = launch(ws.train_arguments("pp2", pp2 + " --set trainer.exit_interval=10"));
  REQUIRE_MESSAGE(staged.exit_code == 0, staged.err);
  CHECK(contains(staged.err, "pipeline over 2 stages (1F1B)"));
  fs::copy(ws.root / "pp2", ws.root / "resharded", fs::copy_options::recursive);
  auto rest = launch(ws.train_arguments("pp2", pp2));  // stopped at step 10, relaunched
  REQUIRE_MESSAGE(rest.exit_code == 0, rest.err);
  const auto pipelined = ws.losses("pp2");
  const double worst = worst_relative_loss(ws.losses("one"), pipelined, 20);
  MESSAGE("20 fp32 steps, PP2 against one process: worst relative loss difference " << worst);
  CHECK(worst < 1e-6);
  // The PP2 checkpoint of step 10 holds every stage's tensors: one process resumes it.
  auto alone = ws.train("resharded", sizes);
  REQUIRE_MESSAGE(alone.exit_code == 0, alone.err);
  const auto resharded = ws.losses("resharded");
  REQUIRE(resharded.size() == 20);
  // PP2 computes what one process computes, bit for bit: so do the steps after the resharding load.
  for (std::size_t i = 10; i < 20; ++i) CHECK(resharded[i] == pipelined[i]);
  // The export: every stage's tensors, as one process writes them.
  CHECK(export_difference(ws.root / "one", ws.root / "pp2") < 1e-4);
  // Generation through the two stages: one process's answers.
  const std::string answer = (ws.root / "eval.toml").string() + " --set model.mm_cfg.llm.from_pretrained=" +
                             (ws.root / "pp2" / "hf").string() + " --set model.mm_cfg.vision_encoder.from_pretrained=" +
                             (ws.root / "pp2" / "hf").string() + " --set model.mm_cfg.mm_mlp_adapter.from_pretrained=" +
                             (ws.root / "pp2" / "hf").string();
  auto alone_answers = neva_run(answer + " --set inference.output_file=" + (ws.root / "answers-1.jsonl").string());
  REQUIRE_MESSAGE(alone_answers.exit_code == 0, alone_answers.err);
  auto staged_answers = launch(answer + " --set model.pipeline_model_parallel_size=2 --set inference.output_file=" +
                               (ws.root / "answers-2.jsonl").string());
  REQUIRE_MESSAGE(staged_answers.exit_code == 0, staged_answers.err);
  const std::string expected_answers = read_text(ws.root / "answers-1.jsonl");
  CHECK(!expected_answers.empty());
  CHECK(read_text(ws.root / "answers-2.jsonl") == expected_answers);
  // Scoring through the two stages: one process's log-probabilities.
  const std::string scoring = " --set run.mode=score --set inference.input_file=" + write_score_requests(ws).string();
  auto alone_scores = neva_run(answer + scoring + " --set inference.output_file=" + (ws.root / "scores-1.jsonl").string());
  REQUIRE_MESSAGE(alone_scores.exit_code == 0, alone_scores.err);
  auto staged_scores = launch(answer + scoring + " --set model.pipeline_model_parallel_size=2 "
                                       "--set inference.output_file=" + (ws.root / "scores-2.jsonl").string());
  REQUIRE_MESSAGE(staged_scores.exit_code == 0, staged_scores.err);
  check_same_scores(ws.root / "scores-1.jsonl", ws.root / "scores-2.jsonl", 2);
  // Interleaved 1F1B: a 4-layer Llama of the recipe's seed (configs/parallel/models), two chunks per
  // stage: 20 fp32 steps as one process and as PP2 x 2 chunks.
  const auto deep_arguments = with_llm(ws, "stage2-deep.toml",
                                       "[model.mm_cfg.llm]\nplugin = \"llama\"\nconfig = \"" +
                                           (neva::test::source_directory() / "configs" / "parallel" / "models" /
                                            "llama-4-layers" / "config.json")
                                               .string() +
                                           "\"\nfreeze = false\n");
  auto deep = [&](const std::string& run, const std::string& extra) {
    return deep_arguments(run, extra + " --set exp_manager.export_hf=false");
  };
  const std::string four_layers = "--set trainer.max_steps=20 --set model.micro_batch_size=1 --set model.global_batch_size=4";
  auto deep_one = neva_run(deep("deep-one", four_layers));
  REQUIRE_MESSAGE(deep_one.exit_code == 0, deep_one.err);
  auto interleaved = launch(deep("deep-pp2-v2", four_layers + " --set model.pipeline_model_parallel_size=2 "
                                                                "--set model.virtual_pipeline_model_parallel_size=2"));
  REQUIRE_MESSAGE(interleaved.exit_code == 0, interleaved.err);
  CHECK(contains(interleaved.err, "pipeline over 2 stages (2 chunks each, interleaved 1F1B)"));
  const double worst_interleaved = worst_relative_loss(ws.losses("deep-one"), ws.losses("deep-pp2-v2"), 20);
  MESSAGE("20 fp32 steps, PP2 interleaved (v = 2) against one process: worst relative loss difference " << worst_interleaved);
  CHECK(worst_interleaved < 1e-6);
  // Layers that do not split into the chunks: refused on every rank before any work.
  auto uneven = neva_run("--nproc-per-node 2 " + ws.train_arguments("uneven", pp2 + " --set model.virtual_pipeline_model_parallel_size=2"));
  CHECK(uneven.exit_code != 0);
  const std::string refusal = "2 decoder layers do not split evenly into 4 pipeline chunks (pipeline_model_parallel_size x "
                              "virtual_pipeline_model_parallel_size); give model.pipeline_layer_split";
  const auto first_refusal = uneven.err.find(refusal);
  CHECK(first_refusal != std::string::npos);
  CHECK(uneven.err.find(refusal, first_refusal + 1) != std::string::npos);  // each rank says it
  CHECK(!fs::exists(ws.root / "uneven" / "metrics.jsonl"));
}

TEST_CASE("a worker that raises: the other fails within the timeout and names it with its error") {
  Workspace ws;
  // Rank 1 cannot open its log (a directory stands where the file goes): it raises before joining.
  fs::create_directories(ws.root / "raised" / "logs" / "rank-1.log");
  auto result = neva_run("--nproc-per-node 2 " + ws.train_arguments("raised", "--set trainer.max_steps=2 "
                                                                      "--set trainer.distributed_timeout_minutes=0.1"));
  INFO("stderr:\n" << result.err);
  CHECK(result.exit_code == 1);
  CHECK(contains(result.err, "worker 1 (rank 1 of 2) exited with status 1"));
  const std::string rank0_log = read_text(ws.root / "raised" / "logs" / "rank-0.log");
  CHECK(contains(rank0_log, "error: process group '"));
  CHECK(contains(rank0_log, "rank 1 failed first: " + (ws.root / "raised" / "logs" / "rank-1.log").string() +
                                ": cannot open this rank's log"));
}

TEST_CASE("expert parallelism under torchrun: a Mixtral over EP2 trains what one process trains, exports and answers") {
  Workspace ws;
  // The demo's stage 2 with a tiny Mixtral (4 experts, top 2) of the demo tokenizer's vocabulary.
  const json llama = json::parse(std::ifstream(ws.root / "model" / "llm" / "config.json"));
  fs::create_directories(ws.root / "mixtral");
  std::ofstream(ws.root / "mixtral" / "config.json")
      << json{{"model_type", "mixtral"}, {"vocab_size", llama["vocab_size"]}, {"hidden_size", 64},
              {"intermediate_size", 128}, {"num_hidden_layers", 2}, {"num_attention_heads", 4},
              {"num_key_value_heads", 2}, {"max_position_embeddings", 256}, {"num_local_experts", 4},
              {"num_experts_per_tok", 2}, {"router_aux_loss_coef", 0.02}, {"bos_token_id", 1}, {"eos_token_id", 2}}
             .dump();
  const auto arguments = with_llm(ws, "stage2-mixtral.toml",
                                  "[model.mm_cfg.llm]\nplugin = \"mixtral\"\nconfig = \"mixtral/config.json\"\nfreeze = false\n");
  // Micro-batches of one sample: the load-balancing loss depends on how tokens are grouped into
  // micro-batches, and the replicas group the global batch's samples otherwise than one process.
  const std::string sizes = "--set trainer.max_steps=20 --set model.micro_batch_size=1 --set model.global_batch_size=4 "
                            "--set exp_manager.export_hf=true";
  auto one = neva_run(arguments("one", sizes));
  REQUIRE_MESSAGE(one.exit_code == 0, one.err);
  const auto launch = &torchrun_two;
  auto split = launch(arguments("ep2", sizes + " --set model.expert_model_parallel_size=2"));
  REQUIRE_MESSAGE(split.exit_code == 0, split.err);
  const double worst = worst_relative_loss(ws.losses("one"), ws.losses("ep2"), 20);
  MESSAGE("20 fp32 steps, EP2 against one process: worst relative loss difference " << worst);
  CHECK(worst < 1e-6);
  // The export has every expert, gathered from both ranks.
  neva::SafetensorsCheckpoint exported((ws.root / "ep2" / "hf" / "model.safetensors").string());
  for (int e = 0; e < 4; ++e) {
    CHECK(exported.contains("language_model.model.layers.1.block_sparse_moe.experts." + std::to_string(e) + ".w2.weight"));
  }
  // Generation over the EP2 export: two ranks (each with two experts) give one process's answers.
  const std::string answer = (ws.root / "eval.toml").string() + " --set model.mm_cfg.llm.plugin=mixtral" +
                             " --set model.mm_cfg.llm.from_pretrained=" + (ws.root / "ep2" / "hf").string() +
                             " --set model.mm_cfg.vision_encoder.from_pretrained=" + (ws.root / "ep2" / "hf").string() +
                             " --set model.mm_cfg.mm_mlp_adapter.from_pretrained=" + (ws.root / "ep2" / "hf").string();
  auto alone = neva_run(answer + " --set inference.output_file=" + (ws.root / "answers-1.jsonl").string());
  REQUIRE_MESSAGE(alone.exit_code == 0, alone.err);
  auto pair = launch(answer + " --set model.expert_model_parallel_size=2 --set inference.output_file=" +
                     (ws.root / "answers-2.jsonl").string());
  REQUIRE_MESSAGE(pair.exit_code == 0, pair.err);
  const std::string a = read_text(ws.root / "answers-1.jsonl"), b = read_text(ws.root / "answers-2.jsonl");
  CHECK(!a.empty());
  CHECK(a == b);
  // A model without experts under expert parallelism: refused on every rank, naming the key.
  auto dense = launch(ws.train_arguments("dense", sizes + " --set model.expert_model_parallel_size=2"));
  CHECK(dense.exit_code != 0);
  CHECK(contains(dense.err, "expert_model_parallel_size = 2 needs a mixture-of-experts language model"));
  // Token dropping (moe_expert_capacity_factor = 0.5: at most half of the even share per expert):
  // one process and EP2 train, and each step's metrics count the assignments dropped (all ranks').
  const std::string dropping = " --set trainer.max_steps=2 --set model.micro_batch_size=1 --set model.global_batch_size=4"
                               " --set model.mm_cfg.llm.moe_expert_capacity_factor=0.5";
  for (const std::string layout : {"one", "ep2"}) {
    const std::string run = "dropping-" + layout;
    auto dropped = layout == "one" ? neva_run(arguments(run, dropping))
                                   : launch(arguments(run, dropping + " --set model.expert_model_parallel_size=2"));
    REQUIRE_MESSAGE(dropped.exit_code == 0, dropped.err);
    std::ifstream in(ws.root / run / "metrics.jsonl");
    int steps = 0;
    for (std::string line; std::getline(in, line); ++steps) {
      const json item = json::parse(line);
      REQUIRE(item.contains("moe_dropped_assignments"));
      CHECK(item["moe_dropped_assignments"].get<std::int64_t>() > 0);
    }
    CHECK(steps == 2);
  }
  // Without experts there is nothing to drop: the key is refused.
  auto no_experts = neva_run(ws.train_arguments("dense-drop", "--set model.mm_cfg.llm.moe_expert_capacity_factor=1.0"));
  CHECK(no_experts.exit_code == 2);
  CHECK(contains(no_experts.err, "model.mm_cfg.llm.moe_expert_capacity_factor: this Llama model has no experts"));
}

TEST_CASE("every recipe in configs/parallel trains two steps as four processes (neva-run --nproc-per-node 4)") {
  Workspace ws;
  const fs::path configs = neva::test::source_directory() / "configs" / "parallel";
  int recipes = 0;
  for (const auto& entry : fs::directory_iterator(configs)) {
    if (entry.path().extension() != ".toml") continue;
    ++recipes;
    const std::string name = entry.path().stem().string();
    // The recipes read ./neva-demo (the repository root's): here the workspace's copy of it.
    const std::string demo = ws.root.string();
    std::string overrides = " --set trainer.max_steps=2 --set model.optim.sched.warmup_steps=1 "
                            "--set exp_manager.export_hf=false --set exp_manager.explicit_log_dir=" +
                            (ws.root / ("parallel-" + name)).string() + " --set model.tokenizer.model=" + demo +
                            "/model/tokenizer --set model.data.data_path=" + demo +
                            "/data/stage2.json --set model.data.image_folder=" + demo +
                            "/data/images --set model.mm_cfg.vision_encoder.from_pretrained=" + demo + "/model/vision";
    if (read_text(entry.path()).find("neva-demo/model/llm") != std::string::npos) {
      overrides += " --set model.mm_cfg.llm.from_pretrained=" + demo + "/model/llm";
    }
    auto result = neva_run("--nproc-per-node 4 " + entry.path().string() + overrides);
    INFO(name << ": " << result.err);
    CHECK(result.exit_code == 0);
    CHECK(ws.losses("parallel-" + name).size() == 2);
  }
  CHECK(recipes >= 7);
}
