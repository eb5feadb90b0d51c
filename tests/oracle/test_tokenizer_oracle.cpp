// neva's tokenizers against Hugging Face tokenizers / transformers (reference data: tokenizer_oracle.py).
#include <doctest/doctest.h>

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>

#include "neva/error.h"
#include "neva/tokenizer.h"
#include "test_support.h"

namespace fs = std::filesystem;

namespace {

fs::path oracle_directory() {
  const char* directory = std::getenv("NEVA_ORACLE_DIR");
  REQUIRE_MESSAGE(directory, "NEVA_ORACLE_DIR is not set (ctest sets it after running the oracle scripts)");
  return fs::path(directory) / "tokenizers";
}

nlohmann::json read_json(const fs::path& path) {
  std::ifstream in(path);
  REQUIRE_MESSAGE(in, "cannot open " << path);
  return nlohmann::json::parse(in);
}

void check_against(const neva::Tokenizer& tokenizer, const nlohmann::json& cases) {
  for (const auto& expected : cases) {
    std::string text = expected["text"];
    CAPTURE(text);
    auto ids = tokenizer.encode(text, true);
    CHECK(ids == expected["ids"].get<std::vector<std::int64_t>>());
    CHECK(tokenizer.encode(text, false) == expected["ids_without_special"].get<std::vector<std::int64_t>>());
    CHECK(tokenizer.decode(ids, false) == expected["decoded"].get<std::string>());
    CHECK(tokenizer.decode(ids, true) == expected["decoded_skip_special"].get<std::string>());
  }
}

}  // namespace

TEST_CASE("byte-level BPE (Llama 3 style tokenizer.json) gives transformers' ids and text") {
  auto directory = oracle_directory() / "bytelevel";
  auto tokenizer = neva::Tokenizer::load(directory.string());
  check_against(*tokenizer, read_json(directory / "reference.json"));
  CHECK(tokenizer->token_id("<image>").has_value());
  CHECK(tokenizer->is_special(*tokenizer->token_id("<|eot_id|>")));
}

TEST_CASE("SentencePiece-converted BPE with byte fallback (Llama 2 style tokenizer.json) gives transformers' ids") {
  auto directory = oracle_directory() / "spbpe";
  auto tokenizer = neva::Tokenizer::load((directory / "converted").string());
  check_against(*tokenizer, read_json(directory / "reference.json"));
}

TEST_CASE("a tokenizer.model alone is run by SentencePiece, with its ids") {
  auto directory = oracle_directory() / "spbpe";
  auto tokenizer = neva::Tokenizer::load(directory.string());  // only tokenizer.model there
  for (const auto& expected : read_json(directory / "sentencepiece.json")) {
    std::string text = expected["text"];
    CAPTURE(text);
    CHECK(tokenizer->encode(text, true) == expected["ids"].get<std::vector<std::int64_t>>());
  }
  for (const auto& expected : read_json(directory / "sentencepiece_controls.json")) {  // <s>, </s> in the text
    std::string text = expected["text"];
    CAPTURE(text);
    CHECK(tokenizer->encode(text, false) == expected["ids"].get<std::vector<std::int64_t>>());
  }
}

TEST_CASE("unsupported tokenizer.json components and missing files are named") {
  neva::test::TempDir dir;
  dir.write("tokenizer.json", R"({"model": {"type": "WordPiece", "vocab": {}}, "normalizer": null})");
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(dir.path().string()),
                       doctest::Contains("model 'WordPiece' is not supported (supported: BPE)"), neva::Error);
  dir.write("tokenizer.json", R"({"model": {"type": "BPE", "vocab": {}, "merges": []}, "normalizer": {"type": "NFKC"}})");
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(dir.path().string()),
                       doctest::Contains("normalizer 'NFKC' is not supported"), neva::Error);
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load("/nonexistent/dir"), "/nonexistent/dir: no such file or directory",
                       neva::Error);
}
