#pragma once
// Export to a transformers LlavaForConditionalGeneration directory: model.safetensors in the layout
// transformers 5 saves (language_model.*, vision_tower.*, multi_modal_projector.linear_{1,2}.*),
// config.json with text_config and vision_config taken from the components' own config.json files,
// the processor files LlavaProcessor needs, and the tokenizer as neva ran it.
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "neva/api.h"
#include "neva/model/llava.h"
#include "neva/vision_encoder.h"

namespace neva {

// Where the model's parts were described: what the export reads besides the weights.
struct HfExportSource {
  struct Part {
    std::string section;    // the recipe table, for messages ("model.mm_cfg.llm")
    std::string hf_config;  // its config.json, or a directory holding one ("" = none)
  };
  Part llm, vision;
  const VisionEncoderConfig* vision_config = nullptr;  // the encoder's shared keys, as parsed
  std::string connector;                               // the connector plugin's name, for messages
  std::string tokenizer;                               // model.tokenizer ("" = no tokenizer files written)
};

// Throws the error export_hf would, before anything is trained: no vision encoder, a connector
// other than two linear layers with a GELU between (mlp2x_gelu), a part without a config.json (or a
// vision one without an integer patch_size), more leading tokens dropped than one.
NEVA_API void check_hf_exportable(const HfExportSource& source, LlavaModel& model);

// Writes `model` at `directory`, replacing what is there in one step (readers see the old
// directory or the new one). `llm_weights`, when given, are the language model's parameters whole
// (nn::whole_parameters under tensor parallelism), written instead of the backbone's own shards.
NEVA_API void export_hf(const HfExportSource& source, LlavaModel& model, const std::filesystem::path& directory,
                        const std::vector<std::pair<std::string, at::Tensor>>& llm_weights = {});

}  // namespace neva
