#include "neva/io/weights.h"

#include <torch/csrc/autograd/variable.h>

#include <map>
#include <set>

#include "neva/context.h"
#include "neva/error.h"
#include "neva/nn/module.h"
#include "page_advice.h"

namespace neva {

namespace {
bool starts_with(const std::string& text, const std::string& prefix) { return text.compare(0, prefix.size(), prefix) == 0; }

// A large CPU parameter about to be filled by a copy: its pages are asked to be transparent huge pages
// (MADV_HUGEPAGE; what the kernel does with it follows /sys/kernel/mm/transparent_hugepage), which the
// copy's first touch then allocates. Decoding streams every weight once per token, and with 4 KiB pages
// it pays a TLB miss every 4 KiB: bf16 decode of a 1.1B Llama 5-10% faster on the project's EPYC in
// paired runs (docs/benchmarks.md). Pages already touched (reused heap memory) stay as they are
// until the kernel collapses them. Advice only: a refusal changes nothing but speed.
void prefer_huge_pages(const at::Tensor& parameter) {
  constexpr std::size_t kHugePage = std::size_t{2} << 20;
  if (parameter.device().is_cpu() && parameter.nbytes() >= 2 * kHugePage) {
    detail::advise_whole_pages(parameter.data_ptr(), parameter.nbytes(), MADV_HUGEPAGE);
  }
}
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
                  const std::string& what, const std::shared_ptr<ProcessGroup>& tensor_group) {
  std::set<std::string> used, mapped;
  torch::NoGradGuard no_grad;
  const int tp = group_size(tensor_group), tp_rank = group_rank(tensor_group);
  std::map<std::string, nn::ParameterSharding> shardings;
  if (tp > 1) {
    for (auto& [name, sharding] : nn::parameter_shardings(module)) shardings.emplace(name, sharding);
  }
  for (auto& item : module.named_parameters()) {
    std::string name = map.checkpoint_name(item.key());
    if (name.empty()) throw Error(what + ": no checkpoint name for parameter '" + item.key() + "'");
    at::Tensor& parameter = item.value();
    const auto sharding = shardings.find(item.key());
    // A tensor the checkpoint gives to two parameters (a tied copy) is mapped into the first only:
    // two parameters must not share memory unless the module ties them itself.
    const bool first_use = used.insert(name).second;
    if (sharding == shardings.end() || sharding->second.tensor_parallel_dim < 0) {
      const at::Tensor stored = checkpoint.tensor(name, parameter.sizes());
      // Only a parameter that is its storage's one user and all of it: copy_ fills memory shared with
      // other tensors (a view of a fused buffer holds its base, which holds the storage too),
      // set_data would leave them behind.
      const bool alone = parameter.storage().use_count() == 1 && parameter.storage().nbytes() == parameter.nbytes();
      if (first_use && alone && parameter.device().is_cpu() && stored.scalar_type() == parameter.scalar_type() &&
          stored.is_contiguous()) {
        // The parameter becomes the file's (copy-on-write) pages: nothing is copied, pages are read
        // from the page cache when first touched, and an update (training) copies just the pages it
        // writes. The file is never written; the mapping lives as long as the parameter.
        parameter.set_data(stored);
        torch::autograd::impl::bump_version(parameter);  // as copy_ would: caches keyed on it see new values
        mapped.insert(name);
        continue;
      }
      prefer_huge_pages(parameter);
      parameter.copy_(stored);
    } else {  // this rank's shard of the whole tensor
      const nn::ParameterSharding& s = sharding->second;
      const at::Tensor whole = checkpoint.tensor(name, nn::whole_shape(parameter, s, tp));
      prefer_huge_pages(parameter);
      parameter.copy_(nn::shard_of(whole, s, tp_rank, tp, parameter.size(s.tensor_parallel_dim)));
    }
    // Copied: the mapping's pages go back (peak memory: the weights once), unless a parameter maps them.
    if (!mapped.count(name)) checkpoint.release(name);
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
