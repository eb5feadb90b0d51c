#include "launch.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <chrono>
#include <cstring>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "neva/error.h"

extern char** environ;

namespace neva {

namespace {

volatile std::sig_atomic_t forwarded_signal = 0;

// A port on 127.0.0.1 the kernel says is free (rank 0's TCPStore binds it a moment later).
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw Error(std::string("--nproc-per-node: cannot open a socket: ") + std::strerror(errno));
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof address;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    const int reason = errno;
    ::close(fd);
    throw Error(std::string("--nproc-per-node: cannot find a free port on 127.0.0.1: ") + std::strerror(reason));
  }
  ::close(fd);
  return ntohs(address.sin_port);
}

std::string describe(int status) {
  if (WIFSIGNALED(status)) return "was killed by signal " + std::to_string(WTERMSIG(status)) + " (" + strsignal(WTERMSIG(status)) + ")";
  return "exited with status " + std::to_string(WEXITSTATUS(status));
}

int exit_code(int status) { return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status); }

}  // namespace

int launch_workers(int workers, const std::vector<std::string>& arguments, int grace_seconds) {
  for (const char* variable : {"WORLD_SIZE", "SLURM_STEP_NUM_TASKS"}) {
    const char* value = std::getenv(variable);
    if (value && *value && std::string(value) != "1") {
      throw RecipeError(std::string("--nproc-per-node: already launched as several processes (") + variable + "=" +
                        value + "); use either --nproc-per-node or a launcher, not both");
    }
  }
  const int port = free_port();
  std::vector<std::string> environment_text;
  for (char** entry = environ; *entry; ++entry) {
    const std::string text = *entry;
    bool ours = false;
    for (const char* name : {"RANK=", "LOCAL_RANK=", "WORLD_SIZE=", "LOCAL_WORLD_SIZE=", "MASTER_ADDR=", "MASTER_PORT=",
                             "GROUP_RANK=", "NODE_RANK="}) {
      ours = ours || text.rfind(name, 0) == 0;
    }
    if (!ours) environment_text.push_back(text);
  }
  std::vector<char*> argv;
  for (const auto& argument : arguments) argv.push_back(const_cast<char*>(argument.c_str()));
  argv.push_back(nullptr);

  // Signals go to the workers, not to this process's default action.
  struct sigaction forward {}, previous_int {}, previous_term {};
  forward.sa_handler = [](int received) { forwarded_signal = received; };
  sigemptyset(&forward.sa_mask);
  ::sigaction(SIGINT, &forward, &previous_int);
  ::sigaction(SIGTERM, &forward, &previous_term);

  std::vector<pid_t> pids(workers, -1);
  for (int rank = 0; rank < workers; ++rank) {
    std::vector<std::string> env = environment_text;
    for (const auto& [name, value] : std::vector<std::pair<std::string, std::string>>{
             {"RANK", std::to_string(rank)},
             {"LOCAL_RANK", std::to_string(rank)},
             {"WORLD_SIZE", std::to_string(workers)},
             {"LOCAL_WORLD_SIZE", std::to_string(workers)},
             {"MASTER_ADDR", "127.0.0.1"},
             {"MASTER_PORT", std::to_string(port)}}) {
      env.push_back(name + "=" + value);
    }
    std::vector<char*> envp;
    for (auto& entry : env) envp.push_back(entry.data());
    envp.push_back(nullptr);
    const pid_t pid = ::fork();
    if (pid < 0) {
      const int reason = errno;
      for (pid_t started : pids) {
        if (started > 0) ::kill(started, SIGKILL);
      }
      throw Error(std::string("--nproc-per-node: cannot start worker ") + std::to_string(rank) + ": " + std::strerror(reason));
    }
    if (pid == 0) {
      ::sigaction(SIGINT, &previous_int, nullptr);
      ::sigaction(SIGTERM, &previous_term, nullptr);
      ::execve("/proc/self/exe", argv.data(), envp.data());
      std::cerr << "neva-run: cannot start worker " << rank << ": " << std::strerror(errno) << std::endl;
      ::_exit(127);
    }
    pids[rank] = pid;
  }

  int running = workers, first_failure = 0;
  std::chrono::steady_clock::time_point failed_at;
  bool killed = false;
  int passed_on = 0;
  while (running > 0) {
    if (forwarded_signal && forwarded_signal != passed_on) {
      passed_on = forwarded_signal;
      for (pid_t pid : pids) {
        if (pid > 0) ::kill(pid, passed_on);
      }
    }
    int status = 0;
    const pid_t done = ::waitpid(-1, &status, WNOHANG);
    if (done > 0) {
      for (int rank = 0; rank < workers; ++rank) {
        if (pids[rank] != done) continue;
        pids[rank] = -1;
        --running;
        const bool stopped = passed_on && exit_code(status) == 128 + passed_on;  // as asked: not a failure to report
        if (exit_code(status) != 0 && !stopped) {
          std::cerr << "neva-run: worker " << rank << " (rank " << rank << " of " << workers << ") " << describe(status)
                    << std::endl;
        }
        if (exit_code(status) != 0 && !first_failure) {
          first_failure = exit_code(status);
          failed_at = std::chrono::steady_clock::now();
        }
      }
      continue;
    }
    if (first_failure && !killed && std::chrono::steady_clock::now() - failed_at > std::chrono::seconds(grace_seconds)) {
      for (int rank = 0; rank < workers; ++rank) {
        if (pids[rank] <= 0) continue;
        std::cerr << "neva-run: worker " << rank << " still running " << grace_seconds
                  << " s after a worker failed: killing it" << std::endl;
        ::kill(pids[rank], SIGKILL);
      }
      killed = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ::sigaction(SIGINT, &previous_int, nullptr);
  ::sigaction(SIGTERM, &previous_term, nullptr);
  return first_failure;
}

}  // namespace neva
