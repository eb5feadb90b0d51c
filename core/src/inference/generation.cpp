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
at::Tensor process_logits(at::Tensor logits, const std::set<std::int64_t>& seen, const SamplingConfig& config) {
  if (config.repetition_penalty != 1.0 && !seen.empty()) {
    at::Tensor index = at::tensor(std::vector<std::int64_t>(seen.begin(), seen.end()), at::kLong);
    at::Tensor score = logits.index_select(0, index);
    score = at::where(score < 0, score * config.repetition_penalty, score / config.repetition_penalty);
    logits = logits.index_copy(0, index, score);
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
  std::vector<std::set<std::int64_t>> seen(batch);
  for (std::int64_t b = 0; b < batch; ++b) {
    const auto& prompt = requests[b].prompt_ids;
    std::int64_t offset = longest - static_cast<std::int64_t>(prompt.size());
    ids[b].narrow(0, offset, prompt.size()).copy_(at::tensor(prompt, at::kLong));
    mask[b].narrow(0, offset, prompt.size()).fill_(1);
    // Ids past the vocabulary (an image placeholder such as LLaVA's -200 style ids) have no logits to penalise.
    for (std::int64_t id : prompt) {
      if (id >= 0 && id < model.backbone().vocab_size()) seen[b].insert(id);
    }
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
  std::vector<GenerationResult> results(batch);
  std::vector<bool> done(batch, false);
  std::vector<std::size_t> streamed(batch, 0);
  at::Tensor next_positions = positions.select(1, -1) + 1;
  for (std::int64_t step = 0; step < config.max_new_tokens; ++step) {
    std::vector<std::int64_t> chosen(batch, 0);
    for (std::int64_t b = 0; b < batch; ++b) {
      if (done[b]) continue;
      at::Tensor row = process_logits(logits[b], seen[b], config);
      std::int64_t token;
      if (config.greedy) {
        token = row.argmax().item<std::int64_t>();
      } else {
        token = at::multinomial(row.softmax(0), 1, false, generator).item<std::int64_t>();
      }
      chosen[b] = token;
      GenerationResult& result = results[b];
      if (std::find(config.stop_token_ids.begin(), config.stop_token_ids.end(), token) != config.stop_token_ids.end()) {
        done[b] = true;
        result.finish_reason = "stop_token";
      } else {
        result.token_ids.push_back(token);
        seen[b].insert(token);
        result.text = tokenizer.decode(result.token_ids, true);
        for (const auto& stop : config.stop_strings) {
          std::size_t at = stop.empty() ? std::string::npos : result.text.find(stop);
          if (at != std::string::npos) {
            result.text.resize(at);
            done[b] = true;
            result.finish_reason = "stop_string";
          }
        }
      }
      if (on_text && !ends_incomplete(result.text)) {
        std::size_t ready = done[b] ? result.text.size() : result.text.size() - held_back(result.text, config.stop_strings);
        if (ready > streamed[b]) {
          on_text(static_cast<std::size_t>(b), result.text.substr(streamed[b], ready - streamed[b]));
          streamed[b] = ready;
        }
      }
    }
    if (std::all_of(done.begin(), done.end(), [](bool d) { return d; })) break;
    if (step + 1 == config.max_new_tokens) break;

    MultimodalInputs next;
    next.input_ids = at::tensor(chosen, at::kLong).view({batch, 1});
    mask = at::cat({mask, at::ones({batch, 1}, at::kLong)}, 1);
    next.attention_mask = mask;
    next.positions = next_positions.view({batch, 1});
    next.cache = cache.get();
    logits = model.forward(next).logits.select(1, -1).to(at::kFloat).cpu();
    next_positions = next_positions + 1;
  }
  for (std::int64_t b = 0; b < batch; ++b) {
    if (results[b].finish_reason.empty()) results[b].finish_reason = "length";
    if (on_text && results[b].text.size() > streamed[b]) on_text(static_cast<std::size_t>(b), results[b].text.substr(streamed[b]));
  }
  return results;
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
