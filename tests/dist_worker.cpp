// One rank of the distributed proofs: joins the world from the launcher's environment (torchrun's
// or our own launch), forms a Gloo process group over all ranks and checks every operation of
// neva's c10d layer against its known result. Prints one line per check ("rank R/N <check> ok");
// exits 3 when a check is wrong, 1 on an error.
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/types.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <iostream>
#include <limits>
#include <string>

#include "neva/error.h"
#include "neva/parallel/mappings.h"
#include "neva/parallel/process_group.h"
#include "neva/recipe.h"
#include "neva/parallel/rank_grid.h"
#include "neva/parallel_strategy.h"
#include "neva/precision_recipe.h"
#include "neva/registry.h"
#include "neva/model/decoder.h"
#include "neva/model/llava.h"
#include "neva/train/checkpoints.h"
#include "neva/train/distributed_checkpoint.h"
#include "neva/train/loss.h"
#include "neva/train/hf_export.h"
#include "neva/train/trainer.h"
#include "float64_precision.h"
#include "random_sample.h"
#include "tiny_decoder.h"

namespace {

int failures = 0;

void report(const neva::World& world, const std::string& check, bool ok) {
  std::cout << "rank " << world.rank << "/" << world.size << " " << check << (ok ? " ok" : " WRONG") << std::endl;
  if (!ok) ++failures;
}

// rank r holds r * 10 + [0, 1, ..., n-1], as float64 (what the parallel tests compare in).
at::Tensor ramp(int rank, std::int64_t n) {
  return torch::arange(n, at::kDouble) + static_cast<double>(rank * 10);
}

// `groups TP PP CP EP`: the megatron parallel-strategy plugin (from the install directory) builds
// every group; each rank all-reduces its global rank over each one and checks the sum and size
// against the layout computed here. Prints "rank R/N group <kind> ok".
int check_groups(const neva::World& world, char** sizes_text) {
  neva::ParallelSizes sizes;
  sizes.tensor = std::stoi(sizes_text[0]);
  sizes.pipeline = std::stoi(sizes_text[1]);
  sizes.context = std::stoi(sizes_text[2]);
  sizes.expert = std::stoi(sizes_text[3]);
  neva::Registry::Options options;
  options.use_environment = false;
  neva::Registry registry(options);
  neva::ConfigDocument document = neva::ConfigDocument::parse("", "groups test");
  auto config = registry.parse_config(neva::ParallelStrategy::kKind, "megatron", document.root());
  auto strategy = registry.create<neva::ParallelStrategy>("megatron", *config, neva::RuntimeContext());
  const c10::Device cpu(c10::DeviceType::CPU);
  neva::ParallelGroups groups = strategy->build_groups(world, sizes, cpu);
  const neva::GroupLayout layout = neva::GroupLayout::megatron(world.size, sizes);
  const std::pair<const char*, std::pair<std::shared_ptr<neva::ProcessGroup>*, const neva::RankGroups*>> kinds[] = {
      {"tensor", {&groups.tensor, &layout.tensor}},
      {"pipeline", {&groups.pipeline, &layout.pipeline}},
      {"data", {&groups.data, &layout.data}},
      {"context", {&groups.context, &layout.context}},
      {"expert", {&groups.expert, &layout.expert}},
      {"expert_data", {&groups.expert_data, &layout.expert_data}},
      {"tensor_and_data", {&groups.tensor_and_data, &layout.tensor_and_data}},
      {"data_and_context", {&groups.data_and_context, &layout.data_and_context}},
      {"tensor_and_expert", {&groups.tensor_and_expert, &layout.tensor_and_expert}},
      {"embedding", {&groups.embedding, &layout.embedding}},
      {"position_embedding", {&groups.position_embedding, &layout.position_embedding}},
      {"world", {&groups.world, &layout.world}}};
  for (const auto& [kind, pair] : kinds) {
    const auto& [group, expected_groups] = pair;
    std::vector<int> members{world.rank};  // not a member of any: "this rank alone"
    for (const auto& candidate : *expected_groups) {
      if (std::find(candidate.begin(), candidate.end(), world.rank) != candidate.end()) members = candidate;
    }
    double expected = 0;
    for (int rank : members) expected += rank;
    at::Tensor value = torch::tensor({static_cast<double>(world.rank)});
    if (*group) (*group)->all_reduce(value).wait(std::chrono::seconds(60));
    const bool ok = neva::group_size(*group) == static_cast<int>(members.size()) && value.item<double>() == expected &&
                    (!*group || (*group)->global_ranks() == members);
    report(world, std::string("group ") + kind, ok);
  }
  // The trainer's schedule follows from the pipeline group: sequential without one, 1F1B with one.
  auto text = [](const neva::Schedule& schedule) {
    std::string out;
    for (const auto& pass : schedule.order(4)) {
      out += (pass.forward ? "F" : "B") + std::to_string(pass.chunk) + "." + std::to_string(pass.micro_batch) + " ";
    }
    return out;
  };
  const std::string expected_schedule =
      sizes.pipeline > 1 ? text(*neva::pipeline_schedule(static_cast<int>(sizes.pipeline), neva::group_rank(groups.pipeline), 1))
                         : text(*neva::sequential_schedule());
  report(world, "schedule", text(*neva::schedule_for(groups)) == expected_schedule);
  return failures ? 3 : 0;
}

// `dp_train`: data parallelism against one process, in float64. Every rank builds the same tiny
// MoE decoder (one seed) twice: a reference trainer that runs every micro-batch of the global batch,
// and a data-parallel one (context.groups.data = the world) that runs this rank's share (micro-batches
// rank, rank + n, ...) and syncs with the trainer's default all-reduce. After each of two steps
// the losses, the synced gradients and the updated weights must agree within 1e-10. Micro-batches
// differ in length and labelled tokens, so a per-replica mean instead of the global one would show.
neva::TrainingSample dp_sample(std::int64_t length, std::int64_t seed) {
  return neva::test::random_sample(length, seed, (length * (seed % 3 + 1)) / 5);  // uneven prompts
}

int check_data_parallel(const neva::World& world) {
  const c10::Device cpu(c10::DeviceType::CPU);
  std::vector<int> everyone;
  for (int rank = 0; rank < world.size; ++rank) everyone.push_back(rank);
  std::shared_ptr<neva::ProcessGroup> group = neva::new_group(world, "dp", everyone, cpu);
  neva::test::Float64 precision;
  struct Replica {
    neva::RuntimeContext context = neva::RuntimeContext::seeded(3);
    std::unique_ptr<neva::LlavaModel> model;
    std::unique_ptr<neva::Trainer> trainer;
    std::map<std::string, at::Tensor> gradients;
  };
  // The overlapped replica's buckets are small (many, started while the backward pass runs); the
  // plain one has the same buckets, reduced after the backward pass; the whole one reduces one.
  // The mixed policy stands for megatron_amp_O2 (weights in a lower precision than the optimizer's
  // main weights: here fp32 weights, fp64 main weights), whose gradients reach the buckets through
  // their hooks and whose ZeRO-1 keeps main-weight copies.
  const neva::DTypePolicy mixed{at::kFloat, at::kFloat, at::kDouble};
  auto make = [&](Replica& r, std::shared_ptr<neva::ProcessGroup> data, bool overlap, std::int64_t bucket_bytes,
                  bool zero = false, bool o2 = false, const char* mlp = "moe") {
    r.context.dtypes = o2 ? mixed : precision.dtype_policy();
    r.context.groups.world = data;  // the data-parallel group is the world here
    r.context.groups.data = std::move(data);
    auto backbone = std::make_shared<neva::DecoderBackbone>(neva::test::tiny_decoder(mlp), r.context);
    r.model = std::make_unique<neva::LlavaModel>(nullptr, nullptr, backbone, -1);
    neva::TrainerOptions options;
    options.optim.lr = 1e-3;
    options.optim.max_steps = 10;
    options.title = "dp";
    options.collective_timeout = std::chrono::seconds(60);
    options.gradient_buckets.overlap = overlap;
    options.gradient_buckets.bucket_bytes = bucket_bytes;
    options.optim.distributed = zero;
    options.optim.clip_grad = 0.05;  // clipping active: the norm must be the whole model's
    r.trainer = std::make_unique<neva::Trainer>(*r.model, precision, r.context, options);
    r.trainer->gradients_ready = [&r](std::vector<neva::TrainedTensor>& trained) {
      const std::vector<at::Tensor> gradients = r.trainer->gradients();  // ZeRO-1: gathered from the shares
      for (std::size_t i = 0; i < trained.size(); ++i) r.gradients[trained[i].name] = gradients[i];
    };
  };
  Replica reference, overlapped, plain, whole, zero;
  make(reference, nullptr, false, 0);
  make(overlapped, group, true, 16 << 10);
  make(plain, group, false, 16 << 10);
  make(whole, group, false, std::int64_t{1} << 30);
  make(zero, group, true, 16 << 10, /*zero=*/true);  // ZeRO-1: distributed_fused_adam
  report(world, "dp zero-1 shards the optimizer state",
         zero.trainer->distributed_optimizer() &&
             zero.trainer->optimizer_state_bytes() * world.size < 2 * plain.trainer->optimizer_state_bytes());
  std::cout << "rank " << world.rank << " optimizer state: replicated " << plain.trainer->optimizer_state_bytes()
            << " bytes, ZeRO-1 " << zero.trainer->optimizer_state_bytes() << " bytes" << std::endl;
  const int micro_batches = 2 * world.size;
  double worst_loss = 0, worst_gradient = 0, worst_weight = 0, overlap_difference = 0;
  bool overlap_seen = true, once_per_step = true;
  for (int step = 0; step < 2; ++step) {
    std::vector<neva::TrainingBatch> all, mine;
    for (int m = 0; m < micro_batches; ++m) {
      const std::int64_t seed = 100 * step + m;
      all.push_back(neva::collate({dp_sample(9 + 3 * m, seed), dp_sample(6 + m, seed + 50)}, false, 0));
      if (m % world.size == world.rank) mine.push_back(all.back());
    }
    const double expected = reference.trainer->train_step(all).loss;
    const auto before = group->traffic();
    const neva::StepReport got = overlapped.trainer->train_step(mine);
    const auto after = group->traffic();
    const double plain_loss = plain.trainer->train_step(mine).loss;
    const double whole_loss = whole.trainer->train_step(mine).loss;
    const double zero_loss = zero.trainer->train_step(mine).loss;
    worst_loss = std::max({worst_loss, std::abs(expected - got.loss), std::abs(expected - plain_loss),
                           std::abs(expected - whole_loss), std::abs(expected - zero_loss)});
    // Buckets started during the backward pass; all-reduces once per step, not per micro-batch: one
    // per bucket, plus the step's labelled-token count and its loss.
    overlap_seen = overlap_seen && got.gradient_sync.buckets > 2 && got.gradient_sync.started_in_backward > 0;
    auto calls = [](const neva::TrafficByOperation& traffic) {
      auto found = traffic.find("all_reduce");
      return found == traffic.end() ? std::int64_t{0} : found->second.calls;
    };
    once_per_step = once_per_step && calls(after) - calls(before) == got.gradient_sync.buckets + 2;
    for (const auto& [name, gradient] : reference.gradients) {
      worst_gradient = std::max({worst_gradient, (gradient - overlapped.gradients.at(name)).abs().max().item<double>(),
                                 (gradient - plain.gradients.at(name)).abs().max().item<double>(),
                                 (gradient - whole.gradients.at(name)).abs().max().item<double>(),
                                 (gradient - zero.gradients.at(name)).abs().max().item<double>()});
      overlap_difference =
          std::max(overlap_difference, (overlapped.gradients.at(name) - plain.gradients.at(name)).abs().max().item<double>());
    }
    for (std::size_t i = 0; i < reference.trainer->trained().size(); ++i) {
      const at::Tensor& a = reference.trainer->trained()[i].main;
      worst_weight = std::max({worst_weight, (a - overlapped.trainer->trained()[i].main).abs().max().item<double>(),
                               (a - plain.trainer->trained()[i].main).abs().max().item<double>(),
                               (a - whole.trainer->trained()[i].main).abs().max().item<double>(),
                               (a - zero.trainer->trained()[i].main).abs().max().item<double>()});
    }
  }
  std::cout << "rank " << world.rank << " worst differences: loss " << worst_loss << ", gradient " << worst_gradient
            << ", weight " << worst_weight << "; overlapped against plain buckets " << overlap_difference << std::endl;
  report(world, "dp loss", worst_loss < 1e-10);
  report(world, "dp gradients", worst_gradient < 1e-10 && !reference.gradients.empty());
  report(world, "dp weights", worst_weight < 1e-10);
  report(world, "dp overlapped buckets equal the plain reduction bitwise", overlap_difference == 0);
  report(world, "dp buckets start during the backward pass", overlap_seen);
  report(world, "dp one reduction per step, none per micro-batch", once_per_step);
  // O2's paths: fp32 weights with fp64 main weights, replicated and ZeRO-1, against one process with
  // the same policy (fp32 sums in another order: close, not equal).
  {
    Replica alone, replicated, sharded;
    make(alone, nullptr, false, 0, false, true);
    make(replicated, group, true, 16 << 10, false, true);
    make(sharded, group, true, 16 << 10, true, true);
    double loss = 0, weight = 0;
    for (int step = 0; step < 2; ++step) {
      std::vector<neva::TrainingBatch> all, mine;
      for (int m = 0; m < micro_batches; ++m) {
        all.push_back(neva::collate({dp_sample(9 + 2 * m, 300 + 10 * step + m)}, false, 0));
        if (m % world.size == world.rank) mine.push_back(all.back());
      }
      const double expected = alone.trainer->train_step(all).loss;
      loss = std::max({loss, std::abs(expected - replicated.trainer->train_step(mine).loss),
                       std::abs(expected - sharded.trainer->train_step(mine).loss)});
      for (std::size_t i = 0; i < alone.trainer->trained().size(); ++i) {
        const at::Tensor a = alone.trainer->trained()[i].param.to(at::kDouble);
        weight = std::max({weight, (a - replicated.trainer->trained()[i].param.to(at::kDouble)).abs().max().item<double>(),
                           (a - sharded.trainer->trained()[i].param.to(at::kDouble)).abs().max().item<double>()});
      }
    }
    std::cout << "rank " << world.rank << " O2-style worst differences: loss " << loss << ", weight " << weight << std::endl;
    report(world, "dp O2-style main copies, replicated and ZeRO-1",
           replicated.trainer->main_copies() && sharded.trainer->distributed_optimizer() && loss < 1e-5 && weight < 1e-5);
  }
  // Gradient accumulation under data parallelism equals one process's single bigger micro-batch
  // (a dense decoder: an MoE's load-balancing loss depends on how tokens are grouped, as in
  // transformers and Megatron).
  {
    Replica big, accumulated;
    make(big, nullptr, false, 0, false, false, "gated");
    make(accumulated, group, true, 16 << 10, false, false, "gated");
    double loss = 0, weight = 0;
    for (int step = 0; step < 2; ++step) {
      std::vector<neva::TrainingSample> every;
      std::vector<neva::TrainingBatch> mine;
      for (int m = 0; m < micro_batches; ++m) {
        const neva::TrainingSample s = dp_sample(8 + 3 * m, 500 + 10 * step + m);
        every.push_back(s);
        if (m % world.size == world.rank) mine.push_back(neva::collate({s}, false, 0));
      }
      loss = std::max(loss, std::abs(big.trainer->train_step({neva::collate(every, false, 0)}).loss -
                                     accumulated.trainer->train_step(mine).loss));
      for (std::size_t i = 0; i < big.trainer->trained().size(); ++i) {
        weight = std::max(weight, (big.trainer->trained()[i].main - accumulated.trainer->trained()[i].main).abs().max().item<double>());
      }
    }
    std::cout << "rank " << world.rank << " accumulation against one micro-batch: loss " << loss << ", weight " << weight
              << std::endl;
    report(world, "dp accumulation equals one bigger micro-batch", loss < 1e-10 && weight < 1e-10);
  }
  // ZeRO-1's state saved and restored into a fresh trainer: the next step as the original's.
  {
    const char* port = std::getenv("MASTER_PORT");  // the same directory on every rank
    const std::filesystem::path dir =
        std::filesystem::temp_directory_path() / ("neva-zero-" + std::string(port ? port : "0"));
    std::filesystem::create_directories(dir);
    const nlohmann::json content = zero.trainer->save(dir, {0});  // each rank its share
    if (world.rank == 0) neva::CheckpointManager::write_manifest(dir, 1, content);
    group->barrier().wait();
    Replica resumed;
    make(resumed, group, true, 16 << 10, /*zero=*/true);
    resumed.trainer->restore(dir);
    std::vector<neva::TrainingBatch> mine;
    for (int m = 0; m < micro_batches; ++m) {
      if (m % world.size == world.rank) mine.push_back(neva::collate({dp_sample(7 + m, 900 + m)}, false, 0));
    }
    const double original = zero.trainer->train_step(mine).loss, again = resumed.trainer->train_step(mine).loss;
    double weights = 0;
    for (std::size_t i = 0; i < zero.trainer->trained().size(); ++i) {
      weights = std::max(weights, (zero.trainer->trained()[i].main - resumed.trainer->trained()[i].main).abs().max().item<double>());
    }
    report(world, "dp zero-1 resumes exactly", original == again && weights == 0);
    group->barrier().wait();
    if (world.rank == 0) std::filesystem::remove_all(dir);
  }
  return failures ? 3 : 0;
}

// Named tensors with every expert's (expert parallelism: each rank holds some experts).
std::vector<std::pair<std::string, at::Tensor>> with_all_experts(const std::vector<std::pair<std::string, at::Tensor>>& local,
                                                                 const std::shared_ptr<neva::ProcessGroup>& experts) {
  if (neva::group_size(experts) == 1) return local;
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& entry : local) {
    if (neva::nn::expert_index(entry.first) < 0) out.push_back(entry);
  }
  for (auto& entry : neva::nn::gather_experts(local, experts)) out.push_back(std::move(entry));
  return out;
}

// `tp_train LAYOUT`: tensor (and sequence) parallelism against one process, in float64. LAYOUT is
// "tpT[-sp][-moe|-kv1][-tied][-zero][-recompute][-packed][-ppP[-vV]]" (or "epE...", "cpC...",
// "ppP..."): T tensor-parallel ranks (the rest of the world data-parallel), P pipeline stages of V
// chunks each (1F1B, interleaved when V > 1; what a checkpoint gathers checked too), sequence parallelism, a Mixtral-style MoE backbone or a Llama with one KV head
// (replicated over the group), tied embeddings, ZeRO-1 over the data-parallel ranks, full activation
// recomputation, packed rows (segments).
// Every rank builds, through the recipe and the plugins, a tiny LLaVA (Llama or Mixtral + CLIP +
// mlp2x_gelu, everything trained) twice from one seed: alone, and split over the megatron plugin's
// groups. Two steps over micro-batches of odd lengths, with and without an image: the losses, every
// gradient and every updated weight (gathered from the shards) must equal the single process's
// within 1e-10, and the vision tower's and connector's gradients must be identical on every rank of a
// tensor-parallel group.
int check_tensor_parallel(const neva::World& world, const std::string& layout, const std::string& reload = "") {
  namespace fs = std::filesystem;
  // "tpN..." or "epN..." (expert parallelism, a Mixtral backbone).
  const bool expert_layout = layout.rfind("ep", 0) == 0;
  const bool context_layout = layout.rfind("cp", 0) == 0;
  const bool pipeline_layout = layout.rfind("pp", 0) == 0;
  const int tp = expert_layout || context_layout || pipeline_layout ? 1 : std::stoi(layout.substr(2));
  // "...-ppN" or "ppN...": pipeline parallelism over N stages; "-vV": V chunks per stage (interleaved).
  const auto pp_at = layout.find("pp");
  const int pp = pp_at == std::string::npos ? 1 : std::stoi(layout.substr(pp_at + 2));
  const auto v_at = layout.find("-v");
  const int virtual_chunks = v_at == std::string::npos ? 1 : std::stoi(layout.substr(v_at + 2));
  // RELOAD: a second layout of the same model and world ("tpT[-sp][-zero][-ppP[-vV]]", "epE", "cpC",
  // "ppP..."), which reads what LAYOUT saves.
  struct Sizes {
    int tp = 1, ep = 1, pp = 1, v = 1, cp = 1;
    bool sp = false, zero = false;
  };
  auto sizes_of = [](const std::string& text) {
    Sizes out;
    auto after = [&text](const std::string& key, int fallback) {
      const auto at = text.find(key);
      return at == std::string::npos ? fallback : std::stoi(text.substr(at + key.size()));
    };
    if (text.rfind("tp", 0) == 0) out.tp = std::stoi(text.substr(2));
    if (text.rfind("ep", 0) == 0) out.ep = std::stoi(text.substr(2));
    out.pp = after("pp", 1);
    out.v = after("-v", 1);
    out.cp = after("cp", 1);
    out.sp = text.find("-sp") != std::string::npos;
    out.zero = text.find("-zero") != std::string::npos;
    return out;
  };
  const Sizes second = sizes_of(reload.empty() ? layout : reload);
  const int layers = std::max({2, pp * virtual_chunks, second.pp * second.v});
  const int ep = expert_layout ? std::stoi(layout.substr(2)) : 1;
  // "...-cpN" or "cpN...": context parallelism over N ranks.
  const auto cp_at = layout.find("cp");
  const int cp = cp_at == std::string::npos ? 1 : std::stoi(layout.substr(cp_at + 2));
  const bool sp = layout.find("-sp") != std::string::npos;
  const bool moe = expert_layout || layout.find("-moe") != std::string::npos;
  const bool one_kv_head = layout.find("-kv1") != std::string::npos;
  const bool zero = layout.find("-zero") != std::string::npos;  // ZeRO-1 over the data-parallel ranks
  const bool tied = layout.find("-tied") != std::string::npos;  // the LM head is the embedding
  const bool recompute = layout.find("-recompute") != std::string::npos;  // full activation recomputation
  const bool packed = layout.find("-packed") != std::string::npos;  // each micro-batch one packed row
  struct Scratch {  // removed however the check ends
    fs::path path = fs::temp_directory_path() / ("neva-tp-" + std::to_string(::getpid()));
    Scratch() { fs::create_directories(path); }
    ~Scratch() { std::error_code ignored; fs::remove_all(path, ignored); }
  } scratch;
  const fs::path& dir = scratch.path;
  auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream((dir / name).string()) << text;
  };
  // A vocabulary of 97 (odd: padded under tensor parallelism), 4 heads.
  write("llm.json", std::string("{\"model_type\": \"") + (moe ? "mixtral" : "llama") +
                        "\", \"vocab_size\": 97, \"hidden_size\": 32, \"intermediate_size\": 64, "
                        "\"num_hidden_layers\": " + std::to_string(layers) + ", \"num_attention_heads\": 4, \"num_key_value_heads\": " +
                        (one_kv_head ? "1" : "2") +
                        ", \"max_position_embeddings\": 256, \"num_local_experts\": 4, \"num_experts_per_tok\": 2, "
                        "\"router_aux_loss_coef\": 0.02, \"tie_word_embeddings\": " + (tied ? "true" : "false") + "}");
  write("clip.json", "{\"model_type\": \"clip_vision_model\", \"hidden_size\": 16, \"intermediate_size\": 32, "
                     "\"num_hidden_layers\": 2, \"num_attention_heads\": 2, \"image_size\": 28, \"patch_size\": 14}");
  auto recipe_text = [&](int tp, bool sp, int ep, int pp = 1, int v = 1) {
    return "[run]\nmode = \"inspect\"\nseed = 11\n[model]\ntensor_model_parallel_size = " + std::to_string(tp) +
      "\nexpert_model_parallel_size = " + std::to_string(ep) +
      "\npipeline_model_parallel_size = " + std::to_string(pp) +
      "\nvirtual_pipeline_model_parallel_size = " + std::to_string(v) +
      (recompute ? "\nactivations_checkpoint_granularity = \"full\"" : "") +
      "\nsequence_parallel = " + (sp ? "true" : "false") +
      "\nmake_vocab_size_divisible_by = 8\n[model.mm_cfg]\nmm_mlp_adapter_type = \"mlp2x_gelu\"\n"
      "image_token_index = 96\n[model.mm_cfg.llm]\nplugin = \"" + (moe ? "mixtral" : "llama") +
      "\"\nconfig = \"" + (dir / "llm.json").string() +
      "\"\n[model.mm_cfg.vision_encoder]\nplugin = \"clip\"\nconfig = \"" + (dir / "clip.json").string() + "\"\n"
      "freeze = false\n";
  };
  neva::Registry::Options options;
  options.use_environment = false;
  const neva::Recipe alone = neva::parse_recipe(neva::ConfigDocument::parse(recipe_text(1, false, 1), "tp test"), dir, options);
  neva::Recipe split = neva::parse_recipe(
      neva::ConfigDocument::parse(recipe_text(tp, sp, ep, pp, virtual_chunks), "tp test"), dir, options);
  split.model.parallel.context = cp;  // (a recipe takes it in train mode only; this one is inspect's)
  std::optional<neva::Recipe> other;
  if (!reload.empty()) {
    other = neva::parse_recipe(
        neva::ConfigDocument::parse(recipe_text(second.tp, second.sp, second.ep, second.pp, second.v), "tp test"), dir, options);
    other->model.parallel.context = second.cp;
  }
  neva::test::Float64 precision;
  struct Replica {
    neva::RuntimeContext context;
    std::unique_ptr<neva::LlavaModel> model;
    std::unique_ptr<neva::Trainer> trainer;
    std::map<std::string, at::Tensor> gradients;  // whole, after the step's synchronisation
  };
  auto make = [&](Replica& r, const neva::Recipe& recipe, const neva::World& in) {
    r.context = recipe.runtime_context(in);
    r.context.dtypes = precision.dtype_policy();
    r.context.sequence_parallel = recipe.model.parallel.sequence_parallel;  // what a train recipe's context has
    r.model = std::make_unique<neva::LlavaModel>(neva::build_model(recipe, r.context));
    neva::TrainerOptions trainer_options;
    trainer_options.optim.lr = 1e-3;
    trainer_options.optim.max_steps = 10;
    trainer_options.optim.clip_grad = 0.05;  // clipping active: the gradient norm must be the whole model's
    trainer_options.optim.distributed = (zero && &recipe == &split) || (other && &recipe == &*other && second.zero);
    trainer_options.title = "tp";
    trainer_options.collective_timeout = std::chrono::seconds(60);
    r.trainer = std::make_unique<neva::Trainer>(*r.model, precision, r.context, trainer_options);
    r.trainer->gradients_ready = [&r](std::vector<neva::TrainedTensor>& trained) {
      const std::vector<at::Tensor> gradients = r.trainer->gradients();  // ZeRO-1: gathered from the shares
      std::vector<std::pair<std::string, at::Tensor>> whole;
      for (std::size_t i = 0; i < trained.size(); ++i) {
        whole.emplace_back(trained[i].name, neva::nn::unshard(gradients[i], trained[i].sharding, r.context.groups.tensor).clone());
      }
      // Pipeline parallelism: every stage's on the first; the others keep their own.
      for (auto& [name, tensor] : neva::nn::gather_pipeline_stages(with_all_experts(whole, r.context.groups.expert),
                                                                   r.context.groups.pipeline)) {
        r.gradients[name] = tensor;
      }
    };
  };
  Replica reference, parallel;
  make(reference, alone, neva::World());
  make(parallel, split, world);
  const int dp = neva::group_size(parallel.context.groups.data), dp_rank = neva::group_rank(parallel.context.groups.data);
  const bool first_stage = neva::group_rank(parallel.context.groups.pipeline) == 0;
  report(world, "tp groups", neva::group_size(parallel.context.groups.tensor) == tp && dp * tp * cp * pp == world.size &&
                                 neva::group_size(parallel.context.groups.pipeline) == pp &&
                                 neva::group_size(parallel.context.groups.expert) == ep &&
                                 neva::group_size(parallel.context.groups.context) == cp);
  auto sample = [](std::int64_t length, std::int64_t seed, bool image) {
    neva::TrainingSample s = neva::test::random_sample(length, seed, length / 3);
    for (auto& id : s.input_ids) id = std::min<std::int64_t>(id, 95);  // 96 is the image placeholder
    for (std::size_t i = 0; i < s.labels.size(); ++i) {
      if (s.labels[i] != neva::kIgnoreIndex) s.labels[i] = s.input_ids[i];
    }
    if (image) {  // 4 placeholders after two text tokens, an image [3, 28, 28]
      for (int i = 2; i < 6; ++i) {
        s.input_ids[i] = 96;
        s.labels[i] = neva::kIgnoreIndex;
      }
      s.images.push_back(torch::randn({3, 28, 28}, neva::make_generator(seed + 7), at::kFloat));
    }
    return s;
  };
  double worst_loss = 0, worst_gradient = 0, worst_weight = 0, vision_spread = 0;
  const int micro_batches = 2 * dp;
  for (int step = 0; step < 2; ++step) {
    std::vector<neva::TrainingBatch> all, mine;
    for (int m = 0; m < micro_batches; ++m) {
      const std::int64_t seed = 100 * step + m;
      all.push_back(neva::collate({sample(11 + 2 * m, seed, m % 2 == 0), sample(8 + m, seed + 50, false)}, packed, 0));
      if (m == 0 && step == 1) {  // one row, no padding and no mask: plain causal attention (the fast path)
        all.back() = neva::collate({sample(13, seed, true)}, false, 0);
        all.back().attention_mask = at::Tensor();
      }
      if (m % dp == dp_rank) mine.push_back(all.back());
    }
    const double expected = reference.trainer->train_step(all).loss;
    const double got = parallel.trainer->train_step(mine).loss;
    worst_loss = std::max(worst_loss, std::abs(expected - got));
    for (const auto& [name, gradient] : reference.gradients) {
      if (!first_stage && !parallel.gradients.count(name)) continue;  // another stage's (the first has all)
      if (!gradient.sizes().equals(parallel.gradients.at(name).sizes())) {
        throw neva::Error(name + ": gradient shaped " + c10::str(parallel.gradients.at(name).sizes()) + ", expected " +
                          c10::str(gradient.sizes()));
      }
      const double difference = (gradient - parallel.gradients.at(name)).abs().max().item<double>();
      if (difference > 1e-10 && world.rank == 0) std::cout << "gradient of " << name << " differs by " << difference << std::endl;
      worst_gradient = std::max(worst_gradient, difference);
      // The replicated vision side: bitwise the same gradient on every rank of the group.
      if (name.rfind("llm.", 0) == 0) continue;
      const at::Tensor mine_grad = parallel.gradients.at(name).reshape({1, -1});
      const at::Tensor every = neva::all_gather_along(parallel.context.groups.tensor, mine_grad, 0);
      vision_spread = std::max(vision_spread, (every - mine_grad).abs().max().item<double>());
    }
    std::vector<std::pair<std::string, at::Tensor>> weights;
    for (const auto& t : parallel.trainer->trained()) {
      weights.emplace_back(t.name, neva::nn::unshard(t.main.detach(), t.sharding, parallel.context.groups.tensor));
    }
    std::map<std::string, at::Tensor> updated;
    for (auto& [name, tensor] : neva::nn::gather_pipeline_stages(with_all_experts(weights, parallel.context.groups.expert),
                                                                 parallel.context.groups.pipeline)) {
      updated[name] = tensor;
    }
    for (const auto& t : reference.trainer->trained()) {
      if (!first_stage && !updated.count(t.name)) continue;
      worst_weight = std::max(worst_weight, (t.main - updated.at(t.name)).abs().max().item<double>());
    }
  }
  // What a checkpoint holds: every tensor whole (shards, stages and ZeRO-1 shares gathered), with its
  // AdamW moments, on the first stage. The largest difference between two such states (infinite when
  // their tensors differ in names or shapes).
  auto state_difference = [](const neva::Trainer::State& a, const neva::Trainer::State& b) {
    double worst = 0;
    for (const auto& [mine, theirs] : {std::pair{&a.weights, &b.weights}, std::pair{&a.moments, &b.moments}}) {
      std::map<std::string, at::Tensor> by_name;
      for (const auto& [name, tensor] : *theirs) {
        if (name.rfind("rng.", 0) != 0) by_name.emplace(name, tensor);
      }
      std::size_t compared = 0;
      for (const auto& [name, tensor] : *mine) {
        if (name.rfind("rng.", 0) == 0) continue;
        ++compared;
        const auto found = by_name.find(name);
        if (found == by_name.end() || !found->second.sizes().equals(tensor.sizes())) {
          std::cout << "checkpoint tensor " << name << " is missing or shaped otherwise" << std::endl;
          return std::numeric_limits<double>::infinity();
        }
        worst = std::max(worst, (found->second.to(at::kDouble) - tensor.to(at::kDouble)).abs().max().item<double>());
      }
      if (compared != by_name.size()) return std::numeric_limits<double>::infinity();
    }
    return worst;
  };
  const neva::Trainer::State expected = reference.trainer->gather_state();
  const neva::Trainer::State got = parallel.trainer->gather_state();
  report(world, layout + " checkpoint state", !first_stage || state_difference(expected, got) <= 1e-10);
  // The export's stream: rank 0 gets every language-model parameter whole, in any order (here the
  // reverse of the names'), from whichever ranks hold it, equal to one process's.
  {
    neva::WholeParameterStream stream(parallel.model->backbone(), parallel.context.groups, parallel.context.device);
    if (world.rank == 0) {
      std::map<std::string, at::Tensor> whole;
      for (const auto& item : reference.model->backbone().named_parameters()) whole.emplace(item.key(), item.value());
      bool same = stream.specs().size() == whole.size();
      double worst = 0;
      for (auto spec = stream.specs().rbegin(); same && spec != stream.specs().rend(); ++spec) {
        const auto found = whole.find(spec->name);
        same = found != whole.end() && found->second.sizes().equals(spec->shape) && found->second.scalar_type() == spec->dtype;
        if (!same) break;
        const at::Tensor tensor = stream.fetch(spec->name);
        same = tensor.sizes().equals(spec->shape);
        if (same) worst = std::max(worst, (tensor - found->second).abs().max().item<double>());
      }
      stream.finish();
      std::cout << "rank 0 " << layout << " export stream: " << stream.specs().size() << " tensors, largest difference "
                << worst << std::endl;
      report(world, layout + " export stream", same && worst <= 1e-10);
    } else {
      stream.serve();
      report(world, layout + " export stream", true);
    }
  }
  // Distributed checkpoints: what this layout saves, one process reads back, and what one process
  // saves, this layout reads back — every tensor and moment exactly (resharding moves bytes only).
  {
    const char* port = std::getenv("MASTER_PORT");
    const fs::path shared = fs::temp_directory_path() / ("neva-dcp-" + std::string(port ? port : "0"));
    const fs::path from_layout = shared / "layout", from_one = shared / "one";
    auto barrier = [&] {
      if (parallel.context.groups.world) parallel.context.groups.world->barrier().wait();
    };
    if (world.rank == 0) {
      fs::create_directories(from_layout);
      fs::create_directories(from_one);
    }
    barrier();
    const nlohmann::json content = parallel.trainer->save(from_layout, {0});
    if (world.rank == 0) {
      neva::CheckpointManager::write_manifest(from_layout, 2, content);
      neva::CheckpointManager::write_manifest(from_one, 2, reference.trainer->save(from_one, {0}));
    }
    barrier();
    Replica read_alone, read_split;
    make(read_alone, alone, neva::World());
    make(read_split, split, world);
    read_alone.trainer->restore(from_layout);
    read_split.trainer->restore(from_one);
    const double to_one = state_difference(got, read_alone.trainer->gather_state());
    const neva::Trainer::State resharded = read_split.trainer->gather_state();
    const double to_layout = first_stage ? state_difference(expected, resharded) : 0;
    std::cout << "rank " << world.rank << " " << layout << " checkpoint round trips: to one process " << to_one
              << ", from one process " << to_layout << std::endl;
    report(world, layout + " distributed checkpoint read by one process", !first_stage || to_one == 0);
    report(world, layout + " one process's checkpoint read by this layout", to_layout == 0);
    if (other) {  // straight from this layout to another
      Replica read_other;
      make(read_other, *other, world);
      read_other.trainer->restore(from_layout);
      const neva::Trainer::State resharded_state = read_other.trainer->gather_state();
      const bool complete = neva::group_rank(read_other.context.groups.pipeline) == 0;
      const double difference = complete ? state_difference(read_alone.trainer->gather_state(), resharded_state) : 0;
      std::cout << "rank " << world.rank << " " << layout << " then " << reload << ": difference " << difference << std::endl;
      report(world, layout + " then " + reload + " checkpoint resharded", difference == 0);
      // The same checkpoint converted offline into the other layout's files (checkpoint convert
      // --tp --pp): that layout reads the same state from it.
      const fs::path converted = shared / "converted";
      if (world.rank == 0) neva::reshard_checkpoint(neva::CheckpointReader(from_layout), converted, second.tp, second.pp);
      barrier();
      Replica read_converted;
      make(read_converted, *other, world);
      read_converted.trainer->restore(converted);
      const neva::Trainer::State converted_state = read_converted.trainer->gather_state();  // a collective
      const double converted_difference = complete ? state_difference(resharded_state, converted_state) : 0;
      report(world, layout + " converted offline for " + reload, converted_difference == 0);
    }
    barrier();
    if (world.rank == 0) fs::remove_all(shared);
  }
  // Greedy decoding with the KV cache (generation runs without sequence or context parallelism).
  if (!sp && cp == 1) {
    auto greedy = [&](Replica& r) {
      at::NoGradGuard no_grad;
      auto cache = r.model->backbone().new_cache(1, 32);
      std::vector<std::int64_t> tokens;
      at::Tensor ids = torch::tensor({{5, 17, 33, 2, 60, 71, 9}}, at::kLong);
      for (int i = 0; i < 8; ++i) {
        neva::MultimodalInputs inputs;
        inputs.input_ids = ids;
        inputs.cache = cache.get();
        const at::Tensor logits = r.model->forward(inputs).logits;
        const std::int64_t next = logits.select(1, logits.size(1) - 1).argmax(-1).item<std::int64_t>();
        tokens.push_back(next);
        ids = torch::tensor({{next}}, at::kLong);
      }
      return tokens;
    };
    report(world, layout + " greedy tokens", greedy(reference) == greedy(parallel));
  }
  std::cout << "rank " << world.rank << " " << layout << " worst differences: loss " << worst_loss << ", gradient "
            << worst_gradient << ", weight " << worst_weight << ", vision gradients across the group " << vision_spread
            << std::endl;
  report(world, layout + " loss", worst_loss < 1e-10);
  report(world, layout + " gradients", worst_gradient < 1e-10 && !reference.gradients.empty());
  report(world, layout + " weights", worst_weight < 1e-10);
  report(world, layout + " vision gradients identical", vision_spread == 0);
  return failures ? 3 : 0;
}

// `fp8_train LAYOUT` ("tpT", the rest of the world data-parallel): the fp8 recipe (hybrid, delayed
// scaling, history 3, "max", over fp32) on the tiny decoder, split over the megatron plugin's groups,
// against the same model alone on the whole global batch (four micro-batches; each data-parallel
// replica its share). Transformer Engine's amax reduction: after every step each layer's scaling state
// is identical on every rank of the tensor x data group; after the first step each weight's amax
// (the whole weight's: the largest of the shards') and so its scale equal one process's bitwise, and
// after three steps every role's scale is within 1e-3 of one process's, the losses within 1e-3
// (FP8 rounding turns the layouts' last-bit differences into steps of an FP8 unit).
int check_fp8(const neva::World& world, const std::string& layout) {
  neva::Registry::Options options;
  options.use_environment = false;
  neva::Registry registry(options);
  const neva::ConfigDocument document = neva::ConfigDocument::parse(
      "[model]\nfp8 = true\nfp8_hybrid = true\nfp8_amax_history_len = 3\nfp8_amax_compute_algo = \"max\"\n", "fp8 test");
  auto recipe = registry.create<neva::PrecisionRecipe>(
      "fp8:32", *registry.parse_config(neva::PrecisionRecipe::kKind, "fp8:32", document.root().section("model")),
      neva::RuntimeContext());
  auto strategy_config = registry.parse_config(neva::ParallelStrategy::kKind, "megatron",
                                               neva::ConfigDocument::parse("", "fp8 test").root());
  auto strategy = registry.create<neva::ParallelStrategy>("megatron", *strategy_config, neva::RuntimeContext());
  neva::ParallelSizes sizes;
  sizes.tensor = std::stoi(layout.substr(2));
  const neva::ParallelGroups groups = strategy->build_groups(world, sizes, c10::Device(c10::DeviceType::CPU));
  struct Run {
    neva::RuntimeContext context = neva::RuntimeContext::seeded(5);
    std::shared_ptr<neva::DecoderBackbone> backbone;
    std::unique_ptr<neva::LlavaModel> model;
    std::unique_ptr<neva::Trainer> trainer;
    std::map<std::string, std::vector<std::pair<std::string, at::Tensor>>> states() const {
      std::map<std::string, std::vector<std::pair<std::string, at::Tensor>>> out;
      for (auto& [path, layer] : neva::nn::linear_layers(*backbone)) {
        if (layer->kernel()) out[path] = layer->kernel()->state();
      }
      return out;
    }
  };
  auto build = [&](Run& run, const neva::ParallelGroups* split) {
    run.context.dtypes = recipe->dtype_policy();
    if (split) run.context.groups = *split;
    run.backbone = std::make_shared<neva::DecoderBackbone>(neva::test::tiny_decoder(), run.context);
    recipe->prepare(*run.backbone, run.context);
    run.model = std::make_unique<neva::LlavaModel>(nullptr, nullptr, run.backbone, -1);
    neva::TrainerOptions trainer_options;
    trainer_options.optim.lr = 1e-3;
    trainer_options.optim.max_steps = 10;
    trainer_options.source = "fp8 test";
    run.trainer = std::make_unique<neva::Trainer>(*run.model, *recipe, run.context, trainer_options);
  };
  Run alone, split;
  build(alone, nullptr);
  build(split, &groups);
  const int replicas = neva::group_size(groups.data), replica = neva::group_rank(groups.data);
  double worst_loss = 0, worst_scale = 0;
  bool consistent = true, first_weights_equal = true;
  for (int step = 0; step < 3; ++step) {
    std::vector<neva::TrainingBatch> all, mine;
    for (int m = 0; m < 4; ++m) {
      neva::TrainingBatch batch = neva::collate({neva::test::random_sample(10 + 3 * m + step, 100 * step + m, 3)}, false, 0);
      if (m % replicas == replica) mine.push_back(batch);
      all.push_back(std::move(batch));
    }
    const double expected = alone.trainer->train_step(all).loss;
    const double got = split.trainer->train_step(mine).loss;
    worst_loss = std::max(worst_loss, std::abs(got - expected) / std::abs(expected));
    const auto reference = alone.states(), mine_states = split.states();
    for (const auto& [path, state] : mine_states) {
      const auto& other = reference.at(path);
      for (std::size_t i = 0; i < state.size(); ++i) {
        const at::Tensor value = state[i].second.to(at::kDouble).reshape({-1});
        at::Tensor largest = value.clone(), smallest = -value;
        groups.tensor_and_data->all_reduce(largest, neva::ReduceOp::Max).wait();
        groups.tensor_and_data->all_reduce(smallest, neva::ReduceOp::Max).wait();
        consistent = consistent && at::equal(largest, value) && at::equal(-smallest, value);
        const std::string& name = state[i].first;
        if (step == 0 && name.find("fp8_weight_") == 0) {
          first_weights_equal = first_weights_equal && at::equal(state[i].second, other[i].second);
        }
        if (step == 2 && name.size() > 6 && name.substr(name.size() - 6) == "_scale") {
          const double a = state[i].second.item<double>(), b = other[i].second.item<double>();
          worst_scale = std::max(worst_scale, std::abs(a - b) / std::abs(b));
        }
      }
    }
  }
  std::cout << "rank " << world.rank << " fp8 " << layout << " worst relative differences: loss " << worst_loss
            << ", scale " << worst_scale << std::endl;
  report(world, "fp8 " + layout + " scaling state identical over the tensor x data group", consistent);
  report(world, "fp8 " + layout + " first step's weight amaxes and scales equal one process's", first_weights_equal);
  report(world, "fp8 " + layout + " scales", worst_scale < 1e-3);
  report(world, "fp8 " + layout + " loss", worst_loss < 1e-3);
  return failures ? 3 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    neva::World world = neva::World::from_environment(std::chrono::seconds(60));
    if (argc == 6 && std::string(argv[1]) == "groups") return check_groups(world, argv + 2);
    if (argc == 2 && std::string(argv[1]) == "dp_train") return check_data_parallel(world);
    if (argc == 3 && std::string(argv[1]) == "tp_train") return check_tensor_parallel(world, argv[2]);
    if (argc == 3 && std::string(argv[1]) == "fp8_train") return check_fp8(world, argv[2]);
    if (argc == 4 && std::string(argv[1]) == "tp_train") return check_tensor_parallel(world, argv[2], argv[3]);
    const int n = world.size, me = world.rank;
    std::vector<int> everyone(n);
    for (int rank = 0; rank < n; ++rank) everyone[rank] = rank;
    auto group = neva::new_group(world, "world", everyone, c10::Device(c10::DeviceType::CPU), std::chrono::seconds(60));
    report(world, "backend " + group->backend_name(), group->backend_name() == "gloo");

    // all_reduce: sum, max, avg.
    at::Tensor values = torch::tensor({1.0, 2.0, 3.0}) * static_cast<double>(me + 1);
    group->all_reduce(values, neva::ReduceOp::Sum).wait();
    report(world, "all_reduce sum", torch::equal(values, torch::tensor({1.0, 2.0, 3.0}) * (n * (n + 1) / 2.0)));
    at::Tensor biggest = torch::tensor({static_cast<double>(me)});
    group->all_reduce(biggest, neva::ReduceOp::Max).wait();
    report(world, "all_reduce max", biggest.item<double>() == n - 1);
    at::Tensor average = torch::tensor({static_cast<double>(me)});
    group->all_reduce(average, neva::ReduceOp::Avg).wait();
    report(world, "all_reduce avg", average.item<double>() == (n - 1) / 2.0);

    at::Tensor message = me == 0 ? torch::arange(4, at::kLong) : torch::zeros({4}, at::kLong);
    group->broadcast(message, 0).wait();
    report(world, "broadcast", torch::equal(message, torch::arange(4, at::kLong)));

    // all_gather into one tensor and into a list: every rank's ramp, in rank order.
    std::vector<at::Tensor> expected_parts;
    for (int rank = 0; rank < n; ++rank) expected_parts.push_back(ramp(rank, 3).reshape({1, 3}));
    const at::Tensor gathered_expected = torch::cat(expected_parts);
    at::Tensor gathered = torch::zeros({n, 3}, at::kDouble);
    group->all_gather_into_tensor(gathered, ramp(me, 3).reshape({1, 3})).wait();
    report(world, "all_gather_into_tensor", torch::equal(gathered, gathered_expected));
    std::vector<at::Tensor> parts;
    for (int rank = 0; rank < n; ++rank) parts.push_back(torch::zeros({3}, at::kDouble));
    group->all_gather(parts, ramp(me, 3)).wait();
    bool list_ok = true;
    for (int rank = 0; rank < n; ++rank) list_ok = list_ok && torch::equal(parts[rank], ramp(rank, 3));
    report(world, "all_gather", list_ok);

    // reduce_scatter: rank r receives rows [2r, 2r + 2) of the sum of every rank's ramp(rank, 2n).
    at::Tensor whole = ramp(me, 2 * n);
    at::Tensor share = torch::zeros({2}, at::kDouble);
    group->reduce_scatter_tensor(share, whole, neva::ReduceOp::Sum).wait();
    at::Tensor sum = torch::zeros({2 * n}, at::kDouble);
    for (int rank = 0; rank < n; ++rank) sum += ramp(rank, 2 * n);
    report(world, "reduce_scatter_tensor sum", torch::equal(share, sum.slice(0, 2 * me, 2 * me + 2)));
    group->reduce_scatter_tensor(share, whole, neva::ReduceOp::Avg).wait();
    report(world, "reduce_scatter_tensor avg", torch::allclose(share, sum.slice(0, 2 * me, 2 * me + 2) / n));

    // all_to_all_single with uneven splits: rank s sends (s + d + 1) rows valued s * 100 + d to rank d.
    std::vector<std::int64_t> in_splits, out_splits;
    std::vector<at::Tensor> outgoing, incoming;
    for (int peer = 0; peer < n; ++peer) {
      in_splits.push_back(me + peer + 1);
      out_splits.push_back(peer + me + 1);
      outgoing.push_back(torch::full({me + peer + 1, 2}, me * 100.0 + peer, at::kDouble));
      incoming.push_back(torch::full({peer + me + 1, 2}, peer * 100.0 + me, at::kDouble));
    }
    at::Tensor received = torch::zeros({torch::cat(incoming).size(0), 2}, at::kDouble);
    group->all_to_all_single(received, torch::cat(outgoing), out_splits, in_splits).wait();
    report(world, "all_to_all_single uneven", torch::equal(received, torch::cat(incoming)));
    at::Tensor even_in = torch::arange(n * 2, at::kDouble) + me * 1000.0, even_out = torch::zeros({n * 2}, at::kDouble);
    group->all_to_all_single(even_out, even_in).wait();
    std::vector<at::Tensor> even_expected;
    for (int peer = 0; peer < n; ++peer) {
      even_expected.push_back(torch::arange(2 * me, 2 * me + 2, at::kDouble) + peer * 1000.0);
    }
    report(world, "all_to_all_single even", torch::equal(even_out, torch::cat(even_expected)));

    // A ring: isend to the next rank, irecv from the previous, then the same as one batch.
    const int next = (me + 1) % n, previous = (me + n - 1) % n;
    at::Tensor mine = ramp(me, 4), from_previous = torch::zeros({4}, at::kDouble);
    neva::Work sent = group->isend(mine, next, 7);
    neva::Work got = group->irecv(from_previous, previous, 7);
    got.wait(std::chrono::seconds(30));
    sent.wait(std::chrono::seconds(30));
    report(world, "isend/irecv ring", torch::equal(from_previous, ramp(previous, 4)));
    at::Tensor batch_in = torch::zeros({4}, at::kDouble);
    std::vector<neva::P2POp> ops{{neva::P2POp::Kind::Send, ramp(me + 1, 4), next, 8},
                                 {neva::P2POp::Kind::Recv, batch_in, previous, 8}};
    group->batch_isend_irecv(ops).wait(std::chrono::seconds(30));
    report(world, "batch_isend_irecv ring", torch::equal(batch_in, ramp(previous + 1, 4)));

    // A receive nobody has sent yet times out with a clear error, and completes once it is sent.
    if (n >= 2 && me <= 1) {
      at::Tensor late = torch::zeros({2}, at::kDouble);
      if (me == 1) {
        neva::Work pending = group->irecv(late, 0, 99);
        std::string error;
        try {
          pending.wait(std::chrono::milliseconds(300));
        } catch (const neva::Error& timed_out) {
          error = timed_out.what();
        }
        report(world, "timeout", error.find("process group 'world' (rank 1 of " + std::to_string(n) +
                                            "): irecv did not complete within 300 ms") == 0);
        report(world, "not completed after the timeout", !pending.completed());
        world.store->set("timed_out", std::vector<std::uint8_t>{1});
        pending.wait(std::chrono::seconds(30));
        report(world, "completes once sent", torch::equal(late, torch::tensor({4.0, 2.0}, at::kDouble)));
      } else {
        world.store->wait({"timed_out"});
        at::Tensor value = torch::tensor({4.0, 2.0}, at::kDouble);
        group->isend(value, 1, 99).wait(std::chrono::seconds(30));
      }
    }
    // Misuse is refused before anything is sent.
    std::string refused;
    try {
      at::Tensor wrong = torch::zeros({n + 1, 3}, at::kDouble);
      (void)group->all_gather_into_tensor(wrong, torch::zeros({1, 3}, at::kDouble));
    } catch (const neva::Error& error) {
      refused = error.what();
    }
    report(world, "shape refused", refused.find("all_gather_into_tensor: expected the whole tensor to hold") !=
                                       std::string::npos);
    group->barrier().wait(std::chrono::seconds(60));
    return failures ? 3 : 0;
  } catch (const std::exception& error) {
    std::cerr << "dist_worker: " << error.what() << std::endl;
    return 1;
  }
}
