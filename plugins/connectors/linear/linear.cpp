// The `linear` connector: one affine projection from vision features to the language model's width
// (LLaVA's mm_projector_type "linear"; weights `weight` [output, input] and `bias` [output]).
#include "neva/connector.h"
#include "neva/nn/linear.h"
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
    // Parameters sit directly on the connector ("weight", "bias"), as on LLaVA's nn.Linear projector:
    // the layer is not a child module, its tensors are the connector's own.
    projection_ = neva::nn::linear(context, config.input_size, config.output_size);
    register_parameter("weight", projection_->weight);
    register_parameter("bias", projection_->bias);
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

  at::Tensor forward(const at::Tensor& vision_features) override { return projection_->forward(vision_features); }
  std::int64_t input_size() const override { return projection_->in_features(); }
  std::int64_t output_size() const override { return projection_->out_features(); }

 private:
  neva::nn::Linear projection_;
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
