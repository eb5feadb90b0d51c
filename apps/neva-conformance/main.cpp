// neva-conformance PLUGIN.so [--config plugin.toml] [--json report.json] [--junit report.xml]
// Runs the conformance battery for the plugin's kind, each check in its own process (a crash fails
// that check, not the run), prints a readable report and writes machine-readable ones.
// Exit status: 0 when every check passes, 1 when one fails, 2 on a usage error.
#include <CLI/CLI.hpp>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "neva/conformance.h"
#include "neva/error.h"
#include "neva/io/json.h"

extern char** environ;

namespace {

namespace fs = std::filesystem;

struct Outcome {
  std::string name, description, status, message;  // status: pass | fail
  double seconds = 0;
};

// Runs `self --run-check NAME PLUGIN --config FILE` with a time limit; its stderr is the failure.
Outcome run_isolated(const std::string& self, const neva::ConformanceCheck& check, const std::string& plugin,
                     const std::string& config, int timeout_seconds) {
  Outcome outcome{check.name, check.description, "fail", "", 0};
  char log_template[] = "/tmp/neva-conformance-log-XXXXXX";
  int log = ::mkstemp(log_template);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, log, STDERR_FILENO);
  posix_spawn_file_actions_adddup2(&actions, log, STDOUT_FILENO);
  std::vector<std::string> args = {self, "--run-check", check.name, plugin};
  if (!config.empty()) args.insert(args.end(), {"--config", config});
  std::vector<char*> argv;
  for (auto& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  auto start = std::chrono::steady_clock::now();
  pid_t child = 0;
  int spawned = posix_spawn(&child, self.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  ::close(log);
  if (spawned != 0) {
    outcome.message = "could not start the check process";
    return outcome;
  }
  int status = 0;
  bool timed_out = false;
  while (::waitpid(child, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() - start > std::chrono::seconds(timeout_seconds)) {
      ::kill(child, SIGKILL);
      ::waitpid(child, &status, 0);
      timed_out = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  outcome.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::string output = neva::read_file(log_template);
  std::remove(log_template);
  while (!output.empty() && (output.back() == '\n' || output.back() == ' ')) output.pop_back();
  if (timed_out) {
    outcome.message = "did not finish within " + std::to_string(timeout_seconds) + " s";
  } else if (WIFSIGNALED(status)) {
    outcome.message = "crashed with signal " + std::to_string(WTERMSIG(status)) + " (" + strsignal(WTERMSIG(status)) + ")";
  } else if (WEXITSTATUS(status) != 0) {
    outcome.message = output.empty() ? "failed" : output;
  } else {
    outcome.status = "pass";
  }
  return outcome;
}

void write_junit(const std::string& path, const std::string& plugin, const std::vector<Outcome>& outcomes) {
  auto escape = [](std::string text) {
    std::string out;
    for (char c : text) {
      switch (c) {
        case '&': out += "&amp;"; break;
        case '<': out += "&lt;"; break;
        case '>': out += "&gt;"; break;
        case '"': out += "&quot;"; break;
        default: out += c;
      }
    }
    return out;
  };
  std::size_t failures = 0;
  for (const auto& o : outcomes) failures += o.status != "pass";
  std::ofstream out(path);
  out << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuite name=\"neva-conformance\" tests=\"" << outcomes.size()
      << "\" failures=\"" << failures << "\">\n";
  for (const auto& o : outcomes) {
    out << "  <testcase classname=\"" << escape(plugin) << "\" name=\"" << o.name << "\" time=\"" << o.seconds << "\"";
    if (o.status == "pass") {
      out << "/>\n";
    } else {
      out << ">\n    <failure message=\"" << escape(o.message) << "\"/>\n  </testcase>\n";
    }
  }
  out << "</testsuite>\n";
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"neva-conformance: checks that a neva plugin behaves as its kind's interface promises"};
  std::string plugin, config_file, json_file, junit_file, run_check;
  int timeout = 300;
  app.add_option("plugin", plugin, "The plugin library (.so)")->required();
  app.add_option("--config", config_file, "TOML with the plugin's recipe keys for a small debug build "
                                          "(connectors default to input_size = 16, output_size = 32)");
  app.add_option("--json", json_file, "Write the report as JSON");
  app.add_option("--junit", junit_file, "Write the report as JUnit XML");
  app.add_option("--timeout", timeout, "Seconds per check (default 300)");
  app.add_option("--run-check", run_check)->group("");  // internal: one check, in this process
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::cout << app.help();
    return 0;
  } catch (const CLI::ParseError& error) {
    std::cerr << "neva-conformance: " << error.what() << " (see --help)\n";
    return 2;
  }

  std::string config;
  if (!config_file.empty()) {
    try {
      config = neva::read_file(config_file, "config");
    } catch (const neva::Error& error) {
      std::cerr << "neva-conformance: " << error.what() << "\n";
      return 2;
    }
  }
  try {
    plugin = fs::absolute(plugin).string();
    if (!run_check.empty()) {
      neva::run_conformance_check(run_check, plugin, config);
      return 0;
    }
    std::string kind = neva::plugin_kind(plugin);
    if (config.empty() && kind != "connector") {
      std::cerr << "neva-conformance: a " << kind << " plugin needs --config with the keys of a small debug build\n";
      return 2;
    }
    std::string self = fs::canonical("/proc/self/exe").string();
    std::vector<Outcome> outcomes;
    std::cout << "neva-conformance: " << plugin << " (" << kind << ")\n";
    for (const auto& check : neva::conformance_checks(kind)) {
      outcomes.push_back(run_isolated(self, check, plugin, config_file.empty() ? "" : fs::absolute(config_file).string(),
                                      timeout));
      const Outcome& o = outcomes.back();
      std::cout << (o.status == "pass" ? "  PASS " : "  FAIL ") << o.name << " (" << std::fixed
                << std::setprecision(1) << o.seconds << " s) " << o.description
                << (o.message.empty() ? "" : "\n       " + o.message) << "\n";
    }
    std::size_t failed = 0;
    nlohmann::json report = {{"plugin", plugin}, {"kind", kind}, {"checks", nlohmann::json::array()}};
    for (const auto& o : outcomes) {
      failed += o.status != "pass";
      report["checks"].push_back({{"name", o.name}, {"description", o.description}, {"status", o.status},
                                  {"message", o.message}, {"seconds", o.seconds}});
    }
    report["passed"] = failed == 0;
    if (!json_file.empty()) std::ofstream(json_file) << report.dump(2) << "\n";
    if (!junit_file.empty()) write_junit(junit_file, plugin, outcomes);
    std::cout << (outcomes.size() - failed) << " passed, " << failed << " failed\n";
    return failed == 0 ? 0 : 1;
  } catch (const std::exception& error) {
    std::cerr << error.what() << "\n";
    return 1;
  }
}
