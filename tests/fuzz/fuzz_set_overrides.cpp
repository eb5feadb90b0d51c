// --set overrides (one per input line) applied to a valid tiny recipe, then validated.
#include "fuzz_support.h"
#include "neva/error.h"
#include "neva/recipe.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const auto directory = neva::fuzz::scratch("set_overrides");
  static const std::string base =
      "[run]\nmode = \"generate\"\n[model.mm_cfg]\nmm_mlp_adapter_type = \"mlp2x_gelu\"\nimage_token_index = 32000\n"
      "[model.mm_cfg.llm]\nplugin = \"llama\"\nconfig = \"" + neva::fuzz::tiny_model("llama-2").string() + "\"\n"
      "[model.mm_cfg.vision_encoder]\nplugin = \"clip\"\nconfig = \"" + neva::fuzz::tiny_model("clip-vit-l-336").string() +
      "\"\n[model.tokenizer]\nmodel = \"" + directory.string() + "\"\n[inference]\nprompts = [\"hi\"]\n";
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    neva::ConfigDocument document = neva::ConfigDocument::parse(base, "recipe.toml");
    std::size_t start = 0;
    while (start <= text.size()) {
      std::size_t end = text.find('\n', start);
      if (end == std::string::npos) end = text.size();
      document.set(std::string_view(text).substr(start, end - start));
      start = end + 1;
    }
    neva::parse_recipe(document, directory, neva::fuzz::plugin_options());
  } catch (const neva::Error&) {
  }
  return 0;
}
