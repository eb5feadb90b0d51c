#pragma once
// Text <-> token ids, with the ids Hugging Face's tokenizers give.
//
// Two sources, chosen by what a model directory holds, read as transformers 5 reads them:
//   tokenizer.json   Hugging Face tokenizers' format: BPE (byte-level as in Llama 3, or with byte
//                    fallback and Metaspace as in Llama 2 / Mistral conversions), its normalizers,
//                    pre-tokenizers, post-processor, decoder and added tokens.
//   tokenizer.model  a SentencePiece BPE model (Llama 2, Mistral, Vicuna, original LLaVA-1.5).
// The class is the one transformers 5.23's AutoTokenizer picks (tokenizer_config.json's or
// config.json's tokenizer_class, overridden by model types it reads generically, e.g. mistral, llava,
// and by byte-level files). For LlamaTokenizer (and always for tokenizer.model) only the vocabulary,
// merges, added tokens and BOS/EOS template come from the files; the pipeline is LlamaTokenizer's own,
// with the config's legacy and add_prefix_space. tokenizer_config.json's added_tokens_decoder adds
// tokens or changes their stripping. Deviations are documented in src/data/tokenizer/tokenizer.cpp.
// Special tokens written in the text ("<image>", "<|eot_id|>") become their ids.
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "neva/api.h"

namespace neva {

class NEVA_API Tokenizer {
 public:
  virtual ~Tokenizer();

  // `add_special_tokens`: the post-processor's additions (e.g. a leading BOS).
  virtual std::vector<std::int64_t> encode(std::string_view text, bool add_special_tokens = true) const = 0;
  virtual std::string decode(const std::vector<std::int64_t>& ids, bool skip_special_tokens = true) const = 0;
  // The id of a token spelled exactly `token` (vocabulary or added token).
  virtual std::optional<std::int64_t> token_id(std::string_view token) const = 0;
  virtual std::int64_t vocab_size() const = 0;
  virtual bool is_special(std::int64_t id) const = 0;

  // tokenizer.json if `path` (a directory or a file) has one, else tokenizer.model. Throws neva::Error
  // naming the file and the unsupported component or malformed entry.
  static std::unique_ptr<Tokenizer> load(const std::string& path);
  // The tokenizer at `path` as one complete tokenizer.json: the pipeline load() runs, whatever files
  // it came from. What an export writes, so that transformers reads it exactly as neva ran it.
  static std::string describe(const std::string& path);
};

// The character GPT-2's byte-level BPE (ByteLevel pre-tokenizer and decoder) writes for `byte`, as
// UTF-8: what vocabularies of byte-level tokenizer.json files are spelled in.
NEVA_API const std::string& byte_level_symbol(std::uint8_t byte);

}  // namespace neva
