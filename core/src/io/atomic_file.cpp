#include "neva/io/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "neva/error.h"

namespace neva {

namespace fs = std::filesystem;

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  fs::path target(path_);
  fs::path directory = target.parent_path().empty() ? fs::path(".") : target.parent_path();
  temporary_ = (directory / ("." + target.filename().string() + ".tmp." + std::to_string(::getpid()))).string();
  fd_ = ::open(temporary_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) throw Error(temporary_ + ": cannot create: " + std::strerror(errno));
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(temporary_.c_str());
}

void AtomicFile::write(const void* data, std::size_t size) {
  const char* cursor = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t written = ::write(fd_, cursor, size);
    if (written < 0 && errno == EINTR) continue;
    if (written <= 0) throw Error(temporary_ + ": write failed: " + std::strerror(errno));
    cursor += written;
    size -= static_cast<std::size_t>(written);
  }
}

void AtomicFile::commit() {
  int fd = fd_;
  fd_ = -1;
  const bool synced = ::fsync(fd) == 0;
  const int saved = errno;
  if (::close(fd) != 0 || !synced) throw Error(temporary_ + ": cannot flush to disk: " + std::strerror(synced ? errno : saved));
  if (::rename(temporary_.c_str(), path_.c_str()) != 0) {
    throw Error(path_ + ": cannot move the finished file into place: " + std::strerror(errno));
  }
  committed_ = true;
  fs::path directory = fs::path(path_).parent_path();
  sync_directory(directory.empty() ? "." : directory.string());
}

void write_file_atomically(const std::string& path, const std::string& contents) {
  AtomicFile file(path);
  file.write(contents);
  file.commit();
}

void sync_directory(const std::string& directory) {
  int fd = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;  // best effort: some filesystems refuse directory handles
  ::fsync(fd);
  ::close(fd);
}

}  // namespace neva
