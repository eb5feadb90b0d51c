// A tokenizer.model without tokenizer.json, read the way transformers 5 reads it: its LlamaTokenizer
// turns the SentencePiece BPE model into a Hugging Face tokenizer (vocabulary and merges taken from
// the pieces, Metaspace pre-tokenizer without splitting, byte fallback, no normalizer) and applies
// tokenizer_config.json's options. neva builds the same tokenizer.json description here and runs it
// through its tokenizer.json engine, so both paths share one implementation.
//
// What tokenizer_config.json decides, with LlamaTokenizer's defaults where it is absent or silent:
//   legacy (false)            false: the "▁" prefix only at the start of the text ("first"); true: on
//                             every stretch of text after a special token ("always").
//   add_prefix_space (true)   false: no "▁" prefix at all ("never").
//   add_bos_token (true), add_eos_token (false), bos_token / eos_token (the model's <s> / </s>).
//   added_tokens_decoder      tokens added beyond the model's pieces.
// The defaults follow LlamaTokenizer's documentation; transformers 5.23 itself adds no BOS when a
// directory has no tokenizer_config.json at all (and AutoTokenizer there does not pick LlamaTokenizer),
// which is no behaviour to copy for a Llama model. SentencePiece's own normalisation rules and its
// user-defined symbols are not used, as in transformers (the C++ API of SentencePiece 0.1.97 cannot
// name user-defined pieces; those a model needs are listed in tokenizer_config.json's
// added_tokens_decoder, which transformers writes since 4.34).
#include <sentencepiece_processor.h>

#include <filesystem>
#include <optional>
#include <unordered_map>
#include <nlohmann/json.hpp>

#include "neva/error.h"
#include "tokenizer_internal.h"

namespace neva {

namespace {

using nlohmann::json;
namespace fs = std::filesystem;

// transformers' generate_merges without scores: for each piece in id order, every split into two
// pieces of the vocabulary is a merge, the piece's id its rank, shorter left halves first.
json merges_of(const std::vector<std::string>& pieces, const std::unordered_map<std::string, int>& ids) {
  json merges = json::array();
  for (const std::string& piece : pieces) {
    for (std::size_t at = 1; at < piece.size(); ++at) {
      if ((static_cast<unsigned char>(piece[at]) & 0xC0) == 0x80) continue;  // inside a UTF-8 character
      std::string left = piece.substr(0, at), right = piece.substr(at);
      if (ids.count(left) && ids.count(right)) merges.push_back(json::array({left, right}));
    }
  }
  return merges;
}

// A token option of tokenizer_config.json: a string, {"content": ...} or null (none).
std::optional<std::string> token_option(const json& config, const char* key, const std::string& fallback,
                                        const std::string& source) {
  if (!config.contains(key)) return fallback.empty() ? std::nullopt : std::optional<std::string>(fallback);
  const json& value = config[key];
  if (value.is_null()) return std::nullopt;
  if (value.is_string()) return value.get<std::string>();
  if (value.is_object() && value.contains("content") && value["content"].is_string()) return value["content"].get<std::string>();
  throw Error(source + ": " + key + ": expected a string, {\"content\": ...} or null");
}

bool bool_option(const json& config, const char* key, bool fallback, const std::string& source) {
  if (!config.contains(key) || config[key].is_null()) return fallback;
  if (!config[key].is_boolean()) throw Error(source + ": " + key + ": expected true or false");
  return config[key].get<bool>();
}

json read_config(const fs::path& path) {
  std::error_code error;
  if (!fs::exists(path, error)) return json::object();
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path.string() + ": cannot open: " + std::strerror(errno));
  try {
    json config = json::parse(in);
    if (!config.is_object()) throw Error(path.string() + ": expected a JSON object");
    return config;
  } catch (const json::exception& error) {
    throw Error(path.string() + ": invalid JSON: " + error.what());
  }
}

}  // namespace

std::unique_ptr<Tokenizer> load_sentencepiece_tokenizer(const std::string& path) {
  sentencepiece::SentencePieceProcessor processor;
  auto status = processor.Load(path);
  if (!status.ok()) throw Error(path + ": cannot load SentencePiece model: " + status.ToString());
  std::vector<std::vector<int>> nbest;
  if (processor.NBestEncode("a", 1, &nbest).ok()) {  // only Unigram models have n-best segmentations
    throw Error(path + ": a Unigram SentencePiece model; neva reads tokenizer.model as transformers' LlamaTokenizer "
                "does (BPE): provide the tokenizer.json transformers saves for this tokenizer");
  }
  const fs::path config_path = fs::path(path).parent_path() / "tokenizer_config.json";
  const json config = read_config(config_path);
  const std::string source = config_path.string();
  if (config.contains("tokenizer_class") && config["tokenizer_class"].is_string()) {
    std::string name = config["tokenizer_class"].get<std::string>();
    if (name != "LlamaTokenizer" && name != "LlamaTokenizerFast") {
      throw Error(source + ": tokenizer_class '" + name + "': a tokenizer.model is read as transformers' "
                  "LlamaTokenizer; provide the tokenizer.json transformers saves for " + name);
    }
  }

  std::vector<std::string> pieces;
  std::unordered_map<std::string, int> ids;
  json vocab = json::object(), added = json::array();
  auto add_token = [&](const std::string& content, std::int64_t id, bool special, bool lstrip, bool rstrip) {
    for (const auto& token : added) {
      if (token["id"] == id) return;
    }
    added.push_back({{"id", id}, {"content", content}, {"special", special}, {"lstrip", lstrip}, {"rstrip", rstrip},
                     {"single_word", false}, {"normalized", false}});
  };
  for (int id = 0; id < processor.GetPieceSize(); ++id) {
    std::string piece = processor.IdToPiece(id);
    pieces.push_back(piece);
    ids.emplace(piece, id);
    vocab[piece] = id;
    if (processor.IsControl(id) || processor.IsUnknown(id)) add_token(piece, id, true, false, false);
  }
  if (config.contains("added_tokens_decoder")) {
    const json& listed = config["added_tokens_decoder"];
    if (!listed.is_object()) throw Error(source + ": added_tokens_decoder: expected an object of id: token");
    for (const auto& [key, token] : listed.items()) {
      std::int64_t id = 0;
      try {
        id = std::stoll(key);
        const std::string content = token.at("content").get<std::string>();
        if (id < processor.GetPieceSize() && pieces[id] != content) {
          throw Error(source + ": added_tokens_decoder: token " + key + " is '" + content + "' but the model's piece " +
                      key + " is '" + pieces[id] + "'");
        }
        add_token(content, id, token.value("special", false), token.value("lstrip", false), token.value("rstrip", false));
      } catch (const std::logic_error& error) {  // std::stoll and json errors
        throw Error(source + ": added_tokens_decoder: malformed entry '" + key + "': " + error.what());
      }
    }
  }

  const bool legacy = bool_option(config, "legacy", false, source);
  const bool prefix_space = bool_option(config, "add_prefix_space", true, source);
  json template_single = json::array(), special_tokens = json::object();
  auto template_token = [&](const std::optional<std::string>& token, const char* key) {
    if (!token) return;
    std::optional<std::int64_t> id;
    for (const auto& item : added) {
      if (item["content"] == *token) id = item["id"].get<std::int64_t>();
    }
    if (!id && ids.count(*token)) id = ids.at(*token);
    if (!id) throw Error(source + ": " + key + " '" + *token + "' is not a token of " + path);
    template_single.push_back({{"SpecialToken", {{"id", *token}, {"type_id", 0}}}});
    special_tokens[*token] = {{"id", *token}, {"ids", {*id}}, {"tokens", {*token}}};
  };
  if (bool_option(config, "add_bos_token", true, source)) {
    template_token(token_option(config, "bos_token", processor.bos_id() >= 0 ? processor.IdToPiece(processor.bos_id()) : "", source),
                   "bos_token");
  }
  template_single.push_back({{"Sequence", {{"id", "A"}, {"type_id", 0}}}});
  if (bool_option(config, "add_eos_token", false, source)) {
    template_token(token_option(config, "eos_token", processor.eos_id() >= 0 ? processor.IdToPiece(processor.eos_id()) : "", source),
                   "eos_token");
  }

  json decoders = json::array({{{"type", "Replace"}, {"pattern", {{"String", "\xE2\x96\x81"}}}, {"content", " "}},
                               {{"type", "ByteFallback"}},
                               {{"type", "Fuse"}}});
  if (prefix_space) decoders.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});
  json spec = {
      {"model",
       {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges_of(pieces, ids)}, {"byte_fallback", true}, {"fuse_unk", true}}},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Metaspace"},
        {"replacement", "\xE2\x96\x81"},
        {"prepend_scheme", !prefix_space ? "never" : legacy ? "always" : "first"},
        {"split", false}}},
      {"post_processor", {{"type", "TemplateProcessing"}, {"single", template_single}, {"special_tokens", special_tokens}}},
      {"decoder", {{"type", "Sequence"}, {"decoders", decoders}}},
  };
  return make_hf_tokenizer(spec, path);
}

}  // namespace neva
