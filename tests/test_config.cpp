#include <doctest/doctest.h>

#include "neva/config.h"
#include "neva/error.h"
#include "neva/suggest.h"

using neva::ConfigDocument;
using neva::RecipeError;

namespace {

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const RecipeError& error) {
    return error.what();
  }
  FAIL("expected a RecipeError");
  return {};
}

}  // namespace

TEST_CASE("typed reads return values and defaults") {
  auto doc = ConfigDocument::parse("[model]\nsize = 4\nrate = 0.5\nname = 'x'\nflag = true\nlist = [1, 2]\n", "r.toml");
  auto model = doc.root().section("model");
  CHECK(model.require<std::int64_t>("size") == 4);
  CHECK(model.get<double>("rate", 0.0) == doctest::Approx(0.5));
  CHECK(model.get<double>("size", 0.0) == doctest::Approx(4.0));  // integers are accepted as numbers
  CHECK(model.get<std::string>("name", "") == "x");
  CHECK(model.get<bool>("flag", false));
  CHECK(model.get<std::vector<std::int64_t>>("list", {}) == std::vector<std::int64_t>{1, 2});
  CHECK(model.get<std::int64_t>("absent", 7) == 7);
  CHECK(doc.root().section("missing").empty());
}

TEST_CASE("a value of the wrong type names file, line, column, key and what was expected") {
  auto doc = ConfigDocument::parse("[model]\n\nsize = \"four\"\n", "recipe.toml");
  auto message = error_of([&] { doc.root().section("model").require<std::int64_t>("size"); });
  CHECK(message == "recipe.toml:3:8: model.size: expected an integer, got a string 'four'");
}

TEST_CASE("a missing required key is named with what it should be") {
  auto doc = ConfigDocument::parse("[model]\n", "recipe.toml");
  auto message = error_of([&] { doc.root().section("model").require<std::string>("plugin"); });
  CHECK(message == "recipe.toml:1:1: model.plugin: missing required key (expected a string)");
}

TEST_CASE("unknown keys are errors with a did-you-mean") {
  auto doc = ConfigDocument::parse("[model]\nmicro_batch_sise = 2\n", "recipe.toml");
  auto model = doc.root().section("model");
  model.get<std::int64_t>("micro_batch_size", 1);
  auto message = error_of([&] { doc.root().reject_unknown_keys(); });
  CHECK(message == "recipe.toml:2:1: model.micro_batch_sise: unknown key (did you mean 'micro_batch_size'?)");
}

TEST_CASE("an unknown table at the root is reported too") {
  auto doc = ConfigDocument::parse("[modle]\nx = 1\n", "recipe.toml");
  doc.root().section("model");
  doc.root().section("run");
  auto message = error_of([&] { doc.root().reject_unknown_keys(); });
  CHECK(message.find("modle: unknown key (did you mean 'model'?)") != std::string::npos);
}

TEST_CASE("choices list what is allowed and suggest the closest") {
  auto doc = ConfigDocument::parse("[trainer]\nprecision = 'bf61'\n", "recipe.toml");
  auto message = error_of([&] { doc.root().section("trainer").choice("precision", "32", {"32", "bf16"}); });
  CHECK(message == "recipe.toml:2:13: trainer.precision: expected one of 32, bf16, got 'bf61' (did you mean 'bf16'?)");
  auto numeric = ConfigDocument::parse("[trainer]\nprecision = 32\n", "recipe.toml");
  CHECK(numeric.root().section("trainer").choice("precision", "bf16", {"32", "bf16"}) == "32");
}

TEST_CASE("integer ranges are checked only for given values") {
  auto doc = ConfigDocument::parse("[model]\ntp = 0\n", "recipe.toml");
  auto model = doc.root().section("model");
  CHECK(model.integer("absent", 0, 1) == 0);
  CHECK(error_of([&] { model.integer("tp", 1, 1); }) == "recipe.toml:2:6: model.tp: expected an integer >= 1, got 0");
}

TEST_CASE("invalid TOML reports line and column") {
  auto message = error_of([] { ConfigDocument::parse("[model]\nsize = = 3\n", "bad.toml"); });
  CHECK(message.rfind("bad.toml:2:", 0) == 0);
  CHECK(message.find("invalid TOML") != std::string::npos);
}

TEST_CASE("deeply nested input is refused, not recursed into") {
  std::string text = "x = " + std::string(100, '[') + std::string(100, ']') + "\n";
  auto message = error_of([&] { ConfigDocument::parse(text, "deep.toml"); });
  CHECK(message.find("deep.toml") == 0);
}

TEST_CASE("--set overrides values, creates tables and reports itself as the source") {
  auto doc = ConfigDocument::parse("[model]\nmicro_batch_size = 2\n", "recipe.toml");
  doc.set("model.micro_batch_size=8");
  doc.set("run.mode=inspect");          // a bare word is a string
  doc.set("model.list=[1, 2, 3]");
  doc.set("model.mm_cfg.llm.freeze=true");
  auto root = doc.root();
  CHECK(root.section("model").require<std::int64_t>("micro_batch_size") == 8);
  CHECK(root.section("run").require<std::string>("mode") == "inspect");
  CHECK(root.section("model").require<std::vector<std::int64_t>>("list").size() == 3);
  CHECK(root.section("model").section("mm_cfg").section("llm").require<bool>("freeze"));
  doc.set("model.micro_batch_size=many");
  auto message = error_of([&] { doc.root().section("model").require<std::int64_t>("micro_batch_size"); });
  CHECK(message == "--set model.micro_batch_size=many: model.micro_batch_size: expected an integer, got a string 'many'");
}

TEST_CASE("--set refuses malformed assignments and paths through non-tables") {
  auto doc = ConfigDocument::parse("[model]\nsize = 2\n", "recipe.toml");
  CHECK(error_of([&] { doc.set("novalue"); }) == "--set novalue: expected section.key=value");
  CHECK(error_of([&] { doc.set("model.size.inner=1"); }) ==
        "--set model.size.inner=1: 'model.size' is not a table in recipe.toml");
  CHECK(error_of([&] { doc.set("model=1"); }) == "--set model=1: 'model' is a table; set one of its keys instead");
  CHECK(error_of([&] { doc.set("model..x=1"); }) == "--set model..x=1: empty key segment in 'model..x'");
}

TEST_CASE("a missing recipe file is named") {
  auto message = error_of([] { ConfigDocument::load("/nonexistent/recipe.toml"); });
  CHECK(message == "/nonexistent/recipe.toml: cannot open recipe file: No such file or directory");
}

TEST_CASE("closest_match finds likely typos and nothing else") {
  CHECK(neva::closest_match("freez", {"freeze", "plugin"}) == "freeze");
  CHECK(neva::closest_match("completely_different", {"freeze", "plugin"}).empty());
}

TEST_CASE("canonical text: equal for the same recipe however it is written, different for another value") {
  auto a = neva::ConfigDocument::parse("[trainer]\nmax_steps = 10\nprecision = \"bf16\"\n[run]\nseed = 1\n", "a.toml");
  auto b = neva::ConfigDocument::parse("run.seed = 1\n\n[trainer]\nprecision = 'bf16'   # same\nmax_steps = 10\n", "b.toml");
  CHECK(a.canonical() == b.canonical());
  b.set("trainer.max_steps=11");
  CHECK(a.canonical() != b.canonical());
  a.set("trainer.max_steps=11");
  CHECK(a.canonical() == b.canonical());  // overrides count, as the file does
}
