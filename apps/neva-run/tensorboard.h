#pragma once
// TensorBoard event files beside metrics.jsonl: what NeMo and Megatron users open (`tensorboard
// --logdir RUN_DIR`). Records are TensorFlow's TFRecord framing (length, masked CRC-32C of the length,
// the serialized Event, masked CRC-32C of it), the Events encoded by protobuf from the TensorFlow
// schema (tensorboardX's .proto files), the checksums by Boost.CRC.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

namespace neva {

class TensorBoardWriter {
 public:
  // A new events.out.tfevents.<seconds>.<host>.<pid>.neva file in `directory` (TensorBoard reads every
  // such file of a directory, in name order). `resumed_step` >= 0: the run resumes after that step,
  // and a SessionLog START at the next step tells TensorBoard to drop what an earlier run of the
  // directory logged past the checkpoint. Throws Error naming the file when it cannot be created.
  TensorBoardWriter(const std::filesystem::path& directory, std::int64_t resumed_step);
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  const std::filesystem::path& path() const { return path_; }
  // Every number in `item` (metrics.jsonl's record of a step) as a scalar at `step`, tagged by its
  // path ("loss", "communication/tensor/all_reduce/bytes"); "step" itself and non-numbers are left out.
  // Flushed: a crash loses at most the record being written (TensorBoard skips a torn last record).
  void scalars(std::int64_t step, const nlohmann::json& item);

 private:
  void write(const std::string& event);
  std::filesystem::path path_;
  std::FILE* file_ = nullptr;
};

// TFRecord's checksum of `size` bytes: CRC-32C (Castagnoli), rotated right 15 bits plus 0xa282ead8.
std::uint32_t masked_crc32c(const void* data, std::size_t size);

}  // namespace neva
