#include <doctest/doctest.h>

#include <sys/stat.h>
#include <torch/version.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "test_support.h"

using neva::test::run_command;
using neva::test::TempDir;

namespace {

// neva-run with plugin discovery limited to the build tree's install-relative directory.
neva::test::CommandResult neva_run(const std::string& arguments) {
  return run_command("env -u NEVA_PLUGIN_PATH " + neva::test::binary("neva-run").string() + " " + arguments, 120);
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

const char* kRecipe = R"([run]
mode = "inspect"

[model]
micro_batch_size = 1

[model.mm_cfg]
mm_mlp_adapter_type = "linear"

[model.mm_cfg.mm_mlp_adapter]
input_size = 8
output_size = 16
)";

}  // namespace

TEST_CASE("neva-run --help and --version exit 0") {
  auto help = neva_run("--help");
  CHECK(help.exit_code == 0);
  CHECK(contains(help.out, "neva-run validate RECIPE.toml"));
  auto version = neva_run("--version");
  CHECK(version.exit_code == 0);
  CHECK(contains(version.out, std::string("LibTorch ") + TORCH_VERSION));
}

TEST_CASE("usage errors exit 2 with one line on stderr") {
  auto result = neva_run("--no-such-flag");
  CHECK(result.exit_code == 2);
  CHECK(contains(result.err, "--no-such-flag"));
  auto none = neva_run("");
  CHECK(none.exit_code == 2);
  CHECK(none.err == "neva-run: no recipe given (see neva-run --help)\n");
}

TEST_CASE("neva-run plugins lists the built-in plugins, as text and as JSON") {
  auto text = neva_run("plugins");
  CHECK(text.exit_code == 0);
  CHECK(contains(text.out, "connector\tlinear\t0.1.0"));
  CHECK(contains(text.out, "connector\tmlp\t0.1.0"));
  auto json = neva_run("plugins --json");
  REQUIRE(json.exit_code == 0);
  auto list = nlohmann::json::parse(json.out);
  REQUIRE(list.size() >= 2);
  CHECK(list[1]["name"] == "mlp");  // sorted by kind, then name
  CHECK(list[1]["abi"] == "2.5");
}

TEST_CASE("a recipe file runs, validates, and takes --set overrides") {
  TempDir dir;
  auto recipe = dir.write("recipe.toml", kRecipe);
  auto run = neva_run(recipe.string() + " --set model.micro_batch_size=3");
  CHECK(run.exit_code == 0);
  CHECK(contains(run.out, "forward: connector [3, 576, 8] Float -> [3, 576, 16] Float"));
  auto validate = neva_run("validate " + recipe.string());
  CHECK(validate.exit_code == 0);
  CHECK(validate.out == recipe.string() + ": valid (mode inspect)\n");
}

TEST_CASE("recipe errors exit 2 with the location first on one line") {
  TempDir dir;
  auto recipe = dir.write("recipe.toml", std::string(kRecipe) + "[trainer]\nprecison = \"bf16\"\n");
  auto result = neva_run("validate " + recipe.string());
  CHECK(result.exit_code == 2);
  CHECK(result.err == "neva-run: " + recipe.string() +
                          ":14:1: trainer.precison: unknown key (did you mean 'precision'?)\n");
  auto missing = neva_run("validate " + (dir.path() / "absent.toml").string());
  CHECK(missing.exit_code == 2);
  CHECK(contains(missing.err, "absent.toml: cannot open recipe file"));
}

TEST_CASE("plugin trust failures are runtime errors (exit 1)") {
  TempDir dir;
  ::chmod(dir.path().c_str(), 0777);
  auto result = neva_run("plugins --plugin-path " + dir.path().string());
  CHECK(result.exit_code == 1);
  CHECK(contains(result.err, "is writable by group or others (mode 0777)"));
}

TEST_CASE("every tiny recipe runs: each backbone and encoder plugin is built and runs a forward pass") {
  for (const auto& entry : std::filesystem::directory_iterator(neva::test::source_directory() / "configs" / "tiny")) {
    if (entry.path().extension() != ".toml") continue;
    CAPTURE(entry.path());
    auto result = neva_run(entry.path().string());
    INFO(result.err);
    CHECK(result.exit_code == 0);
    CHECK(contains(result.out, "forward: 2 x ("));
    CHECK(contains(result.out, "image + 16 text tokens) -> logits"));
  }
}

TEST_CASE("every test case name survives CTest's discovery: no semicolon, which would split it into names matching nothing") {
  // doctest_discover_tests makes one CTest test per name, in a CMake list: a ';' cuts the name into
  // pieces that select no test case, and such a "test" passes without running anything.
  std::size_t names = 0;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(neva::test::source_directory() / "tests")) {
    if (entry.path().extension() != ".cpp") continue;
    std::ifstream in(entry.path());
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    for (std::size_t at = text.find("TEST_CASE(\""); at != std::string::npos; at = text.find("TEST_CASE(\"", at + 1)) {
      std::string name;
      std::size_t cursor = at + 10;
      while (cursor < text.size() && text[cursor] == '"') {  // adjacent literals: "..." "..."
        const std::size_t end = text.find('"', cursor + 1);
        name += text.substr(cursor + 1, end - cursor - 1);
        cursor = text.find_first_not_of(" \n", end + 1);
      }
      ++names;
      CAPTURE(entry.path());
      CHECK_MESSAGE(name.find(';') == std::string::npos, name);
    }
  }
  CHECK(names > 100);
}
