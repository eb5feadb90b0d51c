#include "neva/nn/module.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "neva/context.h"
#include "neva/error.h"
#include "neva/parallel/mappings.h"
#include "neva/parallel/process_group.h"

namespace neva::nn {

Module::~Module() = default;

at::Tensor& Module::register_parameter(std::string name, at::Tensor tensor, const ParameterSharding& sharding,
                                       bool requires_grad) {
  shardings_[name] = sharding;
  return torch::nn::Module::register_parameter(std::move(name), std::move(tensor), requires_grad);
}

namespace {

// `visit(name, module)` for `root` (name "", whether or not a shared_ptr holds it) and every module
// below it, by full name.
template <class Root, class Visit>
void for_each_module(Root& root, const Visit& visit) {
  visit(std::string(), root);
  for (const auto& item : root.named_modules(/*name_prefix=*/"", /*include_self=*/false)) visit(item.key(), *item.value());
}

template <class Change>
void change_all(torch::nn::Module& root, const char* what, const Change& change) {
  for_each_module(root, [&](const std::string& name, torch::nn::Module& each) {
    auto parameters = each.named_parameters(/*recurse=*/false);
    if (parameters.is_empty()) return;
    auto* module = dynamic_cast<Module*>(&each);
    if (!module) {
      throw Error(std::string("cannot mark the parameters of '") + name + "' with " + what +
                  ": it is not a neva::nn::Module (build it with neva::nn's factories)");
    }
    for (const auto& parameter : parameters) change(module->own_shardings()[parameter.key()]);
  });
}

}  // namespace

std::vector<std::pair<std::string, ParameterSharding>> parameter_shardings(const torch::nn::Module& root) {
  std::vector<std::pair<std::string, ParameterSharding>> out;
  for_each_module(root, [&](const std::string& name, const torch::nn::Module& each) {
    const auto* module = dynamic_cast<const Module*>(&each);
    const std::string prefix = name.empty() ? "" : name + ".";
    for (const auto& parameter : each.named_parameters(/*recurse=*/false)) {
      ParameterSharding sharding;
      if (module) {
        if (auto found = module->own_shardings().find(parameter.key()); found != module->own_shardings().end()) {
          sharding = found->second;
        }
      }
      out.emplace_back(prefix + parameter.key(), sharding);
    }
  });
  return out;
}

void set_expert(torch::nn::Module& module, std::int64_t expert) {
  change_all(module, "an expert index", [expert](ParameterSharding& s) { s.expert = expert; });
}

void set_pipeline_stage(torch::nn::Module& module, std::int64_t stage) {
  change_all(module, "a pipeline stage", [stage](ParameterSharding& s) { s.pipeline_stage = stage; });
}

void set_sequence_parallel(torch::nn::Module& module) {
  change_all(module, "sequence parallelism", [](ParameterSharding& s) { s.sequence_parallel = true; });
}

void set_replicated(torch::nn::Module& root) {
  for_each_module(root, [](const std::string&, torch::nn::Module& each) {
    auto* module = dynamic_cast<Module*>(&each);
    if (!module) return;
    for (auto& [name, sharding] : module->own_shardings()) {
      sharding.tensor_parallel_dim = -1;
      sharding.partition_stride = 1;
      sharding.logical_size = 0;
      sharding.tensor_parallel_replicas = 1;
      sharding.sequence_parallel = false;
    }
  });
}

namespace {

std::int64_t shard_count(const ParameterSharding& s, int tp_size) {
  if (s.tensor_parallel_replicas < 1 || tp_size % s.tensor_parallel_replicas != 0) {
    throw Error("a parameter shared by " + std::to_string(s.tensor_parallel_replicas) +
                " tensor-parallel ranks cannot be split over " + std::to_string(tp_size));
  }
  return tp_size / s.tensor_parallel_replicas;
}

}  // namespace

std::int64_t expert_index(const std::string& name) { return path_index(name, ".experts."); }

std::int64_t path_index(const std::string& name, const std::string& key) {
  const auto at = name.find(key);
  if (at == std::string::npos) return -1;
  const auto begin = at + key.size(), end = name.find('.', begin);
  if (end == std::string::npos || end == begin) return -1;
  std::int64_t index = 0;
  for (auto i = begin; i < end; ++i) {
    if (name[i] < '0' || name[i] > '9') return -1;
    index = index * 10 + (name[i] - '0');
  }
  return index;
}

std::vector<std::pair<std::string, at::Tensor>> gather_experts(const std::vector<std::pair<std::string, at::Tensor>>& local,
                                                               const std::shared_ptr<ProcessGroup>& group) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  std::int64_t first = -1, last = -1;
  for (const auto& [name, tensor] : local) {
    const std::int64_t e = expert_index(name);
    if (e < 0) continue;
    first = first < 0 ? e : std::min(first, e);
    last = std::max(last, e);
  }
  if (first < 0) return out;
  const int ep = group_size(group);
  const std::int64_t per_rank = last - first + 1;
  // The tensors of this rank's first expert give every expert's names and shapes, in one order.
  struct Pattern {
    std::string prefix, suffix;
    at::Tensor like;
  };
  std::vector<Pattern> patterns;
  std::map<std::string, at::Tensor> mine;
  for (const auto& [name, tensor] : local) {
    const std::int64_t e = expert_index(name);
    if (e < 0) continue;
    mine[name] = tensor;
    if (e != first) continue;
    const std::string index = ".experts." + std::to_string(e) + ".";
    const auto at = name.find(index);
    patterns.push_back({name.substr(0, at) + ".experts.", name.substr(at + index.size() - 1), tensor});
  }
  at::NoGradGuard no_grad;
  for (const Pattern& pattern : patterns) {
    for (std::int64_t e = 0; e < per_rank * ep; ++e) {
      const std::string name = pattern.prefix + std::to_string(e) + pattern.suffix;
      const int owner = static_cast<int>(e / per_rank);
      at::Tensor tensor = owner == group_rank(group) ? mine.at(name).detach().contiguous().clone()
                                                     : at::empty_like(pattern.like, at::MemoryFormat::Contiguous);
      if (ep > 1) group->broadcast(tensor, owner).wait();
      out.emplace_back(name, tensor);
    }
  }
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> gather_pipeline_stages(
    const std::vector<std::pair<std::string, at::Tensor>>& local, const std::shared_ptr<ProcessGroup>& group) {
  if (group_size(group) == 1) return local;
  at::NoGradGuard no_grad;
  const c10::Device device = local.empty() ? c10::Device(c10::kCPU) : local.front().second.device();
  // Each later stage sends its tensors' names, dtypes and shapes (JSON: its length, then its bytes),
  // then the tensors in that order.
  if (group->rank() != 0) {
    nlohmann::json header = nlohmann::json::array();
    for (const auto& [name, tensor] : local) {
      header.push_back({{"name", name}, {"dtype", static_cast<int>(tensor.scalar_type())}, {"shape", tensor.sizes().vec()}});
    }
    const std::string text = header.dump();
    at::Tensor length = at::tensor({static_cast<std::int64_t>(text.size())}, at::kLong).to(device);
    group->isend(length, 0, 0).wait();
    at::Tensor bytes = at::empty({static_cast<std::int64_t>(text.size())}, at::kByte);
    std::copy(text.begin(), text.end(), bytes.data_ptr<std::uint8_t>());
    bytes = bytes.to(device);
    group->isend(bytes, 0, 1).wait();
    int tag = 2;
    for (const auto& entry : local) {
      at::Tensor data = entry.second.detach().contiguous();
      group->isend(data, 0, tag++).wait();
    }
    return local;
  }
  std::vector<std::pair<std::string, at::Tensor>> out = local;
  std::set<std::string> seen;
  for (const auto& entry : local) seen.insert(entry.first);
  for (int stage = 1; stage < group->size(); ++stage) {
    at::Tensor length = at::zeros({1}, at::TensorOptions(at::kLong).device(device));
    group->irecv(length, stage, 0).wait();
    at::Tensor bytes = at::empty({length.cpu().item<std::int64_t>()}, at::TensorOptions(at::kByte).device(device));
    group->irecv(bytes, stage, 1).wait();
    bytes = bytes.cpu();
    const auto* begin = reinterpret_cast<const char*>(bytes.data_ptr<std::uint8_t>());
    const nlohmann::json header = nlohmann::json::parse(begin, begin + bytes.numel());
    int tag = 2;
    for (const auto& item : header) {
      at::Tensor data = at::empty(item["shape"].get<std::vector<std::int64_t>>(),
                                  at::TensorOptions(static_cast<at::ScalarType>(item["dtype"].get<int>())).device(device));
      group->irecv(data, stage, tag++).wait();
      if (seen.insert(item["name"].get<std::string>()).second) out.emplace_back(item["name"].get<std::string>(), data);
    }
  }
  return out;
}

std::vector<std::int64_t> whole_shape(const at::Tensor& shard, const ParameterSharding& s, int tp_size) {
  std::vector<std::int64_t> shape = shard.sizes().vec();
  if (s.tensor_parallel_dim < 0) return shape;
  const auto d = static_cast<std::size_t>(s.tensor_parallel_dim);
  shape[d] = s.logical_size > 0 ? s.logical_size : shape[d] * shard_count(s, tp_size);
  return shape;
}

at::Tensor shard_of(const at::Tensor& whole, const ParameterSharding& s, int tp_rank, int tp_size,
                    std::int64_t local_extent) {
  if (s.tensor_parallel_dim < 0) return whole;
  const std::int64_t d = s.tensor_parallel_dim, shards = shard_count(s, tp_size);
  const std::int64_t index = tp_rank / s.tensor_parallel_replicas;
  if (s.partition_stride > 1) {
    // Interleaved blocks (fused q/k/v, gate/up), each split separately.
    if (whole.size(d) != local_extent * shards || whole.size(d) % (s.partition_stride * shards) != 0) {
      throw Error("a strided parameter's whole size " + std::to_string(whole.size(d)) + " is not " +
                  std::to_string(shards) + " x its shard's " + std::to_string(local_extent));
    }
    const std::int64_t block = whole.size(d) / s.partition_stride, chunk = block / shards;
    std::vector<at::Tensor> parts;
    for (std::int64_t b = 0; b < s.partition_stride; ++b) parts.push_back(whole.narrow(d, b * block + index * chunk, chunk));
    return at::cat(parts, d);
  }
  const std::int64_t padded = local_extent * shards;
  if (whole.size(d) > padded || (whole.size(d) < padded && s.logical_size != whole.size(d))) {
    throw Error("a parameter split in " + std::to_string(shards) + " shards of " + std::to_string(local_extent) +
                " along dimension " + std::to_string(d) + " cannot come from a whole tensor of " +
                std::to_string(whole.size(d)));
  }
  const std::int64_t begin = index * local_extent;
  const std::int64_t real = std::clamp<std::int64_t>(whole.size(d) - begin, 0, local_extent);
  if (real == local_extent) return whole.narrow(d, begin, local_extent);
  std::vector<std::int64_t> shape = whole.sizes().vec();
  shape[static_cast<std::size_t>(d)] = local_extent;
  at::Tensor out = at::zeros(shape, whole.options());  // the padding rows
  if (real > 0) out.narrow(d, 0, real).copy_(whole.narrow(d, begin, real));
  return out;
}

at::Tensor unshard(const at::Tensor& shard, const ParameterSharding& s, const std::shared_ptr<ProcessGroup>& group) {
  const int tp_size = group_size(group);
  if (s.tensor_parallel_dim < 0 || tp_size == 1) return shard;
  const std::int64_t d = s.tensor_parallel_dim, shards = shard_count(s, tp_size), local = shard.size(d);
  at::Tensor all = all_gather_along(group, shard, d);  // [tp_size x local] along d
  std::vector<at::Tensor> distinct;
  for (std::int64_t i = 0; i < shards; ++i) distinct.push_back(all.narrow(d, i * s.tensor_parallel_replicas * local, local));
  at::Tensor whole;
  if (s.partition_stride == 1 && s.tensor_parallel_replicas == 1) {
    whole = all;  // the shards in order already: no second copy
  } else if (s.partition_stride > 1) {
    const std::int64_t chunk = local / s.partition_stride;
    std::vector<at::Tensor> parts;
    for (std::int64_t b = 0; b < s.partition_stride; ++b) {
      for (const auto& piece : distinct) parts.push_back(piece.narrow(d, b * chunk, chunk));
    }
    whole = at::cat(parts, d);
  } else {
    whole = at::cat(distinct, d);
  }
  return s.logical_size > 0 && s.logical_size != whole.size(d) ? whole.narrow(d, 0, s.logical_size).contiguous() : whole;
}

}  // namespace neva::nn
