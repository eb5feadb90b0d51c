#pragma once
#include <torch/nn/module.h>

#include <cstdint>
#include <string>

#include "neva/component.h"
#include "neva/config.h"

namespace neva {

struct NEVA_API ConnectorConfig : ComponentConfig {
  std::int64_t input_size = 0;   // vision feature width (the encoder's hidden size)
  std::int64_t output_size = 0;  // language-model width (the backbone's hidden size)
  // Checkpoint to load (file or directory); "" = random initialisation. Set by the host from
  // model.mm_cfg.pretrain_mm_mlp_adapter or the adapter table's from_pretrained.
  std::string weights;
  ~ConnectorConfig() override;

  // Reads the optional input_size / output_size keys; without them the host derives both from the
  // vision encoder and the language backbone.
  void read_sizes(const ConfigSection& section);
};

// Projects vision features into the language model's embedding space (LLaVA's mm_projector).
class NEVA_API Connector : public torch::nn::Module, public Component {
 public:
  static constexpr const char* kKind = "connector";
  ~Connector() override;

  // [batch, tokens, input_size] -> [batch, output_tokens(tokens), output_size]
  virtual at::Tensor forward(const at::Tensor& vision_features) = 0;
  virtual std::int64_t input_size() const = 0;
  virtual std::int64_t output_size() const = 0;
  // Connectors that downsample tokens override this.
  virtual std::int64_t output_tokens(std::int64_t input_tokens) const { return input_tokens; }
};

}  // namespace neva
