// Which tokenizer a model directory describes, read as transformers 5 reads it.
//
// transformers picks the class tokenizer_config.json names. A class without a pipeline of its own
// (PreTrainedTokenizerFast, Llama 3's) runs tokenizer.json as written. LlamaTokenizer (Llama 2,
// Mistral, Mixtral, Vicuna, LLaVA-1.5) keeps only the vocabulary, merges, added tokens and
// post-processor of tokenizer.json, or takes them from tokenizer.model, and builds the rest itself:
// no normalizer, a Metaspace pre-tokenizer without splitting whose "▁" prefix goes only at the start
// of the text unless `legacy` is true (then after every special token too) or add_prefix_space is
// false (never), byte fallback, and the decoder to match. Old Llama-2-style tokenizer.json files (a
// Prepend normalizer: "▁" after every special token) are therefore not run as written: transformers
// 5 does not, and LLaVA-1.5 (legacy false) was trained with the prefix at the start only. This is
// transformers 5.23's behaviour (the pinned reference); upstream has debated going back to the file's
// Prepend normalizer for Llama (huggingface/transformers#47700, closed; #47488 did so for CodeLlama).
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "neva/error.h"
#include "tokenizer_internal.h"

namespace neva {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

json read_config(const fs::path& path) {
  std::error_code error;
  if (!fs::exists(path, error)) return json::object();
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path.string() + ": cannot open: " + std::strerror(errno));
  json config = json::parse(in, nullptr, false);
  if (config.is_discarded()) throw Error(path.string() + ": invalid JSON");
  if (!config.is_object()) throw Error(path.string() + ": expected a JSON object");
  return config;
}

// LlamaTokenizer's own pipeline around the vocabulary (see the top of this file).
void apply_llama_pipeline(json& spec, const json& config, const std::string& source) {
  json& model = spec.at("model");
  if (model.value("type", "BPE") != "BPE") throw Error(source + ": LlamaTokenizer needs a BPE model");
  const bool legacy = config_flag(config, "legacy", false, source);
  const bool prefix_space = config_flag(config, "add_prefix_space", true, source);
  model["byte_fallback"] = true;
  model["fuse_unk"] = true;
  model.erase("unk_token");  // LlamaTokenizer's BPE has none: what byte fallback cannot spell is dropped
  model.erase("ignore_merges");
  spec["normalizer"] = nullptr;
  spec["pre_tokenizer"] = {{"type", "Metaspace"},
                           {"replacement", "\xE2\x96\x81"},
                           {"prepend_scheme", !prefix_space ? "never" : legacy ? "always" : "first"},
                           {"split", false}};
  json decoders = json::array({{{"type", "Replace"}, {"pattern", {{"String", "\xE2\x96\x81"}}}, {"content", " "}},
                               {{"type", "ByteFallback"}},
                               {{"type", "Fuse"}}});
  if (prefix_space) decoders.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});
  spec["decoder"] = {{"type", "Sequence"}, {"decoders", decoders}};
}

// tokenizer_config.json's added_tokens_decoder: tokens beyond the model's own, as transformers adds them.
void add_config_tokens(json& spec, const json& config, const std::string& source) {
  if (!config.contains("added_tokens_decoder")) return;
  const json& listed = config["added_tokens_decoder"];
  if (!listed.is_object()) throw Error(source + ": added_tokens_decoder: expected an object of id: token");
  std::map<std::int64_t, std::string> known;
  for (const auto& [token, id] : spec.at("model").at("vocab").items()) known[id.get<std::int64_t>()] = token;
  json& added = spec["added_tokens"];
  if (added.is_null()) added = json::array();
  for (const auto& token : added) known[token.at("id").get<std::int64_t>()] = token.at("content").get<std::string>();
  for (const auto& [key, token] : listed.items()) {
    std::int64_t id = 0;
    std::string content;
    try {
      id = std::stoll(key);
      content = token.at("content").get<std::string>();
    } catch (const std::logic_error& error) {  // std::stoll's and json's errors
      throw Error(source + ": added_tokens_decoder: malformed entry '" + key + "': " + error.what());
    }
    auto found = known.find(id);
    if (found != known.end() && found->second != content) {
      throw Error(source + ": added_tokens_decoder: token " + key + " is '" + content + "' but the tokenizer's token " +
                  key + " is '" + found->second + "'");
    }
    bool listed_already = false;
    for (const auto& item : added) listed_already = listed_already || item.at("id").get<std::int64_t>() == id;
    if (listed_already) continue;
    added.push_back({{"id", id}, {"content", content}, {"special", token.value("special", false)},
                     {"lstrip", token.value("lstrip", false)}, {"rstrip", token.value("rstrip", false)},
                     {"single_word", false}, {"normalized", false}});
  }
}

}  // namespace

bool config_flag(const json& config, const char* key, bool fallback, const std::string& source) {
  if (!config.contains(key) || config[key].is_null()) return fallback;
  if (!config[key].is_boolean()) throw Error(source + ": " + key + ": expected true or false");
  return config[key].get<bool>();
}

Tokenizer::~Tokenizer() = default;

std::unique_ptr<Tokenizer> Tokenizer::load(const std::string& path) {
  fs::path location(path);
  std::error_code error;
  if (fs::is_directory(location, error)) {
    if (fs::exists(location / "tokenizer.json")) {
      location /= "tokenizer.json";
    } else if (fs::exists(location / "tokenizer.model")) {
      location /= "tokenizer.model";
    } else {
      throw Error(path + ": no tokenizer.json or tokenizer.model in this directory");
    }
  } else if (!fs::exists(location, error)) {
    throw Error(path + ": no such file or directory");
  }
  const fs::path config_path = location.parent_path() / "tokenizer_config.json";
  const std::string config_source = config_path.string();
  const json config = read_config(config_path);
  std::string class_name;
  if (config.contains("tokenizer_class") && config["tokenizer_class"].is_string()) {
    class_name = config["tokenizer_class"].get<std::string>();
  }
  const bool llama = class_name == "LlamaTokenizer" || class_name == "LlamaTokenizerFast";
  json spec;
  if (location.extension() == ".json") {
    spec = read_tokenizer_json(location.string());
    if (llama) apply_llama_pipeline(spec, config, config_source);
  } else {
    if (!class_name.empty() && !llama) {
      throw Error(config_source + ": tokenizer_class '" + class_name + "': a tokenizer.model is read as transformers' "
                  "LlamaTokenizer; provide the tokenizer.json transformers saves for " + class_name);
    }
    spec = sentencepiece_description(location.string(), config, config_source);
    apply_llama_pipeline(spec, config, config_source);
  }
  add_config_tokens(spec, config, config_source);
  return make_hf_tokenizer(spec, location.string());
}

}  // namespace neva
