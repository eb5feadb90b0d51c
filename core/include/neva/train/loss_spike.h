#pragma once
// The training loss's guard: a non-finite loss always stops the run before the update; a spike (one
// global batch far above the recent losses) is skipped and counted by default, as PaLM-style training
// does, and only a run that keeps spiking is stopped as diverged.
//
// A spike is judged robustly: against the median of the last `window` accepted losses (one bad batch
// cannot move it), relatively (`factor` times the median) and absolutely (at least `min_increase`
// nats above it). The absolute floor is what keeps a converged run healthy: at a median of 0.006 a
// batch at 0.069 is 11x the median but only 0.06 nats worse, ordinary noise near zero loss.
#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "neva/api.h"

namespace neva {

struct LossSpikeConfig {
  double factor = 5.0;          // trainer.loss_spike_factor; 0 disables spike judging
  double min_increase = 1.0;    // trainer.loss_spike_min_increase (nats)
  std::int64_t window = 100;    // trainer.loss_spike_window: accepted steps the median is taken over
  std::int64_t warmup = 10;     // accepted steps before the first judgement
  bool skip = true;             // trainer.loss_spike_action: "skip" (true) or "stop"
  std::int64_t max_consecutive = 10;  // trainer.loss_spike_max_consecutive: more spikes in a row stop the run
};

class NEVA_API LossSpikeGuard {
 public:
  enum class Verdict {
    Accept,     // update the model with this batch
    Skip,       // a spike: no update, the step is counted and the batch dropped
    Stop,       // stop before the update: non-finite, a spike under action "stop", or too many in a row
  };

  explicit LossSpikeGuard(LossSpikeConfig config = {});

  // What to do with a global batch whose loss is `loss`; `why` says it for Skip and Stop.
  Verdict judge(double loss, std::string* why = nullptr) const;
  // Records the verdict acted on: an accepted loss joins the window; a skip is counted.
  void record(double loss, Verdict verdict);

  double median() const;  // of the window (0 when empty)
  std::int64_t skipped() const { return skipped_; }
  std::int64_t consecutive() const { return consecutive_; }

  // The state a checkpoint keeps, so that a resumed run judges exactly as the uninterrupted one.
  std::vector<double> window() const { return {losses_.begin(), losses_.end()}; }
  void restore(const std::vector<double>& window, std::int64_t skipped, std::int64_t consecutive);

 private:
  LossSpikeConfig config_;
  std::deque<double> losses_;
  std::int64_t skipped_ = 0, consecutive_ = 0;
};

}  // namespace neva
