#include "engine.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>

#include <random>

#include "neva/error.h"

namespace neva::serve {

namespace {

double seconds(Clock::duration duration) { return std::chrono::duration<double>(duration).count(); }

JobEvent failure(int status, const std::string& message) {
  JobEvent event;
  event.final = true;
  event.status = status;
  event.error = message;
  return event;
}

}  // namespace

Engine::Engine(Session& session, std::int64_t slots, std::int64_t context_length, std::size_t max_queue,
               EngineMetrics metrics)
    : session_(session), context_length_(context_length), max_queue_(max_queue), metrics_(metrics) {
  at::NoGradGuard no_grad;
  cache_ = session_.model().backbone().new_cache(slots, context_length);
  slots_.resize(static_cast<std::size_t>(slots));
  thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() {
  abort("the server is shutting down");
  join();
}

bool Engine::submit(std::shared_ptr<Job> job, Deliver deliver) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (draining_ || !abort_.empty()) return false;
    // Room: the free slots (taken at the next step boundary) and the queue behind them.
    const std::size_t taken = busy_.load() + admitting_.load();
    if (queue_.size() >= max_queue_ + (slots_.size() - std::min(taken, slots_.size()))) return false;
    job->queued = Clock::now();
    queue_.emplace_back(std::move(job), std::move(deliver));
    if (metrics_.queue_depth) metrics_.queue_depth->Set(static_cast<double>(queue_.size()));
  }
  wake_.notify_one();
  return true;
}

void Engine::drain() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    draining_ = true;
  }
  wake_.notify_one();
}

void Engine::abort(const std::string& why) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (abort_.empty()) abort_ = why;
  }
  wake_.notify_one();
}

void Engine::join() {
  if (thread_.joinable()) thread_.join();
}

std::size_t Engine::queued() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return queue_.size();
}

std::size_t Engine::busy() const { return busy_.load() + admitting_.load(); }

void Engine::loop() {
  at::NoGradGuard no_grad;
  auto scope = session_.enter_forward();
  for (;;) {
    std::vector<std::tuple<std::size_t, std::shared_ptr<Job>, Deliver>> admitted;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return !abort_.empty() || busy_.load() > 0 || !queue_.empty() || draining_; });
      if (!abort_.empty()) {
        for (auto& [job, deliver] : queue_) deliver(failure(503, abort_));
        queue_.clear();
        for (auto& slot : slots_) {
          if (slot.job) slot.deliver(failure(503, abort_));
          release(slot);
        }
        return;
      }
      if (draining_ && queue_.empty() && busy_.load() == 0) return;
      for (std::size_t row = 0; row < slots_.size() && !queue_.empty(); ++row) {
        if (slots_[row].job) continue;
        admitted.emplace_back(row, std::move(queue_.front().first), std::move(queue_.front().second));
        queue_.pop_front();
        slots_[row].job = std::get<1>(admitted.back());  // reserved
      }
      admitting_.store(admitted.size());
      if (metrics_.queue_depth) metrics_.queue_depth->Set(static_cast<double>(queue_.size()));
    }
    // Clients that left: their slots are free before this step.
    for (auto& slot : slots_) {
      if (slot.decoder && slot.job->cancelled.load()) release(slot);
    }
    std::vector<Admitted> prepared;
    for (auto& [row, job, deliver] : admitted) {
      slots_[row].job.reset();
      if (job->cancelled.load()) continue;
      if (auto ready = prepare(static_cast<std::int64_t>(row), std::move(job), std::move(deliver))) {
        prepared.push_back(std::move(*ready));
      }
    }
    if (!prepared.empty()) prefill(std::move(prepared));
    admitting_.store(0);

    // One token for every busy slot, in one forward pass.
    std::vector<std::int64_t> rows, lengths, tokens;
    for (std::size_t row = 0; row < slots_.size(); ++row) {
      if (!slots_[row].decoder) continue;
      rows.push_back(static_cast<std::int64_t>(row));
      lengths.push_back(slots_[row].length);
      tokens.push_back(slots_[row].next_token);
    }
    if (rows.empty()) continue;
    const auto started = Clock::now();
    at::Tensor logits;
    try {
      MultimodalInputs inputs;
      const auto batch = static_cast<std::int64_t>(rows.size());
      inputs.input_ids = at::tensor(tokens, at::kLong).view({batch, 1});
      inputs.cache = cache_.get();
      inputs.cache_rows = at::tensor(rows, at::kLong);
      inputs.cache_lengths = at::tensor(lengths, at::kLong);
      logits = session_.model().forward(inputs).logits.select(1, -1).to(at::kFloat).cpu();
    } catch (const std::exception& error) {  // e.g. out of memory: these requests end, the server goes on
      const std::string what = error.what();
      for (std::int64_t row : rows) {
        Slot& slot = slots_[static_cast<std::size_t>(row)];
        slot.deliver(failure(500, "the decoding step failed: " + what.substr(0, what.find('\n'))));
        release(slot);
      }
      continue;
    }
    if (metrics_.step_seconds) metrics_.step_seconds->Observe(seconds(Clock::now() - started));
    for (std::size_t i = 0; i < rows.size(); ++i) {
      Slot& slot = slots_[static_cast<std::size_t>(rows[i])];
      slot.length += 1;
      try {
        if (auto token = slot.decoder->step(logits[static_cast<std::int64_t>(i)])) slot.next_token = *token;
        emit(slot);
      } catch (const std::exception& error) {  // e.g. non-finite logits to sample from: this request ends
        fail(slot, error);
      }
    }
  }
}

std::optional<Engine::Admitted> Engine::prepare(std::int64_t row, std::shared_ptr<Job> job, Deliver deliver) {
  Admitted admitted{row, std::move(job), std::move(deliver), {}, {}};
  Job& request = *admitted.job;
  admitted.sampling = request.sampling;
  try {
    if (request.raw_prompt) {
      admitted.prompt.prompt_ids = session_.tokenizer().encode(*request.raw_prompt, true);
    } else {
      admitted.prompt = session_.prepare_conversation(request.turns, {}, std::move(request.images),
                                                      request.system, request.where);
    }
    const auto prompt = static_cast<std::int64_t>(admitted.prompt.prompt_ids.size());
    request.prompt_tokens = prompt;
    if (prompt == 0) throw Error(request.where + ": the prompt is empty (no tokens)");
    if (prompt >= context_length_) {
      throw Error("this model's context is " + std::to_string(context_length_) + " tokens per request, but the prompt is " +
                  std::to_string(prompt) + " tokens (with its images), leaving no room for an answer");
    }
    if (request.explicit_max_tokens && prompt + admitted.sampling.max_new_tokens > context_length_) {
      throw Error("this model's context is " + std::to_string(context_length_) + " tokens per request, but " +
                  std::to_string(prompt + admitted.sampling.max_new_tokens) + " were requested (" + std::to_string(prompt) +
                  " in the prompt, " + std::to_string(admitted.sampling.max_new_tokens) + " for the answer): shorten the "
                  "prompt or ask for fewer tokens");
    }
    admitted.sampling.max_new_tokens = std::min(admitted.sampling.max_new_tokens, context_length_ - prompt);
  } catch (const std::exception& error) {
    const std::string what = error.what();
    admitted.deliver(failure(400, what.substr(0, what.find('\n'))));
    return std::nullopt;
  }
  return admitted;
}

void Engine::prefill(std::vector<Admitted> admitted) {
  // Right padding: row b's prompt fills positions [0, P_b) of its cache row, the padding after it is
  // overwritten by its own next tokens and never visible before (keys past a row's length are masked).
  std::int64_t longest = 0;
  for (const auto& one : admitted) longest = std::max<std::int64_t>(longest, static_cast<std::int64_t>(one.prompt.prompt_ids.size()));
  const auto batch = static_cast<std::int64_t>(admitted.size());
  at::Tensor ids = at::zeros({batch, longest}, at::kLong), wanted = at::zeros({batch, longest}, at::kBool);
  std::vector<std::int64_t> rows;
  MultimodalInputs inputs;
  for (std::int64_t b = 0; b < batch; ++b) {
    const auto& prompt = admitted[static_cast<std::size_t>(b)].prompt;
    const auto length = static_cast<std::int64_t>(prompt.prompt_ids.size());
    ids[b].narrow(0, 0, length).copy_(at::tensor(prompt.prompt_ids, at::kLong));
    wanted[b][length - 1] = true;  // only the last prompt position's logits
    rows.push_back(admitted[static_cast<std::size_t>(b)].row);
    inputs.images.insert(inputs.images.end(), prompt.images.begin(), prompt.images.end());
  }
  inputs.input_ids = ids;
  inputs.logits_mask = wanted;
  inputs.cache = cache_.get();
  inputs.cache_rows = at::tensor(rows, at::kLong);
  inputs.cache_lengths = at::zeros({batch}, at::kLong);
  at::Tensor logits;
  try {
    logits = session_.model().forward(inputs).logits;
    logits = (logits.dim() == 3 ? logits.index({wanted}) : logits).to(at::kFloat).cpu();  // [batch, vocab]
  } catch (const std::exception& error) {
    if (batch > 1) {  // find the one that fails: each alone
      for (auto& one : admitted) prefill({std::move(one)});
      return;
    }
    const std::string what = error.what();
    const bool bad_request = dynamic_cast<const Error*>(&error) != nullptr;
    admitted[0].deliver(failure(bad_request ? 400 : 500, (bad_request ? admitted[0].job->where + ": " : "the prompt's forward pass failed: ") +
                                                           what.substr(0, what.find('\n'))));
    return;
  }
  for (std::int64_t b = 0; b < batch; ++b) start(admitted[static_cast<std::size_t>(b)], logits[b]);
}

void Engine::start(Admitted& admitted, const at::Tensor& logits) {
  Slot& slot = slots_[static_cast<std::size_t>(admitted.row)];
  if (metrics_.prompt_tokens) metrics_.prompt_tokens->Increment(static_cast<double>(admitted.prompt.prompt_ids.size()));
  std::uint64_t seed = 0;
  if (admitted.job->seed) {
    seed = *admitted.job->seed;
  } else {
    std::random_device device;
    seed = device() | (static_cast<std::uint64_t>(device()) << 32);
  }
  slot.job = std::move(admitted.job);
  slot.deliver = std::move(admitted.deliver);
  slot.decoder = std::make_unique<SequenceDecoder>(session_.tokenizer(), admitted.sampling, admitted.prompt.prompt_ids,
                                                   session_.model().backbone().vocab_size(),
                                                   at::make_generator<at::CPUGeneratorImpl>(seed), slot.job->top_logprobs);
  slot.length = static_cast<std::int64_t>(admitted.prompt.prompt_ids.size());
  slot.logprobs_sent = 0;
  slot.first_token = {};
  busy_.fetch_add(1);
  if (admitting_.load() > 0) admitting_.fetch_sub(1);  // now counted as busy
  if (metrics_.slots_busy) metrics_.slots_busy->Set(static_cast<double>(busy_.load()));
  try {
    if (auto token = slot.decoder->step(logits)) slot.next_token = *token;
    emit(slot);
  } catch (const std::exception& error) {
    fail(slot, error);
  }
}

void Engine::fail(Slot& slot, const std::exception& error) {
  const std::string what = error.what();
  if (slot.deliver) slot.deliver(failure(500, "choosing the next token failed: " + what.substr(0, what.find('\n'))));
  release(slot);
}

void Engine::emit(Slot& slot) {
  const SequenceDecoder& decoder = *slot.decoder;
  JobEvent event;
  event.text = slot.decoder->take_text();
  const auto& logprobs = decoder.logprobs();
  const Tokenizer& tokenizer = session_.tokenizer();
  // Alternatives' text is sent with the text they belong to; held-back text waits with them.
  if (!event.text.empty() || decoder.done()) {
    for (; slot.logprobs_sent < logprobs.size(); ++slot.logprobs_sent) {
      const TokenLogprob& entry = logprobs[slot.logprobs_sent];
      TokenLogprobText out{tokenizer.decode({entry.id}, false), entry.logprob, {}};
      for (const auto& [id, value] : entry.top) out.top.emplace_back(tokenizer.decode({id}, false), value);
      event.logprobs.push_back(std::move(out));
    }
  }
  const auto now = Clock::now();
  const auto generated = static_cast<std::int64_t>(decoder.result().token_ids.size());
  if (slot.first_token == Clock::time_point{} && (generated > 0 || decoder.done())) {
    slot.first_token = now;
    if (metrics_.time_to_first_token) metrics_.time_to_first_token->Observe(seconds(now - slot.job->queued));
  }
  if (decoder.done()) {
    event.final = true;
    event.finish_reason = decoder.result().finish_reason == "length" ? "length" : "stop";
    event.prompt_tokens = slot.job->prompt_tokens;
    event.completion_tokens = generated;
    if (metrics_.completion_tokens) metrics_.completion_tokens->Increment(static_cast<double>(generated));
    if (metrics_.time_per_output_token && generated > 1) {
      metrics_.time_per_output_token->Observe(seconds(now - slot.first_token) / static_cast<double>(generated - 1));
    }
    slot.deliver(std::move(event));
    release(slot);
    return;
  }
  if (!event.text.empty()) slot.deliver(std::move(event));
}

void Engine::release(Slot& slot) {
  if (slot.decoder) {
    busy_.fetch_sub(1);
    if (metrics_.slots_busy) metrics_.slots_busy->Set(static_cast<double>(busy_.load()));
  }
  slot.decoder.reset();
  slot.job.reset();
  slot.deliver = nullptr;
}

}  // namespace neva::serve
