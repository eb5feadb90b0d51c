// neva's tokenizers against Hugging Face tokenizers / transformers (reference data: tokenizer_oracle.py).
#include <doctest/doctest.h>

#include <ATen/ATen.h>

#include <cstdlib>
#include <fstream>
#include <optional>
#include <nlohmann/json.hpp>

#include "neva/error.h"
#include "neva/data/tokenizer.h"
#include "test_support.h"

namespace fs = std::filesystem;

namespace {

fs::path oracle_directory() { return neva::test::oracle_directory("tokenizers"); }

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

TEST_CASE("after a tokenizer.model is read, LibTorch's failed checks are still exceptions, not abort()") {
  // libsentencepiece and libc10 both export FLAGS_minloglevel: linked into one process, SentencePiece
  // built its 32-byte flag over c10's int and set FLAGS_caffe2_use_fatal_for_enforce beside it, so a
  // failed allocation aborted the process. SentencePiece now runs in a link-map namespace of its own.
  auto tokenizer = neva::Tokenizer::load((oracle_directory() / "spbpe").string());  // only tokenizer.model there
  CHECK(tokenizer->vocab_size() > 0);
  CHECK_THROWS_AS(at::empty({std::int64_t{1} << 50}, at::kFloat), c10::Error);
  CHECK_THROWS_AS(TORCH_CHECK(false, "a failed check"), c10::Error);
}

TEST_CASE("invalid UTF-8 from byte tokens decodes to transformers' U+FFFD: per maximal subpart (ByteLevel), per byte (ByteFallback)") {
  for (const char* name : {"bytelevel", "spbpe"}) {
    CAPTURE(name);
    const fs::path directory = oracle_directory() / name;
    auto tokenizer = neva::Tokenizer::load((std::string(name) == "spbpe" ? directory / "converted" : directory).string());
    const auto cases = read_json(directory / "invalid_utf8.json");
    REQUIRE(cases.size() >= 10);
    for (const auto& expected : cases) {
      CAPTURE(expected["bytes"].get<std::string>());
      CHECK(tokenizer->decode(expected["ids"].get<std::vector<std::int64_t>>(), false) ==
            expected["decoded"].get<std::string>());
    }
  }
}

TEST_CASE("a tokenizer.model alone is read as transformers' LlamaTokenizer reads it, with its documented defaults") {
  auto directory = oracle_directory() / "spbpe";
  auto tokenizer = neva::Tokenizer::load(directory.string());  // only tokenizer.model there
  check_against(*tokenizer, read_json(directory / "sentencepiece.json"));
}

TEST_CASE("model directories as checkpoints ship them give AutoTokenizer's ids: LlamaTokenizer's pipeline or the file's") {
  // tokenizer.model or an old Llama-2-style tokenizer.json, with tokenizer_config.json's legacy,
  // BOS/EOS and added tokens, and config.json's model type deciding the class (tokenizer_oracle.py).
  for (const std::string name : read_json(oracle_directory() / "variants.json")) {
    CAPTURE(name);
    auto directory = oracle_directory() / name;
    auto tokenizer = neva::Tokenizer::load(directory.string());
    check_against(*tokenizer, read_json(directory / "reference.json"));
    auto meta = read_json(directory / "meta.json");
    std::string transformers_class = meta["class"];
    CAPTURE(transformers_class);
    CHECK(tokenizer->vocab_size() == meta["size"].get<std::int64_t>());
    // What the export writes (describe, under model_type "llava" and a generic class) reads back the same.
    neva::test::TempDir exported;
    exported.write("tokenizer.json", neva::Tokenizer::describe(directory.string()));
    exported.write("tokenizer_config.json", R"({"tokenizer_class": "PreTrainedTokenizerFast"})");
    exported.write("config.json", R"({"model_type": "llava"})");
    check_against(*neva::Tokenizer::load(exported.path().string()), read_json(directory / "reference.json"));
  }
}

TEST_CASE("every model type transformers knows: LlamaTokenizer's pipeline or the file as written, as AutoTokenizer picks") {
  // An old-style tokenizer.json and a config naming LlamaTokenizer under config.json's model type.
  auto recorded = read_json(oracle_directory() / "model_types.json");
  const std::string text = recorded["text"];
  neva::test::TempDir dir;
  for (const char* name : {"tokenizer.json", "tokenizer_config.json"}) {
    fs::copy_file(oracle_directory() / "spbpe_llama2json" / name, dir.path() / name);
  }
  std::int64_t compared = 0;
  for (const auto& [model_type, expected] : recorded["types"].items()) {
    const std::string transformers_class = expected["class"];
    if (transformers_class != "LlamaTokenizer" && transformers_class != "TokenizersBackend") continue;  // own pipelines
    CAPTURE(model_type);
    CAPTURE(transformers_class);
    dir.write("config.json", nlohmann::json{{"model_type", model_type}}.dump());
    CHECK(neva::Tokenizer::load(dir.path().string())->encode(text, true) == expected["ids"].get<std::vector<std::int64_t>>());
    ++compared;
  }
  MESSAGE(compared << " model types compared");
  CHECK(compared > 250);
}

TEST_CASE("a tokenizer_config.json or config.json the tokenizer cannot follow is named") {
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
  dir.write("tokenizer_config.json", R"({"added_tokens_decoder": {"1": {"content": "<image>", "special": true}}})");
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(dir.path().string()),
                       (config + ": added_tokens_decoder: token 1 is '<image>' but the tokenizer's token 1 is '<s>'").c_str(),
                       neva::Error);
  dir.write("tokenizer_config.json", R"({"bos_token": "<bos>"})");
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(dir.path().string()),
                       (config + ": bos_token '<bos>' is not a token of this tokenizer (transformers would add it as a "
                                 "new token, id 600); list it in added_tokens_decoder").c_str(),
                       neva::Error);
  // Added tokens: ids follow the tokenizer's last without a gap (transformers would renumber them).
  dir.write("tokenizer_config.json", R"({"added_tokens_decoder": {"602": {"content": "<image>", "special": true}}})");
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(dir.path().string()),
                       (config + ": added_tokens_decoder: token 602 '<image>' leaves a gap: the next free id is 600 "
                                 "(transformers would renumber it)").c_str(),
                       neva::Error);
  dir.write("tokenizer_config.json", R"({"added_tokens_decoder": {"-1": {"content": "<image>", "special": true}}})");
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(dir.path().string()),
                       doctest::Contains((config + ": added_tokens_decoder: entry '-1': ").c_str()), neva::Error);
  dir.write("tokenizer_config.json", R"({"added_tokens_decoder": {"600": "<image>"}})");
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(dir.path().string()),
                       doctest::Contains((config + ": added_tokens_decoder: entry '600': expected {\"content\": string").c_str()),
                       neva::Error);
  dir.write("tokenizer_config.json", R"({"added_tokens_decoder": {"600": {"content": "<image>", "special": "yes"}}})");
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(dir.path().string()),
                       doctest::Contains((config + ": added_tokens_decoder: entry '600': ").c_str()), neva::Error);
  dir.write("tokenizer_config.json", R"({"added_tokens_decoder": {"600": {"content": "<image>", "single_word": true}}})");
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(dir.path().string()),
                       (config + ": added_tokens_decoder: entry '600': a token matched on normalized text or as a single "
                                 "word is not supported (set \"normalized\": false and \"single_word\": false)").c_str(),
                       neva::Error);
  // What tokenizer.add_tokens("<image>") saves (normalized, not special): LlamaTokenizer has no normalizer.
  dir.write("tokenizer_config.json", R"({"added_tokens_decoder": {"600": {"content": "<image>", "special": false}}})");
  auto plain_added = neva::Tokenizer::load(dir.path().string());
  CHECK(plain_added->encode("a<image>", false).back() == 600);
  CHECK(!plain_added->is_special(600));
  dir.write("tokenizer_config.json", R"({"added_tokens_decoder": {"600": {"content": "<image>", "special": true}}})");
  CHECK(neva::Tokenizer::load(dir.path().string())->encode("a<image>", false).back() == 600);
  // A tokenizer.model that transformers reads with its generic backend (by config.json's model type).
  dir.write("tokenizer_config.json", "{}");
  dir.write("config.json", R"({"model_type": "mistral"})");
  const std::string generic = (dir.path() / "tokenizer.model").string() +
                              ": transformers 5.23 reads a tokenizer.model of model_type 'mistral'";
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(dir.path().string()), doctest::Contains(generic.c_str()), neva::Error);
  dir.write("tokenizer_config.json", "{}");
  dir.write("config.json", R"({"model_type": "t5", "tokenizer_class": "T5Tokenizer"})");
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(dir.path().string()),
                       doctest::Contains(((dir.path() / "config.json").string() + ": tokenizer_class 'T5Tokenizer'").c_str()),
                       neva::Error);
  dir.write("config.json", "[]");
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(dir.path().string()),
                       ((dir.path() / "config.json").string() + ": expected a JSON object").c_str(), neva::Error);
  fs::remove(dir.path() / "config.json");
  auto unigram = oracle_directory() / "spunigram/tokenizer.model";
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(unigram.string()),
                       (unigram.string() + ": a Unigram SentencePiece model; neva reads tokenizer.model as transformers' "
                                           "LlamaTokenizer does (BPE): provide the tokenizer.json transformers saves for "
                                           "this tokenizer").c_str(),
                       neva::Error);
  dir.write("tokenizer_config.json", "{not json");
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(dir.path().string()), doctest::Contains((config + ":1:3: invalid JSON").c_str()),
                       neva::Error);
}

TEST_CASE("unsupported tokenizer.json components and missing files are named") {
  neva::test::TempDir dir;
  dir.write("tokenizer.json", R"({"model": {"type": "WordPiece", "vocab": {}}, "normalizer": null})");
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(dir.path().string()),
                       doctest::Contains("model 'WordPiece' is not supported (supported: BPE)"), neva::Error);
  // ... also when tokenizer_config.json lists tokens (merged before the engine runs) and names Llama.
  dir.write("tokenizer.json", R"({"model": {"type": "Unigram", "vocab": [["<unk>", 0.0]]}})");
  dir.write("tokenizer_config.json", R"({"tokenizer_class": "LlamaTokenizer", "added_tokens_decoder": {}})");
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(dir.path().string()),
                       doctest::Contains("model 'Unigram' is not supported (supported: BPE)"), neva::Error);
  fs::remove(dir.path() / "tokenizer_config.json");
  dir.write("tokenizer.json", R"({"model": {"type": "BPE", "vocab": {}, "merges": []}, "normalizer": {"type": "NFKC"}})");
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load(dir.path().string()),
                       doctest::Contains("normalizer 'NFKC' is not supported"), neva::Error);
  CHECK_THROWS_WITH_AS(neva::Tokenizer::load("/nonexistent/dir"), "/nonexistent/dir: no such file or directory",
                       neva::Error);
}
