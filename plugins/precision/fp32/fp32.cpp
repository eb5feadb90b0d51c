// The `fp32` precision recipe (trainer.precision = 32, NeMo's default): fp32 weights, fp32
// arithmetic, no autocast.
#include <torch/nn/module.h>

#include <cstring>

#include "neva/plugin_abi.h"
#include "neva/precision_recipe.h"

namespace {

struct Fp32Config : neva::ComponentConfig {
  // Reads the model section: megatron_amp_O2 (bf16 weights with fp32 main weights) needs bf16.
  static Fp32Config parse(const char* /*requested_name*/, const neva::ConfigSection& model) {
    if (model.get<bool>("megatron_amp_O2", false)) {
      model.fail("megatron_amp_O2", "O2 keeps bf16 weights with fp32 main weights; it needs trainer.precision = \"bf16\"");
    }
    return {};
  }
};

class Fp32Precision : public neva::PrecisionRecipe {
 public:
  Fp32Precision(const Fp32Config& /*config*/, const neva::RuntimeContext& /*context*/) {}
  neva::DTypePolicy dtype_policy() const override { return {}; }
  void prepare(torch::nn::Module& module, const neva::RuntimeContext& context) const override {
    module.to(context.device, context.dtypes.params);
  }
  std::unique_ptr<neva::PrecisionScope> enter_forward(const neva::RuntimeContext& /*context*/) const override {
    return nullptr;
  }
};

bool answers_to(const char* name) { return std::strcmp(name, "32") == 0 || std::strcmp(name, "32-true") == 0; }

const neva::PluginDescriptor* describe() {
  static const neva::PluginDescriptor descriptor{
      NEVA_PLUGIN_ABI_FIELDS,
      neva::PrecisionRecipe::kKind,
      "fp32",
      "0.1.0",
      NEVA_PLUGIN_TORCH_VERSION,
      "fp32 weights and arithmetic (trainer.precision = 32)",
      &answers_to,
      &neva::parse_plugin_config<Fp32Config>,
      &neva::create_plugin_component<Fp32Config, Fp32Precision>,
  };
  return &descriptor;
}

}  // namespace

NEVA_PLUGIN(describe)
