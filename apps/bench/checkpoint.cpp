// neva-bench-checkpoint: the distributed checkpoint's save and load throughput against this disk's
// own write and read speed, and the peak memory of a load against the bytes it reads; the numbers
// behind docs/benchmarks.md. One rank's state is made of `--mib` MiB of fp32 tensors (64 of them,
// 2-D). The disk is measured with the same calls neva's writer makes (write, fsync) and read with
// pread after the file's pages are dropped from the page cache (posix_fadvise DONTNEED), as are the
// checkpoint's files before the load.
#include <ATen/ATen.h>
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "neva/train/checkpoints.h"
#include "neva/train/distributed_checkpoint.h"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

double status_mib(const char* key) {  // VmRSS, VmHWM from /proc/self/status
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(key, 0) == 0) return std::stod(line.substr(std::string(key).size() + 1)) / 1024.0;
  }
  return 0;
}

void drop_cache(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

}  // namespace

int main(int argc, char** argv) {
  std::int64_t mib = 1024;
  fs::path dir = fs::temp_directory_path() / ("neva-bench-checkpoint-" + std::to_string(::getpid()));
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i];
    if (key == "--mib") mib = std::atoll(argv[i + 1]);
    if (key == "--dir") dir = argv[i + 1];
  }
  fs::create_directories(dir);
  const std::int64_t tensors = 64, columns = 4096;  // rows of 16 KiB: a 4096-wide fp32 weight
  const std::int64_t rows = mib * (1 << 20) / 4 / tensors / columns;
  const double bytes = static_cast<double>(tensors * rows * columns * 4);
  std::printf("state: %lld tensors of [%lld, %lld] fp32, %.0f MiB; directory %s\n", static_cast<long long>(tensors),
              static_cast<long long>(rows), static_cast<long long>(columns), bytes / 1048576, dir.c_str());

  // The disk: one file of the same size, written and fsynced, then read back cold.
  {
    std::vector<char> buffer(64 << 20, 1);
    const fs::path path = dir / "disk.bin";
    auto start = Clock::now();
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    for (double written = 0; written < bytes; written += static_cast<double>(buffer.size())) {
      if (::write(fd, buffer.data(), buffer.size()) < 0) return 1;
    }
    ::fsync(fd);
    ::close(fd);
    const double write_seconds = seconds_since(start);
    drop_cache(path);
    start = Clock::now();
    const int in = ::open(path.c_str(), O_RDONLY);
    off_t at = 0;
    for (ssize_t got; (got = ::pread(in, buffer.data(), buffer.size(), at)) > 0;) at += got;
    ::close(in);
    const double read_seconds = seconds_since(start);
    fs::remove(path);
    std::printf("disk: write + fsync %.2f GB/s, cold read %.2f GB/s\n", bytes / write_seconds / 1e9, bytes / read_seconds / 1e9);
  }

  // Save: one rank's pieces (its file written, fsynced and hashed), the manifest.
  std::vector<neva::CheckpointPiece> pieces;
  for (std::int64_t t = 0; t < tensors; ++t) {
    pieces.push_back({"t" + std::to_string(t), {rows, columns}, neva::whole_region({rows, columns}),
                      at::randn({rows, columns})});
  }
  auto start = Clock::now();
  const nlohmann::json description = neva::write_rank_shard(dir, 0, pieces, {});
  const double save_seconds = seconds_since(start);
  neva::CheckpointManager::write_manifest(dir, 1, neva::merge_rank_shards({description}));
  std::printf("save: %.2f GB/s (write, fsync and SHA-256 of %.0f MiB in %.2f s)\n", bytes / save_seconds / 1e9,
              bytes / 1048576, save_seconds);
  start = Clock::now();
  const std::string problem = neva::CheckpointManager::verify(dir);
  std::printf("verify (SHA-256 of every file): %.2f GB/s%s\n", bytes / seconds_since(start) / 1e9,
              problem.empty() ? "" : (" FAILED: " + problem).c_str());

  // Load into the rank's own tensors (allocated first: they are its state), cold, with the peak
  // memory the load adds.
  std::vector<at::Tensor> destination;
  for (std::int64_t t = 0; t < tensors; ++t) destination.push_back(at::zeros({rows, columns}));
  pieces.clear();
  drop_cache(dir / "rank-00000.safetensors");
  std::ofstream("/proc/self/clear_refs") << "5";  // resets VmHWM to the current VmRSS
  const double before = status_mib("VmRSS:");
  start = Clock::now();
  {
    const neva::CheckpointReader reader(dir);
    for (std::int64_t t = 0; t < tensors; ++t) {
      reader.read("t" + std::to_string(t), neva::whole_region({rows, columns}), destination[static_cast<std::size_t>(t)]);
    }
  }
  const double load_seconds = seconds_since(start);
  const double peak = status_mib("VmHWM:");
  std::printf("load: %.2f GB/s cold; peak resident memory %.0f MiB, %.0f MiB before it (the destination included): "
              "the load added %.0f MiB, %.3f of the %.0f MiB it read\n",
              bytes / load_seconds / 1e9, peak, before, peak - before, (peak - before) / (bytes / 1048576), bytes / 1048576);
  // A resharding read: each tensor's right half of the columns (a row-parallel shard at TP2 from TP1).
  drop_cache(dir / "rank-00000.safetensors");
  start = Clock::now();
  {
    const neva::CheckpointReader reader(dir);
    neva::TensorRegion half = neva::whole_region({rows, columns});
    half.offsets[1] = columns / 2;
    half.lengths[1] = columns / 2;
    for (std::int64_t t = 0; t < tensors; ++t) {
      at::Tensor out = destination[static_cast<std::size_t>(t)].narrow(1, 0, columns / 2);
      at::Tensor staging = at::empty(half.data_shape());
      reader.read("t" + std::to_string(t), half, staging);
      out.copy_(staging);
    }
    std::printf("load of every tensor's right half (a TP2 row-parallel shard from a TP1 checkpoint): %.2f GB/s of "
                "wanted bytes, %.0f MiB read from the file\n",
                bytes / 2 / seconds_since(start) / 1e9, static_cast<double>(reader.bytes_read()) / 1048576);
  }
  fs::remove_all(dir);
  return 0;
}
