#pragma once
// Loading a module's parameters from a checkpoint whose names differ from the module's by prefix
// (HF model vs. LLaVA composite layouts), strictly: every parameter must be present with its shape,
// and every checkpoint tensor under the mapped prefixes must be used.
#include <torch/nn/module.h>

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "neva/api.h"
#include "neva/io/safetensors.h"

namespace neva {

class ProcessGroup;

struct WeightMap {
  // (module prefix, checkpoint prefix) pairs: a parameter "model.norm.weight" is read from
  // "language_model.model.norm.weight" under {"model.", "language_model.model."}. The longest
  // matching module prefix wins; a parameter no prefix matches is an error.
  std::vector<std::pair<std::string, std::string>> prefixes;
  // Checkpoint tensors under the prefixes that may go unused (a tied lm_head copy, buffers), given
  // by their module-side name.
  std::function<bool(const std::string& module_name)> may_ignore;

  // The checkpoint name for a module name, or "" when no prefix maps it.
  std::string checkpoint_name(const std::string& module_name) const;
};

// One way a checkpoint may name a component's tensors, recognised by one tensor it must hold.
struct WeightLayout {
  std::string probe;  // a checkpoint tensor name present only in this layout
  std::vector<std::pair<std::string, std::string>> prefixes;
};

// The first layout whose probe `checkpoint` holds (with `may_ignore` attached); throws naming the
// probes looked for when none matches.
NEVA_API WeightMap detect_layout(const SafetensorsCheckpoint& checkpoint, const std::vector<WeightLayout>& layouts,
                                 const std::string& what,
                                 std::function<bool(const std::string&)> may_ignore = nullptr);

// Loads every parameter of `module` from `checkpoint` (converting dtype, keeping device). A CPU
// parameter of the stored dtype, not split over tensor parallelism, becomes a view of the file's
// copy-on-write mapping instead of a copy (llama.cpp's and safetensors' mmap loading): no copy, no
// second copy in memory, pages read when first used; writing to it (training) copies the pages written
// and never touches the file. Replacing the file with a new one (a checkpoint's rename) is safe; a
// program truncating the file in place while neva runs is not.
// `what` names the component in errors ("llama language model"). With a tensor-parallel group of
// more than one rank, a parameter split over it (neva::nn's ParameterSharding) takes its shard of the
// whole checkpoint tensor.
NEVA_API void load_weights(torch::nn::Module& module, const SafetensorsCheckpoint& checkpoint, const WeightMap& map,
                           const std::string& what, const std::shared_ptr<ProcessGroup>& tensor_group = nullptr);

}  // namespace neva
