#include "neva/train/checkpoints.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <memory>

#include "neva/io/atomic_file.h"
#include "neva/error.h"
#include "neva/io/json.h"
#include "neva/train/distributed_checkpoint.h"

namespace neva {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kManifest = "manifest.json";
constexpr const char* kFormat = "neva-checkpoint";

std::string hostname() {
  char name[256] = {};
  ::gethostname(name, sizeof name - 1);
  return name;
}

}  // namespace

// ------------------------------------------------------------------ the run directory's lock

RunDirectoryLock::RunDirectoryLock(const fs::path& run_dir, const std::function<void(const std::string&)>& warn) {
  const fs::path path = run_dir / "run.lock";
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) throw Error(path.string() + ": cannot open the run directory's lock: " + std::strerror(errno));
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int reason = errno;
    std::string holder(512, '\0');
    const ssize_t length = ::pread(fd_, holder.data(), holder.size() - 1, 0);
    holder.resize(length > 0 ? static_cast<std::size_t>(length) : 0);
    while (!holder.empty() && (holder.back() == '\n' || holder.back() == '\0')) holder.pop_back();
    ::close(fd_);
    fd_ = -1;
    if (reason == ENOLCK || reason == ENOSYS || reason == EOPNOTSUPP) {  // a filesystem without flock (some NFS, Lustre)
      if (warn) {
        warn(path.string() + ": this filesystem cannot lock the run directory (" + std::strerror(reason) +
             "); make sure no other run uses " + run_dir.string());
      }
      return;
    }
    if (reason != EWOULDBLOCK) throw Error(path.string() + ": cannot lock the run directory: " + std::strerror(reason));
    throw Error(run_dir.string() + " is in use by another run (" + (holder.empty() ? "holder unknown" : holder) +
                "); wait for it to finish, or choose another exp_manager.explicit_log_dir");
  }
  // Ours now (a lock left by a dead process is released by the kernel): record who holds it.
  const std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  char started[32];
  std::strftime(started, sizeof started, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  const std::string holder = "pid " + std::to_string(::getpid()) + " on " + hostname() + ", started " + started + "\n";
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, holder.data(), holder.size(), 0) != static_cast<ssize_t>(holder.size())) {
    // The lock holds without the note; only the message to a second run is poorer.
  }
}

RunDirectoryLock::~RunDirectoryLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the flock
}

// ------------------------------------------------------------------ digests

std::string sha256_file(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(path.string() + ": cannot open: " + std::strerror(errno));
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> context(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  if (!context || EVP_DigestInit_ex(context.get(), EVP_sha256(), nullptr) != 1) {
    ::close(fd);
    throw Error(path.string() + ": cannot start a SHA-256 digest (OpenSSL)");
  }
  std::vector<unsigned char> buffer(1 << 20);
  for (;;) {
    const ssize_t got = ::read(fd, buffer.data(), buffer.size());
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      const int reason = errno;
      ::close(fd);
      throw Error(path.string() + ": cannot read: " + std::strerror(reason));
    }
    if (got == 0) break;
    EVP_DigestUpdate(context.get(), buffer.data(), static_cast<std::size_t>(got));
  }
  ::close(fd);
  std::array<unsigned char, EVP_MAX_MD_SIZE> digest{};
  unsigned int length = 0;
  EVP_DigestFinal_ex(context.get(), digest.data(), &length);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < length; ++i) {
    out += hex[digest[i] >> 4];
    out += hex[digest[i] & 15];
  }
  return out;
}

// ------------------------------------------------------------------ checkpoints

CheckpointManager::CheckpointManager(fs::path run_dir, Warn warn)
    : directory_(std::move(run_dir) / "checkpoints"), warn_(std::move(warn)) {
  fs::create_directories(directory_);
}

std::string CheckpointManager::step_name(std::int64_t step) {
  char name[32];
  std::snprintf(name, sizeof name, "step-%07lld", static_cast<long long>(step));
  return name;
}

std::int64_t CheckpointManager::parse_step(const std::string& name) {
  if (name.size() < 6 || name.size() > 5 + 18 || name.compare(0, 5, "step-") != 0) return -1;
  std::int64_t step = 0;
  for (std::size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return -1;
    step = step * 10 + (name[i] - '0');
  }
  return step;
}

std::vector<std::pair<std::int64_t, fs::path>> CheckpointManager::step_directories() const {
  std::vector<std::pair<std::int64_t, fs::path>> out;
  for (const auto& entry : fs::directory_iterator(directory_)) {
    const std::int64_t step = parse_step(entry.path().filename().string());
    if (step >= 0 && entry.is_directory() && !entry.is_symlink()) out.emplace_back(step, entry.path());
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  return out;
}

std::string CheckpointManager::verify(const fs::path& directory) {
  const fs::path manifest_path = directory / kManifest;
  std::error_code error;
  if (!fs::exists(manifest_path, error)) return manifest_path.string() + " is missing: the save was interrupted";
  json manifest;
  try {
    manifest = read_json_file(manifest_path.string());
  } catch (const Error& bad) {
    return bad.what();
  }
  if (!manifest.is_object() || manifest.value("format", "") != kFormat || !manifest.contains("files") ||
      !manifest["files"].is_object()) {
    return manifest_path.string() + ": not a neva checkpoint manifest";
  }
  if (!manifest["version"].is_number_integer() || manifest["version"].get<int>() > kCheckpointFormatVersion) {
    return manifest_path.string() + ": written by a newer neva (manifest version " + json_excerpt(manifest["version"]) +
           ", this neva reads " + std::to_string(kCheckpointFormatVersion) + ")";
  }
  for (const auto& [name, file] : manifest["files"].items()) {
    if (name.empty() || name.find('/') != std::string::npos || name == "." || name == ".." || !file.is_object() ||
        !file.contains("bytes") || !file.at("bytes").is_number_unsigned() || !file.contains("sha256") ||
        !file.at("sha256").is_string()) {
      return manifest_path.string() + ": malformed entry '" + name + "'";
    }
    const fs::path path = directory / name;
    const auto bytes = fs::file_size(path, error);
    if (error) return path.string() + " is missing";
    if (bytes != file.at("bytes").get<std::uint64_t>()) {
      return path.string() + " has " + std::to_string(bytes) + " bytes, the manifest says " +
             std::to_string(file.at("bytes").get<std::uint64_t>()) + " (truncated?)";
    }
    std::string digest;
    try {
      digest = sha256_file(path);
    } catch (const Error& unreadable) {
      return unreadable.what();
    }
    if (digest != file.at("sha256").get<std::string>()) {
      return path.string() + ": SHA-256 " + digest + " differs from the manifest's " +
             file.at("sha256").get<std::string>() + " (the file was damaged or changed after it was saved)";
    }
  }
  return {};
}

std::optional<fs::path> CheckpointManager::find_latest() {
  latest_.reset();
  // The marker names the newest commit; a marker that names anything but a step directory here is not
  // followed (it may point outside the run directory).
  std::optional<std::int64_t> marked;
  const fs::path marker = directory_ / "latest";
  std::error_code error;
  if (fs::exists(marker, error)) {
    std::string name = read_file(marker.string());
    while (!name.empty() && (name.back() == '\n' || name.back() == '\r')) name.pop_back();
    if (parse_step(name) >= 0) {
      marked = parse_step(name);
    } else {
      warn_(marker.string() + " names '" + name + "', which is not a checkpoint of this run directory; ignoring it");
    }
  }
  std::vector<std::string> problems;
  std::vector<fs::path> damaged;
  for (const auto& [step, path] : step_directories()) {
    const bool legacy = marked && *marked == step && !fs::exists(path / kManifest, error) &&
                        fs::exists(path / "trainer_state.json", error);
    if (legacy) {  // committed by an older neva, which wrote no manifest: nothing to verify against
      warn_(path.string() + " was saved without a manifest (by an older neva); resuming from it unverified");
      latest_ = path;
      return latest_;
    }
    if (!fs::exists(path / kManifest, error)) continue;  // an interrupted save: never committed
    std::string problem = verify(path);
    if (problem.empty()) {
      // The damaged ones, newer than this, are kept for the user to look at or restore, out of the way
      // of pruning and of the saves that will reach their steps again.
      for (const auto& directory : damaged) {
        fs::path aside = directory;
        aside += ".damaged";
        std::error_code error;
        fs::rename(directory, aside, error);
        warn_(directory.filename().string() + (error ? " could not be set aside: " + error.message()
                                                     : " is set aside as " + aside.filename().string()));
      }
      if (!problems.empty()) warn_("resuming from " + path.string() + ", the newest intact checkpoint");
      latest_ = path;
      return latest_;
    }
    warn_("checkpoint " + path.filename().string() + " is damaged and is skipped: " + problem);
    problems.push_back(problem);
    damaged.push_back(path);
  }
  if (!problems.empty()) {
    std::string all;
    for (const auto& problem : problems) all += (all.empty() ? "" : "; ") + problem;
    throw Error(directory_.string() + ": no intact checkpoint to resume from (" + all + "); restore the files, or " +
                "move the checkpoints directory away to start over");
  }
  return std::nullopt;
}

fs::path CheckpointManager::prepare(std::int64_t step) {
  const fs::path path = directory_ / step_name(step);
  if (latest_ && *latest_ == path) {
    throw Error(path.string() + " is committed already; a second save of step " + std::to_string(step) + " would replace it");
  }
  fs::remove_all(path);  // an interrupted or damaged save of the same step
  fs::create_directories(path);
  return path;
}

void CheckpointManager::write_manifest(const fs::path& directory, std::int64_t step, json content) {
  if (!content.is_object()) content = json::object();
  json& files = content["files"];
  if (!files.is_object()) files = json::object();
  for (const auto& entry : fs::directory_iterator(directory)) {
    if (!entry.is_regular_file()) continue;
    const std::string name = entry.path().filename().string();
    if (name.front() == '.' || name == kManifest || files.contains(name)) continue;  // temporaries; listed ones
    files[name] = {{"bytes", entry.file_size()}, {"sha256", sha256_file(entry.path())}};
  }
  content["format"] = kFormat;
  content["version"] = kCheckpointFormatVersion;
  content["step"] = step;
  write_file_atomically((directory / kManifest).string(), content.dump(2) + "\n");  // the commit
}

void CheckpointManager::commit(std::int64_t step, std::int64_t keep, json content) {
  const fs::path path = directory_ / step_name(step);
  write_manifest(path, step, std::move(content));
  sync_directory(directory_.string());  // step-N's entry is durable before the marker names it
  write_file_atomically((directory_ / "latest").string(), path.filename().string() + "\n");
  latest_ = path;
  prune(step, keep);
}

void CheckpointManager::save(std::int64_t step, std::int64_t keep, const std::function<void(const fs::path&)>& write) {
  const fs::path path = directory_ / step_name(step);
  if (latest_ && *latest_ == path) return;  // this very step is already committed
  write(prepare(step));
  commit(step, keep);
}

void CheckpointManager::prune(std::int64_t committed_step, std::int64_t keep) {
  std::int64_t kept = 0;
  for (const auto& [step, path] : step_directories()) {
    // Newer than the commit: an interrupted save. Otherwise keep the newest `keep` (older ones without a
    // manifest were committed by an older neva).
    if (step > committed_step || ++kept > keep) fs::remove_all(path);
  }
}

}  // namespace neva
