// The `bf16` precision recipe (trainer.precision = "bf16" or "bf16-mixed", NeMo's names):
//   without model.megatron_amp_O2: fp32 weights; matmuls and activations in bf16 under autocast;
//   with it (Megatron's O2): bf16 weights and arithmetic, the optimizer updating fp32 main weights.
// A model held in bf16 with no fp32 copy at all (inference: params = compute = main_params) runs
// without autocast.
// On CPU, bf16 matmuls go through oneDNN, which uses AMX tiles where the CPU has them and
// AVX512-BF16 otherwise (seen in ONEDNN_VERBOSE: brg_matmul:avx10_1_512_amx on a Xeon with AMX).
#include <torch/nn/module.h>

#include <cstring>

#include "neva/plugin_abi.h"
#include "neva/precision.h"
#include "neva/precision_recipe.h"

namespace {

struct Bf16Config : neva::ComponentConfig {
  bool megatron_amp_O2 = false;
  static Bf16Config parse(const char* /*requested_name*/, const neva::ConfigSection& model) {
    Bf16Config config;
    config.megatron_amp_O2 = model.get<bool>("megatron_amp_O2", false);
    return config;
  }
};

class Bf16Precision : public neva::PrecisionRecipe {
 public:
  Bf16Precision(const Bf16Config& config, const neva::RuntimeContext& /*context*/) {
    policy_.compute = at::kBFloat16;
    if (config.megatron_amp_O2) policy_.params = at::kBFloat16;  // main_params stay fp32
  }
  neva::DTypePolicy dtype_policy() const override { return policy_; }
  void prepare(torch::nn::Module& module, const neva::RuntimeContext& context) const override {
    module.to(context.device, context.dtypes.params);
  }
  std::unique_ptr<neva::PrecisionScope> enter_forward(const neva::RuntimeContext& context) const override {
    return neva::mixed_precision_scope(context);
  }

 private:
  neva::DTypePolicy policy_;
};

bool answers_to(const char* name) { return std::strcmp(name, "bf16-mixed") == 0; }

const neva::PluginDescriptor* describe() {
  static const neva::PluginDescriptor descriptor{
      NEVA_PLUGIN_ABI_FIELDS,
      neva::PrecisionRecipe::kKind,
      "bf16",
      "0.1.0",
      NEVA_PLUGIN_TORCH_VERSION,
      "bf16 under autocast with fp32 weights, or bf16 weights with fp32 main weights (megatron_amp_O2)",
      &answers_to,
      &neva::parse_plugin_config<Bf16Config>,
      &neva::create_plugin_component<Bf16Config, Bf16Precision>,
  };
  return &descriptor;
}

}  // namespace

NEVA_PLUGIN(describe)
