#pragma once
#include <filesystem>
#include <ostream>

namespace neva {

// `neva-run checkpoint inspect DIR [--json]`: a checkpoint's layout, tensors and pieces, and whether its
// files match the manifest's sizes and digests. DIR is a step directory, a run's checkpoints/
// directory or the run directory (then its latest checkpoint). Returns the exit status: 0 intact,
// 1 damaged (the problem printed).
int inspect_checkpoint(const std::filesystem::path& directory, bool json, std::ostream& out, std::ostream& err);

// `neva-run checkpoint convert DIR --to OUT [--tp N --pp N]`: the checkpoint (checked first) written
// again, streamed a piece at a time (reshard_checkpoint): every tensor whole in one file (what a tool
// outside neva reads most simply), or split into the files a TP x PP run writes, so that each rank of
// that layout reads its own file. Any layout resumes from either. Returns the exit status.
int convert_checkpoint(const std::filesystem::path& directory, const std::filesystem::path& to, int tp, int pp,
                       std::ostream& out, std::ostream& err);

}  // namespace neva
