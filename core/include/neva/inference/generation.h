#pragma once
// Text generation and scoring over a LlavaModel: batched prompts (left-padded), a KV cache,
// greedy or sampled decoding with transformers' logits processing order (repetition penalty, then
// temperature, top-k, top-p), stop tokens and stop strings, and streaming of decoded text.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "neva/api.h"
#include "neva/model/llava.h"
#include "neva/data/tokenizer.h"

namespace neva {

struct SamplingConfig {
  bool greedy = true;
  double temperature = 1.0;
  std::int64_t top_k = 0;             // 0 = off
  double top_p = 1.0;                 // 1 = off
  double repetition_penalty = 1.0;    // 1 = off; transformers' definition (divide positive logits)
  std::int64_t max_new_tokens = 64;
  std::uint64_t seed = 0;
  std::vector<std::int64_t> stop_token_ids;  // e.g. EOS; not part of the returned text
  std::vector<std::string> stop_strings;     // generation ends where one appears; it is cut off
};

struct GenerationRequest {
  std::vector<std::int64_t> prompt_ids;  // with image placeholders already expanded
  at::Tensor pixel_values;               // [images, 3, H, W] for this prompt's placeholders, or undefined
  std::vector<at::Tensor> images;        // or [3, H, W] each, when their sizes differ
};

struct GenerationResult {
  std::vector<std::int64_t> token_ids;  // generated, without the stop token
  std::string text;
  std::string finish_reason;  // "stop_token", "stop_string" or "length"
};

// Called with each request's newly decoded text as it is produced (complete UTF-8 only, and never
// text that may still turn out to be part of a stop string).
using TextCallback = std::function<void(std::size_t request, const std::string& text)>;

NEVA_API std::vector<GenerationResult> generate(LlavaModel& model, const Tokenizer& tokenizer,
                                                const std::vector<GenerationRequest>& requests,
                                                const SamplingConfig& config, const TextCallback& on_text = {},
                                                std::int64_t max_context = 0);

// log p(continuation_ids[i] | prompt, continuation[:i]) for each continuation token, in fp32.
NEVA_API std::vector<double> score_continuation(LlavaModel& model, const GenerationRequest& prompt,
                                                const std::vector<std::int64_t>& continuation_ids);

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
