#include "neva/io/safetensors.h"

#include "neva/io/atomic_file.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "neva/error.h"
#include "neva/io/json.h"
#include "page_advice.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors data is little-endian");

namespace neva {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

struct DtypeInfo {
  const char* name;
  c10::ScalarType type;
};

constexpr DtypeInfo kDtypes[] = {
    {"BOOL", c10::ScalarType::Bool},          {"U8", c10::ScalarType::Byte},
    {"I8", c10::ScalarType::Char},            {"F8_E5M2", c10::ScalarType::Float8_e5m2},
    {"F8_E4M3", c10::ScalarType::Float8_e4m3fn}, {"I16", c10::ScalarType::Short},
    {"U16", c10::ScalarType::UInt16},         {"F16", c10::ScalarType::Half},
    {"BF16", c10::ScalarType::BFloat16},      {"I32", c10::ScalarType::Int},
    {"U32", c10::ScalarType::UInt32},         {"F32", c10::ScalarType::Float},
    {"F64", c10::ScalarType::Double},         {"I64", c10::ScalarType::Long},
    {"U64", c10::ScalarType::UInt64},
};

std::string dtype_names() {
  std::string out;
  for (const auto& dtype : kDtypes) out += (out.empty() ? "" : ", ") + std::string(dtype.name);
  return out;
}

const char* dtype_name(c10::ScalarType type) {
  for (const auto& dtype : kDtypes) {
    if (dtype.type == type) return dtype.name;
  }
  return nullptr;
}

std::string shape_text(at::IntArrayRef shape) {
  std::ostringstream out;
  out << "[";
  for (std::size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

struct Mapping {
  void* address = nullptr;
  std::size_t size = 0;
  ~Mapping() {
    if (address) ::munmap(address, size);
  }
};

// Headers and indexes: one JSON value (whitespace around it allowed, as serde_json allows; a NUL
// pad is not), no key twice, and no deeper nesting than a header can need.
json parse_strict_json(std::string_view text, const std::string& where) {
  return parse_json(text, where, JsonLimits{/*max_depth=*/8, /*reject_duplicate_keys=*/true});
}

}  // namespace

struct SafetensorsFile::Impl {
  std::string path;
  std::shared_ptr<Mapping> mapping;
  std::uint64_t data_start = 0;
  std::vector<SafetensorsEntry> entries;
  std::map<std::string, std::size_t> index;
  std::map<std::string, std::string> metadata;

  [[noreturn]] void fail(const std::string& what) const { throw Error(path + ": " + what); }
};

SafetensorsFile::SafetensorsFile(const std::string& path) : impl_(std::make_unique<Impl>()) {
  Impl& self = *impl_;
  self.path = path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) self.fail(std::string("cannot open: ") + std::strerror(errno));
  struct stat status {};
  if (::fstat(fd, &status) != 0 || !S_ISREG(status.st_mode)) {
    ::close(fd);
    self.fail("not a regular file");
  }
  const std::uint64_t file_size = static_cast<std::uint64_t>(status.st_size);
  if (file_size < 8) {
    ::close(fd);
    self.fail("not a safetensors file: " + std::to_string(file_size) + " bytes, shorter than the 8-byte header size");
  }
  self.mapping = std::make_shared<Mapping>();
  self.mapping->address = ::mmap(nullptr, file_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (self.mapping->address == MAP_FAILED) {
    self.mapping->address = nullptr;
    self.fail(std::string("cannot map: ") + std::strerror(errno));
  }
  self.mapping->size = file_size;
  // Pages read from disk through this mapping come into the page cache as 2 MiB folios, which are then
  // mapped with huge pages: decoding streams every weight once per token, and 4 KiB pages cost it a
  // TLB miss every 4 KiB (docs/benchmarks.md). Without the advice, fault readahead builds large folios
  // only for a strictly sequential scan. Advice only: pages already cached keep their size.
  ::madvise(self.mapping->address, file_size, MADV_HUGEPAGE);
  const auto* bytes = static_cast<const unsigned char*>(self.mapping->address);

  std::uint64_t header_size = 0;
  std::memcpy(&header_size, bytes, 8);
  if (header_size > kMaxHeaderBytes) {
    self.fail("safetensors header of " + std::to_string(header_size) + " bytes exceeds the limit of " +
              std::to_string(kMaxHeaderBytes));
  }
  std::uint64_t data_start = 0;
  if (__builtin_add_overflow(header_size, 8, &data_start) || data_start > file_size) {
    self.fail("safetensors header size " + std::to_string(header_size) + " runs past the end of the " +
              std::to_string(file_size) + "-byte file (truncated?)");
  }
  self.data_start = data_start;
  std::string_view header(reinterpret_cast<const char*>(bytes + 8), header_size);
  if (header.empty() || header.front() != '{') self.fail("safetensors header does not start with '{'");
  json document = parse_strict_json(header, self.path + " (safetensors header)");
  if (!document.is_object()) self.fail("safetensors header is not a JSON object");

  for (auto& [name, value] : document.items()) {
    if (name == "__metadata__") {
      if (!value.is_object()) self.fail("__metadata__ must be an object of strings");
      for (auto& [key, text] : value.items()) {
        if (!text.is_string()) self.fail("__metadata__ value '" + key + "' is not a string");
        self.metadata[key] = text.get<std::string>();
      }
      continue;
    }
    auto where = "tensor '" + name + "': ";
    if (!value.is_object()) self.fail(where + "expected an object with dtype, shape and data_offsets");
    for (auto& [field, ignored] : value.items()) {
      if (field != "dtype" && field != "shape" && field != "data_offsets") self.fail(where + "unknown field '" + field + "'");
    }
    SafetensorsEntry entry;
    entry.name = name;
    if (!value.contains("dtype") || !value["dtype"].is_string()) self.fail(where + "missing dtype");
    entry.dtype = value["dtype"].get<std::string>();
    auto known = std::find_if(std::begin(kDtypes), std::end(kDtypes),
                              [&](const DtypeInfo& dtype) { return entry.dtype == dtype.name; });
    if (known == std::end(kDtypes)) self.fail(where + "unknown dtype '" + entry.dtype + "' (known: " + dtype_names() + ")");
    entry.scalar_type = known->type;

    if (!value.contains("shape") || !value["shape"].is_array()) self.fail(where + "missing shape");
    std::uint64_t elements = 1;
    for (const auto& dim : value["shape"]) {
      if (!dim.is_number_unsigned()) self.fail(where + "shape entries must be non-negative integers");
      std::uint64_t size = dim.get<std::uint64_t>();
      if (size > static_cast<std::uint64_t>(INT64_MAX) || __builtin_mul_overflow(elements, size, &elements)) {
        self.fail(where + "shape " + value["shape"].dump() + " overflows");
      }
      entry.shape.push_back(static_cast<std::int64_t>(size));
    }
    std::uint64_t nbytes = 0;
    if (__builtin_mul_overflow(elements, c10::elementSize(entry.scalar_type), &nbytes)) {
      self.fail(where + "shape " + value["shape"].dump() + " overflows");
    }
    const json& offsets = value.contains("data_offsets") ? value["data_offsets"] : json();
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned()) {
      self.fail(where + "data_offsets must be two non-negative integers");
    }
    entry.begin = offsets[0].get<std::uint64_t>();
    entry.end = offsets[1].get<std::uint64_t>();
    if (entry.end < entry.begin) self.fail(where + "data_offsets end before they begin");
    if (entry.end - entry.begin != nbytes) {
      self.fail(where + "data_offsets span " + std::to_string(entry.end - entry.begin) + " bytes, but " + entry.dtype +
                " " + value["shape"].dump() + " needs " + std::to_string(nbytes));
    }
    self.entries.push_back(std::move(entry));
  }

  std::sort(self.entries.begin(), self.entries.end(), [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
    return std::tie(a.begin, a.end) < std::tie(b.begin, b.end);
  });
  std::uint64_t expected = 0;
  for (const auto& entry : self.entries) {
    if (entry.begin != expected) {
      self.fail("tensor '" + entry.name + "' starts at byte " + std::to_string(entry.begin) + " of the data, expected " +
                std::to_string(expected) + " (data offsets must be contiguous, without gaps or overlaps)");
    }
    expected = entry.end;
  }
  std::uint64_t data_end = 0;
  if (__builtin_add_overflow(data_start, expected, &data_end) || data_end != file_size) {
    self.fail("tensor data ends at byte " + std::to_string(data_start + expected) + " but the file has " +
              std::to_string(file_size) + " bytes (truncated, or trailing bytes)");
  }
  for (std::size_t i = 0; i < self.entries.size(); ++i) self.index[self.entries[i].name] = i;
}

SafetensorsFile::~SafetensorsFile() = default;
SafetensorsFile::SafetensorsFile(SafetensorsFile&&) noexcept = default;
SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&&) noexcept = default;

const std::string& SafetensorsFile::path() const { return impl_->path; }
const std::vector<SafetensorsEntry>& SafetensorsFile::entries() const { return impl_->entries; }
const std::map<std::string, std::string>& SafetensorsFile::metadata() const { return impl_->metadata; }
bool SafetensorsFile::contains(const std::string& name) const { return impl_->index.count(name) > 0; }

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name) const {
  auto found = impl_->index.find(name);
  if (found == impl_->index.end()) impl_->fail("missing tensor '" + name + "'");
  return impl_->entries[found->second];
}

at::Tensor SafetensorsFile::tensor(const std::string& name) const {
  const SafetensorsEntry& info = entry(name);
  auto options = at::TensorOptions().dtype(info.scalar_type);
  std::size_t nbytes = info.end - info.begin;
  if (nbytes == 0) return at::empty(info.shape, options);
  char* data = static_cast<char*>(impl_->mapping->address) + impl_->data_start + info.begin;
  if (reinterpret_cast<std::uintptr_t>(data) % c10::elementSize(info.scalar_type) == 0) {
    std::shared_ptr<Mapping> keep = impl_->mapping;
    return at::from_blob(data, info.shape, [keep](void*) {}, options);
  }
  at::Tensor copy = at::empty(info.shape, options);  // unaligned: copy out
  std::memcpy(copy.data_ptr(), data, nbytes);
  return copy;
}

void SafetensorsFile::release(const std::string& name) const {
  const SafetensorsEntry& info = entry(name);
  // Only pages wholly inside the tensor: its neighbours' bytes stay as they are.
  detail::advise_whole_pages(static_cast<const char*>(impl_->mapping->address) + impl_->data_start + info.begin,
                             info.end - info.begin, MADV_DONTNEED);
}

// ---------------------------------------------------------------------------------------------

struct SafetensorsCheckpoint::Impl {
  std::string path;
  std::vector<std::unique_ptr<SafetensorsFile>> files;
  std::map<std::string, const SafetensorsFile*> owner;
};

SafetensorsCheckpoint::SafetensorsCheckpoint(const std::string& path) : impl_(std::make_unique<Impl>()) {
  impl_->path = path;
  fs::path location(path);
  std::error_code error;
  if (fs::is_directory(location, error)) {
    if (fs::exists(location / "model.safetensors.index.json")) {
      location /= "model.safetensors.index.json";
    } else if (fs::exists(location / "model.safetensors")) {
      location /= "model.safetensors";
    } else {
      std::vector<fs::path> candidates;
      for (const auto& item : fs::directory_iterator(location)) {
        if (item.path().extension() == ".safetensors") candidates.push_back(item.path());
      }
      if (candidates.size() != 1) {
        throw Error(path + ": expected model.safetensors, model.safetensors.index.json or exactly one *.safetensors "
                           "file in this directory, found " + std::to_string(candidates.size()) + " .safetensors files");
      }
      location = candidates.front();
    }
  } else if (!fs::exists(location, error)) {
    throw Error(path + ": no such file or directory");
  }

  // Messages name the file read (or the index), not only the directory given.
  impl_->path = location.string();
  const std::string name = location.filename().string();
  if (name.size() > 11 && name.compare(name.size() - 11, 11, ".index.json") == 0) {
    json index = parse_strict_json(read_file(location.string()), location.string());
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
      throw Error(location.string() + ": expected an object with a \"weight_map\" object");
    }
    std::map<std::string, const SafetensorsFile*> shards;
    for (auto& [tensor, shard_value] : index["weight_map"].items()) {
      if (!shard_value.is_string()) throw Error(location.string() + ": weight_map['" + tensor + "'] is not a string");
      std::string shard = shard_value.get<std::string>();
      // Shard names are file names inside the checkpoint's directory, never paths elsewhere.
      if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..") {
        throw Error(location.string() + ": weight_map['" + tensor + "'] names '" + shard +
                    "', which is not a file name in the checkpoint directory");
      }
      auto& file = shards[shard];
      if (!file) {
        try {
          impl_->files.push_back(std::make_unique<SafetensorsFile>((location.parent_path() / shard).string()));
        } catch (const Error& error) {
          throw Error(location.string() + ": weight_map names shard '" + shard + "': " + error.what());
        }
        file = impl_->files.back().get();
      }
      if (!file->contains(tensor)) {
        throw Error(location.string() + ": weight_map puts '" + tensor + "' in " + shard + ", which does not hold it");
      }
      impl_->owner[tensor] = file;
    }
  } else {
    impl_->files.push_back(std::make_unique<SafetensorsFile>(location.string()));
    for (const auto& entry : impl_->files.back()->entries()) impl_->owner[entry.name] = impl_->files.back().get();
  }
}

SafetensorsCheckpoint::~SafetensorsCheckpoint() = default;
SafetensorsCheckpoint::SafetensorsCheckpoint(SafetensorsCheckpoint&&) noexcept = default;

const std::string& SafetensorsCheckpoint::path() const { return impl_->path; }

std::vector<std::string> SafetensorsCheckpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [name, file] : impl_->owner) out.push_back(name);
  return out;
}

bool SafetensorsCheckpoint::contains(const std::string& name) const { return impl_->owner.count(name) > 0; }

at::Tensor SafetensorsCheckpoint::tensor(const std::string& name) const {
  auto found = impl_->owner.find(name);
  if (found == impl_->owner.end()) throw Error(impl_->path + ": missing tensor '" + name + "'");
  return found->second->tensor(name);
}

void SafetensorsCheckpoint::release(const std::string& name) const {
  auto found = impl_->owner.find(name);
  if (found != impl_->owner.end()) found->second->release(name);
}

at::Tensor SafetensorsCheckpoint::tensor(const std::string& name, at::IntArrayRef shape) const {
  at::Tensor value = tensor(name);
  if (value.sizes() != shape) {
    throw Error(impl_->owner.at(name)->path() + ": tensor '" + name + "' has shape " + shape_text(value.sizes()) +
                ", expected " + shape_text(shape));
  }
  return value;
}

// ---------------------------------------------------------------------------------------------

const char* safetensors_dtype_name(c10::ScalarType type) { return dtype_name(type); }

struct SafetensorsWriter::Impl {
  std::string path;
  std::vector<Spec> order;
  std::size_t next = 0;
  AtomicFile file;
  explicit Impl(std::string p) : path(p), file(std::move(p)) {}
};

SafetensorsWriter::SafetensorsWriter(std::string path, std::vector<Spec> tensors,
                                     const std::map<std::string, std::string>& metadata) {
  std::set<std::string> seen;
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  for (const Spec& spec : tensors) {
    if (spec.name == "__metadata__" || !seen.insert(spec.name).second) {
      throw Error(path + ": cannot write tensor name '" + spec.name + "' (reserved or duplicate)");
    }
    if (!dtype_name(spec.dtype)) {
      throw Error(path + ": tensor '" + spec.name + "' has dtype " + std::string(c10::toString(spec.dtype)) +
                  ", which safetensors cannot store");
    }
    for (auto size : spec.shape) {
      if (size < 0) throw Error(path + ": tensor '" + spec.name + "' has a negative size");
    }
  }
  std::sort(tensors.begin(), tensors.end(), [](const Spec& a, const Spec& b) {
    auto size_a = c10::elementSize(a.dtype), size_b = c10::elementSize(b.dtype);
    return size_a != size_b ? size_a > size_b : a.name < b.name;
  });
  std::uint64_t offset = 0;
  for (const Spec& spec : tensors) {
    std::uint64_t nbytes = c10::elementSize(spec.dtype);
    for (auto size : spec.shape) nbytes *= static_cast<std::uint64_t>(size);
    header[spec.name] = {{"dtype", dtype_name(spec.dtype)}, {"shape", spec.shape}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  impl_ = std::make_unique<Impl>(std::move(path));
  impl_->order = std::move(tensors);
  const std::uint64_t header_size = text.size();
  impl_->file.write(&header_size, 8);
  impl_->file.write(text);
}

SafetensorsWriter::~SafetensorsWriter() = default;

const std::vector<SafetensorsWriter::Spec>& SafetensorsWriter::order() const { return impl_->order; }

void SafetensorsWriter::write(const at::Tensor& tensor) {
  if (impl_->next >= impl_->order.size()) throw Error(impl_->path + ": more tensors written than the header lists");
  const Spec& spec = impl_->order[impl_->next];
  if (tensor.scalar_type() != spec.dtype || tensor.sizes() != at::IntArrayRef(spec.shape)) {
    throw Error(impl_->path + ": tensor '" + spec.name + "' is " + std::string(c10::toString(tensor.scalar_type())) +
                " " + shape_text(tensor.sizes()) + ", the header says " + c10::toString(spec.dtype) + " " +
                shape_text(spec.shape));
  }
  const at::Tensor data = tensor.detach().to(at::kCPU).contiguous();
  impl_->file.write(data.data_ptr(), data.numel() * data.element_size());
  ++impl_->next;
}

void SafetensorsWriter::commit() {
  if (impl_->next != impl_->order.size()) {
    throw Error(impl_->path + ": " + std::to_string(impl_->order.size() - impl_->next) + " of " +
                std::to_string(impl_->order.size()) + " tensors not written");
  }
  impl_->file.commit();
}

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<SafetensorsWriter::Spec> specs;
  std::map<std::string, const at::Tensor*> by_name;
  for (const auto& [name, tensor] : tensors) {
    specs.push_back({name, tensor.scalar_type(), tensor.sizes().vec()});
    by_name.emplace(name, &tensor);
  }
  SafetensorsWriter writer(path, std::move(specs), metadata);
  for (const auto& spec : writer.order()) writer.write(*by_name.at(spec.name));
  writer.commit();
}

}  // namespace neva
