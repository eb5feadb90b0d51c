// safetensors: a file's header and tensor table (SafetensorsFile), and an index of shards
// (SafetensorsCheckpoint). Every tensor found is read to its last byte. Input: byte 0 even = a
// .safetensors file; odd = a model.safetensors.index.json beside a valid shard.
#include <ATen/ATen.h>

#include "fuzz_support.h"
#include "neva/error.h"
#include "neva/io/safetensors.h"

namespace {

void touch(const at::Tensor& tensor) {
  if (tensor.numel() == 0) return;
  const auto* bytes = static_cast<const volatile char*>(tensor.data_ptr());
  (void)bytes[0];
  (void)bytes[tensor.nbytes() - 1];
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  static const auto directory = neva::fuzz::scratch("safetensors");
  try {
    if (data[0] % 2 == 0) {
      neva::fuzz::write(directory / "input.safetensors", data + 1, size - 1);
      neva::SafetensorsFile file((directory / "input.safetensors").string());
      for (const auto& entry : file.entries()) touch(file.tensor(entry.name));
    } else {
      static bool shard_written = false;
      if (!shard_written) {
        neva::write_safetensors((directory / "shard.safetensors").string(),
                                {{"a", at::arange(6, at::kFloat).view({2, 3})}, {"b", at::ones({4}, at::kBFloat16)}});
        shard_written = true;
      }
      neva::fuzz::write(directory / "model.safetensors.index.json", data + 1, size - 1);
      neva::SafetensorsCheckpoint checkpoint(directory.string());
      for (const auto& name : checkpoint.names()) touch(checkpoint.tensor(name));
    }
  } catch (const neva::Error&) {
    // a clear refusal: what we want
  }
  return 0;
}
