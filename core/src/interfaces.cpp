// Key functions of every interface: their vtables and typeinfo live in libneva_core only.
#include "neva/component.h"
#include "neva/error.h"
#include "neva/connector.h"
#include "neva/language_backbone.h"
#include "neva/parallel_strategy.h"
#include "neva/precision_recipe.h"
#include "neva/vision_encoder.h"

namespace neva {

Component::~Component() = default;
ComponentConfig::~ComponentConfig() = default;
ConnectorConfig::~ConnectorConfig() = default;
void ConnectorConfig::read_sizes(const ConfigSection& section) {
  input_size = section.integer("input_size", 0, 1);
  output_size = section.integer("output_size", 0, 1);
}
Connector::~Connector() = default;
VisionEncoderConfig::~VisionEncoderConfig() = default;

void VisionEncoderConfig::read_common(const ConfigSection& section, const VisionEncoderConfig& defaults) {
  vision_select_layer = section.get<std::int64_t>("vision_select_layer", defaults.vision_select_layer);
  vision_feature_select_strategy =
      section.choice("vision_feature_select_strategy", defaults.vision_feature_select_strategy, {"default", "full"});
  class_token_length = section.integer("class_token_length", defaults.class_token_length, 0);
}

std::int64_t VisionEncoderConfig::selected_hidden_state(std::int64_t num_layers) const {
  std::int64_t index = vision_select_layer < 0 ? num_layers + 1 + vision_select_layer : vision_select_layer;
  if (index < 0 || index > num_layers) {
    throw Error("vision_select_layer " + std::to_string(vision_select_layer) + " is out of range for an encoder of " +
                std::to_string(num_layers) + " layers (expected " + std::to_string(-num_layers - 1) + " to " +
                std::to_string(num_layers) + ")");
  }
  return index;
}
VisionEncoder::~VisionEncoder() = default;
LanguageBackboneConfig::~LanguageBackboneConfig() = default;
KVCache::~KVCache() = default;
LanguageBackbone::~LanguageBackbone() = default;
ParallelStrategy::~ParallelStrategy() = default;
PrecisionScope::~PrecisionScope() = default;
PrecisionRecipe::~PrecisionRecipe() = default;

}  // namespace neva
