#include "neva/inference/generation.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <algorithm>
#include <set>

#include "neva/error.h"

namespace neva {

namespace {

// transformers' RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper and
// TopPLogitsWarper (min_tokens_to_keep = 1), on one row of fp32 logits.
// Then OpenAI's frequency and presence penalties over the generated tokens.
at::Tensor process_logits(at::Tensor logits, const std::set<std::int64_t>& seen,
                          const std::map<std::int64_t, std::int64_t>& counts, const SamplingConfig& config) {
  if (config.repetition_penalty != 1.0 && !seen.empty()) {
    at::Tensor index = at::tensor(std::vector<std::int64_t>(seen.begin(), seen.end()), at::kLong);
    at::Tensor score = logits.index_select(0, index);
    score = at::where(score < 0, score * config.repetition_penalty, score / config.repetition_penalty);
    logits = logits.index_copy(0, index, score);
  }
  if ((config.frequency_penalty != 0.0 || config.presence_penalty != 0.0) && !counts.empty()) {
    std::vector<std::int64_t> ids;
    std::vector<float> penalty;
    for (const auto& [id, count] : counts) {
      ids.push_back(id);
      penalty.push_back(static_cast<float>(config.frequency_penalty * static_cast<double>(count) + config.presence_penalty));
    }
    logits = logits.index_add(0, at::tensor(ids, at::kLong), -at::tensor(penalty, at::kFloat));
  }
  if (!config.suppressed_ids.empty()) {
    logits = logits.index_fill(0, at::tensor(config.suppressed_ids, at::kLong), -std::numeric_limits<double>::infinity());
  }
  if (config.greedy) return logits;
  if (config.temperature != 1.0) logits = logits / config.temperature;
  const double masked = -std::numeric_limits<double>::infinity();
  if (config.top_k > 0 && config.top_k < logits.size(0)) {
    double kth = std::get<0>(logits.topk(config.top_k)).min().item<double>();
    logits = logits.masked_fill(logits < kth, masked);
  }
  if (config.top_p < 1.0) {
    auto [sorted, order] = logits.sort(/*dim=*/0, /*descending=*/false);
    at::Tensor cumulative = sorted.softmax(0).cumsum(0);
    at::Tensor remove = cumulative <= (1 - config.top_p);
    remove.index_put_({-1}, false);  // keep at least one token
    logits = logits.masked_fill(remove.scatter(0, order, remove), masked);
  }
  return logits;
}

// The longest suffix of `text` that begins some stop string: held back from streaming.
std::size_t held_back(const std::string& text, const std::vector<std::string>& stops) {
  std::size_t hold = 0;
  for (const auto& stop : stops) {
    if (stop.empty()) continue;
    for (std::size_t length = std::min(stop.size() - 1, text.size()); length > hold; --length) {
      if (text.compare(text.size() - length, length, stop, 0, length) == 0) {
        hold = length;
        break;
      }
    }
  }
  return hold;
}

bool ends_incomplete(const std::string& text) {
  return text.size() >= 3 && text.compare(text.size() - 3, 3, "\xEF\xBF\xBD") == 0;  // U+FFFD: bytes still coming
}

}  // namespace

std::vector<GenerationResult> generate(LlavaModel& model, const Tokenizer& tokenizer,
                                       const std::vector<GenerationRequest>& requests, const SamplingConfig& config,
                                       const TextCallback& on_text, std::int64_t max_context) {
  torch::NoGradGuard no_grad;
  const std::int64_t batch = static_cast<std::int64_t>(requests.size());
  if (batch == 0) return {};
  std::int64_t longest = 0;
  for (const auto& request : requests) {
    if (request.prompt_ids.empty()) throw Error("generation: an empty prompt (no tokens) cannot be continued");
    longest = std::max<std::int64_t>(longest, static_cast<std::int64_t>(request.prompt_ids.size()));
  }
  if (max_context > 0 && longest + config.max_new_tokens > max_context) {
    throw Error("prompt of " + std::to_string(longest) + " tokens plus " + std::to_string(config.max_new_tokens) +
                " new tokens exceeds the model's context of " + std::to_string(max_context) + " tokens");
  }

  // Left padding: every prompt ends at the same column, so each step appends one column for all.
  at::Tensor ids = at::zeros({batch, longest}, at::kLong), mask = at::zeros({batch, longest}, at::kLong);
  std::vector<at::Tensor> images;
  for (std::int64_t b = 0; b < batch; ++b) {
    const auto& prompt = requests[b].prompt_ids;
    std::int64_t offset = longest - static_cast<std::int64_t>(prompt.size());
    ids[b].narrow(0, offset, prompt.size()).copy_(at::tensor(prompt, at::kLong));
    mask[b].narrow(0, offset, prompt.size()).fill_(1);
    if (requests[b].pixel_values.defined()) {
      auto stacked = requests[b].pixel_values.unbind(0);
      images.insert(images.end(), stacked.begin(), stacked.end());
    }
    images.insert(images.end(), requests[b].images.begin(), requests[b].images.end());
  }
  at::Tensor positions = (mask.cumsum(1) - 1).clamp_min(0);
  auto cache = model.backbone().new_cache(batch, longest + config.max_new_tokens);

  MultimodalInputs inputs;
  inputs.input_ids = ids;
  inputs.images = images;
  inputs.attention_mask = mask;
  inputs.positions = positions;
  inputs.cache = cache.get();
  at::Tensor logits = model.forward(inputs).logits.select(1, -1).to(at::kFloat).cpu();

  auto generator = at::make_generator<at::CPUGeneratorImpl>(config.seed);
  std::vector<SequenceDecoder> decoders;
  for (std::int64_t b = 0; b < batch; ++b) {
    decoders.emplace_back(tokenizer, config, requests[b].prompt_ids, model.backbone().vocab_size(), generator);
  }
  at::Tensor next_positions = positions.select(1, -1) + 1;
  for (;;) {
    std::vector<std::int64_t> chosen(batch, 0);
    for (std::int64_t b = 0; b < batch; ++b) {
      if (decoders[b].done()) continue;
      if (auto token = decoders[b].step(logits[b])) chosen[b] = *token;
      if (on_text) {
        std::string text = decoders[b].take_text();
        if (!text.empty()) on_text(static_cast<std::size_t>(b), text);
      }
    }
    if (std::all_of(decoders.begin(), decoders.end(), [](const SequenceDecoder& d) { return d.done(); })) break;

    MultimodalInputs next;
    next.input_ids = at::tensor(chosen, at::kLong).view({batch, 1});
    mask = at::cat({mask, at::ones({batch, 1}, at::kLong)}, 1);
    next.attention_mask = mask;
    next.positions = next_positions.view({batch, 1});
    next.cache = cache.get();
    logits = model.forward(next).logits.select(1, -1).to(at::kFloat).cpu();
    next_positions = next_positions + 1;
  }
  std::vector<GenerationResult> results;
  for (const auto& decoder : decoders) results.push_back(decoder.result());
  return results;
}

SequenceDecoder::SequenceDecoder(const Tokenizer& tokenizer, const SamplingConfig& config,
                                 const std::vector<std::int64_t>& prompt_ids, std::int64_t vocab_size,
                                 at::Generator generator, std::int64_t top_logprobs)
    : tokenizer_(tokenizer), config_(config), generator_(std::move(generator)), top_logprobs_(top_logprobs) {
  // Ids past the vocabulary (an image placeholder such as LLaVA's -200 style ids) have no logits to penalise.
  for (std::int64_t id : prompt_ids) {
    if (id >= 0 && id < vocab_size) seen_.insert(id);
  }
  if (config_.max_new_tokens <= 0) result_.finish_reason = "length";
  // Below 1e-5, logits / temperature overflow or make the float softmax a one-hot: that is greedy,
  // and sampling from it would draw from infinities.
  if (!config_.greedy && config_.temperature < 1e-5) config_.greedy = true;
}

std::optional<std::int64_t> SequenceDecoder::step(const at::Tensor& logits) {
  if (done()) throw Error("generation: a token was asked of a finished sequence");
  at::Tensor row = process_logits(logits, seen_, counts_, config_);
  std::int64_t token;
  if (config_.greedy) {
    token = row.argmax().item<std::int64_t>();
  } else {
    token = at::multinomial(row.softmax(0), 1, false, generator_).item<std::int64_t>();
  }
  if (std::find(config_.stop_token_ids.begin(), config_.stop_token_ids.end(), token) != config_.stop_token_ids.end()) {
    result_.finish_reason = "stop_token";
    return std::nullopt;
  }
  if (top_logprobs_ >= 0) {  // of the tokens returned (not a stop token)
    const at::Tensor log_probs = logits.log_softmax(0);
    TokenLogprob entry{token, log_probs[token].item<double>(), {}};
    if (top_logprobs_ > 0) {
      auto [values, ids] = log_probs.topk(std::min<std::int64_t>(top_logprobs_, log_probs.size(0)));
      for (std::int64_t i = 0; i < values.size(0); ++i) entry.top.emplace_back(ids[i].item<std::int64_t>(), values[i].item<double>());
    }
    logprobs_.push_back(std::move(entry));
  }
  result_.token_ids.push_back(token);
  seen_.insert(token);
  ++counts_[token];
  result_.text = tokenizer_.decode(result_.token_ids, true);
  for (const auto& stop : config_.stop_strings) {
    std::size_t at = stop.empty() ? std::string::npos : result_.text.find(stop);
    if (at != std::string::npos) {
      result_.text.resize(at);
      result_.finish_reason = "stop_string";
    }
  }
  if (done()) return std::nullopt;
  if (static_cast<std::int64_t>(result_.token_ids.size()) >= config_.max_new_tokens) {
    result_.finish_reason = "length";
    return std::nullopt;
  }
  return token;
}

std::string SequenceDecoder::take_text() {
  if (!done() && ends_incomplete(result_.text)) return {};
  std::size_t ready = done() ? result_.text.size() : result_.text.size() - held_back(result_.text, config_.stop_strings);
  if (ready <= streamed_) return {};
  std::string text = result_.text.substr(streamed_, ready - streamed_);
  streamed_ = ready;
  return text;
}

std::vector<double> score_continuation(LlavaModel& model, const GenerationRequest& prompt,
                                       const std::vector<std::int64_t>& continuation_ids) {
  torch::NoGradGuard no_grad;
  const std::vector<std::int64_t>& prompt_ids = prompt.prompt_ids;
  if (prompt_ids.empty()) throw Error("scoring: the prompt has no tokens (a continuation needs at least one before it)");
  if (continuation_ids.empty()) return {};
  std::vector<std::int64_t> all = prompt_ids;
  all.insert(all.end(), continuation_ids.begin(), continuation_ids.end());
  MultimodalInputs inputs;
  inputs.input_ids = at::tensor(all, at::kLong).view({1, -1});
  inputs.pixel_values = prompt.pixel_values;
  inputs.images = prompt.images;
  at::Tensor logits = model.forward(inputs).logits[0].to(at::kFloat).cpu();
  const std::int64_t start = static_cast<std::int64_t>(prompt_ids.size()) - 1;
  at::Tensor log_probs = logits.narrow(0, start, continuation_ids.size()).log_softmax(-1);
  at::Tensor picked = log_probs.gather(1, at::tensor(continuation_ids, at::kLong).view({-1, 1})).view({-1});
  return std::vector<double>(picked.data_ptr<float>(), picked.data_ptr<float>() + picked.numel());
}

}  // namespace neva
