#pragma once
#include <filesystem>
#include <ostream>

namespace neva {

// `neva-run checkpoint inspect DIR [--json]`: a checkpoint's layout, tensors and pieces, and whether its
// files match the manifest's sizes and digests. DIR is a step directory, a run's checkpoints/
// directory or the run directory (then its latest checkpoint). Returns the exit status: 0 intact,
// 1 damaged (the problem printed).
int inspect_checkpoint(const std::filesystem::path& directory, bool json, std::ostream& out, std::ostream& err);

}  // namespace neva
