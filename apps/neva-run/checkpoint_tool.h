#pragma once
#include <filesystem>
#include <ostream>

namespace neva {

// `neva-run checkpoint inspect DIR [--json]`: a checkpoint's layout, tensors and pieces, and whether its
// files match the manifest's sizes and digests. DIR is a step directory, a run's checkpoints/
// directory or the run directory (then its latest checkpoint). Returns the exit status: 0 intact,
// 1 damaged (the problem printed).
int inspect_checkpoint(const std::filesystem::path& directory, bool json, std::ostream& out, std::ostream& err);

// `neva-run checkpoint convert DIR --to OUT`: the checkpoint (checked first) with every tensor whole in
// one file, streamed a tensor at a time (consolidate_checkpoint): what a tool outside neva reads most
// simply, and what any layout resumes from. Returns the exit status.
int convert_checkpoint(const std::filesystem::path& directory, const std::filesystem::path& to, std::ostream& out,
                       std::ostream& err);

}  // namespace neva
