#include "neva/parallel/process_group.h"

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <algorithm>
#include <functional>
#include <future>
#include <mutex>
#include <thread>
#include <cstdlib>
#include <optional>

#include "neva/context.h"
#include "neva/error.h"

namespace neva {

// Defined in distributed_nccl.cpp (kept apart: it pulls in the CUDA headers).
c10::intrusive_ptr<c10d::Backend> make_nccl_backend(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                                    std::chrono::milliseconds timeout);

namespace {

std::optional<std::string> env(const char* name) {
  const char* value = std::getenv(name);
  if (!value || !*value) return std::nullopt;
  return std::string(value);
}

int env_int(const char* name, int min, int max) {
  std::string text = *env(name);
  char* end = nullptr;
  errno = 0;
  long value = std::strtol(text.c_str(), &end, 10);
  if (errno || end == text.c_str() || *end || value < min || value > max) {
    throw Error("environment variable " + std::string(name) + "='" + text + "': expected an integer in [" +
                std::to_string(min) + ", " + std::to_string(max) + "]");
  }
  return static_cast<int>(value);
}

std::string require_env(const char* name, const char* launcher) {
  auto value = env(name);
  if (!value) {
    throw Error(std::string("environment variable ") + name + " is not set; " + launcher +
                " launches need MASTER_ADDR and MASTER_PORT (the host and port of rank 0's store)");
  }
  return *value;
}

// Under Slurm without MASTER_ADDR / MASTER_PORT: rank 0's host is the first of the job's nodes, and
// the port follows the job id as PyTorch Lightning chooses it (15000 + the id's last four digits), so
// every task of one job computes the same address without scontrol.
void derive_slurm_rendezvous(World& world) {
  if (!env("MASTER_ADDR")) {
    auto nodes = env("SLURM_JOB_NODELIST");
    if (!nodes) nodes = env("SLURM_NODELIST");
    if (nodes) world.master_addr = first_slurm_host(*nodes);
  }
  if (!env("MASTER_PORT") && env("SLURM_JOB_ID")) {
    const std::string id = *env("SLURM_JOB_ID");
    const std::string digits = id.size() > 4 ? id.substr(id.size() - 4) : id;
    if (!digits.empty() && std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) {
      world.master_port = 15000 + std::stoi(digits);
    }
  }
}

c10d::ReduceOp to_c10d(ReduceOp op) {
  switch (op) {
    case ReduceOp::Max: return c10d::ReduceOp::MAX;
    case ReduceOp::Min: return c10d::ReduceOp::MIN;
    default: return c10d::ReduceOp::SUM;  // Avg: Sum then divide (Gloo has no AVG)
  }
}

}  // namespace

std::string first_slurm_host(const std::string& nodelist) {
  // The first item at bracket depth 0 ("a[1-3],b" -> "a[1-3]"), then in each bracket the first
  // number of its first range, zero padding kept ("node[007-010]" -> "node007").
  auto bad = [&nodelist](const std::string& why) {
    return Error("SLURM_JOB_NODELIST='" + nodelist + "': " + why + " (expected Slurm's hostlist form, e.g. node[01-04,07])");
  };
  std::string host;
  int depth = 0;
  bool skipping = false;  // inside a bracket, past its first number
  for (char c : nodelist) {
    if (c == '[') {
      if (depth++ != 0) throw bad("nested brackets");
      skipping = false;
      continue;
    }
    if (c == ']') {
      if (depth-- != 1) throw bad("an unmatched ]");
      continue;
    }
    if (depth == 0 && c == ',') break;
    if (depth == 1) {
      if (c == '-' || c == ',') skipping = true;
      if (!skipping) host += c;
      continue;
    }
    host += c;
  }
  if (depth != 0) throw bad("an unclosed [");
  if (host.empty()) throw bad("no host");
  return host;
}

World::World() = default;
World::~World() = default;
World::World(const World&) = default;
World& World::operator=(const World&) = default;
World::World(World&&) noexcept = default;
World& World::operator=(World&&) noexcept = default;

int World::launched_size() {
  if (env("WORLD_SIZE") || env("RANK")) return env("WORLD_SIZE") ? env_int("WORLD_SIZE", 1, 1 << 20) : 1;
  if (env("SLURM_NTASKS") && env("SLURM_PROCID")) return env_int("SLURM_NTASKS", 1, 1 << 20);
  return 1;
}

World World::from_environment(std::chrono::milliseconds timeout) {
  World world;
  world.timeout = timeout;
  const char* launcher = nullptr;
  if (env("WORLD_SIZE") || env("RANK")) {
    launcher = "torchrun-style";
    if (!env("WORLD_SIZE") || !env("RANK")) throw Error("environment: RANK and WORLD_SIZE must be set together");
    world.size = env_int("WORLD_SIZE", 1, 1 << 20);
    world.rank = env_int("RANK", 0, world.size - 1);
    world.local_rank = env("LOCAL_RANK") ? env_int("LOCAL_RANK", 0, world.size - 1) : 0;
  } else if (env("SLURM_NTASKS") && env("SLURM_PROCID")) {
    launcher = "Slurm";
    world.size = env_int("SLURM_NTASKS", 1, 1 << 20);
    world.rank = env_int("SLURM_PROCID", 0, world.size - 1);
    world.local_rank = env("SLURM_LOCALID") ? env_int("SLURM_LOCALID", 0, world.size - 1) : 0;
  }
  if (world.size == 1) return world;

  if (std::string(launcher) == "Slurm") derive_slurm_rendezvous(world);
  if (world.master_addr.empty()) world.master_addr = require_env("MASTER_ADDR", launcher);
  if (world.master_port == 0) {
    require_env("MASTER_PORT", launcher);
    world.master_port = env_int("MASTER_PORT", 1, 65535);
  }
  c10d::TCPStoreOptions options;
  options.port = static_cast<std::uint16_t>(world.master_port);
  options.isServer = world.rank == 0;
  options.numWorkers = static_cast<std::size_t>(world.size);
  options.waitWorkers = true;
  options.timeout = timeout;
  try {
    world.store = c10::make_intrusive<c10d::TCPStore>(world.master_addr, options);
  } catch (const std::exception& error) {
    // Rank 0 holds the store: it failed to listen (the port in use) or its peers never came.
    std::string reason = error.what();
    reason = reason.substr(0, reason.find("\nException raised from"));  // c10's backtrace: not for users
    throw Error("rank " + std::to_string(world.rank) + " of " + std::to_string(world.size) +
                (world.rank == 0 ? ": cannot hold the rendezvous store on port " + std::to_string(world.master_port) +
                                       " (MASTER_PORT) for " + world.master_addr + " (MASTER_ADDR)"
                                 : ": cannot reach the rendezvous store at " + world.master_addr + ":" +
                                       std::to_string(world.master_port)) +
                ": " + reason);
  }
  return world;
}

struct ProcessGroup::Accounting {
  std::mutex mutex;
  TrafficByOperation traffic;
  void waited(const std::string& operation, double seconds) {
    std::lock_guard<std::mutex> lock(mutex);
    traffic[operation].seconds += seconds;
  }
};

struct Work::State {
  std::string what;  // "process group 'tp' (rank 0 of 2): all_gather"
  std::string operation;  // "all_gather"
  std::shared_ptr<ProcessGroup::Accounting> accounting;
  std::vector<c10::intrusive_ptr<c10d::Work>> parts;
  std::function<void()> then;  // run once, after a successful wait (Avg's division)
  // A timed wait waits on a thread of its own: c10d's timed waits end a Gloo send or receive for
  // good when they expire (and Gloo's isCompleted() only changes inside wait()), so they cannot
  // tell "not yet" from "failed" nor be waited again. The thread holds the parts, not the Work, and
  // ends when they complete or when the group's own timeout fails them.
  std::shared_future<void> waiter;
  bool done = false;
};

Work::Work() = default;
Work::Work(std::unique_ptr<State> state) : state_(std::move(state)) {}
Work::~Work() = default;
Work::Work(Work&&) noexcept = default;
Work& Work::operator=(Work&&) noexcept = default;

bool Work::completed() const {
  if (!state_ || state_->done) return true;
  if (state_->waiter.valid()) return state_->waiter.wait_for(std::chrono::seconds(0)) == std::future_status::ready;
  return std::all_of(state_->parts.begin(), state_->parts.end(), [](const auto& part) { return part->isCompleted(); });
}

void Work::wait(std::chrono::milliseconds timeout) {
  if (!state_ || state_->done) return;
  const auto started = std::chrono::steady_clock::now();
  struct Record {  // the time blocked here, however the wait ends
    State& state;
    std::chrono::steady_clock::time_point started;
    ~Record() {
      if (state.accounting) {
        state.accounting->waited(state.operation,
                                 std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
      }
    }
  } record{*state_, started};
  try {
    if (timeout == kNoTimeout && !state_->waiter.valid()) {
      for (auto& part : state_->parts) part->wait();
    } else {
      if (!state_->waiter.valid()) {
        auto promise = std::make_shared<std::promise<void>>();
        state_->waiter = promise->get_future().share();
        std::thread([parts = state_->parts, promise] {
          try {
            for (const auto& part : parts) part->wait();
            promise->set_value();
          } catch (...) {
            promise->set_exception(std::current_exception());
          }
        }).detach();
      }
      if (timeout != kNoTimeout && state_->waiter.wait_for(timeout) != std::future_status::ready) {
        throw Error(state_->what + " did not complete within " + std::to_string(timeout.count()) +
                    " ms (a peer that never joined it, or one that called another operation)");
      }
      state_->waiter.get();
    }
  } catch (const Error&) {
    throw;
  } catch (const std::exception& error) {
    throw Error(state_->what + " failed: " + error.what());
  }
  state_->done = true;
  if (state_->then) state_->then();
}

ProcessGroup::ProcessGroup(c10::intrusive_ptr<c10d::Backend> backend, std::string name, std::vector<int> global_ranks)
    : backend_(std::move(backend)), name_(std::move(name)), global_ranks_(std::move(global_ranks)),
      accounting_(std::make_shared<Accounting>()) {}

TrafficByOperation ProcessGroup::traffic() const {
  std::lock_guard<std::mutex> lock(accounting_->mutex);
  return accounting_->traffic;
}
ProcessGroup::~ProcessGroup() = default;

int ProcessGroup::rank() const { return backend_->getRank(); }
int ProcessGroup::size() const { return backend_->getSize(); }
std::string ProcessGroup::backend_name() const { return backend_->getBackendName(); }

Work ProcessGroup::make_work(const char* what, std::vector<c10::intrusive_ptr<c10d::Work>> parts,
                             std::function<void()> then, std::int64_t bytes) const {
  auto state = std::make_unique<Work::State>();
  state->what = "process group '" + name_ + "' (rank " + std::to_string(rank()) + " of " + std::to_string(size()) +
                "): " + what;
  state->operation = what;
  state->accounting = accounting_;
  {
    std::lock_guard<std::mutex> lock(accounting_->mutex);
    Traffic& traffic = accounting_->traffic[what];
    ++traffic.calls;
    traffic.bytes += bytes;
  }
  state->parts = std::move(parts);
  state->then = std::move(then);
  return Work(std::move(state));
}

namespace {

// Starts an operation; an error raised while starting it (a bad shape, a wrong device) names it.
template <class Fn>
c10::intrusive_ptr<c10d::Work> start(const ProcessGroup& group, const char* what, Fn&& fn) {
  try {
    return fn();
  } catch (const std::exception& error) {
    throw Error("process group '" + group.name() + "' (rank " + std::to_string(group.rank()) + " of " +
                std::to_string(group.size()) + "): " + what + " failed: " + error.what());
  }
}

void check_rows(const ProcessGroup& group, const char* what, const at::Tensor& whole, const at::Tensor& share) {
  if (whole.dim() == 0 || share.dim() == 0 || whole.size(0) != share.size(0) * group.size() ||
      whole.sizes().slice(1) != share.sizes().slice(1)) {
    throw Error("process group '" + group.name() + "' (rank " + std::to_string(group.rank()) + " of " +
                std::to_string(group.size()) + "): " + what + ": expected the whole tensor to hold " +
                std::to_string(group.size()) + " x the share's rows along dim 0, got " + c10::str(whole.sizes()) +
                " and " + c10::str(share.sizes()));
  }
}

std::int64_t bytes_of(const at::Tensor& tensor) {
  return tensor.numel() * static_cast<std::int64_t>(tensor.element_size());
}

void check_peer(const ProcessGroup& group, const char* what, int peer) {
  if (peer < 0 || peer >= group.size() || peer == group.rank()) {
    throw Error("process group '" + group.name() + "' (rank " + std::to_string(group.rank()) + " of " +
                std::to_string(group.size()) + "): " + what + ": peer " + std::to_string(peer) +
                " is not another rank of the group");
  }
}

}  // namespace

Work ProcessGroup::all_reduce(at::Tensor& tensor, ReduceOp op) {
  std::vector<at::Tensor> tensors{tensor};
  c10d::AllreduceOptions options;
  options.reduceOp = to_c10d(op);
  auto work = start(*this, "all_reduce", [&] { return backend_->allreduce(tensors, options); });
  std::function<void()> then;
  if (op == ReduceOp::Avg) then = [tensor, size = size()]() mutable { tensor.div_(size); };
  return make_work("all_reduce", {work}, std::move(then), bytes_of(tensor));
}

Work ProcessGroup::broadcast(at::Tensor& tensor, int root) {
  if (root < 0 || root >= size()) {
    throw Error("process group '" + name_ + "' (rank " + std::to_string(rank()) + " of " + std::to_string(size()) +
                "): broadcast: root " + std::to_string(root) + " is not a rank of the group");
  }
  std::vector<at::Tensor> tensors{tensor};
  c10d::BroadcastOptions options;
  options.rootRank = root;
  return make_work("broadcast", {start(*this, "broadcast", [&] { return backend_->broadcast(tensors, options); })},
                   nullptr, bytes_of(tensor));
}

Work ProcessGroup::barrier() {
  return make_work("barrier", {start(*this, "barrier", [&] { return backend_->barrier(); })});
}

Work ProcessGroup::all_gather_into_tensor(at::Tensor& output, const at::Tensor& input) {
  check_rows(*this, "all_gather_into_tensor", output, input);
  at::Tensor source = input;
  return make_work("all_gather_into_tensor",
                   {start(*this, "all_gather_into_tensor", [&] { return backend_->_allgather_base(output, source); })},
                   nullptr, bytes_of(output));
}

Work ProcessGroup::all_gather(std::vector<at::Tensor>& outputs, const at::Tensor& input) {
  if (static_cast<int>(outputs.size()) != size()) {
    throw Error("process group '" + name_ + "' (rank " + std::to_string(rank()) + " of " + std::to_string(size()) +
                "): all_gather: expected " + std::to_string(size()) + " output tensors, got " +
                std::to_string(outputs.size()));
  }
  std::vector<std::vector<at::Tensor>> gathered{outputs};
  std::vector<at::Tensor> inputs{input};
  return make_work("all_gather", {start(*this, "all_gather", [&] { return backend_->allgather(gathered, inputs); })},
                   nullptr, bytes_of(input) * size());
}

Work ProcessGroup::reduce_scatter_tensor(at::Tensor& output, const at::Tensor& input, ReduceOp op) {
  check_rows(*this, "reduce_scatter_tensor", input, output);
  at::Tensor source = input;
  c10d::ReduceScatterOptions options;
  options.reduceOp = to_c10d(op);
  auto work = start(*this, "reduce_scatter_tensor", [&] { return backend_->_reduce_scatter_base(output, source, options); });
  std::function<void()> then;
  if (op == ReduceOp::Avg) then = [output, size = size()]() mutable { output.div_(size); };
  return make_work("reduce_scatter_tensor", {work}, std::move(then), bytes_of(input));
}

Work ProcessGroup::all_to_all_single(at::Tensor& output, const at::Tensor& input,
                                     const std::vector<std::int64_t>& output_splits,
                                     const std::vector<std::int64_t>& input_splits) {
  auto check_splits = [&](const char* which, const std::vector<std::int64_t>& splits, const at::Tensor& tensor) {
    if (splits.empty()) return;
    std::int64_t rows = 0;
    for (auto split : splits) rows += split;
    if (static_cast<int>(splits.size()) != size() || tensor.dim() == 0 || rows != tensor.size(0) ||
        std::any_of(splits.begin(), splits.end(), [](std::int64_t split) { return split < 0; })) {
      throw Error("process group '" + name_ + "' (rank " + std::to_string(rank()) + " of " + std::to_string(size()) +
                  "): all_to_all_single: " + which + " splits " + c10::str(c10::IntArrayRef(splits)) + " must be " +
                  std::to_string(size()) + " non-negative row counts adding up to the tensor's " +
                  (tensor.dim() ? std::to_string(tensor.size(0)) : std::string("0")) + " rows");
    }
  };
  check_splits("output", output_splits, output);
  check_splits("input", input_splits, input);
  at::Tensor source = input;
  std::vector<std::int64_t> out_splits = output_splits, in_splits = input_splits;
  return make_work("all_to_all_single", {start(*this, "all_to_all_single", [&] {
                     return backend_->alltoall_base(output, source, out_splits, in_splits);
                   })},
                   nullptr, bytes_of(input));
}

Work ProcessGroup::isend(at::Tensor& tensor, int peer, int tag) {
  check_peer(*this, "isend", peer);
  std::vector<at::Tensor> tensors{tensor};
  return make_work("isend", {start(*this, "isend", [&] { return backend_->send(tensors, peer, tag); })}, nullptr,
                   bytes_of(tensor));
}

Work ProcessGroup::irecv(at::Tensor& tensor, int peer, int tag) {
  check_peer(*this, "irecv", peer);
  std::vector<at::Tensor> tensors{tensor};
  return make_work("irecv", {start(*this, "irecv", [&] { return backend_->recv(tensors, peer, tag); })}, nullptr,
                   bytes_of(tensor));
}

Work ProcessGroup::batch_isend_irecv(const std::vector<P2POp>& ops) {
  for (const auto& op : ops) check_peer(*this, "batch_isend_irecv", op.peer);
  const bool coalesce = backend_->supportsCoalescing();  // NCCL: one grouped launch
  std::vector<c10::intrusive_ptr<c10d::Work>> parts;
  if (coalesce) backend_->startCoalescing();
  try {
    for (const auto& op : ops) {
      std::vector<at::Tensor> tensors{op.tensor};
      parts.push_back(start(*this, "batch_isend_irecv", [&] {
        return op.kind == P2POp::Kind::Send ? backend_->send(tensors, op.peer, op.tag)
                                            : backend_->recv(tensors, op.peer, op.tag);
      }));
    }
  } catch (...) {
    if (coalesce) (void)backend_->endCoalescing();
    throw;
  }
  if (coalesce) parts = {start(*this, "batch_isend_irecv", [&] { return backend_->endCoalescing(); })};
  std::int64_t bytes = 0;
  for (const auto& op : ops) bytes += bytes_of(op.tensor);
  return make_work("batch_isend_irecv", std::move(parts), nullptr, bytes);
}

TrafficByGroup traffic(const ParallelGroups& g) {
  const std::pair<const char*, const std::shared_ptr<ProcessGroup>*> kinds[] = {
      {"tensor", &g.tensor}, {"pipeline", &g.pipeline}, {"data", &g.data}, {"context", &g.context},
      {"expert", &g.expert}, {"expert_data", &g.expert_data}, {"tensor_and_data", &g.tensor_and_data},
      {"data_and_context", &g.data_and_context}, {"tensor_and_expert", &g.tensor_and_expert},
      {"embedding", &g.embedding}, {"position_embedding", &g.position_embedding}, {"world", &g.world}};
  TrafficByGroup out;
  for (const auto& [kind, group] : kinds) {
    if (*group) out[kind] = (*group)->traffic();
  }
  return out;
}

TrafficByGroup traffic_since(const TrafficByGroup& before, const TrafficByGroup& after) {
  TrafficByGroup out;
  for (const auto& [kind, operations] : after) {
    const auto earlier = before.find(kind);
    for (const auto& [operation, now] : operations) {
      Traffic then;
      if (earlier != before.end()) {
        if (auto found = earlier->second.find(operation); found != earlier->second.end()) then = found->second;
      }
      if (now.calls == then.calls) continue;
      out[kind][operation] = {now.calls - then.calls, now.bytes - then.bytes, now.seconds - then.seconds};
    }
  }
  return out;
}

std::shared_ptr<ProcessGroup> new_group(const World& world, const std::string& name, std::vector<int> global_ranks,
                                        c10::Device device, std::chrono::milliseconds timeout) {
  auto self = std::find(global_ranks.begin(), global_ranks.end(), world.rank);
  if (self == global_ranks.end()) {
    throw Error("process group '" + name + "': rank " + std::to_string(world.rank) + " is not one of its members");
  }
  for (int rank : global_ranks) {
    if (rank < 0 || rank >= world.size) {
      throw Error("process group '" + name + "': member rank " + std::to_string(rank) + " is outside the world of " +
                  std::to_string(world.size));
    }
  }
  if (global_ranks.size() == 1) return nullptr;  // a group of one is "this rank alone"
  if (!world.store) throw Error("process group '" + name + "': the world has no rendezvous store");

  int rank = static_cast<int>(self - global_ranks.begin());
  int size = static_cast<int>(global_ranks.size());
  // A group built again under the same name (a second model in one job: a test's fresh copy, a tool)
  // rendezvouses under its own keys: its n-th creation with these members on this rank, counted in the
  // store itself (every member creates the same groups in the same order, as torch.distributed's
  // group count).
  std::string members;
  for (int rank : global_ranks) members += (members.empty() ? "" : ",") + std::to_string(rank);
  const std::int64_t creation =
      world.store->add("neva/created/" + name + "/" + members + "/" + std::to_string(world.rank), 1);
  auto store = c10::make_intrusive<c10d::PrefixStore>(name + "[" + members + "]#" + std::to_string(creation), world.store);
  c10::intrusive_ptr<c10d::Backend> backend;
  try {
    if (device.is_cuda()) {
      backend = make_nccl_backend(store, rank, size, timeout);
    } else {
      auto options = c10d::ProcessGroupGloo::Options::create(timeout);
      // As torch.distributed does: GLOO_SOCKET_IFNAME picks the interface, else the hostname's address.
      if (auto interface = env("GLOO_SOCKET_IFNAME")) {
        options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(*interface));
      } else {
        options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, options);
    }
  } catch (const std::exception& error) {
    throw Error("process group '" + name + "' (global rank " + std::to_string(world.rank) + "): cannot connect: " +
                error.what());
  }
  return std::make_shared<ProcessGroup>(std::move(backend), name, std::move(global_ranks));
}

}  // namespace neva
