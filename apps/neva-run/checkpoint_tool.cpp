#include "checkpoint_tool.h"

#include <ATen/ATen.h>

#include <iomanip>
#include <nlohmann/json.hpp>
#include <string>

#include "neva/error.h"
#include "neva/io/json.h"
#include "neva/train/checkpoints.h"
#include "neva/train/distributed_checkpoint.h"

namespace neva {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// A step directory from what the user named: itself, or the latest of a checkpoints/ or run directory.
fs::path step_directory(const fs::path& given) {
  std::error_code error;
  for (const fs::path& checkpoints : {given, given / "checkpoints"}) {
    if (!fs::exists(checkpoints / "latest", error)) continue;
    std::string name = read_file((checkpoints / "latest").string());
    while (!name.empty() && (name.back() == '\n' || name.back() == '\r')) name.pop_back();
    if (CheckpointManager::parse_step(name) < 0) throw Error((checkpoints / "latest").string() + " names '" + name + "', not a checkpoint");
    return checkpoints / name;
  }
  if (!fs::is_directory(given, error)) throw Error(given.string() + ": no such checkpoint directory");
  return given;
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

}  // namespace

int inspect_checkpoint(const fs::path& given, bool as_json, std::ostream& out, std::ostream& err) {
  const fs::path directory = step_directory(given);
  const std::string problem = CheckpointManager::verify(directory);
  const CheckpointReader reader(directory);
  json report = {{"directory", directory.string()}, {"format_version", reader.version()}, {"intact", problem.empty()}};
  if (!problem.empty()) report["problem"] = problem;
  if (reader.manifest().contains("step")) report["step"] = reader.manifest()["step"];
  if (reader.manifest().contains("layout")) report["layout"] = reader.manifest()["layout"];
  std::uint64_t total = 0;
  json tensors = json::array();
  for (const std::string& name : reader.names()) {
    const auto& shape = reader.shape(name);
    std::uint64_t bytes = c10::elementSize(reader.dtype(name));
    for (auto size : shape) bytes *= static_cast<std::uint64_t>(size);
    total += bytes;
    tensors.push_back({{"name", name}, {"shape", shape}, {"dtype", c10::toString(reader.dtype(name))},
                       {"pieces", reader.pieces(name)}, {"bytes", bytes}});
  }
  report["tensors"] = tensors;
  report["tensor_bytes"] = total;
  std::uint64_t file_bytes = 0;
  json files = json::object();
  if (reader.manifest().contains("files")) files = reader.manifest()["files"];
  for (const auto& [name, file] : files.items()) file_bytes += file.value("bytes", std::uint64_t{0});
  report["files"] = files.size();
  report["file_bytes"] = file_bytes;
  if (as_json) {
    out << report.dump(2) << "\n";
  } else {
    out << directory.string() << ": checkpoint format " << reader.version();
    if (report.contains("step")) out << ", step " << report["step"].get<std::int64_t>();
    out << "\n";
    if (report.contains("layout")) {
      const json& layout = report["layout"];
      out << "layout: " << layout.value("world_size", 1) << " rank(s): tensor " << layout.value("tensor_model_parallel_size", 1)
          << ", pipeline " << layout.value("pipeline_model_parallel_size", 1) << " (virtual "
          << layout.value("virtual_pipeline_model_parallel_size", 1) << "), context " << layout.value("context_parallel_size", 1)
          << ", expert " << layout.value("expert_model_parallel_size", 1) << ", data " << layout.value("data_parallel_size", 1)
          << (layout.value("distributed_optimizer", false) ? " with ZeRO-1" : "") << "\n";
    }
    out << files.size() << " file(s), " << std::fixed << std::setprecision(1) << file_bytes / 1048576.0 << " MiB; "
        << tensors.size() << " tensors, " << total / 1048576.0 << " MiB\n";
    for (const json& tensor : tensors) {
      out << "  " << tensor["name"].get<std::string>() << " " << shape_text(tensor["shape"].get<std::vector<std::int64_t>>())
          << " " << tensor["dtype"].get<std::string>() << ", " << tensor["pieces"].get<std::size_t>() << " piece(s)\n";
    }
    out << (problem.empty() ? "intact: every file matches the manifest's size and SHA-256\n" : "");
  }
  if (!problem.empty()) {
    err << "neva-run: " << problem << "\n";
    return 1;
  }
  return 0;
}

int convert_checkpoint(const fs::path& given, const fs::path& to, int tp, int pp, std::ostream& out, std::ostream& err) {
  const fs::path directory = step_directory(given);
  const std::string problem = CheckpointManager::verify(directory);
  if (!problem.empty()) {
    err << "neva-run: " << directory.string() << " is not converted: " << problem << "\n";
    return 1;
  }
  const CheckpointReader reader(directory);
  reshard_checkpoint(reader, to, tp, pp);
  out << directory.string() << " -> " << to.string() << ": " << reader.names().size() << " tensors";
  if (tp * pp == 1) {
    out << " whole in one file";
  } else {
    out << " in the files of " << tp * pp << " ranks (tensor-parallel " << tp << " x pipeline " << pp << ")";
  }
  out << " (" << std::fixed << std::setprecision(1) << static_cast<double>(reader.bytes_read()) / 1048576.0
      << " MiB read); any layout resumes from it\n";
  return 0;
}

}  // namespace neva
