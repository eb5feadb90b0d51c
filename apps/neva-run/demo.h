#pragma once
#include <filesystem>
#include <string>
#include <vector>

#include "neva/registry.h"

namespace neva {

// `neva-run demo`: writes the synthetic dataset, tiny base model and recipes into `directory`, runs
// stage 1, stage 2 and the evaluation (`overrides` apply to all three recipes). Returns the exit
// code: 0 when held-out exact-match accuracy is at least 90%, 1 otherwise. `prepare_only`: write the
// files and stop (the recipes then run by hand).
int run_demo(const std::filesystem::path& directory, const std::vector<std::string>& overrides,
             const Registry::Options& options, bool prepare_only = false);

}  // namespace neva
