#pragma once
// Process groups on PyTorch's c10d: Gloo for CPU tensors, NCCL for CUDA tensors.
// Launch follows torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or Slurm
// (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR/MASTER_PORT must be exported).
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/intrusive_ptr.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "neva/api.h"

namespace c10d {
class Backend;
class Store;
class Work;
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
  // How long a member waits for the others: what from_environment was given. Groups are created
  // with it (Gloo's and NCCL's operation timeout), so that a dead or stopped peer fails every
  // operation in time instead of hanging the process (also at exit, in the backend's destructor).
  // Appended in plugin ABI 2.1.
  std::chrono::milliseconds timeout{std::chrono::minutes(30)};

  // Reads the launcher's environment (torchrun first, then Slurm) and connects to the TCPStore held
  // by rank 0. Without any launcher variables: a world of one, no store. Errors name the variable.
  static World from_environment(std::chrono::milliseconds timeout = std::chrono::minutes(5));
  // The number of processes the launcher's environment says were started (1 without one), read
  // without joining them. Throws as from_environment for malformed variables.
  static int launched_size();
};

// The first host of a Slurm hostlist ("gpu[03-05,9],cpu1" -> "gpu03"), without scontrol. Under
// Slurm, World::from_environment uses it as MASTER_ADDR when that is not set (and 15000 + the last
// four digits of SLURM_JOB_ID as MASTER_PORT, as PyTorch Lightning does). Throws naming the list.
NEVA_API std::string first_slurm_host(const std::string& nodelist);

enum class ReduceOp { Sum, Max, Min, Avg };

// The completion of one operation (or of a batch of point-to-point operations), as c10d's Work.
// Every operation of a ProcessGroup returns one: call wait() before reading what it writes or
// writing what it reads. Every operation is [[nodiscard]]: dropping its Work unwaited is a warning.
class NEVA_API Work {
 public:
  static constexpr std::chrono::milliseconds kNoTimeout{-1};

  Work();
  ~Work();
  Work(Work&&) noexcept;
  Work& operator=(Work&&) noexcept;
  Work(const Work&) = delete;
  Work& operator=(const Work&) = delete;

  // Blocks until done. Throws Error naming the group, the operation and this rank when it failed,
  // or when it has not completed within `timeout` (it may still complete: wait again). After a
  // successful wait, further waits return at once.
  void wait(std::chrono::milliseconds timeout = kNoTimeout);
  // True when every part has completed (successfully or not); never blocks.
  bool completed() const;

 private:
  friend class ProcessGroup;
  struct State;
  explicit Work(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

// One send or receive of a batch (batch_isend_irecv), with the peer's rank in the group.
struct P2POp {
  enum class Kind { Send, Recv };
  Kind kind;
  at::Tensor tensor;  // sent from, or received into (in place)
  int peer;
  int tag = 0;
};

// What a group's operations moved and waited for, per operation name ("all_reduce", ...): the
// communication accounting of the training metrics. `bytes` is each call's logical payload, the N
// of the bandwidth cost model (all_reduce: the tensor; all_gather: the gathered output;
// reduce_scatter: the input; all_to_all, send, recv: what this rank sends or receives), whatever the
// backend does on the wire (Gloo emulates reduce_scatter with an all-reduce); `seconds` is the time
// this rank spent blocked in wait() on them.
struct Traffic {
  std::int64_t calls = 0;
  std::int64_t bytes = 0;
  double seconds = 0;
};
using TrafficByOperation = std::map<std::string, Traffic>;

// One c10d process group. `name` is unique per group and prefixes its keys in the store.
// Operations are asynchronous and return Work (wait() for the result); ranks are group ranks.
// Errors name the group and this rank. Tensors must be contiguous and on the group's device.
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

  // In place on every rank: the reduction of every rank's `tensor` (Avg: the sum divided by size()).
  [[nodiscard]] Work all_reduce(at::Tensor& tensor, ReduceOp op = ReduceOp::Sum);
  [[nodiscard]] Work broadcast(at::Tensor& tensor, int root);
  [[nodiscard]] Work barrier();

  // `output` (size() x input's rows along dim 0) receives every rank's `input`, in rank order.
  [[nodiscard]] Work all_gather_into_tensor(at::Tensor& output, const at::Tensor& input);
  // `outputs` (size() tensors shaped as `input`) receives every rank's `input`, in rank order.
  [[nodiscard]] Work all_gather(std::vector<at::Tensor>& outputs, const at::Tensor& input);
  // `output` receives rank r's share of the reduction of `input` (size() x output's rows along dim 0).
  [[nodiscard]] Work reduce_scatter_tensor(at::Tensor& output, const at::Tensor& input, ReduceOp op = ReduceOp::Sum);
  // Rows of `input` go to the ranks in order, `input_splits[r]` rows to rank r; `output` receives
  // `output_splits[r]` rows from rank r. Empty splits: equal shares of dim 0.
  [[nodiscard]] Work all_to_all_single(at::Tensor& output, const at::Tensor& input, const std::vector<std::int64_t>& output_splits = {},
                         const std::vector<std::int64_t>& input_splits = {});
  // Point to point; a send and its receive use the same tag.
  [[nodiscard]] Work isend(at::Tensor& tensor, int peer, int tag = 0);
  [[nodiscard]] Work irecv(at::Tensor& tensor, int peer, int tag = 0);
  // Every send and receive of `ops` at once (one coalesced launch where the backend can: NCCL);
  // the order of `ops` must match across the ranks involved, as in torch.distributed.
  [[nodiscard]] Work batch_isend_irecv(const std::vector<P2POp>& ops);

  // Every operation since the group was made (thread-safe).
  TrafficByOperation traffic() const;
  struct Accounting;  // (internal: shared with the group's Works)

 private:
  Work make_work(const char* what, std::vector<c10::intrusive_ptr<c10d::Work>> parts,
                 std::function<void()> then = nullptr, std::int64_t bytes = 0) const;
  c10::intrusive_ptr<c10d::Backend> backend_;
  std::string name_;
  std::vector<int> global_ranks_;
  std::shared_ptr<Accounting> accounting_;  // shared with the Works, which record their waits
};

struct ParallelGroups;
// Every group of `groups` that exists, by kind ("tensor", "data", ..., "world"), with its traffic.
using TrafficByGroup = std::map<std::string, TrafficByOperation>;
NEVA_API TrafficByGroup traffic(const ParallelGroups& groups);
// What happened between two readings (`after` minus `before`), operations without calls left out.
NEVA_API TrafficByGroup traffic_since(const TrafficByGroup& before, const TrafficByGroup& after);

// Creates the group of `global_ranks` (which must include world.rank) with the backend for `device`:
// Gloo for CPU, NCCL for CUDA. Every member must call this for the same groups in the same order.
NEVA_API std::shared_ptr<ProcessGroup> new_group(const World& world, const std::string& name,
                                                 std::vector<int> global_ranks, c10::Device device,
                                                 std::chrono::milliseconds timeout = std::chrono::minutes(30));

}  // namespace neva
