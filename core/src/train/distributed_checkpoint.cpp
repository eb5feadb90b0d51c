#include "neva/train/distributed_checkpoint.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <functional>
#include <numeric>

#include "neva/error.h"
#include "neva/io/atomic_file.h"
#include "neva/io/json.h"
#include "neva/io/safetensors.h"
#include "neva/parallel/process_group.h"
#include "neva/train/checkpoints.h"

namespace neva {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr std::int64_t kStagingBytes = 16 << 20;  // rows of a piece read at a time

std::int64_t product(const std::vector<std::int64_t>& values, std::size_t from = 0) {
  std::int64_t out = 1;
  for (std::size_t i = from; i < values.size(); ++i) out *= values[i];
  return out;
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

std::string region_text(const TensorRegion& region) {
  std::string out = "offsets " + shape_text(region.offsets) + " lengths " + shape_text(region.lengths);
  if (region.flat()) out += " elements [" + std::to_string(region.flat_begin) + ", " + std::to_string(region.flat_end) + ")";
  return out;
}

// A box of the whole tensor whose elements lie contiguously in some buffer, from `start` on.
struct ContiguousBox {
  std::vector<std::int64_t> offsets, lengths;
  std::int64_t start;
};

// The region as boxes each contiguous in the region's data (a box region: itself; a flat one: the
// partial rows and whole slabs that make up its run of elements).
void decompose(const TensorRegion& region, std::size_t dim, std::vector<std::int64_t>& prefix, std::int64_t begin,
               std::int64_t end, std::int64_t base, std::vector<ContiguousBox>& out) {
  if (begin >= end) return;
  const std::size_t rank = region.lengths.size();
  auto box = [&](std::int64_t first, std::int64_t count, std::int64_t start) {
    ContiguousBox b;
    for (std::size_t d = 0; d < rank; ++d) {
      if (d < dim) {
        b.offsets.push_back(region.offsets[d] + prefix[d]);
        b.lengths.push_back(1);
      } else if (d == dim) {
        b.offsets.push_back(region.offsets[d] + first);
        b.lengths.push_back(count);
      } else {
        b.offsets.push_back(region.offsets[d]);
        b.lengths.push_back(region.lengths[d]);
      }
    }
    b.start = start;
    out.push_back(std::move(b));
  };
  const std::int64_t inner = product(region.lengths, dim + 1);
  if (dim + 1 == rank) {
    box(begin, end - begin, base + begin);
    return;
  }
  const std::int64_t first = begin / inner, last = (end - 1) / inner;
  auto row = [&](std::int64_t r, std::int64_t from, std::int64_t to) {
    prefix[dim] = r;
    decompose(region, dim + 1, prefix, from, to, base + r * inner, out);
  };
  if (first == last && (begin % inner != 0 || end - begin != inner)) {
    row(first, begin - first * inner, end - first * inner);
    return;
  }
  std::int64_t full_begin = first, full_end = last + 1;
  if (begin % inner != 0) {
    row(first, begin % inner, inner);
    full_begin = first + 1;
  }
  if (end % inner != 0) full_end = last;
  if (full_end > full_begin) box(full_begin, full_end - full_begin, base + full_begin * inner);
  if (end % inner != 0) row(last, 0, end - last * inner);
}

// The region's boxes with where each starts in its data.
std::vector<ContiguousBox> contiguous_boxes(const TensorRegion& region) {
  if (!region.flat() || region.lengths.empty()) return {{region.offsets, region.lengths, 0}};
  std::vector<ContiguousBox> out;
  std::vector<std::int64_t> prefix(region.lengths.size(), 0);
  decompose(region, 0, prefix, region.flat_begin, region.flat_end, -region.flat_begin, out);
  return out;
}

bool intersect(const ContiguousBox& a, const ContiguousBox& b, std::vector<std::int64_t>& offsets,
               std::vector<std::int64_t>& lengths) {
  offsets.resize(a.offsets.size());
  lengths.resize(a.offsets.size());
  for (std::size_t d = 0; d < a.offsets.size(); ++d) {
    const std::int64_t low = std::max(a.offsets[d], b.offsets[d]);
    const std::int64_t high = std::min(a.offsets[d] + a.lengths[d], b.offsets[d] + b.lengths[d]);
    if (high <= low) return false;
    offsets[d] = low;
    lengths[d] = high - low;
  }
  return true;
}

bool inside(const TensorRegion& region, const std::vector<std::int64_t>& shape) {
  if (region.offsets.size() != shape.size() || region.lengths.size() != shape.size()) return false;
  for (std::size_t d = 0; d < shape.size(); ++d) {
    if (region.offsets[d] < 0 || region.lengths[d] < 0 || region.offsets[d] + region.lengths[d] > shape[d]) return false;
  }
  if (region.flat()) {
    const std::int64_t box = product(region.lengths);
    if (region.flat_begin < 0 || region.flat_begin > region.flat_end || region.flat_end > box) return false;
  }
  return true;
}

std::string rank_file_name(int rank) {
  char name[48];
  std::snprintf(name, sizeof name, "rank-%05d.safetensors", rank);
  return name;
}

// The safetensors name of a piece's dtype (the writer refuses the others, naming the tensor).
std::string dtype_text(c10::ScalarType type) {
  const char* name = safetensors_dtype_name(type);
  if (!name) throw Error(std::string("checkpoint: safetensors cannot store dtype ") + c10::toString(type));
  return name;
}

}  // namespace

// ------------------------------------------------------------------ regions

std::int64_t TensorRegion::numel() const { return flat() ? flat_end - flat_begin : product(lengths); }

std::vector<std::int64_t> TensorRegion::data_shape() const {
  if (flat()) return {flat_end - flat_begin};
  return lengths;
}

TensorRegion whole_region(const std::vector<std::int64_t>& shape) {
  TensorRegion region;
  region.offsets.assign(shape.size(), 0);
  region.lengths = shape;
  return region;
}

std::vector<ShardSegment> shard_segments(const std::vector<std::int64_t>& local_shape, const nn::ParameterSharding& s,
                                         int tp_rank, int tp_size) {
  std::vector<ShardSegment> out;
  const std::int64_t d = s.tensor_parallel_dim;
  const bool padded = d >= 0 && s.logical_size > 0 && s.logical_size != local_shape[static_cast<std::size_t>(d)] * tp_size;
  if (d < 0 || (tp_size == 1 && !padded)) {  // whole here
    out.push_back({0, 0, local_shape.empty() ? 1 : local_shape[0], whole_region(local_shape)});
    return out;
  }
  const auto dim = static_cast<std::size_t>(d);
  if (s.tensor_parallel_replicas < 1 || tp_size % s.tensor_parallel_replicas != 0) {
    throw Error("a parameter shared by " + std::to_string(s.tensor_parallel_replicas) +
                " tensor-parallel ranks cannot be split over " + std::to_string(tp_size));
  }
  const std::int64_t shards = tp_size / s.tensor_parallel_replicas, index = tp_rank / s.tensor_parallel_replicas;
  const std::int64_t local = local_shape[dim];
  std::vector<std::int64_t> whole = local_shape;
  whole[dim] = s.logical_size > 0 ? s.logical_size : local * shards;
  auto segment = [&](std::int64_t local_begin, std::int64_t global_begin, std::int64_t length) {
    ShardSegment out_segment{d, local_begin, length, whole_region(whole)};
    out_segment.box.offsets[dim] = global_begin;
    out_segment.box.lengths[dim] = length;
    out.push_back(std::move(out_segment));
  };
  if (s.partition_stride > 1) {
    const std::int64_t block = whole[dim] / s.partition_stride, chunk = block / shards;
    for (std::int64_t b = 0; b < s.partition_stride; ++b) segment(b * chunk, b * block + index * chunk, chunk);
    return out;
  }
  const std::int64_t begin = index * local;
  const std::int64_t real = std::clamp<std::int64_t>(whole[dim] - begin, 0, local);
  if (real > 0) segment(0, begin, real);
  return out;
}

std::vector<std::pair<TensorRegion, std::int64_t>> flat_regions(const std::vector<ShardSegment>& segments,
                                                                const std::vector<std::int64_t>& local_shape,
                                                                std::int64_t begin, std::int64_t length) {
  std::vector<std::pair<TensorRegion, std::int64_t>> out;
  for (const ShardSegment& segment : segments) {
    const auto dim = static_cast<std::size_t>(segment.dim);
    // Contiguous in the local tensor: every dimension before the split one of size 1.
    const bool whole = segment.local_begin == 0 && (local_shape.empty() || segment.length == local_shape[dim]);
    if (!whole && product(std::vector<std::int64_t>(local_shape.begin(), local_shape.begin() + static_cast<std::ptrdiff_t>(dim))) != 1) {
      throw Error("a distributed optimizer's share of a tensor split along dimension " + std::to_string(dim) +
                  " in several blocks cannot be described; not implemented");
    }
    const std::int64_t inner = local_shape.empty() ? 1 : product(local_shape, dim + 1);
    const std::int64_t first = whole ? 0 : segment.local_begin * inner;
    const std::int64_t last = whole ? product(local_shape) : first + segment.length * inner;
    const std::int64_t low = std::max(first, begin), high = std::min(last, begin + length);
    if (low >= high) continue;
    TensorRegion region = segment.box;
    region.flat_begin = low - first;
    region.flat_end = high - first;
    out.emplace_back(std::move(region), low - begin);
  }
  return out;
}

// ------------------------------------------------------------------ writing

namespace {

// Writes rank `rank`'s file from the pieces' descriptions (`dtypes`: each piece's stored dtype) and
// returns its description; `data(i)` gives piece i's data as it is written (one in memory at a time).
json write_pieces(const fs::path& directory, int rank, const std::vector<CheckpointPiece>& pieces,
                  const std::vector<c10::ScalarType>& dtypes, const std::vector<std::pair<std::string, at::Tensor>>& own,
                  const std::function<at::Tensor(std::size_t)>& data) {
  const std::string file = rank_file_name(rank);
  std::vector<SafetensorsWriter::Spec> specs;
  std::map<std::string, std::size_t> by_key;  // piece index, or pieces.size() + own index
  std::map<std::string, int> count;
  json described = json::array();
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    const CheckpointPiece& piece = pieces[i];
    const int k = count[piece.name]++;
    const std::string key = k == 0 ? piece.name : piece.name + "@" + std::to_string(k);
    specs.push_back({key, dtypes[i], piece.region.data_shape()});
    by_key.emplace(key, i);
    json entry = {{"name", piece.name},
                  {"shape", piece.shape},
                  {"dtype", dtype_text(dtypes[i])},
                  {"key", key},
                  {"offsets", piece.region.offsets},
                  {"lengths", piece.region.lengths}};
    if (piece.region.flat()) entry["flat"] = {piece.region.flat_begin, piece.region.flat_end};
    if (piece.split_dim >= 0) entry["split"] = {piece.split_dim, piece.split_blocks};
    described.push_back(std::move(entry));
  }
  json own_names = json::array();
  for (std::size_t i = 0; i < own.size(); ++i) {
    specs.push_back({"own/" + own[i].first, own[i].second.scalar_type(), own[i].second.sizes().vec()});
    by_key.emplace("own/" + own[i].first, pieces.size() + i);
    own_names.push_back(own[i].first);
  }
  const fs::path path = directory / file;
  {
    SafetensorsWriter writer(path.string(), std::move(specs),
                             {{"format", "neva-checkpoint-shard"}, {"rank", std::to_string(rank)}});
    for (const auto& spec : writer.order()) {
      const std::size_t i = by_key.at(spec.name);
      writer.write(i < pieces.size() ? data(i) : own[i - pieces.size()].second);
    }
    writer.commit();
  }
  return {{"file", file},
          {"rank", rank},
          {"bytes", fs::file_size(path)},
          {"sha256", sha256_file(path)},
          {"own", own_names},
          {"pieces", described}};
}

}  // namespace

json write_rank_shard(const fs::path& directory, int rank, const std::vector<CheckpointPiece>& pieces,
                      const std::vector<std::pair<std::string, at::Tensor>>& own) {
  std::vector<c10::ScalarType> dtypes;
  for (const CheckpointPiece& piece : pieces) {
    if (piece.data.sizes().vec() != piece.region.data_shape()) {
      throw Error("checkpoint piece of '" + piece.name + "' holds " + shape_text(piece.data.sizes().vec()) +
                  ", its region " + region_text(piece.region) + " needs " + shape_text(piece.region.data_shape()));
    }
    dtypes.push_back(piece.data.scalar_type());
  }
  return write_pieces(directory, rank, pieces, dtypes, own, [&pieces](std::size_t i) { return pieces[i].data; });
}

json merge_rank_shards(const std::vector<json>& ranks) {
  json files = json::object(), rank_list = json::array(), tensors = json::object();
  for (const json& rank : ranks) {
    const std::string file = rank.at("file").get<std::string>();
    files[file] = {{"bytes", rank.at("bytes")}, {"sha256", rank.at("sha256")}};
    rank_list.push_back({{"file", file}, {"own", rank.at("own")}});
    for (const json& piece : rank.at("pieces")) {
      const std::string name = piece.at("name").get<std::string>();
      json& tensor = tensors[name];
      if (!tensor.contains("shape")) {
        tensor = {{"shape", piece.at("shape")}, {"dtype", piece.at("dtype")}, {"shards", json::array()}};
      } else if (tensor["shape"] != piece.at("shape")) {
        throw Error("checkpoint: ranks disagree on the shape of '" + name + "': " + tensor["shape"].dump() + " and " +
                    piece.at("shape").dump() + " (" + file + ")");
      }
      if (piece.contains("split")) tensor["split"] = piece.at("split");
      json shard = {{"file", file}, {"key", piece.at("key")}, {"offsets", piece.at("offsets")}, {"lengths", piece.at("lengths")}};
      if (piece.contains("flat")) shard["flat"] = piece.at("flat");
      tensor["shards"].push_back(std::move(shard));
    }
  }
  // Every element written exactly once: the pieces' sizes add up to the tensor's (the owners' rule
  // writes no piece twice; a gap or an overlap here is a bug, caught before the commit).
  for (auto& [name, tensor] : tensors.items()) {
    const auto shape = tensor.at("shape").get<std::vector<std::int64_t>>();
    std::int64_t covered = 0;
    for (const json& shard : tensor.at("shards")) {
      TensorRegion region{shard.at("offsets").get<std::vector<std::int64_t>>(), shard.at("lengths").get<std::vector<std::int64_t>>()};
      if (shard.contains("flat")) {
        region.flat_begin = shard["flat"][0].get<std::int64_t>();
        region.flat_end = shard["flat"][1].get<std::int64_t>();
      }
      covered += region.numel();
    }
    if (covered != product(shape)) {
      throw Error("checkpoint: the ranks' pieces of '" + name + "' hold " + std::to_string(covered) + " elements, the tensor " +
                  shape_text(shape) + " has " + std::to_string(product(shape)) + " (a piece written twice or by no rank)");
    }
  }
  return {{"files", files}, {"ranks", rank_list}, {"tensors", tensors}};
}

std::vector<std::string> all_gather_text(const std::shared_ptr<ProcessGroup>& group, const std::string& text,
                                         c10::Device device) {
  if (!group || group->size() == 1) return {text};
  const int size = group->size();
  const auto options = at::TensorOptions(at::kLong).device(device);
  at::Tensor lengths = at::zeros({size}, options);
  at::Tensor mine = at::tensor({static_cast<std::int64_t>(text.size())}, options);
  group->all_gather_into_tensor(lengths, mine).wait();
  lengths = lengths.cpu();
  const std::int64_t longest = lengths.max().item<std::int64_t>();
  at::Tensor bytes = at::zeros({longest}, at::kByte);
  std::memcpy(bytes.data_ptr(), text.data(), text.size());
  at::Tensor all = at::zeros({size * longest}, at::TensorOptions(at::kByte).device(device));
  at::Tensor send = bytes.to(device);
  group->all_gather_into_tensor(all, send).wait();
  all = all.cpu();
  std::vector<std::string> out;
  for (int r = 0; r < size; ++r) {
    const auto* begin = reinterpret_cast<const char*>(all.data_ptr<std::uint8_t>()) + r * longest;
    out.emplace_back(begin, begin + lengths[r].item<std::int64_t>());
  }
  return out;
}

// ------------------------------------------------------------------ reading

struct CheckpointReader::File {
  std::string path;
  int fd = -1;
  SafetensorsFile header;
  std::uint64_t data_start = 0;
  explicit File(const std::string& p) : path(p), header(p) {
    fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw Error(p + ": cannot open: " + std::strerror(errno));
    std::uint64_t header_bytes = 0;
    if (::pread(fd, &header_bytes, 8, 0) != 8) throw Error(p + ": cannot read its header");
    data_start = 8 + header_bytes;
  }
  ~File() {
    if (fd >= 0) ::close(fd);
  }
};

CheckpointReader::~CheckpointReader() = default;
CheckpointReader::CheckpointReader(CheckpointReader&&) noexcept = default;

std::size_t CheckpointReader::open_file(const std::string& name) {
  if (auto found = file_index_.find(name); found != file_index_.end()) return found->second;
  if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..") {
    throw Error((directory_ / "manifest.json").string() + ": names a file '" + name + "' outside its directory");
  }
  files_.push_back(std::make_unique<File>((directory_ / name).string()));
  file_index_[name] = files_.size() - 1;
  return files_.size() - 1;
}

CheckpointReader::CheckpointReader(const fs::path& directory) : directory_(directory) {
  const fs::path manifest_path = directory / "manifest.json";
  std::error_code error;
  if (fs::exists(manifest_path, error)) manifest_ = read_json_file(manifest_path.string());
  const std::string where = manifest_path.string() + ": ";
  const int version = manifest_.is_object() && manifest_.contains("version") && manifest_["version"].is_number_integer()
                          ? manifest_["version"].get<int>()
                          : 1;
  if (version > kCheckpointFormatVersion) {
    throw Error(where + "written by a newer neva (checkpoint format " + std::to_string(version) + ", this neva reads up to " +
                std::to_string(kCheckpointFormatVersion) + ")");
  }
  version_ = version;
  auto add_piece = [&](const std::string& name, Tensor& tensor, std::size_t file, const std::string& key,
                       TensorRegion region) {
    const SafetensorsFile& data = files_[file]->header;
    if (!data.contains(key)) throw Error(data.path() + ": has no tensor '" + key + "', which the manifest lists for '" + name + "'");
    const SafetensorsEntry& entry = data.entry(key);
    if (!inside(region, tensor.shape)) {
      throw Error(where + "a piece of '" + name + "' (" + region_text(region) + ") lies outside its shape " + shape_text(tensor.shape));
    }
    if (entry.shape != region.data_shape()) {
      throw Error(data.path() + ": tensor '" + key + "' has shape " + shape_text(entry.shape) + ", the manifest's piece of '" +
                  name + "' needs " + shape_text(region.data_shape()));
    }
    tensor.pieces.push_back({file, key, std::move(region), entry.scalar_type, files_[file]->data_start + entry.begin});
  };
  if (version == 1) {  // whole tensors in two files, one generator state
    for (const char* name : {"model.safetensors", "optimizer.safetensors"}) {
      const std::size_t file = open_file(name);
      for (const SafetensorsEntry& entry : files_[file]->header.entries()) {
        if (entry.name.rfind("rng.", 0) == 0) {
          own_.resize(1);
          own_[0][entry.name] = {file, entry.name, whole_region(entry.shape), entry.scalar_type,
                                 files_[file]->data_start + entry.begin};
          continue;
        }
        Tensor& tensor = tensors_[entry.name];
        tensor.shape = entry.shape;
        add_piece(entry.name, tensor, file, entry.name, whole_region(entry.shape));
      }
    }
    return;
  }
  try {
    for (const auto& [name, described] : manifest_.at("tensors").items()) {
      Tensor& tensor = tensors_[name];
      tensor.shape = described.at("shape").get<std::vector<std::int64_t>>();
      if (described.contains("split")) {
        tensor.split = {described.at("split").at(0).get<std::int64_t>(), described.at("split").at(1).get<std::int64_t>()};
        const bool valid = tensor.split.first >= 0 && tensor.split.first < static_cast<std::int64_t>(tensor.shape.size()) &&
                           tensor.split.second >= 1;
        if (!valid) throw Error(where + "tensor '" + name + "' has split " + described.at("split").dump() + ", outside its shape " + shape_text(tensor.shape));
      }
      std::int64_t covered = 0;
      for (const json& shard : described.at("shards")) {
        TensorRegion region{shard.at("offsets").get<std::vector<std::int64_t>>(), shard.at("lengths").get<std::vector<std::int64_t>>()};
        if (shard.contains("flat")) {
          region.flat_begin = shard.at("flat").at(0).get<std::int64_t>();
          region.flat_end = shard.at("flat").at(1).get<std::int64_t>();
        }
        const std::string file = shard.at("file").get<std::string>();
        if (!manifest_.at("files").contains(file)) throw Error(where + "a piece of '" + name + "' is in '" + file + "', which it does not list");
        covered += region.numel();
        add_piece(name, tensor, open_file(file), shard.at("key").get<std::string>(), std::move(region));
      }
      if (covered != product(tensor.shape)) {
        throw Error(where + "the pieces of '" + name + "' hold " + std::to_string(covered) + " of its " +
                    std::to_string(product(tensor.shape)) + " elements");
      }
    }
    for (const json& rank : manifest_.at("ranks")) {
      own_.emplace_back();
      const std::string file = rank.at("file").get<std::string>();
      const std::size_t index = open_file(file);
      for (const json& name : rank.at("own")) {
        const std::string key = "own/" + name.get<std::string>();
        const SafetensorsFile& data = files_[index]->header;
        if (!data.contains(key)) throw Error(data.path() + ": has no tensor '" + key + "', which the manifest lists");
        const SafetensorsEntry& entry = data.entry(key);
        own_.back()[name.get<std::string>()] = {index, key, whole_region(entry.shape), entry.scalar_type,
                                                files_[index]->data_start + entry.begin};
      }
    }
  } catch (const json::exception& malformed) {
    throw Error(where + "malformed manifest: " + json_error_reason(malformed));
  }
}

bool CheckpointReader::contains(const std::string& name) const { return tensors_.count(name) > 0; }

std::vector<std::string> CheckpointReader::names() const {
  std::vector<std::string> out;
  for (const auto& entry : tensors_) out.push_back(entry.first);
  return out;
}

const std::vector<std::int64_t>& CheckpointReader::shape(const std::string& name) const {
  auto found = tensors_.find(name);
  if (found == tensors_.end()) throw Error(directory_.string() + ": the checkpoint has no tensor '" + name + "'");
  return found->second.shape;
}

c10::ScalarType CheckpointReader::dtype(const std::string& name) const {
  shape(name);
  const Tensor& tensor = tensors_.at(name);
  return tensor.pieces.empty() ? at::kFloat : tensor.pieces.front().dtype;
}

std::size_t CheckpointReader::pieces(const std::string& name) const {
  shape(name);
  return tensors_.at(name).pieces.size();
}

std::pair<std::int64_t, std::int64_t> CheckpointReader::split(const std::string& name) const {
  shape(name);
  return tensors_.at(name).split;
}

int CheckpointReader::world_size() const { return std::max<int>(1, static_cast<int>(own_.size())); }

void CheckpointReader::read_piece(const Piece& piece, const TensorRegion& region, at::Tensor& out,
                                  std::int64_t& copied) const {
  const File& file = *files_[piece.file];
  const auto element = static_cast<std::int64_t>(c10::elementSize(piece.dtype));
  std::vector<std::int64_t> offsets, lengths;
  for (const ContiguousBox& source : contiguous_boxes(piece.region)) {
    for (const ContiguousBox& target : contiguous_boxes(region)) {
      if (!intersect(source, target, offsets, lengths)) continue;
      // The target box's view of `out`.
      at::Tensor view = region.flat() ? out.narrow(0, target.start, product(target.lengths)).view(target.lengths) : out;
      const std::size_t rank = offsets.size();
      if (rank == 0) {  // a scalar
        at::Tensor staging = at::empty({}, at::TensorOptions(piece.dtype));
        if (::pread(file.fd, staging.data_ptr(), static_cast<std::size_t>(element), static_cast<off_t>(piece.position + source.start * element)) != element) {
          throw Error(file.path + ": cannot read '" + piece.key + "' (truncated?)");
        }
        view.copy_(staging);
        bytes_read_ += static_cast<std::uint64_t>(element);
        copied += 1;
        continue;
      }
      // Rows (slices along the first dimension) of the source box are contiguous in the file. Where
      // the target takes whole rows in the stored dtype into contiguous memory, they are read straight
      // into it; otherwise through one staging buffer of up to kStagingBytes. Part of each row (a
      // column block) is read with its whole rows: reading each row's part alone (a pread per row)
      // measured 0.15 GB/s of wanted bytes against 1.0 reading whole rows (8 KiB halves of 16 KiB
      // rows, cold, docs/benchmarks.md) — the disk reads through a gap faster than it seeks over it.
      const std::int64_t row = product(source.lengths, 1) * element;
      const std::int64_t rows = lengths[0], first = offsets[0] - source.offsets[0];
      const std::int64_t batch = std::max<std::int64_t>(1, kStagingBytes / std::max<std::int64_t>(row, 1));
      bool whole_rows = true;
      for (std::size_t d = 1; d < rank; ++d) whole_rows = whole_rows && lengths[d] == source.lengths[d];
      at::Tensor target_rows = view.narrow(0, offsets[0] - target.offsets[0], rows);
      for (std::size_t d = 1; d < rank; ++d) {
        target_rows = target_rows.narrow(static_cast<std::int64_t>(d), offsets[d] - target.offsets[d], lengths[d]);
      }
      const bool direct = whole_rows && target_rows.is_contiguous() && target_rows.scalar_type() == piece.dtype &&
                          target_rows.device().is_cpu();
      std::vector<std::int64_t> staging_shape = source.lengths;
      staging_shape[0] = std::min(batch, rows);
      at::Tensor staging = direct ? at::Tensor() : at::empty(staging_shape, at::TensorOptions(piece.dtype));
      auto read_bytes = [&](char* into, std::int64_t bytes, std::uint64_t position) {
        std::int64_t at_byte = 0;
        while (at_byte < bytes) {
          const ssize_t got = ::pread(file.fd, into + at_byte, static_cast<std::size_t>(bytes - at_byte),
                                      static_cast<off_t>(position + static_cast<std::uint64_t>(at_byte)));
          if (got < 0 && errno == EINTR) continue;
          if (got <= 0) {
            throw Error(file.path + ": cannot read '" + piece.key + "' (" +
                        (got == 0 ? std::string("truncated") : std::string(std::strerror(errno))) + ")");
          }
          at_byte += got;
        }
        bytes_read_ += static_cast<std::uint64_t>(bytes);
      };
      for (std::int64_t done = 0; done < rows; done += batch) {
        const std::int64_t count = std::min(batch, rows - done);
        const std::uint64_t position = piece.position + static_cast<std::uint64_t>(source.start * element + (first + done) * row);
        at::Tensor to = target_rows.narrow(0, done, count);
        if (direct) {
          read_bytes(static_cast<char*>(to.data_ptr()), count * row, position);
          copied += to.numel();
          continue;
        }
        at::Tensor from = staging.narrow(0, 0, count);
        read_bytes(static_cast<char*>(from.data_ptr()), count * row, position);
        for (std::size_t d = 1; d < rank; ++d) {
          from = from.narrow(static_cast<std::int64_t>(d), offsets[d] - source.offsets[d], lengths[d]);
        }
        to.copy_(from);
        copied += from.numel();
      }
    }
  }
}

void CheckpointReader::read(const std::string& name, const TensorRegion& region, at::Tensor out) const {
  const Tensor& tensor = tensors_.count(name) ? tensors_.at(name) : (shape(name), tensors_.at(name));
  const std::string where = directory_.string() + ": tensor '" + name + "' ";
  if (!inside(region, tensor.shape)) {
    throw Error(where + "has shape " + shape_text(tensor.shape) + "; this run needs its " + region_text(region) +
                " (was the checkpoint written by another model?)");
  }
  if (out.sizes().vec() != region.data_shape()) {
    throw Error(where + ": reading " + region_text(region) + " into a tensor of shape " + shape_text(out.sizes().vec()));
  }
  at::NoGradGuard no_grad;
  std::int64_t copied = 0;
  for (const Piece& piece : tensor.pieces) read_piece(piece, region, out, copied);
  if (copied != region.numel()) {
    throw Error(where + ": its pieces hold " + std::to_string(copied) + " of the " + std::to_string(region.numel()) +
                " elements of " + region_text(region));
  }
}

at::Tensor CheckpointReader::read_whole(const std::string& name) const {
  const std::vector<std::int64_t>& whole = shape(name);
  at::Tensor out = at::empty(whole, at::TensorOptions(dtype(name)));
  read(name, whole_region(whole), out);
  return out;
}

at::Tensor CheckpointReader::own_tensor(int rank, const std::string& name) const {
  const std::map<std::string, Piece>* table = nullptr;
  if (rank >= 0 && rank < static_cast<int>(own_.size()) && own_[static_cast<std::size_t>(rank)].count(name)) {
    table = &own_[static_cast<std::size_t>(rank)];
  } else if (!own_.empty() && own_[0].count(name)) {
    table = &own_[0];
  }
  if (!table) return {};
  const Piece& piece = table->at(name);
  at::Tensor out = at::empty(piece.region.lengths, at::TensorOptions(piece.dtype));
  std::int64_t copied = 0;
  read_piece(piece, piece.region, out, copied);
  return out;
}

// ------------------------------------------------------------------ conversion

namespace {

// The parameter a state tensor belongs to ("exp_avg.<name>" -> "<name>").
std::string parameter_of(const std::string& name) {
  for (const char* prefix : {"exp_avg_sq.", "exp_avg.", "step."}) {
    if (name.rfind(prefix, 0) == 0) return name.substr(std::strlen(prefix));
  }
  return name;
}

}  // namespace

void reshard_checkpoint(const CheckpointReader& checkpoint, const fs::path& directory, int tp, int pp) {
  if (tp < 1 || pp < 1) {
    throw Error("checkpoint convert: --tp and --pp must be at least 1 (got " + std::to_string(tp) + " and " +
                std::to_string(pp) + ")");
  }
  std::error_code error;
  if (fs::exists(directory, error) && !fs::is_empty(directory, error)) {
    throw Error(directory.string() + " exists and is not empty; convert into a new directory");
  }
  const int world = tp * pp;
  std::int64_t layers = 0;
  for (const std::string& name : checkpoint.names()) {
    const std::string parameter = parameter_of(name);
    if (parameter.rfind("llm.", 0) == 0) layers = std::max(layers, nn::path_index(parameter, ".layers.") + 1);
  }
  if (pp > 1 && layers < pp) {
    throw Error(checkpoint.directory().string() + ": " + std::to_string(layers) + " decoder layers do not split over " +
                std::to_string(pp) + " pipeline stages");
  }
  auto stage_of = [&](const std::string& name) -> int {
    const std::string parameter = parameter_of(name);
    if (parameter.rfind("llm.", 0) != 0) return 0;  // the connector, the vision tower: the first stage's
    const std::int64_t layer = nn::path_index(parameter, ".layers.");
    if (layer >= 0) return static_cast<int>(layer * pp / layers);
    return parameter.find("embed") != std::string::npos ? 0 : pp - 1;
  };
  // Every rank's pieces: a split tensor's blocks cut in tp runs; the rest whole on tp-rank 0.
  std::vector<std::vector<CheckpointPiece>> pieces(static_cast<std::size_t>(world));
  std::vector<std::vector<c10::ScalarType>> dtypes(static_cast<std::size_t>(world));
  for (const std::string& name : checkpoint.names()) {
    const std::vector<std::int64_t>& shape = checkpoint.shape(name);
    const std::pair<std::int64_t, std::int64_t> split = checkpoint.split(name);
    const std::int64_t dim = split.first, given_blocks = split.second;  // (captured below: not a structured binding)
    const int first = stage_of(name) * tp;
    auto add = [&](int rank, TensorRegion region) {
      pieces[static_cast<std::size_t>(rank)].push_back({name, shape, std::move(region), at::Tensor(), dim, given_blocks});
      dtypes[static_cast<std::size_t>(rank)].push_back(checkpoint.dtype(name));
    };
    if (dim < 0 || tp == 1) {
      add(first, whole_region(shape));
      continue;
    }
    const auto d = static_cast<std::size_t>(dim);
    const std::int64_t blocks = shape[d] % given_blocks == 0 ? given_blocks : 1;
    const std::int64_t block = shape[d] / blocks, chunk = (block + tp - 1) / tp;
    for (int r = 0; r < tp; ++r) {
      for (std::int64_t b = 0; b < blocks; ++b) {
        const std::int64_t begin = r * chunk, length = std::min(chunk, block - begin);
        if (length <= 0) continue;
        TensorRegion region = whole_region(shape);
        region.offsets[d] = b * block + begin;
        region.lengths[d] = length;
        add(first + r, std::move(region));
      }
    }
  }
  fs::create_directories(directory);
  std::vector<json> descriptions;
  for (int rank = 0; rank < world; ++rank) {
    std::vector<std::pair<std::string, at::Tensor>> own;
    if (checkpoint.world_size() > 0) {
      for (const char* name : {"rng.cpu", "rng.cuda"}) {
        at::Tensor state = checkpoint.own_tensor(rank, name);
        if (state.defined()) own.emplace_back(name, std::move(state));
      }
    }
    const auto& mine = pieces[static_cast<std::size_t>(rank)];
    const auto& types = dtypes[static_cast<std::size_t>(rank)];
    descriptions.push_back(write_pieces(directory, rank, mine, types, own, [&](std::size_t i) {
      at::Tensor data = at::empty(mine[i].region.data_shape(), at::TensorOptions(types[i]));
      checkpoint.read(mine[i].name, mine[i].region, data);
      return data;
    }));
  }
  json content = merge_rank_shards(descriptions);
  json layout = {{"world_size", world}, {"tensor_model_parallel_size", tp}, {"pipeline_model_parallel_size", pp},
                 {"virtual_pipeline_model_parallel_size", 1}, {"context_parallel_size", 1},
                 {"expert_model_parallel_size", 1}, {"data_parallel_size", 1}, {"distributed_optimizer", false}};
  if (checkpoint.manifest().is_object() && checkpoint.manifest().contains("layout")) {
    layout["converted_from"] = checkpoint.manifest()["layout"];
  }
  content["layout"] = layout;
  const fs::path state = checkpoint.directory() / "trainer_state.json";
  if (fs::exists(state, error)) write_file_atomically((directory / "trainer_state.json").string(), read_file(state.string()));
  const std::int64_t step = checkpoint.manifest().is_object() ? checkpoint.manifest().value("step", std::int64_t{0}) : 0;
  CheckpointManager::write_manifest(directory, step, content);
}

}  // namespace neva
