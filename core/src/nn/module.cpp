#include "neva/nn/module.h"

#include "neva/error.h"

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

}  // namespace neva::nn
