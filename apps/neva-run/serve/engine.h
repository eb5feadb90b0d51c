#pragma once
// neva-run serve's model thread: continuous batching over a fixed number of slots. Each slot is a row
// of one KV cache holding one request's sequence (BackboneInputs::cache_lengths); at every step
// boundary waiting requests are prefilled into free slots, then every busy slot decodes one token
// in a single batched forward pass. A cancelled request (its client gone) leaves its slot at the
// next boundary.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "../session.h"
#include "neva/data/conversation.h"
#include "neva/inference/generation.h"

namespace prometheus {
class Registry;
class Histogram;
class Gauge;
class Counter;
}  // namespace prometheus

namespace neva::serve {

using Clock = std::chrono::steady_clock;

// A request as the protocol layer hands it over: the conversation with its images already decoded
// and preprocessed (off the network thread), and how to sample.
struct Job {
  std::vector<Turn> turns;            // their text holds the images' <image> placeholders
  std::vector<at::Tensor> images;
  std::string system;
  std::optional<std::string> raw_prompt;  // instead of turns: text continued as it is (/v1/completions)
  SamplingConfig sampling;
  bool explicit_max_tokens = false;  // sampling.max_new_tokens was asked for (else: what fits)
  std::int64_t top_logprobs = -1;    // -1: no log-probabilities
  std::optional<std::uint64_t> seed;  // none: drawn at random
  std::string where = "request";     // names the request in errors

  // Set by the engine as the request proceeds; read on the network thread after the final event.
  std::int64_t prompt_tokens = 0;
  std::atomic<bool> cancelled{false};
  Clock::time_point queued = Clock::now();
};

// A generated token's log-probability, with the token as text (and its alternatives').
struct TokenLogprobText {
  std::string token;
  double logprob = 0;
  std::vector<std::pair<std::string, double>> top;
};

// What the engine reports about a job, in order: pieces of text, then one final event.
struct JobEvent {
  std::string text;
  std::vector<TokenLogprobText> logprobs;  // of the tokens since the last event
  bool final = false;
  std::string finish_reason;  // "stop" or "length" when final without error
  std::string error;          // a request the model could not take (too long, bad image count...)
  int status = 0;             // the HTTP status for `error`
  std::int64_t prompt_tokens = 0, completion_tokens = 0;
};

using Deliver = std::function<void(JobEvent)>;  // called on the engine thread

struct EngineMetrics {
  prometheus::Gauge* queue_depth = nullptr;
  prometheus::Gauge* slots_busy = nullptr;
  prometheus::Counter* prompt_tokens = nullptr;
  prometheus::Counter* completion_tokens = nullptr;
  prometheus::Histogram* time_to_first_token = nullptr;
  prometheus::Histogram* time_per_output_token = nullptr;
  prometheus::Histogram* step_seconds = nullptr;
};

class Engine {
 public:
  Engine(Session& session, std::int64_t slots, std::int64_t context_length, std::size_t max_queue, EngineMetrics metrics);
  ~Engine();

  // Queues a job; false when the queue is full (or the engine is stopping).
  bool submit(std::shared_ptr<Job> job, Deliver deliver);
  // Stop taking jobs; the thread ends when every queued and running one is done.
  void drain();
  // End now: queued and running jobs get a final error event.
  void abort(const std::string& why);
  void join();
  std::size_t queued() const;
  std::size_t busy() const;
  std::int64_t context_length() const { return context_length_; }

 private:
  struct Slot {
    std::shared_ptr<Job> job;
    Deliver deliver;
    std::unique_ptr<SequenceDecoder> decoder;
    std::int64_t length = 0;      // tokens in this slot's cache row
    std::int64_t next_token = 0;  // to feed at the next step
    std::size_t logprobs_sent = 0;
    Clock::time_point first_token;
  };
  void loop();
  // A job taken from the queue for a free row, its prompt prepared.
  struct Admitted {
    std::int64_t row;
    std::shared_ptr<Job> job;
    Deliver deliver;
    GenerationRequest prompt;
    SamplingConfig sampling;
  };
  std::optional<Admitted> prepare(std::int64_t row, std::shared_ptr<Job> job, Deliver deliver);
  // Prefills the admitted prompts into their rows together (right-padded to the longest), then
  // picks each one's first token.
  void prefill(std::vector<Admitted> admitted);
  void start(Admitted& admitted, const at::Tensor& logits);
  void emit(Slot& slot);
  void release(Slot& slot);
  void fail(Slot& slot, const std::exception& error);

  Session& session_;
  const std::int64_t context_length_;
  const std::size_t max_queue_;
  EngineMetrics metrics_;
  std::unique_ptr<KVCache> cache_;
  std::vector<Slot> slots_;

  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::pair<std::shared_ptr<Job>, Deliver>> queue_;
  bool draining_ = false;
  std::string abort_;  // non-empty: end every job with this error
  std::atomic<std::size_t> busy_{0};
  std::atomic<std::size_t> admitting_{0};  // taken from the queue, being prefilled
  std::thread thread_;
};

}  // namespace neva::serve
