#include "protocol.h"

#include <openssl/evp.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>

namespace neva::serve {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string type_name(const json& value) {
  switch (value.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::string: return "a string";
    case json::value_t::array: return "an array";
    case json::value_t::object: return "an object";
    default: return "a number";
  }
}

[[noreturn]] void invalid(const std::string& param, const std::string& message) {
  throw ApiError(400, param.empty() ? message : "'" + param + "': " + message, param);
}

bool present(const json& body, const char* key) { return body.contains(key) && !body.at(key).is_null(); }

std::int64_t integer(const json& body, const char* key, std::int64_t min, std::int64_t max) {
  const json& value = body.at(key);
  if (!value.is_number_integer()) invalid(key, "expected an integer, got " + type_name(value));
  const auto number = value.get<std::int64_t>();
  if (number < min || number > max) {
    invalid(key, std::to_string(number) + " is out of range: expected " + std::to_string(min) + " to " + std::to_string(max));
  }
  return number;
}

double number(const json& body, const char* key, double min, double max) {
  const json& value = body.at(key);
  if (!value.is_number()) invalid(key, "expected a number, got " + type_name(value));
  const auto x = value.get<double>();
  if (!(x >= min && x <= max)) {
    invalid(key, json(x).dump() + " is out of range: expected " + json(min).dump() + " to " + json(max).dump());
  }
  return x;
}

bool boolean(const json& body, const char* key) {
  const json& value = body.at(key);
  if (!value.is_boolean()) invalid(key, "expected a boolean, got " + type_name(value));
  return value.get<bool>();
}

// Every OpenAI parameter this server knows: those it honours, and those outside what it serves (tools,
// audio, JSON mode...: text generation only, docs/serving.md), refused by name in check_keys.
const std::set<std::string> kCommonKeys = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream",
                                           "stream_options", "frequency_penalty", "presence_penalty", "user",
                                           "logprobs", "top_logprobs", "logit_bias", "metadata", "store", "service_tier"};
const std::set<std::string> kChatKeys = {"messages", "max_completion_tokens", "tools", "tool_choice", "functions",
                                         "function_call", "response_format", "parallel_tool_calls", "modalities", "audio",
                                         "prediction", "reasoning_effort", "web_search_options"};
const std::set<std::string> kCompletionKeys = {"prompt", "echo", "best_of", "suffix"};

void check_keys(const json& body, const std::set<std::string>& endpoint) {
  for (const auto& [key, value] : body.items()) {
    if (!kCommonKeys.count(key) && !endpoint.count(key)) {
      invalid(key, "unrecognized request argument (this server takes the OpenAI parameters listed in docs/serving.md)");
    }
  }
  // Output-changing features neva does not implement: refused rather than ignored.
  for (const char* key : {"tools", "tool_choice", "functions", "function_call", "modalities", "audio", "prediction",
                          "suffix", "web_search_options", "reasoning_effort"}) {
    if (present(body, key)) invalid(key, "not supported by this server (neva generates text only)");
  }
  if (present(body, "parallel_tool_calls")) invalid("parallel_tool_calls", "not supported: this server has no tools");
  if (present(body, "response_format")) {
    const json& format = body.at("response_format");
    if (!format.is_object() || format.value("type", json()) != "text") {
      invalid("response_format", "only {\"type\": \"text\"} is supported (no JSON mode or schemas)");
    }
  }
  if (present(body, "logit_bias")) {
    const json& bias = body.at("logit_bias");
    if (!bias.is_object()) invalid("logit_bias", "expected an object, got " + type_name(bias));
    if (!bias.empty()) invalid("logit_bias", "not supported by this server");
  }
  if (present(body, "echo") && boolean(body, "echo")) invalid("echo", "echo = true is not supported");
  if (present(body, "best_of") && integer(body, "best_of", 1, 1 << 20) != 1) invalid("best_of", "only best_of = 1 is supported");
  if (present(body, "user") && !body.at("user").is_string()) invalid("user", "expected a string, got " + type_name(body.at("user")));
  if (present(body, "metadata") && !body.at("metadata").is_object()) invalid("metadata", "expected an object");
  if (present(body, "store") && boolean(body, "store")) invalid("store", "store = true is not supported (nothing is kept)");
}

// The parameters both endpoints share, over the recipe's defaults.
void read_sampling(const json& body, const SamplingConfig& defaults, const Limits& limits, ParsedRequest& parsed,
                   const char* max_tokens_key) {
  if (present(body, "model")) {
    if (!body.at("model").is_string()) invalid("model", "expected a string, got " + type_name(body.at("model")));
    const std::string model = body.at("model").get<std::string>();
    if (model != limits.model_name) {
      throw ApiError(404, "The model '" + model + "' does not exist: this server serves '" + limits.model_name + "'",
                     "model", "model_not_found");
    }
  }
  Job& job = *parsed.job;
  job.sampling = defaults;
  job.sampling.max_new_tokens = limits.max_tokens;
  for (const char* key : {max_tokens_key, "max_tokens"}) {
    if (!present(body, key)) continue;
    const std::int64_t asked = integer(body, key, 1, std::numeric_limits<std::int32_t>::max());
    if (asked > limits.max_tokens) {
      invalid(key, std::to_string(asked) + " is more than this server's limit of " + std::to_string(limits.max_tokens) +
                       " new tokens per request (serve.max_tokens)");
    }
    job.sampling.max_new_tokens = asked;
    job.explicit_max_tokens = true;
    break;
  }
  if (present(body, "temperature")) {
    const double temperature = number(body, "temperature", 0.0, 2.0);
    job.sampling.greedy = temperature == 0.0;  // (a tiny one is greedy too: SequenceDecoder)
    if (!job.sampling.greedy) job.sampling.temperature = temperature;
  }
  if (present(body, "top_p")) {
    job.sampling.top_p = number(body, "top_p", 0.0, 1.0);
    if (job.sampling.top_p == 0.0) invalid("top_p", "0 keeps no token: expected a number in (0, 1]");
  }
  if (present(body, "seed")) {
    const json& seed = body.at("seed");
    if (!seed.is_number_integer()) invalid("seed", "expected an integer, got " + type_name(seed));
    job.seed = seed.is_number_unsigned() ? seed.get<std::uint64_t>() : static_cast<std::uint64_t>(seed.get<std::int64_t>());
  }
  if (present(body, "stop")) {
    const json& stop = body.at("stop");
    std::vector<std::string> stops;
    if (stop.is_string()) {
      stops.push_back(stop.get<std::string>());
    } else if (stop.is_array()) {
      if (stop.size() > 4) invalid("stop", "at most 4 stop sequences, got " + std::to_string(stop.size()));
      for (const auto& item : stop) {
        if (!item.is_string()) invalid("stop", "expected strings, got " + type_name(item));
        stops.push_back(item.get<std::string>());
      }
    } else {
      invalid("stop", "expected a string or an array of strings, got " + type_name(stop));
    }
    for (const auto& text : stops) {
      if (text.empty()) invalid("stop", "an empty stop sequence would end every answer before it starts");
      job.sampling.stop_strings.push_back(text);
    }
  }
  if (present(body, "n") && integer(body, "n", 1, 128) != 1) {
    invalid("n", "only n = 1 is supported (send the request again for more answers)");
  }
  if (present(body, "frequency_penalty")) job.sampling.frequency_penalty = number(body, "frequency_penalty", -2.0, 2.0);
  if (present(body, "presence_penalty")) job.sampling.presence_penalty = number(body, "presence_penalty", -2.0, 2.0);
  if (present(body, "stream")) parsed.stream = boolean(body, "stream");
  if (present(body, "stream_options")) {
    const json& options = body.at("stream_options");
    if (!parsed.stream) invalid("stream_options", "only allowed when stream is true");
    if (!options.is_object()) invalid("stream_options", "expected an object, got " + type_name(options));
    for (const auto& [key, value] : options.items()) {
      if (key != "include_usage" && key != "include_obfuscation") invalid("stream_options", "unknown option '" + key + "'");
    }
    if (present(options, "include_usage")) parsed.include_usage = boolean(options, "include_usage");
  }
}

// An image_url part's image: the bytes of a data: URL, or of a file below the allowed folder.
PendingImage read_image_url(const json& part, const Limits& limits, const std::string& where) {
  const json* url_field = part.contains("image_url") ? &part.at("image_url") : nullptr;
  if (!url_field) invalid(where, "an image_url part needs \"image_url\": {\"url\": ...}");
  std::string url;
  if (url_field->is_string()) {
    url = url_field->get<std::string>();
  } else if (url_field->is_object() && url_field->contains("url") && url_field->at("url").is_string()) {
    url = url_field->at("url").get<std::string>();
    if (url_field->contains("detail")) {
      const json& detail = url_field->at("detail");
      if (!detail.is_string() || (detail != "auto" && detail != "low" && detail != "high")) {
        invalid(where + ".image_url.detail", "expected \"auto\", \"low\" or \"high\"");
      }
    }
  } else {
    invalid(where + ".image_url", "expected {\"url\": \"data:image/png;base64,...\"}");
  }
  if (!limits.has_vision) {
    invalid(where, "this model has no vision encoder: it takes text only");
  }
  if (url.rfind("data:", 0) == 0) {
    const std::size_t comma = url.find(',');
    if (comma == std::string::npos) invalid(where + ".image_url.url", "a data: URL without a comma before its data");
    const std::string header = url.substr(5, comma - 5);
    if (header.size() < 7 || header.compare(header.size() - 7, 7, ";base64") != 0) {
      invalid(where + ".image_url.url", "expected a base64 data: URL (data:image/png;base64,...)");
    }
    const std::string media = header.substr(0, header.size() - 7);
    if (media != "image/png" && media != "image/jpeg" && media != "image/jpg") {
      invalid(where + ".image_url.url", "media type '" + media + "': PNG and JPEG images are supported");
    }
    return {decode_base64(url.substr(comma + 1), where + ".image_url.url"), "", where};
  }
  if (url.rfind("file://", 0) == 0) {
    if (limits.allowed_image_dir.empty()) {
      invalid(where + ".image_url.url", "file:// images are refused: the server allows none (serve.allowed_image_dir)");
    }
    std::error_code error;
    const fs::path root = fs::weakly_canonical(limits.allowed_image_dir, error);
    const fs::path path = fs::weakly_canonical(fs::path(url.substr(7)), error);
    const fs::path relative = path.lexically_relative(root);
    if (error || url.size() <= 7 || url[7] != '/' || relative.empty() || *relative.begin() == "..") {
      invalid(where + ".image_url.url", "file:// images must be absolute paths below the allowed folder " + root.string());
    }
    return {"", path.string(), where + " (" + path.string() + ")"};  // read on the worker thread
  }
  if (url.rfind("http://", 0) == 0 || url.rfind("https://", 0) == 0) {
    invalid(where + ".image_url.url", "remote image URLs are not fetched: send the image as a data: URL (base64)");
  }
  invalid(where + ".image_url.url", "expected a data: URL (base64 PNG or JPEG) or a file:// path");
}

// A message's content: text, or parts (text and, for the user, images).
// Each image part puts its <image> placeholder where it stands.
std::string read_content(const json& message, const std::string& role, const std::string& where, const Limits& limits,
                         ParsedRequest& parsed) {
  if (!message.contains("content")) invalid(where, "missing 'content'");
  const json& content = message.at("content");
  if (content.is_string()) return content.get<std::string>();
  if (!content.is_array()) invalid(where + ".content", "expected a string or an array of parts, got " + type_name(content));
  std::string text;
  for (std::size_t j = 0; j < content.size(); ++j) {
    const json& part = content[j];
    const std::string at = where + ".content[" + std::to_string(j) + "]";
    if (!part.is_object() || !part.contains("type") || !part.at("type").is_string()) {
      invalid(at, "expected a part {\"type\": \"text\" | \"image_url\", ...}");
    }
    const std::string type = part.at("type").get<std::string>();
    if (type == "text") {
      if (!part.contains("text") || !part.at("text").is_string()) invalid(at, "a text part needs a string 'text'");
      text += part.at("text").get<std::string>();
    } else if (type == "image_url") {
      if (role != "user") invalid(at, "only user messages may hold images");
      if (parsed.images.size() >= kMaxImagesPerRequest) {
        invalid(at, "more than " + std::to_string(kMaxImagesPerRequest) + " images in one request");
      }
      parsed.images.push_back(read_image_url(part, limits, at));
      text += "<image>\n";  // in the order of the parts; LLaVA's convention puts it first
    } else {
      invalid(at, "part type '" + type + "' is not supported (text and image_url are)");
    }
  }
  return text;
}

}  // namespace

json error_body(const std::string& message, const std::string& type, const std::string& param, const std::string& code) {
  return {{"error",
           {{"message", message},
            {"type", type},
            {"param", param.empty() ? json() : json(param)},
            {"code", code.empty() ? json() : json(code)}}}};
}

std::string decode_base64(const std::string& text, const std::string& where) {
  std::string clean;
  clean.reserve(text.size());
  for (char c : text) {
    if (c != '\n' && c != '\r') clean.push_back(c);
  }
  if (clean.empty()) invalid(where, "the base64 data is empty");
  if (clean.size() % 4 != 0) invalid(where, "invalid base64: its length is not a multiple of 4");
  std::string bytes(clean.size() / 4 * 3, '\0');
  const int written = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(bytes.data()),
                                      reinterpret_cast<const unsigned char*>(clean.data()), static_cast<int>(clean.size()));
  if (written < 0) invalid(where, "invalid base64 data");
  std::size_t padding = 0;
  if (clean.back() == '=') padding = clean[clean.size() - 2] == '=' ? 2 : 1;
  bytes.resize(static_cast<std::size_t>(written) - padding);
  return bytes;
}

ParsedRequest parse_chat_request(const json& body, const SamplingConfig& defaults, const Limits& limits) {
  if (!body.is_object()) invalid("", "the request body must be a JSON object, got " + type_name(body));
  check_keys(body, kChatKeys);
  ParsedRequest parsed;
  read_sampling(body, defaults, limits, parsed, "max_completion_tokens");
  if (!body.contains("messages")) invalid("messages", "missing: a chat completion needs messages");
  const json& messages = body.at("messages");
  if (!messages.is_array()) invalid("messages", "expected an array, got " + type_name(messages));
  if (messages.empty()) invalid("messages", "expected at least one message");
  Job& job = *parsed.job;
  for (std::size_t i = 0; i < messages.size(); ++i) {
    const json& message = messages[i];
    const std::string where = "messages[" + std::to_string(i) + "]";
    if (!message.is_object()) invalid(where, "expected an object, got " + type_name(message));
    if (!message.contains("role") || !message.at("role").is_string()) invalid(where, "expected a string 'role'");
    const std::string role = message.at("role").get<std::string>();
    for (const auto& [key, value] : message.items()) {
      if (key != "role" && key != "content" && key != "name") invalid(where + "." + key, "not supported in a message");
    }
    if (role == "tool" || role == "function") invalid(where + ".role", "'" + role + "' messages are not supported (no tools)");
    if (role != "system" && role != "developer" && role != "user" && role != "assistant") {
      invalid(where + ".role", "unknown role '" + role + "': expected system, developer, user or assistant");
    }
    const std::string text = read_content(message, role, where, limits, parsed);
    if (role == "system" || role == "developer") {  // every system message joins the template's system prompt
      job.system += (job.system.empty() ? "" : "\n") + text;
      continue;
    }
    const Turn::Role turn_role = role == "user" ? Turn::Role::User : Turn::Role::Assistant;
    if (job.turns.empty() && turn_role == Turn::Role::Assistant) {
      invalid(where, "the conversation must begin with a user message (after any system messages)");
    }
    if (!job.turns.empty() && job.turns.back().role == turn_role) {  // consecutive messages of one role join
      job.turns.back().text += "\n" + text;
    } else {
      job.turns.push_back({turn_role, text});
    }
  }
  if (job.turns.empty()) invalid("messages", "no user message: the model answers the last user message");
  if (job.turns.back().role != Turn::Role::User) invalid("messages", "the last message must be the user's (the model answers it)");
  if (present(body, "logprobs") && boolean(body, "logprobs")) job.top_logprobs = 0;
  if (present(body, "top_logprobs")) {
    if (job.top_logprobs < 0) invalid("top_logprobs", "needs logprobs = true");
    job.top_logprobs = integer(body, "top_logprobs", 0, 20);
  }
  return parsed;
}

ParsedRequest parse_completion_request(const json& body, const SamplingConfig& defaults, const Limits& limits) {
  if (!body.is_object()) invalid("", "the request body must be a JSON object, got " + type_name(body));
  check_keys(body, kCompletionKeys);
  ParsedRequest parsed;
  parsed.chat = false;
  // The completion API's stop strings are the request's only (the chat template's end is not text
  // here); the tokenizer's end tokens still stop it.
  SamplingConfig plain = defaults;
  plain.stop_strings.clear();
  read_sampling(body, plain, limits, parsed, "max_tokens");
  if (!body.contains("prompt")) invalid("prompt", "missing: a completion needs a prompt");
  const json& prompt = body.at("prompt");
  if (prompt.is_string()) {
    parsed.job->raw_prompt = prompt.get<std::string>();
  } else if (prompt.is_array() && prompt.size() == 1 && prompt[0].is_string()) {
    parsed.job->raw_prompt = prompt[0].get<std::string>();
  } else if (prompt.is_array()) {
    invalid("prompt", "expected one string (batches of prompts and token-id prompts are not supported)");
  } else {
    invalid("prompt", "expected a string, got " + type_name(prompt));
  }
  if (present(body, "logprobs")) parsed.job->top_logprobs = integer(body, "logprobs", 0, 5);
  if (present(body, "top_logprobs")) invalid("top_logprobs", "the completions API takes logprobs = N (0 to 5) instead");
  return parsed;
}

namespace {

json logprob_entry(const std::string& token, double logprob) {
  std::vector<int> bytes(token.begin(), token.end());
  for (int& b : bytes) b &= 0xFF;
  return {{"token", token}, {"logprob", logprob}, {"bytes", bytes}};
}

json chat_logprobs(const std::vector<TokenLogprobText>& logprobs) {
  json content = json::array();
  for (const auto& entry : logprobs) {
    json item = logprob_entry(entry.token, entry.logprob);
    json top = json::array();
    for (const auto& [token, value] : entry.top) top.push_back(logprob_entry(token, value));
    item["top_logprobs"] = top;
    content.push_back(item);
  }
  return {{"content", content}, {"refusal", nullptr}};
}

json completion_logprobs(const std::vector<TokenLogprobText>& logprobs, std::size_t offset) {  // offset: of the first token in the text
  json tokens = json::array(), values = json::array(), tops = json::array(), offsets = json::array();
  for (const auto& entry : logprobs) {
    tokens.push_back(entry.token);
    values.push_back(entry.logprob);
    json top = json::object();
    for (const auto& [token, value] : entry.top) top[token] = value;
    tops.push_back(top);
    offsets.push_back(offset);
    offset += entry.token.size();
  }
  return {{"tokens", tokens}, {"token_logprobs", values}, {"top_logprobs", tops}, {"text_offset", offsets}};
}

json usage(const Completion& completion) {
  return {{"prompt_tokens", completion.prompt_tokens},
          {"completion_tokens", completion.completion_tokens},
          {"total_tokens", completion.prompt_tokens + completion.completion_tokens}};
}

}  // namespace

json chat_response(const Completion& completion, const std::string& model, bool logprobs) {
  return {{"id", completion.id},
          {"object", "chat.completion"},
          {"created", completion.created},
          {"model", model},
          {"choices", json::array({{{"index", 0},
                                    {"message", {{"role", "assistant"}, {"content", completion.text}, {"refusal", nullptr}}},
                                    {"logprobs", logprobs ? chat_logprobs(completion.logprobs) : json()},
                                    {"finish_reason", completion.finish_reason}}})},
          {"usage", usage(completion)}};
}

json completion_response(const Completion& completion, const std::string& model, bool logprobs) {
  return {{"id", completion.id},
          {"object", "text_completion"},
          {"created", completion.created},
          {"model", model},
          {"choices", json::array({{{"index", 0},
                                    {"text", completion.text},
                                    {"logprobs", logprobs ? completion_logprobs(completion.logprobs, 0) : json()},
                                    {"finish_reason", completion.finish_reason}}})},
          {"usage", usage(completion)}};
}

json chat_chunk(const Completion& completion, const std::string& model, const std::string& text,
                const std::vector<TokenLogprobText>* logprobs, bool first, const std::string& finish_reason) {
  json delta = json::object();
  if (first) delta["role"] = "assistant";
  if (!text.empty() || first) delta["content"] = text;
  return {{"id", completion.id},
          {"object", "chat.completion.chunk"},
          {"created", completion.created},
          {"model", model},
          {"choices", json::array({{{"index", 0},
                                    {"delta", delta},
                                    {"logprobs", logprobs ? chat_logprobs(*logprobs) : json()},
                                    {"finish_reason", finish_reason.empty() ? json() : json(finish_reason)}}})}};
}

json completion_chunk(const Completion& completion, const std::string& model, const std::string& text,
                      const std::vector<TokenLogprobText>* logprobs, const std::string& finish_reason, std::size_t offset) {
  return {{"id", completion.id},
          {"object", "text_completion"},
          {"created", completion.created},
          {"model", model},
          {"choices", json::array({{{"index", 0},
                                    {"text", text},
                                    {"logprobs", logprobs ? completion_logprobs(*logprobs, offset) : json()},
                                    {"finish_reason", finish_reason.empty() ? json() : json(finish_reason)}}})}};
}

json usage_chunk(const Completion& completion, const std::string& model, bool chat) {
  return {{"id", completion.id},
          {"object", chat ? "chat.completion.chunk" : "text_completion"},
          {"created", completion.created},
          {"model", model},
          {"choices", json::array()},
          {"usage", usage(completion)}};
}

}  // namespace neva::serve
