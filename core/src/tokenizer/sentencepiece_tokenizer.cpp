// A tokenizer.model, read the way transformers 5's LlamaTokenizer reads one without tokenizer.json:
// the SentencePiece BPE model's pieces become the vocabulary, its merges are derived from the pieces
// (generate_merges) and its control and unknown pieces are special added tokens. tokenizer.cpp adds
// LlamaTokenizer's pipeline, tokenizer_config.json's tokens and the BOS/EOS template.
// SentencePiece's own normalisation rules and its user-defined symbols are not used, as in
// transformers; the C++ API of SentencePiece 0.1.97 has no piece-type query for user-defined symbols,
// so a model that needs them must list them in tokenizer_config.json's added_tokens_decoder (which
// transformers writes since 4.34). Llama-family models have none.
#include <sentencepiece_processor.h>

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

}  // namespace

SentencePieceDescription sentencepiece_description(const std::string& path) {
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
    if (processor.IsControl(id) || processor.IsUnknown(id)) added.push_back(make_added_token(id, piece, true, false, false));
  }
  auto piece_or_none = [&](int id) { return id >= 0 ? processor.IdToPiece(id) : std::string(); };
  return {{{"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges_of(pieces, ids)}}}, {"added_tokens", added}},
          piece_or_none(processor.bos_id()),
          piece_or_none(processor.eos_id())};
}

}  // namespace neva
