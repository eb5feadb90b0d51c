#include "test_support.h"

#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>

namespace neva::test {

namespace fs = std::filesystem;

fs::path plugin_directory() { return NEVA_TEST_PLUGIN_DIR; }
fs::path broken_plugin_directory(const std::string& fault) { return fs::path(NEVA_TEST_BROKEN_DIR) / fault; }
fs::path binary(const std::string& name) { return fs::path(NEVA_TEST_BINARY_DIR) / name; }
fs::path source_directory() { return NEVA_TEST_SOURCE_DIR; }
fs::path example_plugin_directory() { return NEVA_TEST_EXAMPLE_PLUGIN_DIR; }
fs::path kill_shim() { return NEVA_TEST_KILL_SHIM; }

TempDir::TempDir() {
  std::random_device random;
  path_ = fs::temp_directory_path() / ("neva-test-" + std::to_string(::getpid()) + "-" + std::to_string(random()));
  fs::create_directories(path_);
  fs::permissions(path_, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                             fs::perms::others_read | fs::perms::others_exec);
}

TempDir::~TempDir() {
  std::error_code ignored;
  fs::remove_all(path_, ignored);
}

fs::path TempDir::write(const std::string& name, const std::string& content) const {
  fs::path file = path_ / name;
  std::ofstream(file, std::ios::binary) << content;
  return file;
}

namespace {
std::string slurp(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}
}  // namespace

CommandResult run_command(const std::string& command, int timeout_seconds) {
  TempDir dir;
  fs::path out = dir.path() / "out", err = dir.path() / "err", script = dir.path() / "command.sh";
  std::ofstream(script) << command << "\n";
  std::string shell = "timeout -k 5 " + std::to_string(timeout_seconds) + " /bin/sh " + script.string() + " >" +
                      out.string() + " 2>" + err.string() + " </dev/null";
  int status = std::system(shell.c_str());
  CommandResult result;
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  result.out = slurp(out);
  result.err = slurp(err);
  return result;
}

Process::Process(const std::string& command) {
  posix_spawnattr_t attributes;
  posix_spawnattr_init(&attributes);
  sigset_t defaults;
  sigemptyset(&defaults);
  sigaddset(&defaults, SIGINT);
  sigaddset(&defaults, SIGTERM);
  posix_spawnattr_setsigdefault(&attributes, &defaults);
  posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGDEF);
  const std::string shell_command = "exec " + command;
  char* argv[] = {const_cast<char*>("/bin/sh"), const_cast<char*>("-c"), const_cast<char*>(shell_command.c_str()), nullptr};
  const int failed = posix_spawn(&pid_, "/bin/sh", nullptr, &attributes, argv, environ);
  posix_spawnattr_destroy(&attributes);
  if (failed != 0) throw std::runtime_error("posix_spawn failed for: " + command);
}

Process::~Process() {
  if (!reaped_ && pid_ > 0) {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
}

void Process::signal(int number) const { ::kill(pid_, number); }

int Process::wait(int timeout_seconds) {
  for (int waited = 0; waited < timeout_seconds * 20; ++waited) {
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      reaped_ = true;
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    ::usleep(50000);
  }
  return -1;  // still running: the destructor kills it
}

int free_port() {
  int socket_fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  if (::bind(socket_fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) {
    ::close(socket_fd);
    throw std::runtime_error("free_port: bind failed");
  }
  socklen_t length = sizeof address;
  ::getsockname(socket_fd, reinterpret_cast<sockaddr*>(&address), &length);
  ::close(socket_fd);
  return ntohs(address.sin_port);
}

}  // namespace neva::test
