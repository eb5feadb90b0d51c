// tokenizer_config.json (byte 0 even) or config.json (odd) beside a valid tokenizer.json (the demo's)
// or tokenizer.model (byte 0 & 2: the oracle-style SentencePiece model in the assets).
#include <filesystem>

#include "fuzz_support.h"
#include "neva/error.h"
#include "neva/data/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  namespace fs = std::filesystem;
  static const auto json_dir = neva::fuzz::scratch("tokenizer_config_json");
  static const auto model_dir = neva::fuzz::scratch("tokenizer_config_model");
  static const bool prepared = [] {
    fs::copy_file(neva::fuzz::assets() / "tokenizer/tokenizer.json", json_dir / "tokenizer.json",
                  fs::copy_options::overwrite_existing);
    fs::copy_file(neva::fuzz::assets() / "sentencepiece/tokenizer.model", model_dir / "tokenizer.model",
                  fs::copy_options::overwrite_existing);
    return true;
  }();
  (void)prepared;
  const fs::path& directory = (data[0] & 2) ? model_dir : json_dir;
  const char* file = data[0] % 2 == 0 ? "tokenizer_config.json" : "config.json";
  fs::remove(directory / "tokenizer_config.json");
  fs::remove(directory / "config.json");
  neva::fuzz::write(directory / file, data + 1, size - 1);
  try {
    auto tokenizer = neva::Tokenizer::load(directory.string());
    const auto ids = tokenizer->encode("<s>USER: <image>\nhi</s>ASSISTANT: red", true);
    tokenizer->decode(ids, false);
    tokenizer->decode(ids, true);
    neva::Tokenizer::describe(directory.string());
  } catch (const neva::Error&) {
  }
  return 0;
}
