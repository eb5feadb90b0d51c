// A tokenizer.model, read the way transformers 5's LlamaTokenizer reads one without tokenizer.json:
// the SentencePiece BPE model's pieces become the vocabulary, its merges are derived from the pieces
// (generate_merges), its control and unknown pieces are special added tokens, and the BOS/EOS
// template follows tokenizer_config.json's add_bos_token (default true) and add_eos_token (default
// false). tokenizer.cpp adds LlamaTokenizer's pipeline (Metaspace, byte fallback, decoder).
// The BOS default follows LlamaTokenizer's documentation; transformers 5.23 itself adds no BOS when a
// directory has no tokenizer_config.json at all (and AutoTokenizer there does not pick LlamaTokenizer),
// which is no behaviour to copy for a Llama model. SentencePiece's own normalisation rules and its
// user-defined symbols are not used, as in transformers (the C++ API of SentencePiece 0.1.97 cannot
// name user-defined pieces; those a model needs are listed in tokenizer_config.json's
// added_tokens_decoder, which transformers writes since 4.34).
#include <sentencepiece_processor.h>

#include <optional>
#include <unordered_map>
#include <nlohmann/json.hpp>

#include "neva/error.h"
#include "tokenizer_internal.h"

namespace neva {

namespace {

using nlohmann::json;

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

}  // namespace

json sentencepiece_description(const std::string& path, const json& config, const std::string& source) {
  sentencepiece::SentencePieceProcessor processor;
  auto status = processor.Load(path);
  if (!status.ok()) throw Error(path + ": cannot load SentencePiece model: " + status.ToString());
  std::vector<std::vector<int>> nbest;
  if (processor.NBestEncode("a", 1, &nbest).ok()) {  // only Unigram models have n-best segmentations
    throw Error(path + ": a Unigram SentencePiece model; neva reads tokenizer.model as transformers' LlamaTokenizer "
                "does (BPE): provide the tokenizer.json transformers saves for this tokenizer");
  }
  std::vector<std::string> pieces;
  std::unordered_map<std::string, int> ids;
  json vocab = json::object(), added = json::array();
  for (int id = 0; id < processor.GetPieceSize(); ++id) {
    std::string piece = processor.IdToPiece(id);
    pieces.push_back(piece);
    ids.emplace(piece, id);
    vocab[piece] = id;
    if (processor.IsControl(id) || processor.IsUnknown(id)) {
      added.push_back({{"id", id}, {"content", piece}, {"special", true}, {"lstrip", false}, {"rstrip", false},
                       {"single_word", false}, {"normalized", false}});
    }
  }
  json single = json::array(), special_tokens = json::object();
  auto template_token = [&](const std::optional<std::string>& token, const char* key) {
    if (!token) return;
    auto found = ids.find(*token);
    if (found == ids.end()) throw Error(source + ": " + key + " '" + *token + "' is not a piece of " + path);
    single.push_back({{"SpecialToken", {{"id", *token}, {"type_id", 0}}}});
    special_tokens[*token] = {{"id", *token}, {"ids", {found->second}}, {"tokens", {*token}}};
  };
  auto piece_or_none = [&](int id) { return id >= 0 ? processor.IdToPiece(id) : std::string(); };
  if (config_flag(config, "add_bos_token", true, source)) {
    template_token(token_option(config, "bos_token", piece_or_none(processor.bos_id()), source), "bos_token");
  }
  single.push_back({{"Sequence", {{"id", "A"}, {"type_id", 0}}}});
  if (config_flag(config, "add_eos_token", false, source)) {
    template_token(token_option(config, "eos_token", piece_or_none(processor.eos_id()), source), "eos_token");
  }
  return {{"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges_of(pieces, ids)}}},
          {"added_tokens", added},
          {"post_processor", {{"type", "TemplateProcessing"}, {"single", single}, {"special_tokens", special_tokens}}}};
}

}  // namespace neva
