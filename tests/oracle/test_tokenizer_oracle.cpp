// neva's tokenizers against Hugging Face tokenizers / transformers (reference data: tokenizer_oracle.py).
#include <doctest/doctest.h>

#include <cstdlib>
#include <fstream>
#include <optional>
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

TEST_CASE("a tokenizer.model alone is read as transformers' LlamaTokenizer reads it, with its documented defaults") {
  auto directory = oracle_directory() / "spbpe";
  auto tokenizer = neva::Tokenizer::load(directory.string());  // only tokenizer.model there
  check_against(*tokenizer, read_json(directory / "sentencepiece.json"));
}

TEST_CASE("tokenizer.model with tokenizer_config.json: legacy, the BOS/EOS template and added tokens as transformers") {
  for (const char* name : {"spbpe_llava", "spbpe_legacy"}) {
    CAPTURE(name);
    auto directory = oracle_directory() / name;
    auto tokenizer = neva::Tokenizer::load(directory.string());
    check_against(*tokenizer, read_json(directory / "reference.json"));
    CHECK((tokenizer->token_id("<image>") == (std::string(name) == "spbpe_llava" ? std::optional<std::int64_t>(600)
                                                                                 : std::nullopt)));
  }
}

TEST_CASE("tokenizer_class LlamaTokenizer: an old-style tokenizer.json runs with transformers 5's pipeline, not as written") {
  for (const char* name : {"spbpe_llama2json", "spbpe_llama2json_legacy"}) {
    CAPTURE(name);
    auto directory = oracle_directory() / name;
    check_against(*neva::Tokenizer::load(directory.string()), read_json(directory / "reference.json"));
  }
}

TEST_CASE("a tokenizer_config.json a tokenizer.model cannot follow is named") {
  neva::test::TempDir dir;
  fs::copy_file(oracle_directory() / "spbpe/tokenizer.model", dir.path() / "tokenizer.model");
  const std::string config = (dir.path() / "tokenizer_config.json").string();
  dir.write("tokenizer_config.json", R"({"tokenizer_class": "T5Tokenizer"})");
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(dir.path().string()),
                       (config + ": tokenizer_class 'T5Tokenizer': a tokenizer.model is read as transformers' "
                                 "LlamaTokenizer; provide the tokenizer.json transformers saves for T5Tokenizer").c_str(),
                       neva::Error);
  dir.write("tokenizer_config.json", R"({"legacy": "no"})");
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(dir.path().string()), (config + ": legacy: expected true or false").c_str(),
                       neva::Error);
  dir.write("tokenizer_config.json", R"({"added_tokens_decoder": {"1": {"content": "<image>"}}})");
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(dir.path().string()),
                       (config + ": added_tokens_decoder: token 1 is '<image>' but the tokenizer's token 1 is '<s>'").c_str(),
                       neva::Error);
  dir.write("tokenizer_config.json", R"({"bos_token": "<bos>"})");
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(dir.path().string()),
                       doctest::Contains(": bos_token '<bos>' is not a piece of "), neva::Error);
  auto unigram = oracle_directory() / "spunigram/tokenizer.model";
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(unigram.string()),
                       (unigram.string() + ": a Unigram SentencePiece model; neva reads tokenizer.model as transformers' "
                                           "LlamaTokenizer does (BPE): provide the tokenizer.json transformers saves for "
                                           "this tokenizer").c_str(),
                       neva::Error);
  dir.write("tokenizer_config.json", "{not json");
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(dir.path().string()), doctest::Contains((config + ": invalid JSON").c_str()),
                       neva::Error);
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
