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
#include "neva/data/image_tokens.h"
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

}  // namespace neva
