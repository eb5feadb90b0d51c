#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>

#include "neva/parallel/process_group.h"
#include "neva/error.h"
#include "test_support.h"

using neva::test::run_command;

namespace {

// Launches `ranks` workers as torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
neva::test::CommandResult launch(int ranks, const std::string& arguments = "") {
  std::string worker = neva::test::binary("neva_dist_worker").string();
  int port = neva::test::free_port();
  std::string script = "status=0\npids=''\n";
  for (int rank = 0; rank < ranks; ++rank) {
    script += "RANK=" + std::to_string(rank) + " LOCAL_RANK=" + std::to_string(rank) + " WORLD_SIZE=" +
              std::to_string(ranks) + " MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port) + " " + worker +
              arguments + " &\npids=\"$pids $!\"\n";
  }
  script += "for p in $pids; do wait $p || status=1; done\nexit $status\n";
  // Generous: CI runs two of these multi-process tests at once on two cores; a hang is still caught
  // (and each rank's own c10d timeout names the missing peer well before this).
  return run_command(script, 480);
}

struct EnvGuard {
  std::vector<std::string> names;
  void set(const std::string& name, const std::string& value) {
    names.push_back(name);
    ::setenv(name.c_str(), value.c_str(), 1);
  }
  ~EnvGuard() {
    for (const auto& name : names) ::unsetenv(name.c_str());
  }
};

// The checks dist_worker.cpp prints for every rank.
const char* const kWorkerChecks[] = {"backend gloo", "all_reduce sum", "all_reduce max", "all_reduce avg", "broadcast",
                                     "all_gather_into_tensor", "all_gather", "reduce_scatter_tensor sum",
                                     "reduce_scatter_tensor avg", "all_to_all_single uneven", "all_to_all_single even",
                                     "isend/irecv ring", "batch_isend_irecv ring", "shape refused"};

void check_workers(const neva::test::CommandResult& result, int ranks) {
  INFO("stdout: " << result.out << "\nstderr: " << result.err);
  CHECK(result.exit_code == 0);
  CHECK(result.out.find("WRONG") == std::string::npos);
  for (int rank = 0; rank < ranks; ++rank) {
    const std::string prefix = "rank " + std::to_string(rank) + "/" + std::to_string(ranks) + " ";
    for (const char* check : kWorkerChecks) CHECK(result.out.find(prefix + check + " ok") != std::string::npos);
  }
  const std::string second = "rank 1/" + std::to_string(ranks) + " ";
  for (const char* check : {"timeout", "not completed after the timeout", "completes once sent"}) {
    CHECK(result.out.find(second + check + " ok") != std::string::npos);
  }
}

}  // namespace

TEST_CASE("processes form a Gloo process group through c10d and agree on every operation of the c10d layer") {
  SUBCASE("two ranks") { check_workers(launch(2), 2); }
  SUBCASE("three ranks (uneven all_to_all splits, a ring of three)") { check_workers(launch(3), 3); }
}

TEST_CASE("the real torchrun --no-python launches the ranks and they find each other") {
  const auto torchrun = neva::test::source_directory() / ".venv" / "bin" / "torchrun";
  REQUIRE(std::filesystem::exists(torchrun));
  const std::string command = torchrun.string() + " --no-python --standalone --nproc-per-node 2 " +
                              neva::test::binary("neva_dist_worker").string();
  check_workers(run_command(command, 180), 2);
}

TEST_CASE("the megatron strategy builds every group on c10d, each with the members Megatron's rank order gives") {
  // The members are checked against GroupLayout (whose numbers test_parallel.cpp checks against
  // Megatron-core's docstrings); here every rank all-reduces over every group it joined.
  auto check = [](const std::string& sizes) {
    auto result = launch(4, " groups " + sizes);
    INFO("sizes: " << sizes << "\nstdout: " << result.out << "\nstderr: " << result.err);
    CHECK(result.exit_code == 0);
    CHECK(result.out.find("WRONG") == std::string::npos);
    for (int rank = 0; rank < 4; ++rank) {
      for (const char* kind : {"tensor", "pipeline", "data", "context", "expert", "expert_data", "tensor_and_data",
                               "data_and_context", "tensor_and_expert", "embedding", "position_embedding", "world"}) {
        CHECK(result.out.find("rank " + std::to_string(rank) + "/4 group " + kind + " ok") != std::string::npos);
      }
      CHECK(result.out.find("rank " + std::to_string(rank) + "/4 schedule ok") != std::string::npos);
    }
  };
  SUBCASE("tensor 2 x pipeline 2") { check("2 2 1 1"); }
  SUBCASE("context 2, expert 2, data 2") { check("1 1 2 2"); }
}

TEST_CASE("data parallelism: replicas on their shares match one process on the whole batch (float64)") {
  // Loss, synced gradients and updated weights after each of two steps, a tiny MoE decoder, within
  // 1e-10; gradient buckets all-reduced during the last micro-batch's backward pass equal one
  // reduction after it, bit for bit, and nothing is reduced per micro-batch (dist_worker.cpp,
  // check_data_parallel).
  for (int ranks : {2, 3}) {
    auto result = launch(ranks, " dp_train");
    INFO("ranks: " << ranks << "\nstdout: " << result.out << "\nstderr: " << result.err);
    CHECK(result.exit_code == 0);
    CHECK(result.out.find("WRONG") == std::string::npos);
    for (int rank = 0; rank < ranks; ++rank) {
      const std::string prefix = "rank " + std::to_string(rank) + "/" + std::to_string(ranks) + " ";
      for (const char* check : {"dp loss", "dp gradients", "dp weights",
                                "dp overlapped buckets equal the plain reduction bitwise",
                                "dp buckets start during the backward pass", "dp one reduction per step, none per micro-batch",
                                "dp zero-1 shards the optimizer state", "dp zero-1 resumes exactly",
                                "dp O2-style main copies, replicated and ZeRO-1",
                                "dp accumulation equals one bigger micro-batch"}) {
        CHECK(result.out.find(prefix + check + " ok") != std::string::npos);
      }
    }
  }
}

// One tensor-parallel layout against one process (dist_worker.cpp, check_tensor_parallel): a tiny
// LLaVA (Llama or Mixtral + CLIP + mlp2x_gelu) built through the recipe and plugins, two steps in
// float64: loss, gathered gradients and updated weights within 1e-10; the replicated vision side's
// gradients identical on every rank of a tensor-parallel group.
static void check_tensor_parallel(int ranks, const std::string& layout) {
  auto result = launch(ranks, " tp_train " + layout);
  INFO("ranks: " << ranks << ", layout " << layout << "\nstdout: " << result.out << "\nstderr: " << result.err);
  CHECK(result.exit_code == 0);
  CHECK(result.out.find("WRONG") == std::string::npos);
  for (int rank = 0; rank < ranks; ++rank) {
    const std::string prefix = "rank " + std::to_string(rank) + "/" + std::to_string(ranks) + " ";
    CHECK(result.out.find(prefix + "tp groups ok") != std::string::npos);
    for (const char* check : {" loss", " gradients", " weights", " vision gradients identical", " checkpoint state",
                              " distributed checkpoint read by one process", " one process's checkpoint read by this layout",
                              " export stream"}) {
      CHECK(result.out.find(prefix + layout + check + " ok") != std::string::npos);
    }
    if (layout.find("-sp") == std::string::npos && layout.find("cp") == std::string::npos) {  // generation: without SP or CP
      CHECK(result.out.find(prefix + layout + " greedy tokens ok") != std::string::npos);
    }
  }
}

TEST_CASE("tensor parallelism: TP2 matches one process (Llama + CLIP, float64), with sequence parallelism too") {
  SUBCASE("TP2") { check_tensor_parallel(2, "tp2"); }
  SUBCASE("TP2 + SP") { check_tensor_parallel(2, "tp2-sp"); }
  SUBCASE("TP2 with one KV head, replicated over the group") { check_tensor_parallel(2, "tp2-kv1"); }
  SUBCASE("TP2 + SP with tied embeddings (the LM head is the vocabulary-parallel embedding)") {
    check_tensor_parallel(2, "tp2-sp-tied");
  }
  SUBCASE("TP2 + SP with full activation recomputation and packed rows") { check_tensor_parallel(2, "tp2-sp-recompute-packed"); }
}

TEST_CASE("tensor parallelism: Mixtral's experts split under TP2, with and without sequence parallelism (float64)") {
  SUBCASE("TP2") { check_tensor_parallel(2, "tp2-moe"); }
  SUBCASE("TP2 + SP") { check_tensor_parallel(2, "tp2-sp-moe"); }
}

TEST_CASE("tensor x data parallelism over four processes: TP2 x DP2, ZeRO-1 and TP4 + SP match one process (float64)") {
  SUBCASE("TP2 x DP2, Llama") { check_tensor_parallel(4, "tp2"); }
  SUBCASE("TP2 x DP2 + SP, Mixtral") { check_tensor_parallel(4, "tp2-sp-moe"); }
  SUBCASE("TP4 + SP: two KV heads, each on two ranks") { check_tensor_parallel(4, "tp4-sp"); }
  SUBCASE("TP2 x DP2 + SP with ZeRO-1, one KV head") { check_tensor_parallel(4, "tp2-sp-kv1-zero"); }
}

// FP8 under tensor x data parallelism (dist_worker.cpp, check_fp8): Transformer Engine's amax
// reduction over the tensor x data group keeps every rank's scaling state identical and equal to one
// process's on the whole batch.
TEST_CASE("fp8: amaxes reduced over the tensor x data group, every rank's scaling equal to one process's (TP2, TP2 x DP2)") {
  for (const int ranks : {2, 4}) {
    auto result = launch(ranks, " fp8_train tp2");
    INFO("ranks: " << ranks << "\nstdout: " << result.out << "\nstderr: " << result.err);
    CHECK(result.exit_code == 0);
    CHECK(result.out.find("WRONG") == std::string::npos);
    for (int rank = 0; rank < ranks; ++rank) {
      const std::string prefix = "rank " + std::to_string(rank) + "/" + std::to_string(ranks) + " fp8 tp2 ";
      for (const char* check : {"scaling state identical over the tensor x data group", "first step's weight amaxes and "
                                "scales equal one process's", "scales", "loss"}) {
        CHECK(result.out.find(prefix + check + " ok") != std::string::npos);
      }
    }
  }
}

TEST_CASE("expert parallelism: Mixtral's experts over EP2 and EP4, with data parallelism, match one process (float64)") {
  // Each rank holds its experts; tokens go to them and back with all_to_all; experts' gradients
  // summed over the expert-data group, dense ones over the data group; greedy decoding too.
  SUBCASE("EP2") { check_tensor_parallel(2, "ep2"); }
  SUBCASE("EP2 x DP2 (expert-data groups of two), recomputation and packed rows") {
    check_tensor_parallel(4, "ep2-recompute-packed");
  }
  SUBCASE("EP4: one expert per rank") { check_tensor_parallel(4, "ep4"); }
}

TEST_CASE("context parallelism: zig-zag chunks and ring attention over CP2 and CP4, with TP, SP, MoE and ZeRO-1 (float64)") {
  // Padded and packed rows and one unpadded row (the plain causal path), recomputation, the MoE's
  // load-balancing loss over the whole sequence.
  SUBCASE("CP2") { check_tensor_parallel(2, "cp2"); }
  SUBCASE("CP2, Mixtral, packed rows, recomputation") { check_tensor_parallel(2, "cp2-moe-packed-recompute"); }
  SUBCASE("TP2 x CP2") { check_tensor_parallel(4, "tp2-cp2"); }
  SUBCASE("TP2 + SP x CP2, Mixtral") { check_tensor_parallel(4, "tp2-sp-cp2-moe"); }
  SUBCASE("CP4") { check_tensor_parallel(4, "cp4"); }
  SUBCASE("CP2 x DP2 with ZeRO-1") { check_tensor_parallel(4, "cp2-zero"); }
}

TEST_CASE("pipeline parallelism: 1F1B and interleaved 1F1B over PP2 and PP4, with TP, SP, CP, DP, ZeRO-1 and tied embeddings (float64)") {
  // The vision encoder and connector on stage 0; hidden states and their gradients between stages
  // point to point; the loss on the last stage; tied embeddings' two copies summed; generation
  // through the stages; what a checkpoint gathers from every stage.
  SUBCASE("PP2") { check_tensor_parallel(2, "pp2"); }
  SUBCASE("PP2, tied embeddings") { check_tensor_parallel(2, "pp2-tied"); }
  SUBCASE("PP2, two chunks per stage (interleaved)") { check_tensor_parallel(2, "pp2-v2"); }
  SUBCASE("PP4") { check_tensor_parallel(4, "pp4"); }
  SUBCASE("PP2 x DP2") { check_tensor_parallel(4, "pp2"); }
  SUBCASE("TP2 x PP2") { check_tensor_parallel(4, "tp2-pp2"); }
  SUBCASE("TP2 + SP x PP2, tied embeddings, recomputation") { check_tensor_parallel(4, "tp2-sp-tied-recompute-pp2"); }
  SUBCASE("CP2 x PP2, packed rows") { check_tensor_parallel(4, "cp2-packed-pp2"); }
  SUBCASE("PP2 x DP2 with ZeRO-1, interleaved") { check_tensor_parallel(4, "pp2-zero-v2"); }
}

// Distributed checkpoints (dist_worker.cpp): what LAYOUT saves after two float64 steps, RELOAD (the
// same model and world, another layout) reads back: every weight, moment and step exactly as saved
// (and, in every check_tensor_parallel run, to and from one process).
static void check_resharding(int ranks, const std::string& layout, const std::string& reload) {
  auto result = launch(ranks, " tp_train " + layout + " " + reload);
  INFO("ranks: " << ranks << ", " << layout << " then " << reload << "\nstdout: " << result.out << "\nstderr: " << result.err);
  CHECK(result.exit_code == 0);
  for (int rank = 0; rank < ranks; ++rank) {
    const std::string prefix = "rank " + std::to_string(rank) + "/" + std::to_string(ranks) + " ";
    CHECK(result.out.find(prefix + layout + " then " + reload + " checkpoint resharded ok") != std::string::npos);
    CHECK(result.out.find(prefix + layout + " converted offline for " + reload + " ok") != std::string::npos);
  }
}

TEST_CASE("distributed checkpoints: saved under one layout, read exactly under another (float64)") {
  SUBCASE("TP2 -> PP2") { check_resharding(2, "tp2", "pp2"); }
  SUBCASE("TP2 x DP2 -> TP4 + SP (KV heads shared by two ranks)") { check_resharding(4, "tp2", "tp4-sp"); }
  SUBCASE("PP2 x DP2 interleaved with ZeRO-1 -> TP2 x PP2") { check_resharding(4, "pp2-zero-v2", "tp2-pp2"); }
  SUBCASE("EP2 x DP2 -> EP4") { check_resharding(4, "ep2", "ep4"); }
  SUBCASE("CP2 x DP2 with ZeRO-1 -> TP2 + SP x DP2 with ZeRO-1") { check_resharding(4, "cp2-zero", "tp2-sp-zero"); }
}

TEST_CASE("without launcher variables the world is this process alone") {
  neva::World world = neva::World::from_environment();
  CHECK(world.size == 1);
  CHECK(world.rank == 0);
  CHECK(!world.store);
  CHECK(neva::new_group(world, "solo", {0}, c10::Device(c10::DeviceType::CPU)) == nullptr);
}

TEST_CASE("launcher misconfiguration is a clear error naming the variable") {
  SUBCASE("rank out of range") {
    EnvGuard env;
    env.set("RANK", "2");
    env.set("WORLD_SIZE", "2");
    CHECK_THROWS_WITH_AS(neva::World::from_environment(),
                         "environment variable RANK='2': expected an integer in [0, 1]", neva::Error);
  }
  SUBCASE("no rendezvous address") {
    EnvGuard env;
    env.set("SLURM_PROCID", "0");
    env.set("SLURM_NTASKS", "4");
    CHECK_THROWS_WITH_AS(neva::World::from_environment(),
                         doctest::Contains("MASTER_ADDR is not set; Slurm launches need MASTER_ADDR and MASTER_PORT"),
                         neva::Error);
  }
  SUBCASE("rank not in the group") {
    neva::World world;
    world.size = 2;
    CHECK_THROWS_WITH_AS(neva::new_group(world, "tp", {1}, c10::Device(c10::DeviceType::CPU)),
                         "process group 'tp': rank 0 is not one of its members", neva::Error);
  }
}

TEST_CASE("Slurm: rank 0's host is the first of SLURM_JOB_NODELIST, expanded without scontrol") {
  CHECK(neva::first_slurm_host("gpu07") == "gpu07");
  CHECK(neva::first_slurm_host("gpu[03-05,9],cpu1") == "gpu03");
  CHECK(neva::first_slurm_host("node[007-010]") == "node007");  // zero padding kept
  CHECK(neva::first_slurm_host("cpu1,gpu[1-2]") == "cpu1");
  CHECK(neva::first_slurm_host("rack[2-3]-n[11,14]") == "rack2-n11");
  CHECK_THROWS_WITH_AS(neva::first_slurm_host("gpu[1-3"), doctest::Contains("an unclosed ["), neva::Error);
  CHECK_THROWS_WITH_AS(neva::first_slurm_host("gpu[[1]]"), doctest::Contains("nested brackets"), neva::Error);
  CHECK_THROWS_WITH_AS(neva::first_slurm_host(""), doctest::Contains("no host"), neva::Error);
  // Without MASTER_ADDR / MASTER_PORT: the first node and 15000 + the job id's last four digits.
  EnvGuard env;
  env.set("SLURM_PROCID", "0");
  env.set("SLURM_NTASKS", "2");
  env.set("SLURM_JOB_NODELIST", "127.0.0.[1-2]");
  env.set("SLURM_JOB_ID", "98761234");
  CHECK_THROWS_WITH_AS(neva::World::from_environment(std::chrono::seconds(1)),
                       doctest::Contains("cannot hold the rendezvous store on port 16234 (MASTER_PORT) for 127.0.0.1"),
                       neva::Error);
}

TEST_CASE("a rank whose peers never arrive fails within its timeout instead of hanging") {
  EnvGuard env;
  env.set("RANK", "0");
  env.set("WORLD_SIZE", "2");
  env.set("MASTER_ADDR", "127.0.0.1");
  env.set("MASTER_PORT", std::to_string(neva::test::free_port()));
  CHECK_THROWS_WITH_AS(neva::World::from_environment(std::chrono::seconds(2)),
                       doctest::Contains("rank 0 of 2: cannot hold the rendezvous store on port"), neva::Error);
}

TEST_CASE("rendezvous: a port in use and an unreachable rank 0 are clear errors within the timeout") {
  // Another process listens on MASTER_PORT: rank 0 cannot hold the store there, and says so.
  const int port = neva::test::free_port();
  const int listener = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(listener >= 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<std::uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_ANY);
  REQUIRE(::bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0);
  REQUIRE(::listen(listener, 1) == 0);
  {
    EnvGuard env;
    env.set("RANK", "0");
    env.set("WORLD_SIZE", "2");
    env.set("MASTER_ADDR", "127.0.0.1");
    env.set("MASTER_PORT", std::to_string(port));
    const std::string expected = "rank 0 of 2: cannot hold the rendezvous store on port " + std::to_string(port);
    CHECK_THROWS_WITH_AS(neva::World::from_environment(std::chrono::seconds(2)), doctest::Contains(expected.c_str()),
                         neva::Error);
  }
  ::close(listener);
  // Rank 1 of a job whose rank 0 never comes up: it gives up within its timeout, naming the address.
  EnvGuard env;
  env.set("RANK", "1");
  env.set("WORLD_SIZE", "2");
  env.set("MASTER_ADDR", "127.0.0.1");
  env.set("MASTER_PORT", std::to_string(neva::test::free_port()));
  const auto started = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH_AS(neva::World::from_environment(std::chrono::seconds(2)),
                       doctest::Contains("rank 1 of 2: cannot reach the rendezvous store at 127.0.0.1:"), neva::Error);
  CHECK(std::chrono::steady_clock::now() - started < std::chrono::seconds(30));
}
