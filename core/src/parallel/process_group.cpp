#include "neva/parallel/process_group.h"

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <algorithm>
#include <cstdlib>
#include <optional>

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

c10d::ReduceOp to_c10d(ReduceOp op) {
  switch (op) {
    case ReduceOp::Max: return c10d::ReduceOp::MAX;
    case ReduceOp::Min: return c10d::ReduceOp::MIN;
    default: return c10d::ReduceOp::SUM;  // Avg: Sum then divide (Gloo has no AVG)
  }
}

}  // namespace

World::World() = default;
World::~World() = default;
World::World(const World&) = default;
World& World::operator=(const World&) = default;
World::World(World&&) noexcept = default;
World& World::operator=(World&&) noexcept = default;

World World::from_environment(std::chrono::milliseconds timeout) {
  World world;
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

  world.master_addr = require_env("MASTER_ADDR", launcher);
  require_env("MASTER_PORT", launcher);
  world.master_port = env_int("MASTER_PORT", 1, 65535);
  c10d::TCPStoreOptions options;
  options.port = static_cast<std::uint16_t>(world.master_port);
  options.isServer = world.rank == 0;
  options.numWorkers = static_cast<std::size_t>(world.size);
  options.waitWorkers = true;
  options.timeout = timeout;
  try {
    world.store = c10::make_intrusive<c10d::TCPStore>(world.master_addr, options);
  } catch (const std::exception& error) {
    throw Error("rank " + std::to_string(world.rank) + " of " + std::to_string(world.size) +
                ": cannot reach the rendezvous store at " + world.master_addr + ":" +
                std::to_string(world.master_port) + ": " + error.what());
  }
  return world;
}

ProcessGroup::ProcessGroup(c10::intrusive_ptr<c10d::Backend> backend, std::string name, std::vector<int> global_ranks)
    : backend_(std::move(backend)), name_(std::move(name)), global_ranks_(std::move(global_ranks)) {}
ProcessGroup::~ProcessGroup() = default;

int ProcessGroup::rank() const { return backend_->getRank(); }
int ProcessGroup::size() const { return backend_->getSize(); }
std::string ProcessGroup::backend_name() const { return backend_->getBackendName(); }

namespace {

template <class Fn>
void run_collective(const ProcessGroup& group, const char* what, Fn&& fn) {
  try {
    fn()->wait();
  } catch (const std::exception& error) {
    throw Error("process group '" + group.name() + "' (rank " + std::to_string(group.rank()) + " of " +
                std::to_string(group.size()) + "): " + what + " failed: " + error.what());
  }
}

}  // namespace

void ProcessGroup::all_reduce(at::Tensor& tensor, ReduceOp op) {
  std::vector<at::Tensor> tensors{tensor};
  c10d::AllreduceOptions options;
  options.reduceOp = to_c10d(op);
  run_collective(*this, "all_reduce", [&] { return backend_->allreduce(tensors, options); });
  if (op == ReduceOp::Avg) tensor.div_(size());
}

void ProcessGroup::broadcast(at::Tensor& tensor, int root_group_rank) {
  std::vector<at::Tensor> tensors{tensor};
  c10d::BroadcastOptions options;
  options.rootRank = root_group_rank;
  run_collective(*this, "broadcast", [&] { return backend_->broadcast(tensors, options); });
}

void ProcessGroup::barrier() {
  run_collective(*this, "barrier", [&] { return backend_->barrier(); });
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
  auto store = c10::make_intrusive<c10d::PrefixStore>(name, world.store);
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
