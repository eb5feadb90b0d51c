#include <filesystem>

#include "neva/error.h"
#include "tokenizer_internal.h"

namespace neva {

Tokenizer::~Tokenizer() = default;

std::unique_ptr<Tokenizer> Tokenizer::load(const std::string& path) {
  namespace fs = std::filesystem;
  fs::path location(path);
  std::error_code error;
  if (fs::is_directory(location, error)) {
    if (fs::exists(location / "tokenizer.json")) return load_hf_tokenizer((location / "tokenizer.json").string());
    if (fs::exists(location / "tokenizer.model")) return load_sentencepiece_tokenizer((location / "tokenizer.model").string());
    throw Error(path + ": no tokenizer.json or tokenizer.model in this directory");
  }
  if (!fs::exists(location, error)) throw Error(path + ": no such file or directory");
  if (location.extension() == ".json") return load_hf_tokenizer(path);
  return load_sentencepiece_tokenizer(path);
}

}  // namespace neva
