#pragma once
// "<image>" markers in text: counting them, LLaVA's <im_start>/<im_end> wrapping, and tokenizing
// with each marker expanded to its image's feature tokens. Training data and generation share them.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "neva/api.h"
#include "neva/data/tokenizer.h"

namespace neva {

// Tokenizes `text`, turning the i-th "<image>" into tokens_per_image[i] copies of `image_token_id`
// (the last count repeats for further images): as transformers' processors do when the tokenizer has
// "<image>" as a token, else by tokenizing the text around each "<image>" separately (LLaVA's
// tokenizer_image_token).
NEVA_API std::vector<std::int64_t> tokenize_with_images(const Tokenizer& tokenizer, const std::string& text,
                                                        std::int64_t image_token_id,
                                                        const std::vector<std::int64_t>& tokens_per_image,
                                                        bool add_special_tokens = true);

inline constexpr const char* kImageMarker = "<image>";
// How many "<image>" markers `text` holds.
NEVA_API std::size_t count_image_markers(const std::string& text);
// LLaVA's mm_use_im_start_end: every "<image>" becomes "<im_start><image><im_end>". Throws naming
// `tokenizer_source` when the tokenizer lacks either token.
NEVA_API std::string wrap_image_markers(const std::string& text, const Tokenizer& tokenizer,
                                        const std::string& tokenizer_source);
inline std::vector<std::int64_t> tokenize_with_images(const Tokenizer& tokenizer, const std::string& text,
                                                      std::int64_t image_token_id, std::int64_t tokens_per_image,
                                                      bool add_special_tokens = true) {
  return tokenize_with_images(tokenizer, text, image_token_id, std::vector<std::int64_t>{tokens_per_image},
                              add_special_tokens);
}

}  // namespace neva
