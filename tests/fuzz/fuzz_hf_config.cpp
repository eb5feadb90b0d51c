// config.json as each model plugin reads it (HfConfig, read_hf_source, the plugins' shape readers and
// checks), through parse_recipe. Byte 0 picks the plugin; the rest is the file.
#include "fuzz_support.h"
#include "neva/error.h"
#include "neva/recipe.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  static const auto directory = neva::fuzz::scratch("hf_config");
  static const char* backbones[] = {"llama", "mistral", "mixtral", "nemotron4"};
  static const char* encoders[] = {"clip", "siglip"};
  const int choice = data[0] % 6;
  neva::fuzz::write(directory / "config.json", data + 1, size - 1);
  const std::string fuzzed = (directory / "config.json").string();
  std::string recipe = "[model.mm_cfg]\nimage_token_index = 32000\n";
  if (choice < 4) {
    recipe += std::string("[model.mm_cfg.llm]\nplugin = \"") + backbones[choice] + "\"\nconfig = \"" + fuzzed + "\"\n" +
              "[model.mm_cfg.mm_mlp_adapter]\ninput_size = 8\n";
  } else {
    recipe += "[model.mm_cfg.llm]\nplugin = \"llama\"\nconfig = \"" + neva::fuzz::tiny_model("llama-2").string() +
              "\"\n[model.mm_cfg.vision_encoder]\nplugin = \"" + encoders[choice - 4] + "\"\nconfig = \"" + fuzzed + "\"\n";
  }
  try {
    neva::ConfigDocument document = neva::ConfigDocument::parse(recipe, "recipe.toml");
    neva::parse_recipe(document, directory, neva::fuzz::plugin_options());
  } catch (const neva::Error&) {
  }
  return 0;
}
