#pragma once
#include <cerrno>
#include <cstring>
#include <fstream>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <sstream>
#include <string>

#include "neva/tokenizer.h"

namespace neva {

// A true/false option of tokenizer_config.json (`source`), `fallback` when absent or null.
bool config_flag(const nlohmann::json& config, const char* key, bool fallback, const std::string& source);
// tokenizer.json, parsed; errors name the file.
nlohmann::json read_tokenizer_json(const std::string& path);
// A tokenizer from a tokenizer.json description; `source` names it in errors.
std::unique_ptr<Tokenizer> make_hf_tokenizer(const nlohmann::json& spec, const std::string& source);
// The vocabulary, merges, added tokens and BOS/EOS template transformers' LlamaTokenizer takes from a
// SentencePiece BPE model (tokenizer.model) and its tokenizer_config.json (`config`, named `config_source`).
nlohmann::json sentencepiece_description(const std::string& tokenizer_model, const nlohmann::json& config,
                                         const std::string& config_source);

}  // namespace neva
