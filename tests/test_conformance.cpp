#include <doctest/doctest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "test_support.h"

namespace fs = std::filesystem;
using neva::test::TempDir;

namespace {

struct Report {
  int exit_code;
  nlohmann::json json;
  std::string out;
};

Report conformance(const fs::path& plugin, const std::string& config_toml = "") {
  TempDir dir;
  std::string arguments = plugin.string() + " --json " + (dir.path() / "report.json").string() + " --junit " +
                          (dir.path() / "report.xml").string();
  if (!config_toml.empty()) arguments += " --config " + dir.write("config.toml", config_toml).string();
  auto result = neva::test::run_command(neva::test::binary("neva-conformance").string() + " " + arguments, 600);
  Report report{result.exit_code, nlohmann::json(), result.out + result.err};
  std::ifstream in(dir.path() / "report.json");
  if (in) report.json = nlohmann::json::parse(in);
  CHECK(fs::exists(dir.path() / "report.xml"));
  return report;
}

std::string status_of(const Report& report, const std::string& check) {
  for (const auto& item : report.json["checks"]) {
    if (item["name"] == check) return item["status"];
  }
  return "missing";
}

std::string tiny(const std::string& model) {
  return "config = \"" + (neva::test::source_directory() / "configs" / "tiny" / "models" / model / "config.json").string() +
         "\"\n";
}

fs::path faulty(const std::string& fault) {
  return neva::test::broken_plugin_directory("faulty_" + fault) / ("libneva-faulty-" + fault + ".so");
}

}  // namespace

TEST_CASE("every built-in plugin passes the conformance battery") {
  const std::pair<const char*, std::string> plugins[] = {
      {"connector-linear", ""},
      {"connector-mlp", ""},
      {"language_backbone-llama", tiny("llama-2")},
      {"language_backbone-mistral", tiny("mistral")},
      {"language_backbone-mixtral", tiny("mixtral")},
      {"language_backbone-nemotron4", tiny("nemotron-4")},
      {"vision_encoder-clip", tiny("clip-vit-l-336")},
      {"vision_encoder-siglip", tiny("siglip-so400m")},
  };
  for (const auto& [name, config] : plugins) {
    CAPTURE(std::string(name));
    auto report = conformance(neva::test::plugin_directory() / ("libneva-" + std::string(name) + ".so"), config);
    INFO(report.out);
    CHECK(report.exit_code == 0);
    CHECK(report.json["passed"] == true);
  }
}

TEST_CASE("deliberately faulty plugins fail the check that covers their fault") {
  SUBCASE("a non-deterministic forward") {
    auto report = conformance(faulty("nondeterministic"));
    CHECK(report.exit_code == 1);
    CHECK(status_of(report, "determinism") == "fail");
    CHECK(status_of(report, "forward") == "pass");
  }
  SUBCASE("a gradient that does not flow") {
    auto report = conformance(faulty("no_gradient"));
    CHECK(report.exit_code == 1);
    CHECK(status_of(report, "gradients") == "fail");
    CHECK(report.out.find("no gradient reached trainable parameter 'linear.weight'") != std::string::npos);
  }
  SUBCASE("a crash in forward fails those checks, not the run") {
    auto report = conformance(faulty("crash"));
    CHECK(report.exit_code == 1);
    CHECK(status_of(report, "forward") == "fail");
    CHECK(status_of(report, "build") == "pass");
    CHECK(report.out.find("crashed with signal 6") != std::string::npos);
  }
  SUBCASE("outputs that depend on the rest of the batch") {
    auto report = conformance(faulty("batch_coupled"));
    CHECK(report.exit_code == 1);
    CHECK(status_of(report, "batch_independence") == "fail");
    CHECK(status_of(report, "forward") == "pass");
  }
  SUBCASE("per-call state in a static tensor shared by instances and threads") {
    auto report = conformance(faulty("shared_state"));
    CHECK(report.exit_code == 1);
    CHECK(status_of(report, "threads") == "fail");
    CHECK(status_of(report, "determinism") == "pass");
  }
  SUBCASE("a torch::nn::Linear of the plugin's own, which model.fp8 cannot run in FP8") {
    auto report = conformance(faulty("own_linear"), tiny("llama-2"));
    CHECK(report.exit_code == 1);
    CHECK(status_of(report, "fp8") == "fail");
    CHECK(report.out.find("module 'side_proj' is a torch::nn::Linear built outside neva::nn::linear") != std::string::npos);
    CHECK(status_of(report, "forward") == "pass");
  }
  SUBCASE("KV-cache slots that ignore their rows") {
    auto report = conformance(faulty("ignored_slots"), tiny("llama-2"));
    CHECK(report.exit_code == 1);
    CHECK(status_of(report, "kv_slots") == "fail");
    CHECK(report.out.find("in KV-cache rows 2 and 0") != std::string::npos);
    CHECK(status_of(report, "kv_cache") == "pass");
  }
  SUBCASE("a broken KV cache") {
    auto report = conformance(faulty("broken_cache"), tiny("llama-2"));
    CHECK(report.exit_code == 1);
    CHECK(status_of(report, "kv_cache") == "fail");
    CHECK(status_of(report, "forward") == "pass");
  }
}

TEST_CASE("a connector's default widths hold with --config too, and a zero width is refused naming the key") {
  const fs::path linear = neva::test::plugin_directory() / "libneva-connector-linear.so";
  auto empty = conformance(linear, "# nothing but a comment\n");
  INFO(empty.out);
  CHECK(empty.exit_code == 0);
  auto zero = conformance(linear, "input_size = 0\n");
  CHECK(zero.exit_code == 1);
  CHECK(status_of(zero, "build") == "fail");
  CHECK(zero.out.find("input_size: expected an integer >= 1, got 0") != std::string::npos);
}

TEST_CASE("neva-conformance refuses usage errors with exit 2") {
  auto result = neva::test::run_command(neva::test::binary("neva-conformance").string() + " " +
                                        (neva::test::plugin_directory() / "libneva-language_backbone-llama.so").string());
  CHECK(result.exit_code == 2);
  CHECK(result.err.find("needs --config") != std::string::npos);
}
