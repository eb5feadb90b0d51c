#pragma once
// neva-run's `train` mode: either NeVA stage from a recipe, with checkpoints, exact resume, metrics
// and an optional Hugging Face export at the end.
#include <cstdint>
#include <filesystem>
#include <string>

#include "neva/recipe.h"

namespace neva {

struct TrainSummary {
  std::int64_t steps = 0;       // optimizer steps done in total (resumed ones included)
  std::int64_t trained = 0;     // of which in this call
  double last_loss = 0;
  std::int64_t skipped_samples = 0;
  std::int64_t skipped_batches = 0;  // loss spikes skipped (trainer.loss_spike_action = "skip")
  int signal = 0;                    // SIGTERM or SIGINT when one stopped the run (after a checkpoint)
  double seconds = 0;
  std::filesystem::path run_dir;
  std::filesystem::path hf_dir;  // empty when not exported
};

// `title` prefixes progress and log lines ("stage 1").
TrainSummary run_train(const Recipe& recipe, const std::string& title = "train");

// Prints a warning on stderr when the recipe's bf16 arithmetic would be emulated on this CPU
// (neva::emulated_bf16_warning); every command that runs a model calls it once.
void warn_if_bf16_emulated(const Recipe& recipe);

}  // namespace neva
