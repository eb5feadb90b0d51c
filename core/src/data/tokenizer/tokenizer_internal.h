#pragma once
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "neva/data/tokenizer.h"

namespace neva {

// A true/false option of tokenizer_config.json (`source`), `fallback` when absent or null.
bool config_flag(const nlohmann::json& config, const char* key, bool fallback, const std::string& source);
// One entry of a tokenizer.json's added_tokens.
nlohmann::json make_added_token(std::int64_t id, const std::string& content, bool special, bool lstrip, bool rstrip);
// A tokenizer from a tokenizer.json description; `source` names it in errors.
std::unique_ptr<Tokenizer> make_hf_tokenizer(const nlohmann::json& spec, const std::string& source);

// What transformers' LlamaTokenizer takes from a SentencePiece BPE model (tokenizer.model): the
// description's model (vocabulary, and merges as generate_merges derives them) and added tokens (the
// control and unknown pieces, special), and the model's BOS and EOS pieces ("" when it has none).
struct SentencePieceDescription {
  nlohmann::json spec;
  std::string bos, eos;
};
SentencePieceDescription sentencepiece_description(const std::string& tokenizer_model);

}  // namespace neva
