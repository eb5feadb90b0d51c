// The `linear` connector: one affine projection from vision features to the language model's width
// (LLaVA's mm_projector_type "linear"; weights `weight` [output, input] and `bias` [output]).
#include <torch/nn/modules/linear.h>

#include "neva/connector.h"
#include "neva/plugin_abi.h"

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
  LinearConnector(const LinearConfig& config, const neva::RuntimeContext& context)
      : projection_(register_module("projection", torch::nn::Linear(config.input_size, config.output_size))) {
    to(context.device, context.dtypes.params);
  }

  at::Tensor forward(const at::Tensor& vision_features) override { return projection_->forward(vision_features); }
  std::int64_t input_size() const override { return projection_->options.in_features(); }
  std::int64_t output_size() const override { return projection_->options.out_features(); }

 private:
  torch::nn::Linear projection_;
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
