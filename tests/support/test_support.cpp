#include "test_support.h"

#include <jpeglib.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <vector>
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

// A JPEG of a gradient, `scans` progressive scans (0: baseline), through libjpeg.
std::string encode_jpeg(int width, int height, int scans) {
  jpeg_compress_struct info{};
  jpeg_error_mgr errors{};
  info.err = jpeg_std_error(&errors);
  jpeg_create_compress(&info);
  unsigned char* buffer = nullptr;
  unsigned long size = 0;
  jpeg_mem_dest(&info, &buffer, &size);
  info.image_width = width;
  info.image_height = height;
  info.input_components = 1;
  info.in_color_space = JCS_GRAYSCALE;
  jpeg_set_defaults(&info);
  std::vector<jpeg_scan_info> script;
  if (scans > 0) {
    // DC, then each AC coefficient alone in successive-approximation passes: up to 1 + 63 * 10 scans.
    script.push_back({1, {0}, 0, 0, 0, 0});
    for (int k = 1; k <= 63 && static_cast<int>(script.size()) < scans; ++k) {
      script.push_back({1, {0}, k, k, 0, 9});
      for (int bit = 9; bit >= 1 && static_cast<int>(script.size()) < scans; --bit) {
        script.push_back({1, {0}, k, k, bit, bit - 1});
      }
    }
    // Coefficients not covered by a cut-short script still need a first scan.
    info.scan_info = script.data();
    info.num_scans = static_cast<int>(script.size());
  }
  jpeg_start_compress(&info, TRUE);
  std::vector<unsigned char> row(width);
  while (info.next_scanline < info.image_height) {
    for (int x = 0; x < width; ++x) row[x] = static_cast<unsigned char>((x * 7 + info.next_scanline * 3) & 255);
    JSAMPROW pointer = row.data();
    jpeg_write_scanlines(&info, &pointer, 1);
  }
  jpeg_finish_compress(&info);
  jpeg_destroy_compress(&info);
  std::string out(reinterpret_cast<char*>(buffer), size);
  free(buffer);
  return out;
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

std::filesystem::path oracle_directory(const std::string& part) {
  const char* directory = std::getenv("NEVA_ORACLE_DIR");
  if (!directory) throw std::runtime_error("NEVA_ORACLE_DIR is not set (ctest sets it after running the oracle scripts)");
  return part.empty() ? std::filesystem::path(directory) : std::filesystem::path(directory) / part;
}

}  // namespace neva::test
