#pragma once
// The OpenAI wire format: requests read into Jobs (every field checked, unknown ones refused), and
// responses, stream chunks and error objects written.
#include <nlohmann/json.hpp>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine.h"

namespace neva::serve {

// A request the server refuses: the HTTP status and OpenAI's error object fields.
struct ApiError : std::runtime_error {
  ApiError(int status, const std::string& message, std::string param = "", std::string code = "",
           std::string type = "invalid_request_error")
      : std::runtime_error(message), status(status), param(std::move(param)), code(std::move(code)), type(std::move(type)) {}
  int status;
  std::string param, code, type;
};

nlohmann::json error_body(const std::string& message, const std::string& type, const std::string& param,
                          const std::string& code);

// An image a request carries, not decoded yet: the bytes of a data: URL or a file below the
// allowed folder.
struct PendingImage {
  std::string bytes;  // a data: URL's
  std::string path;   // or a file's below the allowed folder, read on the worker thread
  std::string where;  // messages[i].content[j]
};

inline constexpr std::size_t kMaxImagesPerRequest = 16;

struct Limits {
  std::string model_name;
  std::int64_t max_tokens = 64;  // the most a request may ask for (and its default)
  std::string allowed_image_dir;
  std::size_t max_image_bytes = 32u << 20;
  bool has_vision = false;
};

struct ParsedRequest {
  std::shared_ptr<Job> job = std::make_shared<Job>();
  std::vector<PendingImage> images;
  bool stream = false;
  bool include_usage = false;
  bool chat = true;
};

// `defaults`: the recipe's sampling (its stops included). Throws ApiError.
ParsedRequest parse_chat_request(const nlohmann::json& body, const SamplingConfig& defaults, const Limits& limits);
ParsedRequest parse_completion_request(const nlohmann::json& body, const SamplingConfig& defaults, const Limits& limits);

// The bytes of a base64 string (OpenSSL's decoder); throws ApiError naming `where`.
std::string decode_base64(const std::string& text, const std::string& where);

// Responses.
struct Completion {
  std::string id;
  std::int64_t created = 0;
  std::string text;
  std::vector<TokenLogprobText> logprobs;
  std::string finish_reason;
  std::int64_t prompt_tokens = 0, completion_tokens = 0;
};
nlohmann::json chat_response(const Completion& completion, const std::string& model, bool logprobs);
nlohmann::json completion_response(const Completion& completion, const std::string& model, bool logprobs);
// One stream chunk: `first` carries the assistant role; `finish_reason` non-empty on the last.
nlohmann::json chat_chunk(const Completion& completion, const std::string& model, const std::string& text,
                          const std::vector<TokenLogprobText>* logprobs, bool first, const std::string& finish_reason);
// `offset`: where `text` starts in the whole completion (the logprobs' text_offset).
nlohmann::json completion_chunk(const Completion& completion, const std::string& model, const std::string& text,
                                const std::vector<TokenLogprobText>* logprobs, const std::string& finish_reason,
                                std::size_t offset);
nlohmann::json usage_chunk(const Completion& completion, const std::string& model, bool chat);

}  // namespace neva::serve
