#pragma once
#include <cerrno>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "neva/tokenizer.h"

namespace neva {

std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& tokenizer_json);
std::unique_ptr<Tokenizer> load_sentencepiece_tokenizer(const std::string& tokenizer_model);

}  // namespace neva
