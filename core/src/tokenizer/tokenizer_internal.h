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

std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& tokenizer_json);
// A tokenizer from a tokenizer.json description already parsed; `source` names it in errors.
std::unique_ptr<Tokenizer> make_hf_tokenizer(const nlohmann::json& spec, const std::string& source);
std::unique_ptr<Tokenizer> load_sentencepiece_tokenizer(const std::string& tokenizer_model);

}  // namespace neva
