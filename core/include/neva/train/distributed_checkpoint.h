#pragma once
// Distributed checkpoints: every rank writes only the state it owns, and any layout reads it back.
//
// A checkpoint directory holds one safetensors file per rank (rank-RRRRR.safetensors) with the
// pieces of the logical (whole) tensors that rank owns — each replicated piece written once, by one
// owner — and a manifest listing, for every logical tensor, its whole shape and each piece's file,
// key, box (global offsets and lengths) and, for a distributed optimizer's share, the run of the
// box's elements it holds (`flat`). A reader fills any region of any tensor from the pieces that
// overlap it, reading only their rows (Megatron-core's dist_checkpointing ShardedTensor with
// flattened_range, PyTorch DCP's chunk metadata). docs/checkpoint-format.md is the format's page.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "neva/api.h"
#include "neva/nn/module.h"

namespace neva {

class ProcessGroup;

// A region of a whole tensor: a box (offsets and lengths per dimension), or only the elements
// [flat_begin, flat_end) of the box in row-major order (a distributed optimizer's share).
struct NEVA_API TensorRegion {
  std::vector<std::int64_t> offsets, lengths;
  std::int64_t flat_begin = 0, flat_end = -1;  // flat_end < 0: the whole box
  bool flat() const { return flat_end >= 0; }
  // Elements in the region; its data is box-shaped, or one-dimensional when flat.
  std::int64_t numel() const;
  std::vector<std::int64_t> data_shape() const;
};

// The whole box of a tensor of `shape`.
NEVA_API TensorRegion whole_region(const std::vector<std::int64_t>& shape);

// Where this rank's local tensor (shape `local_shape`) of a parameter sharded as `sharding` over
// `tp_size` tensor-parallel ranks lies in the whole tensor: local.narrow(dim, local_begin, length) is
// the whole tensor's `box`. One segment for a tensor split in one block (or not at all), one per
// block for fused q/k/v or gate/up (partition_stride); vocabulary padding rows are in no segment.
struct ShardSegment {
  std::int64_t dim = 0, local_begin = 0, length = 0;
  TensorRegion box;
};
NEVA_API std::vector<ShardSegment> shard_segments(const std::vector<std::int64_t>& local_shape,
                                                  const nn::ParameterSharding& sharding, int tp_rank, int tp_size);
// The regions of the whole tensor that the local elements [begin, begin + length) (row-major) hold,
// each with where its elements start within that range. Throws when a segment is not contiguous in
// the local tensor (a split along an inner dimension cut into several segments).
NEVA_API std::vector<std::pair<TensorRegion, std::int64_t>> flat_regions(const std::vector<ShardSegment>& segments,
                                                                         const std::vector<std::int64_t>& local_shape,
                                                                         std::int64_t begin, std::int64_t length);

// One piece of state a rank writes: the region's elements of the logical tensor `name`.
struct CheckpointPiece {
  std::string name;
  std::vector<std::int64_t> shape;  // the whole tensor's
  TensorRegion region;
  at::Tensor data;  // region.data_shape(), any dtype safetensors stores
  // How the tensor splits over tensor parallelism (the manifest's "split": what an offline
  // conversion re-splits by): the dimension (-1: not split) and its interleaved blocks.
  std::int64_t split_dim = -1, split_blocks = 1;
};

// This checkpoint format's version (manifest "version"): 1 wrote whole tensors in model.safetensors
// and optimizer.safetensors; 2 is the per-rank format.
inline constexpr int kCheckpointFormatVersion = 2;

// Writes `pieces` and `own` (this rank's own tensors: its generators' states) into
// <directory>/rank-RRRRR.safetensors (RRRRR: `rank`), fsynced, and returns the file's description
// for the manifest: {"file", "bytes", "sha256", "own": [names], "pieces": [{name, shape, dtype, key,
// offsets, lengths[, flat]}]}.
NEVA_API nlohmann::json write_rank_shard(const std::filesystem::path& directory, int rank,
                                         const std::vector<CheckpointPiece>& pieces,
                                         const std::vector<std::pair<std::string, at::Tensor>>& own);
// The manifest's "files", "ranks" and "tensors" from every rank's description (in rank order).
// Throws when two ranks wrote overlapping pieces or a tensor's pieces do not cover it.
NEVA_API nlohmann::json merge_rank_shards(const std::vector<nlohmann::json>& ranks);

// Every rank's `text` on every rank of `group` (a collective; `device`: where its tensors live).
NEVA_API std::vector<std::string> all_gather_text(const std::shared_ptr<ProcessGroup>& group, const std::string& text,
                                                  c10::Device device);

class CheckpointReader;

// Writes `checkpoint` again as a run of `tp` x `pp` ranks (tensor-parallel rank fastest) would have
// saved it, offline: each tensor split along its recorded dimension (its manifest "split"; each
// interleaved block split in `tp` runs, the last ones shorter when a block does not divide) into
// rank files, a decoder layer's tensors ("llm....layers.<i>....") in stage i x pp / layers, the
// language model's other tensors in the first stage (names with "embed") or the last, the
// connector's and the vision tower's in the first; each rank's own tensors from the rank of that
// number (else rank 0). Streamed: one piece in memory at a time. With tp = pp = 1, every tensor whole
// in one file. The arrangement only decides which file a rank reads: every layout loads any
// checkpoint. Also written: trainer_state.json, and a manifest whose layout is tp x pp with
// "converted_from" the original's. `directory` must not exist or be empty.
NEVA_API void reshard_checkpoint(const CheckpointReader& checkpoint, const std::filesystem::path& directory, int tp = 1,
                                 int pp = 1);

// Reads a checkpoint of either format: any region of any logical tensor, from the pieces that
// overlap it, with a bounded staging buffer (rows of a piece at a time; never a whole file or tensor).
class NEVA_API CheckpointReader {
 public:
  // Opens the manifest (version 2) or the whole-tensor files (version 1). Throws Error naming the
  // file and what is wrong: a malformed manifest, a piece outside its tensor, a key missing from its
  // file, pieces that do not cover their tensor.
  explicit CheckpointReader(const std::filesystem::path& directory);
  ~CheckpointReader();
  CheckpointReader(CheckpointReader&&) noexcept;

  const std::filesystem::path& directory() const { return directory_; }
  int version() const { return version_; }
  const nlohmann::json& manifest() const { return manifest_; }
  bool contains(const std::string& name) const;
  std::vector<std::string> names() const;  // sorted
  const std::vector<std::int64_t>& shape(const std::string& name) const;
  c10::ScalarType dtype(const std::string& name) const;  // as stored (of the first piece)
  std::size_t pieces(const std::string& name) const;
  // The manifest's "split" of the tensor: {dimension, blocks}; {-1, 1} when not recorded or not split.
  std::pair<std::int64_t, std::int64_t> split(const std::string& name) const;
  // Fills `out` (region.data_shape(), any dtype: converted) with the region of tensor `name`.
  // Throws Error naming the tensor when it is absent, the region leaves it, or its pieces miss part.
  void read(const std::string& name, const TensorRegion& region, at::Tensor out) const;
  // The whole tensor (small ones: scalars, what a test compares), in its stored dtype.
  at::Tensor read_whole(const std::string& name) const;
  // A rank's own tensor (its generator state): rank `rank`'s when that rank wrote one, else rank 0's;
  // undefined when none has it.
  at::Tensor own_tensor(int rank, const std::string& name) const;
  int world_size() const;  // of the run that wrote it (1 for version 1)
  std::uint64_t bytes_read() const { return bytes_read_; }

 private:
  struct Piece {
    std::size_t file;
    std::string key;
    TensorRegion region;
    c10::ScalarType dtype;
    std::uint64_t position;  // of its data in the file
  };
  struct Tensor {
    std::vector<std::int64_t> shape;
    std::vector<Piece> pieces;
    std::pair<std::int64_t, std::int64_t> split{-1, 1};
  };
  struct File;
  std::size_t open_file(const std::string& name);
  void read_piece(const Piece& piece, const TensorRegion& region, at::Tensor& out, std::int64_t& copied) const;

  std::filesystem::path directory_;
  int version_ = 0;
  nlohmann::json manifest_;
  std::vector<std::unique_ptr<File>> files_;
  std::map<std::string, std::size_t> file_index_;
  std::map<std::string, Tensor> tensors_;
  std::vector<std::map<std::string, Piece>> own_;  // per rank
  mutable std::uint64_t bytes_read_ = 0;
};

}  // namespace neva
