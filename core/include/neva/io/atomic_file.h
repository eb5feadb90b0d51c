#pragma once
// Files that appear complete or not at all: written to a temporary file in the target's directory,
// flushed to disk (fsync), renamed over the target, and the directory entry flushed too. A crash at
// any point leaves the previous file (or none), never a torn one.
#include <cstddef>
#include <string>

#include "neva/api.h"

namespace neva {

class NEVA_API AtomicFile {
 public:
  explicit AtomicFile(std::string path);  // throws Error when the temporary file cannot be created
  ~AtomicFile();                          // not committed: the temporary file is removed
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, std::size_t size);
  void write(const std::string& text) { write(text.data(), text.size()); }
  void commit();  // fsync, rename into place, fsync the directory

 private:
  std::string path_, temporary_;
  int fd_ = -1;
  bool committed_ = false;
};

NEVA_API void write_file_atomically(const std::string& path, const std::string& contents);
// fsync of a directory, so that renames and new entries in it survive a power loss.
NEVA_API void sync_directory(const std::string& directory);

}  // namespace neva
