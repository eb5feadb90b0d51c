#pragma once
// Text generation and scoring over a LlavaModel: batched prompts (left-padded), a KV cache,
// greedy or sampled decoding with transformers' logits processing order (repetition penalty, then
// temperature, top-k, top-p), stop tokens and stop strings, and streaming of decoded text.
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "neva/api.h"
#include "neva/model/llava.h"
#include "neva/data/image_tokens.h"
#include "neva/data/tokenizer.h"

namespace neva {

struct SamplingConfig {
  bool greedy = true;
  double temperature = 1.0;  // below 1e-5: greedy
  std::int64_t top_k = 0;             // 0 = off
  double top_p = 1.0;                 // 1 = off
  double repetition_penalty = 1.0;    // 1 = off; transformers' definition (divide positive logits)
  // OpenAI's: subtract frequency_penalty x count + presence_penalty x (count > 0) of each token
  // generated so far (the prompt's tokens not counted); 0 = off.
  double frequency_penalty = 0.0;
  double presence_penalty = 0.0;
  std::int64_t max_new_tokens = 64;
  std::uint64_t seed = 0;
  std::vector<std::int64_t> stop_token_ids;  // e.g. EOS; not part of the returned text
  std::vector<std::string> stop_strings;     // generation ends where one appears; it is cut off
  // Never generated (transformers' suppress_tokens): e.g. the image placeholder, which has no image
  // behind it when fed back.
  std::vector<std::int64_t> suppressed_ids;
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

// One generated token's log-probability under the model (log-softmax of the raw logits, before
// penalties and temperature) and, when asked, the most likely tokens' at that step.
struct TokenLogprob {
  std::int64_t id = 0;
  double logprob = 0;
  std::vector<std::pair<std::int64_t, double>> top;  // most likely first
};

// The decoding state of one sequence: logits processing, choosing the token, stop tokens and stop
// strings, the length limit and the text ready to stream. generate() keeps one per request;
// neva-run serve one per slot.
class NEVA_API SequenceDecoder {
 public:
  // `generator` draws the samples (it may be shared by several sequences). `top_logprobs`: -1 for
  // no log-probabilities, else how many alternatives to record per token (0 = the chosen one only).
  SequenceDecoder(const Tokenizer& tokenizer, const SamplingConfig& config, const std::vector<std::int64_t>& prompt_ids,
                  std::int64_t vocab_size, at::Generator generator, std::int64_t top_logprobs = -1);
  // Takes this sequence's next-token logits ([vocab], fp32 on the CPU) and picks the token. Returns
  // it when it is to be fed back (generation goes on), or nothing when the sequence is done.
  std::optional<std::int64_t> step(const at::Tensor& logits);
  bool done() const { return !result_.finish_reason.empty(); }
  // Text decoded since the last call that is safe to show (complete UTF-8, nothing that may still
  // become a stop string); once done, everything that is left.
  std::string take_text();
  const GenerationResult& result() const { return result_; }
  const std::vector<TokenLogprob>& logprobs() const { return logprobs_; }

 private:
  const Tokenizer& tokenizer_;
  SamplingConfig config_;
  at::Generator generator_;
  std::int64_t top_logprobs_;
  std::set<std::int64_t> seen_;                  // prompt and generated ids (repetition penalty)
  std::map<std::int64_t, std::int64_t> counts_;  // generated ids (frequency / presence penalties)
  GenerationResult result_;
  std::vector<TokenLogprob> logprobs_;
  std::size_t streamed_ = 0;
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
