#include <doctest/doctest.h>

#include <fstream>

#include "neva/error.h"
#include "neva/recipe.h"
#include "builtin_plugins.h"
#include "test_support.h"

namespace fs = std::filesystem;
using neva::test::plugin_directory;

namespace {

neva::Registry::Options only_builtin() { return neva::test::builtin_plugins(); }

const char* kMinimal = R"(
[model.mm_cfg]
mm_mlp_adapter_type = "mlp2x_gelu"

[model.mm_cfg.mm_mlp_adapter]
input_size = 16
output_size = 32
)";

neva::Recipe parse(const std::string& text, const std::vector<std::string>& overrides = {}) {
  auto document = neva::ConfigDocument::parse(text, "recipe.toml");
  for (const auto& assignment : overrides) document.set(assignment);
  return neva::parse_recipe(document, "/recipes", only_builtin());
}

std::string recipe_error(const std::string& text, const std::vector<std::string>& overrides = {}) {
  try {
    parse(text, overrides);
  } catch (const neva::RecipeError& error) {
    return error.what();
  }
  FAIL("expected a RecipeError");
  return {};
}

}  // namespace

TEST_CASE("a minimal recipe gets NeMo's defaults and its plugins' typed configs") {
  neva::Recipe recipe = parse(kMinimal);
  CHECK(recipe.run.mode == "inspect");
  CHECK(recipe.trainer.precision == "32");
  CHECK(recipe.model.parallel.tensor == 1);
  CHECK(recipe.model.micro_batch_size == 1);
  CHECK(recipe.model.mm_cfg.connector.plugin == "mlp2x_gelu");
  auto* config = dynamic_cast<neva::ConnectorConfig*>(recipe.model.mm_cfg.connector.config.get());
  REQUIRE(config);
  CHECK(config->input_size == 16);
  CHECK(config->output_size == 32);
  CHECK(!recipe.model.mm_cfg.llm);
}

// A real recipe with each `... = "path"  # tiny: NAME` line pointed at configs/tiny/models/NAME
// (`# tiny: none`: the line dropped), so everything but the checkpoints themselves is checked.
std::string with_tiny_models(const fs::path& recipe) {
  std::ifstream in(recipe);
  std::string out, line;
  while (std::getline(in, line)) {
    std::size_t marker = line.find("# tiny: ");
    if (marker != std::string::npos) {
      std::string name = line.substr(marker + 8);
      if (name == "none") continue;
      line = "config = \"tiny/models/" + name + "/config.json\"";
    }
    out += line + "\n";
  }
  return out;
}

TEST_CASE("every recipe in configs/ validates (real ones with their tiny model configs)") {
  fs::path configs = neva::test::source_directory() / "configs";
  std::size_t real = 0, tiny = 0;
  for (const auto& entry : fs::directory_iterator(configs)) {
    if (entry.path().extension() != ".toml") continue;
    CAPTURE(entry.path());
    auto document = neva::ConfigDocument::parse(with_tiny_models(entry.path()), entry.path().string());
    CHECK_NOTHROW(neva::parse_recipe(document, configs, only_builtin()));
    ++real;
  }
  for (const auto& entry : fs::directory_iterator(configs / "tiny")) {
    if (entry.path().extension() != ".toml") continue;
    CAPTURE(entry.path());
    CHECK_NOTHROW(neva::load_recipe(entry.path(), {}, only_builtin()));
    ++tiny;
  }
  CHECK(real == tiny);  // every real recipe has a tiny sibling (configs/demo/ holds the demo's, run by neva-run demo)
}

TEST_CASE("precision decides the dtype policy") {
  auto policy = parse(kMinimal, {"trainer.precision=bf16"}).dtype_policy();
  CHECK((policy.params == c10::ScalarType::Float));
  CHECK((policy.compute == c10::ScalarType::BFloat16));
  auto o2 = parse(kMinimal, {"trainer.precision=bf16", "model.megatron_amp_O2=true"}).dtype_policy();
  CHECK((o2.params == c10::ScalarType::BFloat16));
  CHECK((o2.main_params == c10::ScalarType::Float));
}

TEST_CASE("plugin paths in a recipe resolve against the recipe's directory") {
  auto recipe = parse(std::string("[run]\nplugin_paths = [\"") + plugin_directory().string() + "\"]\n" + kMinimal);
  CHECK(recipe.run.plugin_paths.front() == plugin_directory());
  auto document = neva::ConfigDocument::parse("[run]\nplugin_paths = [\"../plugins\"]\n", "r.toml");
  CHECK_THROWS_WITH_AS(neva::parse_recipe(document, "/recipes/sub", only_builtin()),
                       "plugin directory /recipes/plugins does not exist or is not a directory", neva::PluginError);
}

TEST_CASE("recipe errors name the place and what was expected") {
  CHECK(recipe_error(std::string(kMinimal) + "[run]\nmode = \"trian\"\n") ==
        "recipe.toml:9:8: run.mode: expected one of inspect, train, generate, score, serve, got 'trian' (did you mean 'train'?)");
  CHECK(recipe_error(std::string("[model]\nmicro_batch_size = 3\nglobal_batch_size = 4\n") + kMinimal) ==
        "recipe.toml:3:21: model.global_batch_size: must be a multiple of micro_batch_size (3), got 4");
  CHECK(recipe_error(std::string("[model]\nsequence_parallel = true\n") + kMinimal).find(
            "model.sequence_parallel: sequence parallelism splits activations") != std::string::npos);
  CHECK(recipe_error(kMinimal, {"model.tensor_model_parallel_size=0"}) ==
        "--set model.tensor_model_parallel_size=0: model.tensor_model_parallel_size: expected an integer >= 1, got 0");
  CHECK(recipe_error(kMinimal, {"run.device=tpu"}) == "--set run.device=tpu: run.device: expected cpu, cuda or cuda:N, got 'tpu'");
  CHECK(recipe_error(kMinimal, {"model.megatron_amp_O2=true"}).find("needs trainer.precision = \"bf16\"") !=
        std::string::npos);
}

TEST_CASE("unknown keys anywhere, including a plugin's table, are errors with a did-you-mean") {
  CHECK(recipe_error(std::string("[model]\ntensor_model_paralel_size = 2\n") + kMinimal) ==
        "recipe.toml:2:1: model.tensor_model_paralel_size: unknown key (did you mean 'tensor_model_parallel_size'?)");
  CHECK(recipe_error(kMinimal, {"model.mm_cfg.mm_mlp_adapter.input_sise=3"}) ==
        "--set model.mm_cfg.mm_mlp_adapter.input_sise=3: model.mm_cfg.mm_mlp_adapter.input_sise: unknown key "
        "(did you mean 'input_size'?)");
  CHECK(recipe_error(kMinimal, {"model.mm_cfg.mm_mlp_adapter_type=mlp", "model.mm_cfg.mm_mlp_adapter.dept=3"})
            .find("(did you mean 'depth'?)") != std::string::npos);
}

TEST_CASE("an unknown plugin name is a recipe error listing what is available") {
  CHECK(recipe_error(kMinimal, {"model.mm_cfg.mm_mlp_adapter_type=mpl"})
            .rfind("--set model.mm_cfg.mm_mlp_adapter_type=mpl: model.mm_cfg.mm_mlp_adapter_type: no connector plugin "
                   "named 'mpl' (did you mean 'mlp'?); available: linear, mlp",
                   0) == 0);
  CHECK(recipe_error(std::string(kMinimal) + "[model.mm_cfg.llm]\nplugin = \"lama\"\n")
            .rfind("recipe.toml:9:10: model.mm_cfg.llm.plugin: no language_backbone plugin named 'lama' (did you "
                   "mean 'llama'?); available: llama",
                   0) == 0);
}

TEST_CASE("connector sizes are required while nothing else provides them") {
  CHECK(recipe_error("[model.mm_cfg]\nmm_mlp_adapter_type = 'linear'\n") ==
        "recipe.toml: model.mm_cfg.mm_mlp_adapter.input_size: required while the recipe has no vision_encoder to "
        "take it from (expected an integer >= 1)");
  // A language model alone is text only: no connector is built, so none needs sizes.
  const std::string llm = (neva::test::source_directory() / "configs/tiny/models/llama-2/config.json").string();
  neva::Recipe text_only = parse("[model.mm_cfg.llm]\nplugin = \"llama\"\nconfig = \"" + llm + "\"\n");
  CHECK(!text_only.model.mm_cfg.vision_encoder);
  neva::LlavaModel model = neva::build_model(text_only, text_only.runtime_context());
  CHECK((model.connector() == nullptr && model.encoder() == nullptr));
}
