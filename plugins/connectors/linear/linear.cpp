// The `linear` connector: one affine projection from vision features to the language model's width
// (LLaVA's mm_projector_type "linear"; weights `weight` [output, input] and `bias` [output]).
#include <torch/nn/functional/linear.h>
#include <torch/nn/modules/linear.h>

#include "neva/connector.h"
#include "neva/plugin_abi.h"
#include "neva/io/weights.h"

namespace {

struct LinearConfig : neva::ConnectorConfig {
  static LinearConfig parse(const char* /*requested_name*/, const neva::ConfigSection& section) {
    LinearConfig config;
    config.read_sizes(section);
    return config;
  }
};

class LinearConnector : public neva::Connector {
 public:
  LinearConnector(const LinearConfig& config, const neva::RuntimeContext& context) {
    // Parameters sit directly on the connector ("weight", "bias"), as on LLaVA's nn.Linear projector;
    // initialised as torch.nn.Linear does.
    torch::nn::Linear initial(config.input_size, config.output_size);
    weight_ = register_parameter("weight", initial->weight.detach());
    bias_ = register_parameter("bias", initial->bias.detach());
    to(context.device, context.dtypes.params);
    if (!config.weights.empty()) {
      // LLaVA's names (model.mm_projector.weight) or a bare projector file (weight, bias).
      neva::SafetensorsCheckpoint checkpoint(config.weights);
      auto map = neva::detect_layout(checkpoint,
                                     {{"model.mm_projector.weight", {{"", "model.mm_projector."}}},
                                      {"mm_projector.weight", {{"", "mm_projector."}}},
                                      {"weight", {{"", ""}}}},
                                     "linear connector");
      neva::load_weights(*this, checkpoint, map, "linear connector");
    }
  }

  at::Tensor forward(const at::Tensor& vision_features) override {
    return torch::nn::functional::linear(vision_features, weight_, bias_);
  }
  std::int64_t input_size() const override { return weight_.size(1); }
  std::int64_t output_size() const override { return weight_.size(0); }

 private:
  at::Tensor weight_;
  at::Tensor bias_;
};

const neva::PluginDescriptor* describe() {
  static const neva::PluginDescriptor descriptor{
      NEVA_PLUGIN_ABI_FIELDS,
      neva::Connector::kKind,
      "linear",
      "0.1.0",
      NEVA_PLUGIN_TORCH_VERSION,
      "Linear projection of vision features (LLaVA 'linear')",
      nullptr,
      &neva::parse_plugin_config<LinearConfig>,
      &neva::create_plugin_component<LinearConfig, LinearConnector>,
  };
  return &descriptor;
}

}  // namespace

NEVA_PLUGIN(describe)
