// tokenizer.json (Hugging Face tokenizers), the subset LLaVA-family models use: BPE with merges
// (byte-level or byte-fallback, ignore_merges, unk fusing); normalizers Prepend, Replace, Sequence;
// pre-tokenizers Split (regex via PCRE2), ByteLevel, Metaspace, Sequence; TemplateProcessing and
// ByteLevel post-processors; decoders ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace,
// Sequence; added tokens with lstrip/rstrip. Anything else is refused by name when loading.
// The algorithms follow the tokenizers crate (models/bpe/word.rs merge order, added_vocabulary.rs
// leftmost-longest matching, metaspace.rs prepend schemes).
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <queue>
#include <unordered_map>

#include "neva/error.h"
#include "neva/io/json.h"
#include "tokenizer_internal.h"

namespace neva {

using nlohmann::json;

namespace {

// ------------------------------------------------------------------ UTF-8 helpers

std::vector<std::string> utf8_chars(std::string_view text) {
  std::vector<std::string> out;
  for (std::size_t i = 0; i < text.size();) {
    unsigned char lead = static_cast<unsigned char>(text[i]);
    std::size_t length = lead < 0x80 ? 1 : (lead >> 5) == 0x6 ? 2 : (lead >> 4) == 0xE ? 3 : (lead >> 3) == 0x1E ? 4 : 1;
    length = std::min(length, text.size() - i);
    out.emplace_back(text.substr(i, length));
    i += length;
  }
  return out;
}

std::string utf8_encode(std::uint32_t code) {
  std::string out;
  if (code < 0x80) {
    out += static_cast<char>(code);
  } else if (code < 0x800) {
    out += static_cast<char>(0xC0 | (code >> 6));
    out += static_cast<char>(0x80 | (code & 0x3F));
  } else if (code < 0x10000) {
    out += static_cast<char>(0xE0 | (code >> 12));
    out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (code & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (code >> 18));
    out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (code & 0x3F));
  }
  return out;
}

// Replaces invalid UTF-8 with U+FFFD as String::from_utf8_lossy (the tokenizers library) and
// Python's errors="replace" do: each maximal subpart of an ill-formed sequence (the longest prefix of
// a well-formed sequence, Unicode 15 section 3.9, table 3-7) becomes one U+FFFD. So "\xE2\x82A" is
// one U+FFFD and "A", an overlong "\xC0\xAF" two, a surrogate "\xED\xA0\x80" three.
std::string utf8_lossy(const std::string& bytes) {
  std::string out;
  out.reserve(bytes.size());
  const std::size_t size = bytes.size();
  for (std::size_t i = 0; i < size;) {
    const unsigned char lead = static_cast<unsigned char>(bytes[i]);
    if (lead < 0x80) {
      out += static_cast<char>(lead);
      ++i;
      continue;
    }
    // The sequence's length and the range its second byte must be in (the rest: 80..BF).
    std::size_t length = 0;
    unsigned char low = 0x80, high = 0xBF;
    if (lead >= 0xC2 && lead <= 0xDF) {
      length = 2;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
      length = 3;
      if (lead == 0xE0) low = 0xA0;   // no overlongs
      if (lead == 0xED) high = 0x9F;  // no surrogates
    } else if (lead >= 0xF0 && lead <= 0xF4) {
      length = 4;
      if (lead == 0xF0) low = 0x90;   // no overlongs
      if (lead == 0xF4) high = 0x8F;  // nothing past U+10FFFF
    }
    std::size_t valid = 1;  // bytes of the maximal subpart
    while (length > 0 && valid < length && i + valid < size) {
      const unsigned char next = static_cast<unsigned char>(bytes[i + valid]);
      const unsigned char lo = valid == 1 ? low : 0x80, hi = valid == 1 ? high : 0xBF;
      if (next < lo || next > hi) break;
      ++valid;
    }
    if (length > 0 && valid == length) {
      out.append(bytes, i, length);
    } else {
      out += "\xEF\xBF\xBD";
    }
    i += valid;
  }
  return out;
}

// GPT-2's reversible byte <-> printable-character table (ByteLevel).
struct ByteTable {
  std::array<std::string, 256> to_char;
  std::unordered_map<std::string, unsigned char> to_byte;
  ByteTable() {
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      std::uint32_t code = printable ? static_cast<std::uint32_t>(b) : static_cast<std::uint32_t>(256 + extra++);
      to_char[b] = utf8_encode(code);
      to_byte[to_char[b]] = static_cast<unsigned char>(b);
    }
  }
};
const ByteTable& byte_table() {
  static const ByteTable table;
  return table;
}

}  // namespace

const std::string& byte_level_symbol(std::uint8_t byte) { return byte_table().to_char[byte]; }

namespace {

// ------------------------------------------------------------------ regex (PCRE2)

class Regex {
 public:
  Regex(const std::string& pattern, const std::string& where) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.c_str()), pattern.size(), PCRE2_UTF | PCRE2_UCP, &error,
                          &offset, nullptr);
    if (!code_) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof message);
      const std::string shown = pattern.size() > 60 ? pattern.substr(0, 57) + "..." : pattern;
      throw Error(where + ": cannot compile regex '" + shown + "' at offset " + std::to_string(offset) + ": " +
                  reinterpret_cast<const char*>(message));
    }
    data_ = pcre2_match_data_create_from_pattern(code_, nullptr);
  }
  Regex(const Regex&) = delete;
  ~Regex() {
    pcre2_match_data_free(data_);
    pcre2_code_free(code_);
  }
  // Non-overlapping matches, as [begin, end) byte ranges.
  std::vector<std::pair<std::size_t, std::size_t>> find_all(std::string_view text) const {
    std::vector<std::pair<std::size_t, std::size_t>> out;
    std::size_t start = 0;
    while (start <= text.size()) {
      int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), start, 0, data_, nullptr);
      if (rc < 0) break;
      PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data_);
      std::size_t begin = ovector[0], end = ovector[1];
      if (end == begin) {  // empty match: step one character forward
        if (begin >= text.size()) break;
        start = begin + utf8_chars(text.substr(begin)).front().size();
        continue;
      }
      out.emplace_back(begin, end);
      start = end;
    }
    return out;
  }

 private:
  pcre2_code* code_ = nullptr;
  pcre2_match_data* data_ = nullptr;
};

// GPT-2's split, used by ByteLevel with use_regex = true.
constexpr const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ------------------------------------------------------------------ pipeline pieces

struct Piece {
  std::string text;
  bool at_start;  // begins at offset 0 of the original input (Metaspace "first")
};

std::string replace_all(std::string text, const std::string& from, const std::string& to) {
  if (from.empty()) return text;
  for (std::size_t at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size())) {
    text.replace(at, from.size(), to);
  }
  return text;
}

std::string string_pattern(const json& pattern, const std::string& where) {
  if (pattern.contains("String")) return pattern["String"].get<std::string>();
  throw Error(where + ": only String patterns are supported here, got " + json_excerpt(pattern));
}

class Normalizer {
 public:
  explicit Normalizer(const json& spec, const std::string& where) {
    if (spec.is_null()) return;
    add(spec, where);
  }
  std::string apply(std::string text) const {
    for (const auto& step : steps_) {
      if (step.kind == "Prepend") {
        if (!text.empty()) text = step.a + text;
      } else {
        text = replace_all(text, step.a, step.b);
      }
    }
    return text;
  }

 private:
  struct Step {
    std::string kind, a, b;
  };
  void add(const json& spec, const std::string& where) {
    std::string type = spec.value("type", "");
    if (type == "Sequence") {
      for (const auto& child : spec.at("normalizers")) add(child, where);
    } else if (type == "Prepend") {
      steps_.push_back({type, spec.at("prepend").get<std::string>(), ""});
    } else if (type == "Replace") {
      steps_.push_back({type, string_pattern(spec.at("pattern"), where), spec.at("content").get<std::string>()});
    } else {
      throw Error(where + ": normalizer '" + type + "' is not supported (supported: Prepend, Replace, Sequence)");
    }
  }
  std::vector<Step> steps_;
};

class PreTokenizer {
 public:
  PreTokenizer(const json& spec, const std::string& where) {
    if (!spec.is_null()) add(spec, where);
  }
  std::vector<Piece> apply(std::vector<Piece> pieces) const {
    for (const auto& step : steps_) {
      std::vector<Piece> next;
      for (auto& piece : pieces) step(piece, next);
      pieces = std::move(next);
    }
    return pieces;
  }

 private:
  using Step = std::function<void(Piece&, std::vector<Piece>&)>;

  static void split_by(const Regex& regex, bool keep_gaps, Piece& piece, std::vector<Piece>& out) {
    std::size_t cursor = 0;
    for (auto [begin, end] : regex.find_all(piece.text)) {
      if (begin > cursor && keep_gaps) out.push_back({piece.text.substr(cursor, begin - cursor), piece.at_start && cursor == 0});
      out.push_back({piece.text.substr(begin, end - begin), piece.at_start && begin == 0});
      cursor = end;
    }
    if (cursor < piece.text.size() && keep_gaps) out.push_back({piece.text.substr(cursor), piece.at_start && cursor == 0});
  }

  void add(const json& spec, const std::string& where) {
    std::string type = spec.value("type", "");
    if (type == "Sequence") {
      for (const auto& child : spec.at("pretokenizers")) add(child, where);
    } else if (type == "Split") {
      std::string behavior = spec.value("behavior", "Isolated");
      if (spec.value("invert", false) || (behavior != "Isolated" && behavior != "Removed")) {
        throw Error(where + ": Split pre-tokenizer with behavior '" + behavior + "'" +
                    (spec.value("invert", false) ? " and invert" : "") + " is not supported (supported: Isolated, Removed)");
      }
      const json& pattern = spec.at("pattern");
      std::string regex = pattern.contains("Regex") ? pattern["Regex"].get<std::string>() : "";
      if (!pattern.contains("Regex")) {  // a literal string: escape it
        for (char c : string_pattern(pattern, where)) regex += std::string(std::strchr("\\^$.|?*+()[]{}", c) && c ? "\\" : "") + c;
      }
      auto compiled = std::make_shared<Regex>(regex, where);
      bool isolated = behavior == "Isolated";
      if (isolated) {
        steps_.push_back([compiled](Piece& piece, std::vector<Piece>& out) { split_by(*compiled, true, piece, out); });
      } else {
        steps_.push_back([compiled](Piece& piece, std::vector<Piece>& out) {
          std::size_t cursor = 0;
          for (auto [begin, end] : compiled->find_all(piece.text)) {
            if (begin > cursor) out.push_back({piece.text.substr(cursor, begin - cursor), piece.at_start && cursor == 0});
            cursor = end;
          }
          if (cursor < piece.text.size()) out.push_back({piece.text.substr(cursor), piece.at_start && cursor == 0});
        });
      }
    } else if (type == "ByteLevel") {
      bool prefix = spec.value("add_prefix_space", false);
      std::shared_ptr<Regex> gpt2;
      if (spec.value("use_regex", true)) gpt2 = std::make_shared<Regex>(kGpt2Pattern, where);
      steps_.push_back([prefix, gpt2](Piece& piece, std::vector<Piece>& out) {
        if (prefix && !piece.text.empty() && piece.text[0] != ' ') piece.text = " " + piece.text;
        std::vector<Piece> split;
        if (gpt2) {
          split_by(*gpt2, true, piece, split);
        } else {
          split.push_back(piece);
        }
        for (auto& part : split) {
          std::string mapped;
          for (unsigned char byte : part.text) mapped += byte_table().to_char[byte];
          out.push_back({mapped, part.at_start});
        }
      });
    } else if (type == "Metaspace") {
      std::string replacement = spec.value("replacement", "\xE2\x96\x81");
      std::string scheme = spec.value("prepend_scheme", spec.value("add_prefix_space", true) ? "always" : "never");
      bool split = spec.value("split", true);
      steps_.push_back([replacement, scheme, split](Piece& piece, std::vector<Piece>& out) {
        std::string text = replace_all(piece.text, " ", replacement);
        bool starts = text.compare(0, replacement.size(), replacement) == 0;
        if (!starts && (scheme == "always" || (scheme == "first" && piece.at_start))) text = replacement + text;
        if (!split) {
          out.push_back({text, piece.at_start});
          return;
        }
        // MergedWithNext: every replacement character starts a new piece.
        std::size_t begin = 0;
        for (std::size_t at = text.find(replacement, 1); at != std::string::npos; at = text.find(replacement, at + 1)) {
          out.push_back({text.substr(begin, at - begin), piece.at_start && begin == 0});
          begin = at;
        }
        if (begin < text.size()) out.push_back({text.substr(begin), piece.at_start && begin == 0});
      });
    } else {
      throw Error(where + ": pre-tokenizer '" + type + "' is not supported (supported: Split, ByteLevel, Metaspace, Sequence)");
    }
  }

  std::vector<Step> steps_;
};

class Decoder {
 public:
  Decoder(const json& spec, const std::string& where) {
    if (!spec.is_null()) add(spec, where);
  }
  std::string apply(std::vector<std::string> tokens) const {
    for (const auto& step : steps_) tokens = step(std::move(tokens));
    std::string out;
    for (const auto& token : tokens) out += token;
    return out;
  }

 private:
  using Step = std::function<std::vector<std::string>(std::vector<std::string>)>;
  void add(const json& spec, const std::string& where) {
    std::string type = spec.value("type", "");
    if (type == "Sequence") {
      for (const auto& child : spec.at("decoders")) add(child, where);
    } else if (type == "ByteLevel") {
      steps_.push_back([](std::vector<std::string> tokens) {
        std::string bytes;
        for (const auto& token : tokens) {
          for (const auto& character : utf8_chars(token)) {
            auto found = byte_table().to_byte.find(character);
            if (found != byte_table().to_byte.end()) {
              bytes += static_cast<char>(found->second);
            } else {
              bytes += character;
            }
          }
        }
        return std::vector<std::string>{utf8_lossy(bytes)};
      });
    } else if (type == "Replace") {
      std::string from = string_pattern(spec.at("pattern"), where), to = spec.at("content").get<std::string>();
      steps_.push_back([from, to](std::vector<std::string> tokens) {
        for (auto& token : tokens) token = replace_all(token, from, to);
        return tokens;
      });
    } else if (type == "ByteFallback") {
      steps_.push_back([](std::vector<std::string> tokens) {
        std::vector<std::string> out;
        std::string pending;  // consecutive <0xXX> bytes decode together
        // As tokenizers' ByteFallback: a run that is not valid UTF-8 becomes one U+FFFD per byte.
        auto flush = [&] {
          if (pending.empty()) return;
          if (utf8_lossy(pending) == pending) {
            out.push_back(pending);
          } else {
            for (std::size_t i = 0; i < pending.size(); ++i) out.push_back("\xEF\xBF\xBD");
          }
          pending.clear();
        };
        auto hex = [](char c) {
          return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        };
        for (const auto& token : tokens) {
          // "<0xXX>" with two hex digits; anything else (e.g. "<0xZZ>") is an ordinary token.
          const int high = token.size() == 6 ? hex(token[3]) : -1, low = token.size() == 6 ? hex(token[4]) : -1;
          if (high >= 0 && low >= 0 && token.compare(0, 3, "<0x") == 0 && token[5] == '>') {
            pending += static_cast<char>(high * 16 + low);
          } else {
            flush();
            out.push_back(token);
          }
        }
        flush();
        return out;
      });
    } else if (type == "Fuse") {
      steps_.push_back([](std::vector<std::string> tokens) {
        std::string joined;
        for (const auto& token : tokens) joined += token;
        return std::vector<std::string>{joined};
      });
    } else if (type == "Strip") {
      std::string content = spec.value("content", " ");
      std::size_t start = spec.value("start", 0), stop = spec.value("stop", 0);
      steps_.push_back([content, start, stop](std::vector<std::string> tokens) {
        for (auto& token : tokens) {
          for (std::size_t i = 0; i < start && token.compare(0, content.size(), content) == 0; ++i) token.erase(0, content.size());
          for (std::size_t i = 0; i < stop && token.size() >= content.size() &&
                                  token.compare(token.size() - content.size(), content.size(), content) == 0;
               ++i) {
            token.erase(token.size() - content.size());
          }
        }
        return tokens;
      });
    } else if (type == "Metaspace") {
      std::string replacement = spec.value("replacement", "\xE2\x96\x81");
      std::string scheme = spec.value("prepend_scheme", spec.value("add_prefix_space", true) ? "always" : "never");
      steps_.push_back([replacement, scheme](std::vector<std::string> tokens) {
        for (std::size_t i = 0; i < tokens.size(); ++i) {
          tokens[i] = replace_all(tokens[i], replacement, " ");
          if (i == 0 && scheme != "never" && !tokens[i].empty() && tokens[i][0] == ' ') tokens[i].erase(0, 1);
        }
        return tokens;
      });
    } else {
      throw Error(where + ": decoder '" + type +
                  "' is not supported (supported: ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, Sequence)");
    }
  }
  std::vector<Step> steps_;
};

struct AddedToken {
  std::string content;
  std::int64_t id;
  bool special, lstrip, rstrip;
};

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

// ------------------------------------------------------------------ the tokenizer

class HfTokenizer : public Tokenizer {
 public:
  HfTokenizer(const json& spec, const std::string& source)
      : normalizer_(spec.value("normalizer", json()), source),
        pre_tokenizer_(spec.value("pre_tokenizer", json()), source),
        decoder_(spec.value("decoder", json()), source) {
    const json& model = spec.at("model");
    std::string type = model.value("type", "BPE");
    if (type != "BPE") throw Error(source + ": model '" + type + "' is not supported (supported: BPE)");
    if (!model.value("continuing_subword_prefix", json()).is_null() || !model.value("end_of_word_suffix", json()).is_null()) {
      throw Error(source + ": BPE continuing_subword_prefix / end_of_word_suffix are not supported");
    }
    byte_fallback_ = model.value("byte_fallback", false);
    fuse_unk_ = model.value("fuse_unk", false);
    ignore_merges_ = model.value("ignore_merges", false);
    for (auto& [token, id] : model.at("vocab").items()) {
      vocab_[token] = id.get<std::int64_t>();
      vocab_size_ = std::max(vocab_size_, id.get<std::int64_t>() + 1);
    }
    if (model.contains("unk_token") && model["unk_token"].is_string()) {
      auto found = vocab_.find(model["unk_token"].get<std::string>());
      if (found == vocab_.end()) throw Error(source + ": unk_token is not in the vocabulary");
      unk_id_ = found->second;
    }
    std::int64_t rank = 0;
    for (const auto& merge : model.at("merges")) {
      std::string left, right;
      if (merge.is_array()) {
        left = merge.at(0).get<std::string>();
        right = merge.at(1).get<std::string>();
      } else {
        std::string text = merge.get<std::string>();
        std::size_t space = text.find(' ', 1);
        if (space == std::string::npos) throw Error(source + ": malformed merge '" + text + "'");
        left = text.substr(0, space);
        right = text.substr(space + 1);
      }
      auto l = vocab_.find(left), r = vocab_.find(right), merged = vocab_.find(left + right);
      if (l == vocab_.end() || r == vocab_.end() || merged == vocab_.end()) {
        throw Error(source + ": merge '" + left + " " + right + "' uses tokens missing from the vocabulary");
      }
      merges_[{l->second, r->second}] = {rank++, merged->second};
    }
    for (const auto& token : spec.value("added_tokens", json::array())) {
      AddedToken added{token.at("content").get<std::string>(), token.at("id").get<std::int64_t>(),
                       token.value("special", false), token.value("lstrip", false), token.value("rstrip", false)};
      vocab_size_ = std::max(vocab_size_, added.id + 1);
      added_.push_back(added);
    }
    for (const auto& [token, id] : vocab_) id_to_token_[id] = token;
    for (const auto& token : added_) id_to_token_[token.id] = token.content;
    read_post_processor(spec.value("post_processor", json()), source);
    for (const std::vector<std::int64_t>* ids : {&prefix_, &suffix_}) {
      for (std::int64_t id : *ids) {
        if (id >= vocab_size_) {
          throw Error(source + ": post_processor: token id " + std::to_string(id) + " is outside the vocabulary (" +
                      std::to_string(vocab_size_) + " tokens)");
        }
      }
    }
  }

  std::vector<std::int64_t> encode(std::string_view text, bool add_special_tokens) const override {
    std::vector<std::int64_t> ids;
    if (add_special_tokens) ids.insert(ids.end(), prefix_.begin(), prefix_.end());
    for (const auto& [segment, added_id] : split_added(text)) {
      if (added_id >= 0) {
        ids.push_back(added_id);
        continue;
      }
      std::vector<Piece> pieces = pre_tokenizer_.apply({{normalizer_.apply(segment.text), segment.at_start}});
      for (const auto& piece : pieces) {
        if (!piece.text.empty()) bpe(piece.text, ids);
      }
    }
    if (add_special_tokens) ids.insert(ids.end(), suffix_.begin(), suffix_.end());
    return ids;
  }

  std::string decode(const std::vector<std::int64_t>& ids, bool skip_special_tokens) const override {
    std::vector<std::string> tokens;
    for (std::int64_t id : ids) {
      if (skip_special_tokens && is_special(id)) continue;
      auto found = id_to_token_.find(id);
      if (found != id_to_token_.end()) tokens.push_back(found->second);
    }
    return decoder_.apply(std::move(tokens));
  }

  std::optional<std::int64_t> token_id(std::string_view token) const override {
    for (const auto& added : added_) {
      if (added.content == token) return added.id;
    }
    auto found = vocab_.find(std::string(token));
    if (found == vocab_.end()) return std::nullopt;
    return found->second;
  }

  std::int64_t vocab_size() const override { return vocab_size_; }

  bool is_special(std::int64_t id) const override {
    return std::any_of(added_.begin(), added_.end(), [&](const AddedToken& t) { return t.id == id && t.special; });
  }

 private:
  // Text pieces between added tokens (id -1), and the added tokens themselves: leftmost-longest.
  std::vector<std::pair<Piece, std::int64_t>> split_added(std::string_view text) const {
    std::vector<std::pair<Piece, std::int64_t>> out;
    std::size_t cursor = 0, at = 0;
    while (at < text.size()) {
      const AddedToken* best = nullptr;
      for (const auto& token : added_) {
        if (!token.content.empty() && text.compare(at, token.content.size(), token.content) == 0 &&
            (!best || token.content.size() > best->content.size())) {
          best = &token;
        }
      }
      if (!best) {
        ++at;
        continue;
      }
      std::size_t begin = at, end = at + best->content.size();
      if (best->lstrip) {
        while (begin > cursor && is_space(text[begin - 1])) --begin;
      }
      if (best->rstrip) {
        while (end < text.size() && is_space(text[end])) ++end;
      }
      if (begin > cursor) out.push_back({{std::string(text.substr(cursor, begin - cursor)), cursor == 0}, -1});
      out.push_back({{best->content, begin == 0}, best->id});
      cursor = at = end;
    }
    if (cursor < text.size()) out.push_back({{std::string(text.substr(cursor)), cursor == 0}, -1});
    return out;
  }

  // One pre-tokenized word through BPE (tokenizers' BPE::merge_word and Word::merge_all).
  void bpe(const std::string& word, std::vector<std::int64_t>& ids) const {
    if (ignore_merges_) {
      auto whole = vocab_.find(word);
      if (whole != vocab_.end()) {
        ids.push_back(whole->second);
        return;
      }
    }
    struct Symbol {
      std::int64_t id;
      std::int64_t prev, next;
      bool alive;
    };
    std::vector<Symbol> symbols;
    auto add = [&](std::int64_t id) {
      std::int64_t index = static_cast<std::int64_t>(symbols.size());
      if (!symbols.empty()) symbols.back().next = index;
      symbols.push_back({id, index - 1, -1, true});
    };
    std::int64_t pending_unk = -1;  // an unknown-character run not yet emitted
    for (const auto& character : utf8_chars(word)) {
      auto found = vocab_.find(character);
      if (found != vocab_.end()) {
        if (pending_unk >= 0) add(pending_unk), pending_unk = -1;
        add(found->second);
        continue;
      }
      if (byte_fallback_) {
        std::vector<std::int64_t> bytes;
        for (unsigned char byte : character) {
          char name[8];
          std::snprintf(name, sizeof name, "<0x%02X>", byte);
          auto byte_token = vocab_.find(name);
          if (byte_token == vocab_.end()) break;
          bytes.push_back(byte_token->second);
        }
        if (bytes.size() == character.size()) {
          if (pending_unk >= 0) add(pending_unk), pending_unk = -1;
          for (std::int64_t id : bytes) add(id);
          continue;
        }
      }
      if (unk_id_ >= 0) {
        if (pending_unk >= 0 && !fuse_unk_) add(pending_unk);
        pending_unk = unk_id_;
      }
    }
    if (pending_unk >= 0) add(pending_unk);

    struct Merge {
      std::int64_t rank, position, new_id;
      bool operator<(const Merge& other) const {  // a min-heap on (rank, position)
        return rank != other.rank ? rank > other.rank : position > other.position;
      }
    };
    std::priority_queue<Merge> queue;
    auto lookup = [&](std::int64_t left, std::int64_t right) -> const std::pair<std::int64_t, std::int64_t>* {
      auto found = merges_.find({left, right});
      return found == merges_.end() ? nullptr : &found->second;
    };
    for (std::size_t i = 0; i + 1 < symbols.size(); ++i) {
      if (auto* merge = lookup(symbols[i].id, symbols[i + 1].id)) {
        queue.push({merge->first, static_cast<std::int64_t>(i), merge->second});
      }
    }
    while (!queue.empty()) {
      Merge top = queue.top();
      queue.pop();
      Symbol& current = symbols[top.position];
      if (!current.alive || current.next < 0) continue;
      Symbol& right = symbols[current.next];
      auto* still = lookup(current.id, right.id);
      if (!still || still->second != top.new_id) continue;  // an expired entry
      current.id = top.new_id;
      right.alive = false;
      current.next = right.next;
      if (right.next >= 0) symbols[right.next].prev = top.position;
      if (current.prev >= 0) {
        if (auto* merge = lookup(symbols[current.prev].id, current.id)) queue.push({merge->first, current.prev, merge->second});
      }
      if (current.next >= 0) {
        if (auto* merge = lookup(current.id, symbols[current.next].id)) queue.push({merge->first, top.position, merge->second});
      }
    }
    for (const auto& symbol : symbols) {
      if (symbol.alive) ids.push_back(symbol.id);
    }
  }

  void read_post_processor(const json& spec, const std::string& source) {
    if (spec.is_null()) return;
    std::string type = spec.value("type", "");
    if (type == "Sequence") {
      for (const auto& child : spec.at("processors")) read_post_processor(child, source);
    } else if (type == "ByteLevel") {
      // Only adjusts offsets: the ids are unchanged.
    } else if (type == "TemplateProcessing") {
      bool before = true;
      for (const auto& item : spec.at("single")) {
        if (item.contains("Sequence")) {
          before = false;
          continue;
        }
        std::string name = item.at("SpecialToken").at("id").get<std::string>();
        for (const auto& id : spec.at("special_tokens").at(name).at("ids")) {
          if (!id.is_number_integer() || id.get<std::int64_t>() < 0) {
            throw Error(source + ": post_processor: special token '" + name + "': expected non-negative integer ids, got " +
                        json_excerpt(id));
          }
          (before ? prefix_ : suffix_).push_back(id.get<std::int64_t>());
        }
      }
    } else {
      throw Error(source + ": post-processor '" + type + "' is not supported (supported: TemplateProcessing, ByteLevel, Sequence)");
    }
  }

  Normalizer normalizer_;
  PreTokenizer pre_tokenizer_;
  Decoder decoder_;
  std::unordered_map<std::string, std::int64_t> vocab_;
  std::unordered_map<std::int64_t, std::string> id_to_token_;
  std::map<std::pair<std::int64_t, std::int64_t>, std::pair<std::int64_t, std::int64_t>> merges_;  // -> (rank, new id)
  std::vector<AddedToken> added_;
  std::vector<std::int64_t> prefix_, suffix_;
  std::int64_t unk_id_ = -1, vocab_size_ = 0;
  bool byte_fallback_ = false, fuse_unk_ = false, ignore_merges_ = false;
};

}  // namespace

std::unique_ptr<Tokenizer> make_hf_tokenizer(const json& spec, const std::string& source) {
  try {
    return std::make_unique<HfTokenizer>(spec, source);
  } catch (const json::exception& error) {
    throw Error(source + ": malformed tokenizer: " + json_error_reason(error));
  }
}

}  // namespace neva
