#include "neva/precision.h"

#include <ATen/autocast_mode.h>
#include <torch/nn/module.h>

#include "neva/error.h"

namespace neva {

namespace {

// Autocast on the context's device type for as long as it lives; restores what was there before.
class AutocastScope : public PrecisionScope {
 public:
  AutocastScope(c10::DeviceType device, at::ScalarType dtype)
      : device_(device),
        was_enabled_(at::autocast::is_autocast_enabled(device)),
        previous_dtype_(at::autocast::get_autocast_dtype(device)) {
    at::autocast::set_autocast_enabled(device_, true);
    at::autocast::set_autocast_dtype(device_, dtype);
  }
  ~AutocastScope() override {
    at::autocast::set_autocast_enabled(device_, was_enabled_);
    at::autocast::set_autocast_dtype(device_, previous_dtype_);
    if (!was_enabled_) at::autocast::clear_cache();
  }

 private:
  c10::DeviceType device_;
  bool was_enabled_;
  at::ScalarType previous_dtype_;
};

class BuiltinPrecision : public PrecisionRecipe {
 public:
  explicit BuiltinPrecision(DTypePolicy policy) : policy_(policy) {}
  DTypePolicy dtype_policy() const override { return policy_; }
  void prepare(torch::nn::Module& module, const RuntimeContext& context) const override {
    module.to(context.device, policy_.params);
  }
  std::unique_ptr<PrecisionScope> enter_forward(const RuntimeContext& context) const override {
    if (policy_.compute == at::kFloat) return nullptr;
    return std::make_unique<AutocastScope>(context.device.type(), policy_.compute);
  }

 private:
  DTypePolicy policy_;
};

}  // namespace

std::unique_ptr<PrecisionRecipe> make_precision_recipe(const std::string& precision, bool megatron_amp_O2) {
  DTypePolicy policy;
  if (precision == "32") {
    if (megatron_amp_O2) throw Error("megatron_amp_O2 needs bf16 precision");
    return std::make_unique<BuiltinPrecision>(policy);
  }
  if (precision != "bf16" && precision != "bf16-mixed") {
    throw Error("unknown precision '" + precision + "' (expected 32, bf16 or bf16-mixed)");
  }
  policy.compute = at::kBFloat16;
  if (megatron_amp_O2) policy.params = at::kBFloat16;  // main_params stay fp32
  return std::make_unique<BuiltinPrecision>(policy);
}

}  // namespace neva
