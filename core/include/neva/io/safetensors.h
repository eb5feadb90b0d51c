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

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The safetensors name of a dtype ("F32", "BF16", ...), or nullptr when safetensors cannot store it.
NEVA_API const char* safetensors_dtype_name(c10::ScalarType type);

// Writes tensors (any device, contiguous or not) to `path` atomically: a temporary file in the same
// directory, fsync, rename, fsync of the directory. Header padded with spaces to a multiple of 8;
// tensors ordered by descending alignment, then name, so every tensor's data is aligned.
NEVA_API void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                                const std::map<std::string, std::string>& metadata = {});

}  // namespace neva
