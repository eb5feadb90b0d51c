#include "neva/io/weights.h"

#include <set>

#include "neva/error.h"

namespace neva {

namespace {
bool starts_with(const std::string& text, const std::string& prefix) { return text.compare(0, prefix.size(), prefix) == 0; }
}  // namespace

std::string WeightMap::checkpoint_name(const std::string& module_name) const {
  const std::pair<std::string, std::string>* best = nullptr;
  for (const auto& rule : prefixes) {
    if (starts_with(module_name, rule.first) && (!best || rule.first.size() > best->first.size())) best = &rule;
  }
  return best ? best->second + module_name.substr(best->first.size()) : std::string();
}

WeightMap detect_layout(const SafetensorsCheckpoint& checkpoint, const std::vector<WeightLayout>& layouts,
                        const std::string& what, std::function<bool(const std::string&)> may_ignore) {
  std::string probes;
  for (const auto& layout : layouts) {
    if (checkpoint.contains(layout.probe)) return WeightMap{layout.prefixes, std::move(may_ignore)};
    probes += (probes.empty() ? "" : ", ") + layout.probe;
  }
  throw Error(checkpoint.path() + ": no " + what + " weights found (looked for " + probes + ")");
}

void load_weights(torch::nn::Module& module, const SafetensorsCheckpoint& checkpoint, const WeightMap& map,
                  const std::string& what) {
  std::set<std::string> used;
  torch::NoGradGuard no_grad;
  for (auto& item : module.named_parameters()) {
    std::string name = map.checkpoint_name(item.key());
    if (name.empty()) throw Error(what + ": no checkpoint name for parameter '" + item.key() + "'");
    item.value().copy_(checkpoint.tensor(name, item.value().sizes()));
    used.insert(name);
  }
  for (const auto& name : checkpoint.names()) {
    if (used.count(name)) continue;
    for (const auto& [module_prefix, checkpoint_prefix] : map.prefixes) {
      if (!starts_with(name, checkpoint_prefix)) continue;
      std::string module_name = module_prefix + name.substr(checkpoint_prefix.size());
      if (map.may_ignore && map.may_ignore(module_name)) break;
      throw Error(checkpoint.path() + ": unexpected tensor '" + name + "' for the " + what +
                  " (its configuration has no such parameter)");
    }
  }
}

}  // namespace neva
