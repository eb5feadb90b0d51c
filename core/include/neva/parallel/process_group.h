#pragma once
// Process groups on PyTorch's c10d: Gloo for CPU tensors, NCCL for CUDA tensors.
// Launch follows torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or Slurm
// (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR/MASTER_PORT must be exported).
#include <c10/core/Device.h>
#include <c10/util/intrusive_ptr.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "neva/api.h"

namespace at {
class Tensor;
}
namespace c10d {
class Backend;
class Store;
}  // namespace c10d

namespace neva {

// This process's place in the job, and the job's rendezvous store.
struct NEVA_API World {
  World();
  ~World();
  World(const World&);
  World& operator=(const World&);
  World(World&&) noexcept;
  World& operator=(World&&) noexcept;

  int rank = 0;
  int size = 1;
  int local_rank = 0;
  std::string master_addr;
  int master_port = 0;
  c10::intrusive_ptr<c10d::Store> store;  // null when size == 1

  // Reads the launcher's environment (torchrun first, then Slurm) and connects to the TCPStore held
  // by rank 0. Without any launcher variables: a world of one, no store. Errors name the variable.
  static World from_environment(std::chrono::milliseconds timeout = std::chrono::minutes(5));
};

enum class ReduceOp { Sum, Max, Min, Avg };

// One c10d process group. `name` is unique per group and prefixes its keys in the store.
class NEVA_API ProcessGroup {
 public:
  ProcessGroup(c10::intrusive_ptr<c10d::Backend> backend, std::string name, std::vector<int> global_ranks);
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int rank() const;
  int size() const;
  const std::string& name() const { return name_; }
  const std::vector<int>& global_ranks() const { return global_ranks_; }
  c10d::Backend& backend() const { return *backend_; }
  std::string backend_name() const;  // "gloo", "nccl"

  // Blocking collectives (wait for completion); errors name the group and this rank.
  void all_reduce(at::Tensor& tensor, ReduceOp op = ReduceOp::Sum);
  void broadcast(at::Tensor& tensor, int root_group_rank);
  void barrier();

 private:
  c10::intrusive_ptr<c10d::Backend> backend_;
  std::string name_;
  std::vector<int> global_ranks_;
};

// Creates the group of `global_ranks` (which must include world.rank) with the backend for `device`:
// Gloo for CPU, NCCL for CUDA. Every member must call this for the same groups in the same order.
NEVA_API std::shared_ptr<ProcessGroup> new_group(const World& world, const std::string& name,
                                                 std::vector<int> global_ranks, c10::Device device,
                                                 std::chrono::milliseconds timeout = std::chrono::minutes(30));

}  // namespace neva
