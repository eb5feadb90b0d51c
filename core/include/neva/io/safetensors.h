#pragma once
// safetensors checkpoints: a validating, memory-mapped reader, sharded checkpoints
// (*.safetensors.index.json), and an atomic writer.
//
// Validation follows the reference implementation: the header is at most 100,000,000 bytes, valid
// UTF-8 JSON starting with '{', without duplicate keys; every dtype is known; shapes multiply
// without overflow to exactly the bytes given; data offsets are contiguous from 0 and cover the
// buffer to the last byte of the file. Tensor names are data: they never reach the filesystem.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "neva/api.h"

namespace neva {

struct SafetensorsEntry {
  std::string name;
  std::string dtype;  // as written: "F32", "BF16", "F8_E4M3", ...
  c10::ScalarType scalar_type;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;  // offsets into the data buffer, [begin, end)
  std::uint64_t end = 0;
};

// One .safetensors file, validated when opened and memory-mapped (copy-on-write, never written
// back). Tensors are zero-copy views of the mapping where the dtype's alignment allows, and keep
// the mapping alive while they live.
class NEVA_API SafetensorsFile {
 public:
  static constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

  // Throws neva::Error naming the file and what is wrong.
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;

  const std::string& path() const;
  const std::vector<SafetensorsEntry>& entries() const;  // in file order
  const std::map<std::string, std::string>& metadata() const;
  bool contains(const std::string& name) const;
  const SafetensorsEntry& entry(const std::string& name) const;  // throws when absent
  // The tensor on CPU, in its stored dtype.
  at::Tensor tensor(const std::string& name) const;
  // Gives the memory of tensor `name`'s whole pages back (madvise MADV_DONTNEED): for a reader that has
  // copied it out, so that loading a model holds each weight once, not once more in the mapping. A
  // view taken before reads the file again where touched (anything written through it is dropped).
  void release(const std::string& name) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A checkpoint: one .safetensors file, or the shards named by a *.safetensors.index.json, or a
// directory holding either (model.safetensors / model.safetensors.index.json).
class NEVA_API SafetensorsCheckpoint {
 public:
  explicit SafetensorsCheckpoint(const std::string& path);
  ~SafetensorsCheckpoint();
  SafetensorsCheckpoint(SafetensorsCheckpoint&&) noexcept;

  const std::string& path() const;
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const;
  // Throws neva::Error "<checkpoint>: missing tensor 'name'" when absent.
  at::Tensor tensor(const std::string& name) const;
  // tensor(name) checked against `shape`: "<file>: tensor 'name' has shape [..], expected [..]".
  at::Tensor tensor(const std::string& name, at::IntArrayRef shape) const;
  // SafetensorsFile::release in the file that holds it.
  void release(const std::string& name) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The safetensors name of a dtype ("F32", "BF16", ...), or nullptr when safetensors cannot store it.
NEVA_API const char* safetensors_dtype_name(c10::ScalarType type);

// A .safetensors file written one tensor at a time: the header (every tensor's name, dtype and shape)
// first, then each tensor's data in order(), so only the tensor being written is held in memory (a
// checkpoint or an export larger than RAM streams through). Atomic: a temporary file in the same
// directory, fsync, rename, fsync of the directory at commit(); not committed, nothing appears.
// Header padded with spaces to a multiple of 8; tensors ordered by descending alignment, then name,
// so every tensor's data is aligned.
class NEVA_API SafetensorsWriter {
 public:
  struct Spec {
    std::string name;
    c10::ScalarType dtype;
    std::vector<std::int64_t> shape;
  };
  // Throws neva::Error naming `path` and the tensor for a reserved or duplicate name, a dtype
  // safetensors cannot store, or a negative size.
  SafetensorsWriter(std::string path, std::vector<Spec> tensors, const std::map<std::string, std::string>& metadata = {});
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  // The order write() takes the tensors in.
  const std::vector<Spec>& order() const;
  // The next tensor's data (any device, contiguous or not), checked against its spec.
  void write(const at::Tensor& tensor);
  // After the last tensor: fsync, rename into place.
  void commit();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Writes tensors (any device, contiguous or not) to `path` atomically, as SafetensorsWriter does.
NEVA_API void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                                const std::map<std::string, std::string>& metadata = {});

}  // namespace neva
