// Which tokenizer a model directory describes, read as transformers 5 reads it.
//
// AutoTokenizer picks the class tokenizer_config.json (or config.json) names, unless the model type
// or a byte-level tokenizer.json overrides it (is_llama_tokenizer). A class without a pipeline of its
// own (PreTrainedTokenizerFast, TokenizersBackend: Llama 3, and Mistral, Mixtral, llava-hf by their
// model type) runs tokenizer.json as written. LlamaTokenizer (Llama 2, Vicuna, original LLaVA-1.5)
// keeps only the vocabulary, merges, added tokens and post-processor of tokenizer.json, or takes them
// from tokenizer.model, and builds the rest itself:
// no normalizer, a Metaspace pre-tokenizer without splitting whose "▁" prefix goes only at the start
// of the text unless `legacy` is true (then after every special token too) or add_prefix_space is
// false (never), byte fallback, and the decoder to match. Old Llama-2-style tokenizer.json files (a
// Prepend normalizer: "▁" after every special token) are therefore not run as written: transformers
// 5 does not (original LLaVA-1.5's tokenizer_config.json says legacy false: the prefix at the start
// only, which is what transformers' non-legacy Llama tokenizers have meant since 4.31). This is
// transformers 5.23's behaviour (the pinned reference); upstream has debated going back to the file's
// Prepend normalizer for Llama (huggingface/transformers#47700, closed). CodeLlamaTokenizer, which
// also builds its own pipeline, is not modelled: its tokenizer.json runs as written.
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <stdexcept>

#include "neva/error.h"
#include "neva/io/hf_config.h"
#include "neva/io/json.h"
#include "tokenizer_internal.h"

namespace neva {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

json parse_object(const std::string& text, const fs::path& path) {
  json value = parse_json(text, path.string());
  if (!value.is_object()) throw Error(path.string() + ": expected a JSON object");
  return value;
}

// A JSON object from `path`; an empty object when `optional` and the file does not exist.
json read_json_object(const fs::path& path, bool optional) {
  std::error_code error;
  if (optional && !fs::exists(path, error)) {
    if (error) throw Error(path.string() + ": cannot check: " + error.message());
    return json::object();
  }
  return parse_object(read_file(path.string()), path);
}

// What the tokenizer needs of the model's config.json (read with HfConfig, when there is one).
struct ModelConfig {
  std::string model_type, tokenizer_class;
};

ModelConfig read_model_config(const fs::path& directory) {
  std::error_code error;
  if (!fs::exists(directory / "config.json", error)) return {};
  const HfConfig config = HfConfig::load((directory / "config.json").string());
  return {config.get<std::string>("model_type", ""), config.get<std::string>("tokenizer_class", "")};
}

std::string string_or_empty(const json& object, const char* key) {
  return object.contains(key) && object[key].is_string() ? object[key].get<std::string>() : std::string();
}

// Model types for which transformers 5.23's AutoTokenizer does not build LlamaTokenizer although
// tokenizer_config.json names it (models/auto/tokenization_auto.py: the type registers its generic
// TokenizersBackend, or is in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS with a class of its own).
// For them the tokenizer.json runs as written. Generated from transformers 5.23; the oracle
// (tokenizer_oracle.py, model_types.json) records AutoTokenizer for every model type it knows and
// the tests check this list against it.
const std::set<std::string>& generic_backend_model_types() {
  static const std::set<std::string> types{
      "EvollaModel", "arctic", "aria", "beam", "bigbird_pegasus", "camembertv2-base", "canary", "chatlm",
      "cohere_asr", "ernie4_5", "ernie4_5_moe", "flex_olmo", "fuyu", "glm", "glm4", "glm4_moe", "glm4_moe_lite",
      "glm4v", "glm4v_moe", "glm_image", "glmasr", "got_ocr2", "gpt_bigcode", "gradium_phonon_tts", "granite",
      "granitemoe", "granitemoehybrid", "granitemoeshared", "h2ovl_chat", "hyperclovax", "hyperclovax_vision_v2",
      "hyperclovax_vlm", "internlm2", "internlm3", "iquestcoder", "jamba", "kimi_k25", "kimi_linear", "kosmos-2",
      "llava", "llava_next", "mimo_v2_flash", "minicpm3", "minicpm_ocr", "minicpmv", "minicpmv4_6", "minicpmv4_7",
      "minimax_m2", "ministral", "ministral3", "mistral", "mistral3", "mistral_large4", "mixtral", "modernbert",
      "modernbert-decoder", "molmo", "molmo2", "nemo_speechlm", "nemotron", "nvfp4", "nystromformer", "olmo2",
      "olmo3", "olmo_hybrid", "opencua", "openvla", "paddleocr_vl", "pegasus_x", "persimmon", "phi3", "phi3_v",
      "phimoe", "pix2struct", "pixtral", "pocket_tts", "qwen2", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text",
      "qwen4_exp", "siglip2", "smolvlm", "stablelm", "step3_vl", "umt5", "vipllava", "voxtral", "voxtral_realtime",
      "xlm-roberta-xl"};
  return types;
}

// Whether AutoTokenizer (transformers 5.23) builds LlamaTokenizer for this directory: its class is
// tokenizer_config.json's tokenizer_class, else config.json's; a generic model type or a byte-level
// tokenizer.json (searched as transformers does, for the string "ByteLevel") overrides it.
bool is_llama_tokenizer(const json& tokenizer_config, const ModelConfig& model_config, const std::string& tokenizer_json_text) {
  std::string name = string_or_empty(tokenizer_config, "tokenizer_class");
  if (name.empty()) name = model_config.tokenizer_class;
  if (name != "LlamaTokenizer" && name != "LlamaTokenizerFast") return false;
  if (generic_backend_model_types().count(model_config.model_type)) return false;
  return tokenizer_json_text.find("\"ByteLevel\"") == std::string::npos;
}

// LlamaTokenizer's own pipeline around the vocabulary (see the top of this file).
void apply_llama_pipeline(json& spec, const json& config, const std::string& config_source,
                          const std::string& source) {
  json& model = spec["model"];
  const std::string type = model.is_object() ? model.value("type", "BPE") : std::string("(none)");
  if (type != "BPE") throw Error(source + ": model '" + type + "': LlamaTokenizer needs a BPE model");
  const bool legacy = config_flag(config, "legacy", false, config_source);
  const bool prefix_space = config_flag(config, "add_prefix_space", true, config_source);
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

// The tables a BPE tokenizer.json must hold in the shapes the tokenizers library requires (it refuses
// a file otherwise): vocab an object of token -> id, merges an array, each added token an object with
// a string "content" and an id. neva would otherwise read an array as a vocabulary of "0", "1", ...
// or repair an added token from the config, and run a tokenizer the reference cannot load.
void check_bpe_tables(const json& spec, const std::string& source) {
  const json& model = spec.at("model");
  auto fail = [&](const std::string& what) { throw Error(source + ": " + what); };
  if (!model.contains("vocab") || !model.at("vocab").is_object()) fail("model.vocab: expected an object of token: id");
  for (const auto& item : model.at("vocab").items()) {
    const json& id = item.value();
    if (!id.is_number_integer() || id.get<std::int64_t>() < 0 || id.get<std::int64_t>() > INT32_MAX) {
      fail("model.vocab['" + item.key() + "']: expected an id in [0, 2^31), got " + json_excerpt(id));
    }
  }
  if (model.contains("merges") && !model.at("merges").is_array()) fail("model.merges: expected an array");
  const json& added = spec.at("added_tokens");
  if (!added.is_array()) fail("added_tokens: expected an array");
  for (std::size_t i = 0; i < added.size(); ++i) {
    const json& token = added[i];
    const std::string where = "added_tokens[" + std::to_string(i) + "]: ";
    if (!token.is_object() || !token.contains("content") || !token.at("content").is_string()) {
      fail(where + "expected an object with a string \"content\"");
    }
    if (!token.contains("id") || !token.at("id").is_number_integer() || token.at("id").get<std::int64_t>() < 0 ||
        token.at("id").get<std::int64_t>() > INT32_MAX) {
      fail(where + "expected an id in [0, 2^31)");
    }
  }
}

// The content of a special-token option (a string or {"content": ...}); "" for none.
std::string token_content(const json& value) {
  if (value.is_string()) return value.get<std::string>();
  if (value.is_object() && value.contains("content") && value["content"].is_string()) return value["content"].get<std::string>();
  return {};
}

// The special tokens tokenizer_config.json names: bos/eos/unk/pad_token (LlamaTokenizer's defaults
// where `llama_defaults` and the key is absent) and additional_special_tokens / extra_special_tokens.
std::vector<std::pair<std::string, std::string>> named_special_tokens(const json& config, bool llama_defaults) {
  std::vector<std::pair<std::string, std::string>> named;  // (key, content)
  const std::pair<const char*, const char*> keys[] = {
      {"bos_token", "<s>"}, {"eos_token", "</s>"}, {"unk_token", "<unk>"}, {"pad_token", ""}};
  for (const auto& [key, fallback] : keys) {
    std::string content = config.contains(key) ? token_content(config[key]) : llama_defaults ? fallback : "";
    if (!content.empty()) named.emplace_back(key, content);
  }
  for (const char* key : {"additional_special_tokens", "extra_special_tokens"}) {
    if (!config.contains(key) || !config[key].is_array()) continue;
    for (const auto& value : config[key]) {
      std::string content = token_content(value);
      if (!content.empty()) named.emplace_back(key, content);
    }
  }
  return named;
}

// The added tokens of tokenizer_config.json's added_tokens_decoder, or of a pre-4.34 added_tokens.json
// ({"token": id}) where the config lists none, over those the files give, as transformers merges them:
// an entry adds a token, or changes the stripping of the one with its id; a token is special when the
// file or the entry says so, and every token the config names (bos_token, ...) is special. New ids
// must follow the tokenizer's last id without a gap (transformers would renumber them), and a named
// token must exist (transformers would add it as a new one). Tokens matched on normalized text (where
// there is a normalizer) or as single words are refused: neva matches added tokens on the raw text.
void merge_config_tokens(json& spec, const json& config, const fs::path& directory, bool llama_defaults) {
  const std::string config_source = (directory / "tokenizer_config.json").string();
  const std::vector<std::pair<std::string, std::string>> named = named_special_tokens(config, llama_defaults);
  std::set<std::string> named_contents;
  for (const auto& item : named) named_contents.insert(item.second);
  json listed;
  std::string source = config_source, what = "added_tokens_decoder: ";
  if (config.contains("added_tokens_decoder")) {
    listed = config["added_tokens_decoder"];
    if (!listed.is_object()) throw Error(source + ": added_tokens_decoder: expected an object of id: token");
  } else if (fs::exists(directory / "added_tokens.json")) {
    source = (directory / "added_tokens.json").string();
    what = "";
    const json file = read_json_object(directory / "added_tokens.json", false);
    listed = json::object();
    for (const auto& [content, id] : file.items()) {
      if (!id.is_number_integer()) throw Error(source + ": '" + content + "': expected an integer id");
      const bool special = named_contents.count(content) > 0;
      listed[std::to_string(id.get<std::int64_t>())] = {{"content", content}, {"special", special}, {"normalized", !special}};
    }
  }
  const bool has_normalizer = !spec["normalizer"].is_null();
  std::map<std::int64_t, std::string> vocab;
  for (const auto& [token, id] : spec["model"]["vocab"].items()) vocab[id.get<std::int64_t>()] = token;
  std::map<std::int64_t, json> added;
  for (const auto& token : spec["added_tokens"]) added[token.at("id").get<std::int64_t>()] = token;
  std::map<std::int64_t, json> entries;
  for (const auto& item : listed.items()) {
    const std::string& key = item.key();
    const json& token = item.value();  // captured below: not a structured binding (C++17)
    const std::string where = source + ": " + what + "entry '" + key + "': ";
    try {
      if (key.empty() || key.size() > 18 || key.find_first_not_of("0123456789") != std::string::npos) {
        throw std::invalid_argument("not a token id (expected a non-negative integer)");
      }
      const std::int64_t id = std::stoll(key);
      const std::string content = token.at("content").get<std::string>();
      const auto flag = [&](const char* name, bool fallback) {
        return token.contains(name) ? token.at(name).get<bool>() : fallback;
      };
      const bool special = flag("special", false);
      if ((has_normalizer && flag("normalized", !special)) || flag("single_word", false)) {
        throw std::invalid_argument("a token matched on normalized text or as a single word is not supported "
                                    "(set \"normalized\": false and \"single_word\": false)");
      }
      entries[id] = make_added_token(id, content, special, flag("lstrip", false), flag("rstrip", false));
    } catch (const std::invalid_argument& error) {
      throw Error(where + error.what());
    } catch (const json::exception& error) {
      throw Error(where + "expected {\"content\": string, \"special\": bool, ...}: " + json_error_reason(error));
    }
  }
  std::int64_t next = vocab.empty() ? 0 : vocab.rbegin()->first + 1;
  if (!added.empty()) next = std::max(next, added.rbegin()->first + 1);
  for (auto& [id, token] : entries) {
    const std::string content = token["content"].get<std::string>();
    const auto in_vocab = vocab.find(id);
    const auto in_added = added.find(id);
    const std::string* existing = in_added != added.end() ? in_added->second["content"].get_ptr<const std::string*>()
                                  : in_vocab != vocab.end() ? &in_vocab->second
                                                            : nullptr;
    if (existing && *existing != content) {
      throw Error(source + ": " + what + "token " + std::to_string(id) + " is '" + content + "' but the tokenizer's token " +
                  std::to_string(id) + " is '" + *existing + "'");
    }
    if (!existing && id != next) {
      throw Error(source + ": " + what + "token " + std::to_string(id) + " '" + content + "' leaves a gap: the next free id is " +
                  std::to_string(next) + " (transformers would renumber it)");
    }
    if (!existing) ++next;
    if (in_added != added.end() && in_added->second.value("special", false)) token["special"] = true;
    added[id] = token;
  }
  // Named tokens are special, whatever the file or the entries say (transformers adds them as such).
  for (const auto& [key, content] : named) {
    bool found = false;
    for (auto& [id, token] : added) {
      if (token["content"] == content) found = true, token["special"] = true;
    }
    if (found) continue;
    if (spec["model"]["vocab"].contains(content)) {
      const std::int64_t id = spec["model"]["vocab"][content].get<std::int64_t>();
      added[id] = make_added_token(id, content, true, false, false);
    } else if (config.contains(key)) {  // LlamaTokenizer's defaults may be absent from a vocabulary
      throw Error(config_source + ": " + key + " '" + content + "' is not a token of this tokenizer (transformers would " +
                  "add it as a new token, id " + std::to_string(next) + "); list it in added_tokens_decoder");
    }
  }
  spec["added_tokens"] = json::array();
  for (auto& [id, token] : added) spec["added_tokens"].push_back(std::move(token));
}

// The BOS/EOS template a tokenizer.model gets (tokenizer_config.json's add_bos_token, default true as
// LlamaTokenizer documents it; add_eos_token, default false), from the tokens the tokenizer now has.
// transformers 5.23 itself adds no BOS where add_bos_token is absent (its TokenizersBackend reads a
// missing key as false), against its documentation and against how Llama models were trained; neva
// follows the documentation there, and only there. A directory with a tokenizer.model and no
// tokenizer_config.json is read as LlamaTokenizer (AutoTokenizer would pick its generic backend,
// which drops SentencePiece's prefix).
void sentencepiece_template(json& spec, const json& config, const std::string& source, const std::string& bos,
                            const std::string& eos) {
  auto token_option = [&](const char* key, const std::string& fallback) -> std::optional<std::string> {
    if (!config.contains(key)) return fallback.empty() ? std::nullopt : std::optional<std::string>(fallback);
    if (config[key].is_null()) return std::nullopt;
    std::string content = token_content(config[key]);
    if (content.empty()) throw Error(source + ": " + key + ": expected a string, {\"content\": ...} or null");
    return content;
  };
  json single = json::array(), special_tokens = json::object();
  auto add = [&](const char* key, const std::string& fallback) {
    const auto token = token_option(key, fallback);
    if (!token) return;
    std::optional<std::int64_t> id;
    for (const auto& item : spec["added_tokens"]) {
      if (item["content"] == *token) id = item["id"].get<std::int64_t>();
    }
    if (!id && spec["model"]["vocab"].contains(*token)) id = spec["model"]["vocab"][*token].get<std::int64_t>();
    if (!id) throw Error(source + ": " + key + " '" + *token + "' is not a token of this tokenizer");
    single.push_back({{"SpecialToken", {{"id", *token}, {"type_id", 0}}}});
    special_tokens[*token] = {{"id", *token}, {"ids", {*id}}, {"tokens", {*token}}};
  };
  if (config_flag(config, "add_bos_token", true, source)) add("bos_token", bos);
  single.push_back({{"Sequence", {{"id", "A"}, {"type_id", 0}}}});
  if (config_flag(config, "add_eos_token", false, source)) add("eos_token", eos);
  spec["post_processor"] = {{"type", "TemplateProcessing"}, {"single", single}, {"special_tokens", special_tokens}};
}

}  // namespace

bool config_flag(const json& config, const char* key, bool fallback, const std::string& source) {
  if (!config.contains(key) || config[key].is_null()) return fallback;
  if (!config[key].is_boolean()) throw Error(source + ": " + key + ": expected true or false");
  return config[key].get<bool>();
}

json make_added_token(std::int64_t id, const std::string& content, bool special, bool lstrip, bool rstrip) {
  return {{"id", id},         {"content", content}, {"special", special},   {"lstrip", lstrip},
          {"rstrip", rstrip}, {"single_word", false}, {"normalized", false}};
}

namespace {

// The tokenizer.json description of the tokenizer at `path`, as neva runs it; `source` is set to the
// file it came from.
json describe_tokenizer(const std::string& path, std::string& source) {
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
  source = location.string();
  const fs::path config_path = location.parent_path() / "tokenizer_config.json";
  const std::string config_source = config_path.string();
  const json config = read_json_object(config_path, true);
  const ModelConfig model_config = read_model_config(location.parent_path());
  try {
    json spec;
    if (location.extension() == ".json") {
      const std::string text = read_file(location.string());  // searched as transformers does (is_llama_tokenizer)
      spec = parse_object(text, location);
      if (!spec.contains("added_tokens") || spec["added_tokens"].is_null()) spec["added_tokens"] = json::array();
      // Only BPE is supported: let the engine say so for other models before their vocabulary is read.
      if (!spec.contains("model") || !spec["model"].is_object() || spec["model"].value("type", "BPE") != "BPE") {
        return spec;
      }
      check_bpe_tables(spec, source);
      if (is_llama_tokenizer(config, model_config, text)) {
        // LlamaTokenizer takes the file's added tokens only when the config lists none.
        if (config.contains("added_tokens_decoder")) spec["added_tokens"] = json::array();
        apply_llama_pipeline(spec, config, config_source, source);
        merge_config_tokens(spec, config, location.parent_path(), true);
      } else {
        merge_config_tokens(spec, config, location.parent_path(), false);
      }
    } else {
      const std::string& model_type = model_config.model_type;
      if (generic_backend_model_types().count(model_type)) {
        throw Error(source + ": transformers 5.23 reads a tokenizer.model of model_type '" + model_type +
                    "' (config.json) with its generic backend, which drops SentencePiece's '\xE2\x96\x81' prefix; "
                    "provide the tokenizer.json this model ships so that neva and transformers agree");
      }
      std::string name = string_or_empty(config, "tokenizer_class");
      std::string named_in = config_source;
      if (name.empty()) {
        name = model_config.tokenizer_class;
        named_in = (location.parent_path() / "config.json").string();
      }
      if (!name.empty() && name != "LlamaTokenizer" && name != "LlamaTokenizerFast") {
        throw Error(named_in + ": tokenizer_class '" + name + "': a tokenizer.model is read as transformers' "
                    "LlamaTokenizer; provide the tokenizer.json transformers saves for " + name);
      }
      SentencePieceDescription model = sentencepiece_description(source);
      spec = std::move(model.spec);
      apply_llama_pipeline(spec, config, config_source, source);
      merge_config_tokens(spec, config, location.parent_path(), true);
      sentencepiece_template(spec, config, config_source, model.bos, model.eos);
    }
    return spec;
  } catch (const json::exception& malformed) {
    throw Error(source + ": malformed tokenizer: " + json_error_reason(malformed));
  }
}

}  // namespace

Tokenizer::~Tokenizer() = default;

std::unique_ptr<Tokenizer> Tokenizer::load(const std::string& path) {
  std::string source;
  const json spec = describe_tokenizer(path, source);
  return make_hf_tokenizer(spec, source);
}

std::string Tokenizer::describe(const std::string& path) {
  std::string source;
  return describe_tokenizer(path, source).dump();
}

}  // namespace neva
