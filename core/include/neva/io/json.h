#pragma once
// JSON from users' files (config.json, tokenizer files, LLaVA data, safetensors headers, run state),
// parsed with the limits a hostile or broken file needs. nlohmann's own parser would stop at a NUL
// byte as if the text ended there (so "{}\0garbage" parsed as {}), and values nested without bound
// overflow the stack of the recursive code that later copies, prints or walks them.
#include <nlohmann/json.hpp>

#include <functional>
#include <string>
#include <string_view>

#include "neva/api.h"

namespace neva {

struct JsonLimits {
  int max_depth = 128;                  // serde_json's limit (the tokenizers and safetensors references)
  bool reject_duplicate_keys = false;   // safetensors headers and indexes: a key given twice is an error
};

// Parses `text` as exactly one JSON value (surrounding JSON whitespace allowed), as Python's json and
// serde_json do. Throws neva::Error "<source>:LINE:COLUMN: invalid JSON: <what>" for a syntax error,
// invalid UTF-8, a NUL byte, a leading byte-order mark, nesting deeper than limits.max_depth or a
// duplicate key (when asked). `source` is the file (or "file:line" for a JSON Lines record).
NEVA_API nlohmann::json parse_json(std::string_view text, const std::string& source, const JsonLimits& limits = {});

// One record of a JSON Lines file, line `line_number` of `path`: errors say "<path>:<line>:<column>".
NEVA_API nlohmann::json parse_json_line(std::string_view line, const std::string& path, std::size_t line_number,
                                        const JsonLimits& limits = {});

// The whole of a regular file as bytes; throws neva::Error "<path>: cannot open[ <what>]: <reason>"
// (also for a directory, device or FIFO), e.g. what = "image": "x.png: cannot open image: ...".
NEVA_API std::string read_file(const std::string& path, const char* what = "");
// The same check without reading: `path` can be opened and is a regular file.
NEVA_API void check_regular_file(const std::string& path, const char* what = "");
// Each line of a regular file (without its '\n'), with its 1-based number, read as it streams.
NEVA_API void for_each_line(const std::string& path, const std::function<void(std::string_view, std::size_t)>& line);
// parse_json(read_file(path), path, limits).
NEVA_API nlohmann::json read_json_file(const std::string& path, const JsonLimits& limits = {});

// A nlohmann exception's text without its "[json.exception.type_error.302] " tag: "type must be
// string, but is number".
NEVA_API std::string json_error_reason(const nlohmann::json::exception& error);

// `value` as JSON text for a message, cut to about `max_chars` characters.
NEVA_API std::string json_excerpt(const nlohmann::json& value, std::size_t max_chars = 60);

}  // namespace neva
