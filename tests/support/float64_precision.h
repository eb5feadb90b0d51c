#pragma once
// fp64 throughout, no autocast: what the equivalence checks (accumulation, data parallelism)
// compare in.
#include <torch/nn/module.h>

#include "neva/precision_recipe.h"

namespace neva::test {

class Float64 : public PrecisionRecipe {
 public:
  DTypePolicy dtype_policy() const override { return {at::kDouble, at::kDouble, at::kDouble}; }
  void prepare(torch::nn::Module& module, const RuntimeContext& context) const override {
    module.to(context.device, context.dtypes.params);
  }
  std::unique_ptr<PrecisionScope> enter_forward(const RuntimeContext&) const override { return nullptr; }
};

}  // namespace neva::test
