#pragma once
#include <memory>

#include "neva/component.h"
#include "neva/context.h"

namespace torch::nn {
class Module;
}

namespace neva {

// Held for the duration of one forward pass (e.g. an autocast region); ends when destroyed.
class NEVA_API PrecisionScope {
 public:
  virtual ~PrecisionScope();
};

// How numbers are represented while a model runs and trains: fp32, bf16 mixed, bf16-O2, FP8, ...
class NEVA_API PrecisionRecipe : public Component {
 public:
  static constexpr const char* kKind = "precision_recipe";
  ~PrecisionRecipe() override;

  virtual DTypePolicy dtype_policy() const = 0;
  // Prepares a freshly built module (cast parameters, swap in low-precision linears, ...).
  virtual void prepare(torch::nn::Module& module, const RuntimeContext& context) const = 0;
  // Entered around each forward pass; null when nothing needs to be active.
  virtual std::unique_ptr<PrecisionScope> enter_forward(const RuntimeContext& context) const = 0;
};

}  // namespace neva
