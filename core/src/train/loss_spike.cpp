#include "neva/train/loss_spike.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace neva {

namespace {

std::string number(double value) {
  char text[32];
  std::snprintf(text, sizeof text, "%.6g", value);
  return text;
}

}  // namespace

LossSpikeGuard::LossSpikeGuard(LossSpikeConfig config) : config_(config) {}

double LossSpikeGuard::median() const {
  if (losses_.empty()) return 0;
  std::vector<double> sorted(losses_.begin(), losses_.end());
  const std::size_t middle = sorted.size() / 2;
  std::nth_element(sorted.begin(), sorted.begin() + middle, sorted.end());
  if (sorted.size() % 2 == 1) return sorted[middle];
  const double upper = sorted[middle];
  return (*std::max_element(sorted.begin(), sorted.begin() + middle) + upper) / 2;
}

LossSpikeGuard::Verdict LossSpikeGuard::judge(double loss, std::string* why) const {
  auto say = [&](Verdict verdict, std::string text) {
    if (why) *why = std::move(text);
    return verdict;
  };
  if (!std::isfinite(loss)) return say(Verdict::Stop, std::string("the loss is ") + (std::isnan(loss) ? "NaN" : "infinite"));
  if (config_.factor <= 0 || static_cast<std::int64_t>(losses_.size()) < config_.warmup) return Verdict::Accept;
  const double typical = median();
  if (loss <= config_.factor * typical || loss - typical <= config_.min_increase) return Verdict::Accept;
  const std::string spike = "the loss spiked to " + number(loss) + " (" + number(loss / std::max(typical, 1e-30)) +
                            "x the median " + number(typical) + " of the last " + std::to_string(losses_.size()) +
                            " steps)";
  if (!config_.skip) return say(Verdict::Stop, spike);
  if (consecutive_ + 1 > config_.max_consecutive) {
    return say(Verdict::Stop, spike + "; " + std::to_string(consecutive_ + 1) +
                                  " spikes in a row (more than trainer.loss_spike_max_consecutive = " +
                                  std::to_string(config_.max_consecutive) + "): the run has diverged");
  }
  return say(Verdict::Skip, spike);
}

void LossSpikeGuard::record(double loss, Verdict verdict) {
  if (verdict == Verdict::Skip) {
    ++skipped_;
    ++consecutive_;
    return;
  }
  if (verdict != Verdict::Accept) return;
  consecutive_ = 0;
  losses_.push_back(loss);
  while (static_cast<std::int64_t>(losses_.size()) > config_.window) losses_.pop_front();
}

void LossSpikeGuard::restore(const std::vector<double>& window, std::int64_t skipped, std::int64_t consecutive) {
  losses_.assign(window.begin(), window.end());
  while (static_cast<std::int64_t>(losses_.size()) > config_.window) losses_.pop_front();
  skipped_ = skipped;
  consecutive_ = consecutive;
}

}  // namespace neva
