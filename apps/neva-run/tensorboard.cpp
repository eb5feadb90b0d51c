#include "tensorboard.h"

#include <unistd.h>

#include <boost/crc.hpp>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <vector>

#include "neva/error.h"
#include "tensorboardX/proto/event.pb.h"

namespace neva {

namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Every number of `value` under `prefix`, depth first in key order.
void flatten(const std::string& prefix, const nlohmann::json& value, std::vector<std::pair<std::string, double>>& out) {
  if (value.is_number()) {
    out.emplace_back(prefix, value.get<double>());
  } else if (value.is_object()) {
    for (const auto& [key, item] : value.items()) flatten(prefix.empty() ? key : prefix + "/" + key, item, out);
  }
}

}  // namespace

std::uint32_t masked_crc32c(const void* data, std::size_t size) {
  boost::crc_optimal<32, 0x1EDC6F41, 0xFFFFFFFF, 0xFFFFFFFF, true, true> crc;
  crc.process_bytes(data, size);
  const std::uint32_t value = crc.checksum();
  return ((value >> 15) | (value << 17)) + 0xa282ead8u;
}

TensorBoardWriter::TensorBoardWriter(const std::filesystem::path& directory, std::int64_t resumed_step) {
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  const double started = now_seconds();
  path_ = directory / ("events.out.tfevents." + std::to_string(static_cast<std::int64_t>(started)) + "." + host + "." +
                       std::to_string(::getpid()) + ".neva");
  file_ = std::fopen(path_.c_str(), "wb");
  if (!file_) throw Error(path_.string() + ": cannot create the TensorBoard event file: " + std::strerror(errno));
  tensorboardX::Event version;
  version.set_wall_time(started);
  version.set_file_version("brain.Event:2");
  write(version.SerializeAsString());
  if (resumed_step >= 0) {
    tensorboardX::Event start;
    start.set_wall_time(started);
    start.set_step(resumed_step + 1);
    start.mutable_session_log()->set_status(tensorboardX::SessionLog::START);
    write(start.SerializeAsString());
  }
}

TensorBoardWriter::~TensorBoardWriter() {
  if (file_) std::fclose(file_);
}

void TensorBoardWriter::scalars(std::int64_t step, const nlohmann::json& item) {
  std::vector<std::pair<std::string, double>> values;
  flatten("", item, values);
  tensorboardX::Event event;
  event.set_wall_time(now_seconds());
  event.set_step(step);
  for (const auto& [tag, number] : values) {
    if (tag == "step") continue;
    auto* value = event.mutable_summary()->add_value();
    value->set_tag(tag);
    value->set_simple_value(static_cast<float>(number));
  }
  write(event.SerializeAsString());
}

void TensorBoardWriter::write(const std::string& event) {
  const std::uint64_t length = event.size();
  const std::uint32_t length_crc = masked_crc32c(&length, sizeof(length)), data_crc = masked_crc32c(event.data(), event.size());
  const bool written = std::fwrite(&length, sizeof(length), 1, file_) == 1 &&
                       std::fwrite(&length_crc, sizeof(length_crc), 1, file_) == 1 &&
                       (event.empty() || std::fwrite(event.data(), event.size(), 1, file_) == 1) &&
                       std::fwrite(&data_crc, sizeof(data_crc), 1, file_) == 1 && std::fflush(file_) == 0;
  if (!written) throw Error(path_.string() + ": cannot write the TensorBoard event file: " + std::strerror(errno));
}

}  // namespace neva
