// A recipe's TOML through the whole validator: typed sections, every plugin's own keys, the
// checks across them (parse_recipe), as `neva-run validate` runs it.
#include "fuzz_support.h"
#include "neva/error.h"
#include "neva/recipe.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const auto directory = neva::fuzz::scratch("recipe");
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    neva::ConfigDocument document = neva::ConfigDocument::parse(text, (directory / "recipe.toml").string());
    neva::parse_recipe(document, directory, neva::fuzz::plugin_options());
  } catch (const neva::Error&) {
  }
  return 0;
}
