#pragma once
// A training run's checkpoints, <run>/checkpoints/step-NNNNNNN/, and the lock on its run directory.
//
// A checkpoint is committed when its manifest.json is in place: written (atomically) only after every
// file of the checkpoint is on disk, it lists each file with its size and SHA-256. checkpoints/latest
// then names the newest one. Loading verifies the manifest; a damaged or incomplete checkpoint is
// passed over, with a warning, for the newest intact one (Megatron's and DCP's commit-marker rule, with
// the per-file digests of Megatron's dist_checkpointing manifest).
#include <cstdint>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "neva/api.h"

namespace neva {

// An exclusive lock on a run directory (flock on <run>/run.lock, which also records the holder). The
// kernel releases it when its process dies, so a lock left by a crashed or killed run is taken over.
class NEVA_API RunDirectoryLock {
 public:
  // Throws Error naming the holder's pid and host when another process holds it. On a filesystem
  // without flock (some NFS and Lustre mounts) it tells `warn` and holds nothing.
  explicit RunDirectoryLock(const std::filesystem::path& run_dir,
                            const std::function<void(const std::string&)>& warn = {});
  ~RunDirectoryLock();
  RunDirectoryLock(const RunDirectoryLock&) = delete;
  RunDirectoryLock& operator=(const RunDirectoryLock&) = delete;

 private:
  int fd_ = -1;
};

// The SHA-256 of a file's contents, in hex (OpenSSL).
NEVA_API std::string sha256_file(const std::filesystem::path& path);

class NEVA_API CheckpointManager {
 public:
  using Warn = std::function<void(const std::string&)>;

  // <run_dir>/checkpoints, created if absent. `warn` receives what loading passed over.
  CheckpointManager(std::filesystem::path run_dir, Warn warn);

  // The newest intact committed checkpoint (the one `latest` names when it verifies, else the newest
  // by step whose manifest verifies), or none when the run has not committed one. Damaged ones newer
  // than it are renamed step-N.damaged (kept, and out of the way of pruning). Throws Error when
  // checkpoints exist but none is intact, naming each problem: nothing saved is dropped silently.
  std::optional<std::filesystem::path> find_latest();
  // The checkpoint find_latest found or save last committed.
  const std::optional<std::filesystem::path>& latest() const { return latest_; }

  // Writes the checkpoint of `step` through `write(directory)` into a fresh step directory, commits
  // it (manifest, then latest) and keeps the newest `keep` committed ones.
  void save(std::int64_t step, std::int64_t keep, const std::function<void(const std::filesystem::path&)>& write);
  // The same in two halves, for a save that several processes write: prepare() gives a fresh
  // step directory (an interrupted save of the same step removed), every rank writes its files into
  // it, and once all of them are on disk commit() writes the manifest — `content` (what
  // Trainer::save returns) completed by write_manifest — then `latest`, and prunes.
  std::filesystem::path prepare(std::int64_t step);
  void commit(std::int64_t step, std::int64_t keep, nlohmann::json content = nlohmann::json::object());
  // <directory>/manifest.json, atomically: `content` with the format, its version and the step, and
  // every file of the directory that content["files"] does not list yet, with its size and SHA-256.
  static void write_manifest(const std::filesystem::path& directory, std::int64_t step, nlohmann::json content);

  static std::string step_name(std::int64_t step);  // "step-0000042"
  // The step of a checkpoint directory name, or -1 when `name` is not one.
  static std::int64_t parse_step(const std::string& name);
  // "" when the checkpoint at `directory` is intact, else what is wrong with it (names the file).
  static std::string verify(const std::filesystem::path& directory);

 private:
  std::vector<std::pair<std::int64_t, std::filesystem::path>> step_directories() const;  // newest first
  void prune(std::int64_t committed_step, std::int64_t keep);

  std::filesystem::path directory_;
  Warn warn_;
  std::optional<std::filesystem::path> latest_;
};

}  // namespace neva
