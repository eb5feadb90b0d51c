// tokenizer.model through the SentencePiece library. Control symbols written in the text (<s>,
// </s>, ...) are split out first and map to their ids (SentencePiece matches user-defined symbols
// itself); every other stretch of text is encoded by SentencePiece as it is, which adds its dummy
// "▁" prefix to each stretch (transformers' "legacy" behaviour). Where a tokenizer.json exists it is
// preferred (Tokenizer::load), and it reproduces transformers' current behaviour exactly.
#include <sentencepiece_processor.h>

#include <algorithm>

#include "neva/error.h"
#include "tokenizer_internal.h"

namespace neva {

namespace {

class SentencePieceTokenizer : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(const std::string& path) {
    auto status = processor_.Load(path);
    if (!status.ok()) throw Error(path + ": cannot load SentencePiece model: " + status.ToString());
    for (int id = 0; id < processor_.GetPieceSize(); ++id) {
      if (processor_.IsControl(id)) {  // user-defined symbols SentencePiece matches itself
        std::string piece = processor_.IdToPiece(id);
        if (!piece.empty()) specials_.emplace_back(piece, id);
      }
    }
  }

  std::vector<std::int64_t> encode(std::string_view text, bool add_special_tokens) const override {
    std::vector<std::int64_t> ids;
    if (add_special_tokens && processor_.bos_id() >= 0) ids.push_back(processor_.bos_id());
    std::size_t cursor = 0, at = 0;
    auto flush = [&](std::size_t end) {
      if (end <= cursor) return;
      std::vector<int> piece_ids;
      processor_.Encode(std::string(text.substr(cursor, end - cursor)), &piece_ids);
      ids.insert(ids.end(), piece_ids.begin(), piece_ids.end());
    };
    while (at < text.size()) {
      const std::pair<std::string, int>* best = nullptr;
      for (const auto& special : specials_) {
        if (text.compare(at, special.first.size(), special.first) == 0 && (!best || special.first.size() > best->first.size())) {
          best = &special;
        }
      }
      if (!best) {
        ++at;
        continue;
      }
      flush(at);
      ids.push_back(best->second);
      cursor = at = at + best->first.size();
    }
    flush(text.size());
    return ids;
  }

  std::string decode(const std::vector<std::int64_t>& ids, bool skip_special_tokens) const override {
    std::vector<int> kept;
    std::string out;
    auto flush = [&] {
      std::string text;
      processor_.Decode(kept, &text);
      out += text;
      kept.clear();
    };
    for (std::int64_t id : ids) {
      if (id < 0 || id >= processor_.GetPieceSize()) continue;
      if (processor_.IsControl(static_cast<int>(id))) {
        if (skip_special_tokens) continue;
        flush();
        out += processor_.IdToPiece(static_cast<int>(id));
        continue;
      }
      kept.push_back(static_cast<int>(id));
    }
    flush();
    return out;
  }

  std::optional<std::int64_t> token_id(std::string_view token) const override {
    int id = processor_.PieceToId(std::string(token));
    if (id == processor_.unk_id() && token != processor_.IdToPiece(id)) return std::nullopt;
    return id;
  }
  std::int64_t vocab_size() const override { return processor_.GetPieceSize(); }
  bool is_special(std::int64_t id) const override {
    return id >= 0 && id < processor_.GetPieceSize() && processor_.IsControl(static_cast<int>(id));
  }

 private:
  sentencepiece::SentencePieceProcessor processor_;
  std::vector<std::pair<std::string, int>> specials_;
};

}  // namespace

std::unique_ptr<Tokenizer> load_sentencepiece_tokenizer(const std::string& path) {
  return std::make_unique<SentencePieceTokenizer>(path);
}

}  // namespace neva
