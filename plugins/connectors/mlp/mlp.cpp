// The `mlp` connector: LLaVA's mlp{N}x_gelu projector, Linear(input, output) followed by N-1 times
// [exact GELU, Linear(output, output)]. Registered so that its parameters are named like LLaVA's
// nn.Sequential (0.weight, 0.bias, 2.weight, ...), which keeps checkpoint mapping one-to-one.
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>

#include <cstring>
#include <regex>

#include "neva/connector.h"
#include "neva/nn/linear.h"
#include "neva/plugin_abi.h"
#include "neva/io/weights.h"

namespace {

// "mlp3x_gelu" -> 3; 0 when the name is not of that form.
std::int64_t depth_from_name(const char* name) {
  static const std::regex pattern("mlp([1-9][0-9]{0,2})x_gelu");
  std::cmatch match;
  return std::regex_match(name, match, pattern) ? std::stoll(match[1].str()) : 0;
}

bool answers_to(const char* name) { return depth_from_name(name) > 0; }

struct MlpConfig : neva::ConnectorConfig {
  std::int64_t depth = 2;  // number of Linear layers

  static MlpConfig parse(const char* requested_name, const neva::ConfigSection& section) {
    MlpConfig config;
    config.read_sizes(section);
    if (std::int64_t from_name = depth_from_name(requested_name)) {
      config.depth = from_name;  // the name fixes the depth; a `depth` key would contradict it
    } else {
      config.depth = section.integer("depth", config.depth, 1, 999);
    }
    return config;
  }
};

class MlpConnector : public neva::Connector {
 public:
  MlpConnector(const MlpConfig& config, const neva::RuntimeContext& context)
      : input_size_(config.input_size), output_size_(config.output_size) {
    layers_->push_back(neva::nn::linear(context, config.input_size, config.output_size));
    for (std::int64_t i = 1; i < config.depth; ++i) {
      layers_->push_back(torch::nn::GELU(torch::nn::GELUOptions().approximate("none")));
      layers_->push_back(neva::nn::linear(context, config.output_size, config.output_size));
    }
    // Registered directly so names are "0.weight", "2.weight", ... as in LLaVA's mm_projector.
    for (const auto& item : layers_->named_children()) register_module(item.key(), item.value());
    to(context.device, context.dtypes.params);
    if (!config.weights.empty()) load(config.weights, config.depth);
  }

  at::Tensor forward(const at::Tensor& vision_features) override { return layers_->forward(vision_features); }
  std::int64_t input_size() const override { return input_size_; }
  std::int64_t output_size() const override { return output_size_; }

 private:
  // LLaVA's own names (model.mm_projector.N), a bare projector file (N.weight), or llava-hf's
  // multi_modal_projector.linear_1/2 (two layers only) in either layout.
  void load(const std::string& path, std::int64_t depth) {
    neva::SafetensorsCheckpoint checkpoint(path);
    std::vector<neva::WeightLayout> layouts = {{"model.mm_projector.0.weight", {{"", "model.mm_projector."}}},
                                               {"mm_projector.0.weight", {{"", "mm_projector."}}}};
    if (depth == 2) {
      for (std::string prefix : {"multi_modal_projector.", "model.multi_modal_projector."}) {
        layouts.push_back({prefix + "linear_1.weight", {{"0.", prefix + "linear_1."}, {"2.", prefix + "linear_2."}}});
      }
    }
    layouts.push_back({"0.weight", {{"", ""}}});
    neva::load_weights(*this, checkpoint, neva::detect_layout(checkpoint, layouts, "mlp connector"),
                       "mlp" + std::to_string(depth) + "x_gelu connector");
  }

  std::int64_t input_size_;
  std::int64_t output_size_;
  torch::nn::Sequential layers_;
};

const neva::PluginDescriptor* describe() {
  static const neva::PluginDescriptor descriptor{
      NEVA_PLUGIN_ABI_FIELDS,
      neva::Connector::kKind,
      "mlp",
      "0.1.0",
      NEVA_PLUGIN_TORCH_VERSION,
      "MLP projector with exact GELU (LLaVA 'mlp{N}x_gelu'; answers to mlp2x_gelu, mlp3x_gelu, ...)",
      &answers_to,
      &neva::parse_plugin_config<MlpConfig>,
      &neva::create_plugin_component<MlpConfig, MlpConnector>,
  };
  return &descriptor;
}

}  // namespace

NEVA_PLUGIN(describe)
