// A test-only LD_PRELOAD library: counts the file operations a process makes on paths under a
// "/checkpoints/" directory (open for writing, write, fsync, rename, mkdir, unlink) and, when
// NEVA_KILL_AT=N, kills the process with SIGKILL just before the N-th, as a power cut or `kill -9`
// at that instant would. With NEVA_KILL_TRACE=FILE it only lists them (one "N call path" line each),
// so a test can pick points inside a save. With NEVA_KILL_RANK=R only the process with RANK=R counts.
// Production code has no hook: this sits between it and libc.

#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <atomic>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_FDS 4096

namespace {
std::atomic<int> watched[MAX_FDS];  // fds opened on checkpoint paths (files and directories)
std::atomic<long> counter;

int is_checkpoint_path(const char* path) { return path && strstr(path, "/checkpoints/") != nullptr; }

void event(const char* call, const char* path) {
  // NEVA_KILL_RANK=R: only the process whose launcher-given RANK is R counts (one rank of a
  // multi-process run; the launcher itself has no RANK).
  const char* only = getenv("NEVA_KILL_RANK");
  if (only) {
    const char* rank = getenv("RANK");
    if (!rank || strcmp(rank, only) != 0) return;
  }
  long n = counter.fetch_add(1) + 1;
  const char* trace = getenv("NEVA_KILL_TRACE");
  if (trace) {
    FILE* out = fopen(trace, "a");
    if (out) {
      fprintf(out, "%ld %s %s\n", n, call, path ? path : "");
      fclose(out);
    }
  }
  const char* at = getenv("NEVA_KILL_AT");
  if (at && atol(at) == n) raise(SIGKILL);
}

void* next(const char* name) { return dlsym(RTLD_NEXT, name); }

// Opening a checkpoint file for writing is an event; every fd on a checkpoint path is watched.
void before_open(const char* call, const char* path, int flags) {
  if ((flags & (O_WRONLY | O_RDWR)) && is_checkpoint_path(path)) event(call, path);
}
int after_open(int fd, const char* path) {
  if (fd >= 0 && fd < MAX_FDS) watched[fd].store(is_checkpoint_path(path));
  return fd;
}

}  // namespace

extern "C" {

// open and openat take a mode only with O_CREAT or O_TMPFILE.
#define NEVA_SHIM_MODE(flags)              \
  mode_t mode = 0;                         \
  if ((flags) & (O_CREAT | O_TMPFILE)) {   \
    va_list args;                          \
    va_start(args, flags);                 \
    mode = va_arg(args, mode_t);           \
    va_end(args);                          \
  }

int open(const char* path, int flags, ...) {
  static auto real = reinterpret_cast<int (*)(const char*, int, ...)>(next("open"));
  NEVA_SHIM_MODE(flags)
  before_open("open", path, flags);
  return after_open(real(path, flags, mode), path);
}

int open64(const char* path, int flags, ...) {
  NEVA_SHIM_MODE(flags)
  return open(path, flags, mode);
}

int openat(int dirfd, const char* path, int flags, ...) {
  static auto real = reinterpret_cast<int (*)(int, const char*, int, ...)>(next("openat"));
  NEVA_SHIM_MODE(flags)
  before_open("openat", path, flags);
  return after_open(real(dirfd, path, flags, mode), path);
}

ssize_t write(int fd, const void* data, size_t size) {
  static auto real = reinterpret_cast<ssize_t (*)(int, const void*, size_t)>(next("write"));
  if (fd >= 0 && fd < MAX_FDS && watched[fd].load()) event("write", "");
  return real(fd, data, size);
}

int fsync(int fd) {
  static auto real = reinterpret_cast<int (*)(int)>(next("fsync"));
  if (fd >= 0 && fd < MAX_FDS && watched[fd].load()) event("fsync", "");
  return real(fd);
}

int rename(const char* from, const char* to) {
  static auto real = reinterpret_cast<int (*)(const char*, const char*)>(next("rename"));
  if (is_checkpoint_path(to)) event("rename", to);
  return real(from, to);
}

int mkdir(const char* path, mode_t mode) {
  static auto real = reinterpret_cast<int (*)(const char*, mode_t)>(next("mkdir"));
  if (is_checkpoint_path(path)) event("mkdir", path);
  return real(path, mode);
}

int unlink(const char* path) {
  static auto real = reinterpret_cast<int (*)(const char*)>(next("unlink"));
  if (is_checkpoint_path(path)) event("unlink", path);
  return real(path);
}

}  // extern "C"
