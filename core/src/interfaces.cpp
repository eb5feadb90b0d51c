// Key functions of every interface: their vtables and typeinfo live in libneva_core only.
#include "neva/component.h"
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
VisionEncoder::~VisionEncoder() = default;
LanguageBackboneConfig::~LanguageBackboneConfig() = default;
KVCache::~KVCache() = default;
LanguageBackbone::~LanguageBackbone() = default;
ParallelStrategy::~ParallelStrategy() = default;
PrecisionScope::~PrecisionScope() = default;
PrecisionRecipe::~PrecisionRecipe() = default;

}  // namespace neva
