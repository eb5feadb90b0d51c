#pragma once
// neva-run --nproc-per-node N: starts N workers on this machine, as torchrun --standalone does.
#include <string>
#include <vector>

namespace neva {

// Runs `arguments` (argv[0] first, without --nproc-per-node) as `workers` processes of this binary,
// each with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and MASTER_ADDR/MASTER_PORT (127.0.0.1 and a
// free port) set. SIGINT and SIGTERM are passed on to every worker (training stops them all at the
// same step, after a checkpoint). When a worker fails, the others are given `grace_seconds` to fail
// on their own (their collectives see the peer gone), then killed; each failure is reported with
// the worker's rank and exit status. Returns 0 when every worker succeeded, else the status of the
// first that failed (128 + signal for a killed one).
int launch_workers(int workers, const std::vector<std::string>& arguments, int grace_seconds = 30);

}  // namespace neva
