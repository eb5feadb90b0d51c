#pragma once
// Helpers shared by the doctest suites: build-tree paths, temporary directories, running commands.
#include <filesystem>
#include <string>

namespace neva::test {

// Paths baked in by tests/CMakeLists.txt.
std::filesystem::path plugin_directory();         // build/lib/neva/plugins (the real plugins)
std::filesystem::path broken_plugin_directory(const std::string& fault);  // one directory per fault
std::filesystem::path binary(const std::string& name);                  // build/bin/<name>
std::filesystem::path source_directory();
std::filesystem::path example_plugin_directory();  // examples/qwen2, built out of tree against the SDK
std::filesystem::path kill_shim();
// NEVA_ORACLE_DIR (which ctest sets after running the reference scripts) / `part`; throws when unset.
std::filesystem::path oracle_directory(const std::string& part = "");  // support/kill_shim.cpp: LD_PRELOAD it to kill -9 inside checkpoint I/O

// A fresh directory (mode 0755) removed when the object dies.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path write(const std::string& name, const std::string& content) const;

 private:
  std::filesystem::path path_;
};

struct CommandResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};

// Runs `command` through /bin/sh with a time limit (seconds); a command that hangs fails the test
// instead of hanging it.
CommandResult run_command(const std::string& command, int timeout_seconds = 120);

// A command started in the background (/bin/sh -c, SIGINT and SIGTERM at their defaults even where
// the test runner ignores them), for tests that signal it.
class Process {
 public:
  explicit Process(const std::string& command);
  ~Process();  // kills it if still running
  int pid() const { return pid_; }
  void signal(int number) const;
  // Waits up to `timeout_seconds`; the exit status as run_command gives it (128 + signal if killed).
  int wait(int timeout_seconds = 120);

 private:
  int pid_ = -1;
  bool reaped_ = false;
};

// A greyscale JPEG of a gradient (libjpeg); `scans` > 0: progressive, with that many scans (up to 631:
// the DC scan, then each AC coefficient in successive-approximation passes).
std::string encode_jpeg(int width, int height, int scans = 0);

// A TCP port on 127.0.0.1 that was free a moment ago.
int free_port();

}  // namespace neva::test
