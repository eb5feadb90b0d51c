// One rank of the distributed proofs: joins the world from the launcher's environment (torchrun's
// or our own launch), forms a Gloo process group over all ranks and checks every operation of
// neva's c10d layer against its known result. Prints one line per check ("rank R/N <check> ok");
// exits 3 when a check is wrong, 1 on an error.
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <iostream>
#include <string>

#include "neva/error.h"
#include "neva/parallel/process_group.h"
#include "neva/parallel/rank_grid.h"
#include "neva/parallel_strategy.h"
#include "neva/registry.h"
#include "neva/model/decoder.h"
#include "neva/model/llava.h"
#include "neva/train/loss.h"
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
  // The trainer's schedule follows from the pipeline group: sequential without one, refused with one.
  bool refused = false;
  try {
    (void)neva::schedule_for(groups);
  } catch (const neva::Error& error) {
    refused = std::string(error.what()).find("1F1B") != std::string::npos;
  }
  report(world, "schedule", refused == (sizes.pipeline > 1));
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
  auto make = [&](Replica& r, std::shared_ptr<neva::ProcessGroup> data) {
    r.context.dtypes = precision.dtype_policy();
    r.context.groups.data = std::move(data);
    auto backbone = std::make_shared<neva::DecoderBackbone>(neva::test::tiny_decoder("moe"), r.context);
    r.model = std::make_unique<neva::LlavaModel>(nullptr, nullptr, backbone, -1);
    neva::TrainerOptions options;
    options.optim.lr = 1e-3;
    options.optim.max_steps = 10;
    options.title = "dp";
    options.collective_timeout = std::chrono::seconds(60);
    r.trainer = std::make_unique<neva::Trainer>(*r.model, precision, r.context, options);
    auto sync = r.trainer->sync_gradients;  // the default: set only for the data-parallel replica
    r.trainer->sync_gradients = [&r, sync](std::vector<neva::TrainedTensor>& trained) {
      if (sync) sync(trained);
      for (const auto& t : trained) r.gradients[t.name] = t.main.grad().detach().clone();
    };
  };
  Replica reference, replica;
  make(reference, nullptr);
  make(replica, group);
  report(world, "dp default sync", static_cast<bool>(replica.trainer->sync_gradients));
  const int micro_batches = 2 * world.size;
  double worst_loss = 0, worst_gradient = 0, worst_weight = 0;
  for (int step = 0; step < 2; ++step) {
    std::vector<neva::TrainingBatch> all, mine;
    for (int m = 0; m < micro_batches; ++m) {
      const std::int64_t seed = 100 * step + m;
      all.push_back(neva::collate({dp_sample(9 + 3 * m, seed), dp_sample(6 + m, seed + 50)}, false, 0));
      if (m % world.size == world.rank) mine.push_back(all.back());
    }
    const double expected = reference.trainer->train_step(all).loss;
    const double got = replica.trainer->train_step(mine).loss;
    worst_loss = std::max(worst_loss, std::abs(expected - got));
    for (const auto& [name, gradient] : reference.gradients) {
      worst_gradient = std::max(worst_gradient, (gradient - replica.gradients.at(name)).abs().max().item<double>());
    }
    for (std::size_t i = 0; i < reference.trainer->trained().size(); ++i) {
      const at::Tensor& a = reference.trainer->trained()[i].main;
      const at::Tensor& b = replica.trainer->trained()[i].main;
      worst_weight = std::max(worst_weight, (a - b).abs().max().item<double>());
    }
  }
  std::cout << "rank " << world.rank << " worst differences: loss " << worst_loss << ", gradient " << worst_gradient
            << ", weight " << worst_weight << std::endl;
  report(world, "dp loss", worst_loss < 1e-10);
  report(world, "dp gradients", worst_gradient < 1e-10 && !reference.gradients.empty());
  report(world, "dp weights", worst_weight < 1e-10);
  return failures ? 3 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    neva::World world = neva::World::from_environment(std::chrono::seconds(60));
    if (argc == 6 && std::string(argv[1]) == "groups") return check_groups(world, argv + 2);
    if (argc == 2 && std::string(argv[1]) == "dp_train") return check_data_parallel(world);
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
