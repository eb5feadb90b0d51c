#pragma once
// Export to a transformers LlavaForConditionalGeneration directory: model.safetensors in the layout
// transformers 5 saves (language_model.*, vision_tower.*, multi_modal_projector.linear_{1,2}.*),
// config.json with text_config and vision_config taken from the components' own config.json files,
// the processor files LlavaProcessor needs, and the tokenizer as neva ran it.
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "neva/api.h"
#include "neva/context.h"
#include "neva/io/safetensors.h"
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

// A model's parameters whole, one at a time on world rank 0, from whichever ranks hold them: a
// tensor-parallel group gathers the shards of one tensor (nn::unshard), and the group's first rank
// sends it to rank 0 when rank 0 does not hold it (a later pipeline stage's layers, another
// expert-parallel rank's experts). No rank holds more than its own shard and one whole tensor.
//
// Built by every rank of groups.world (a collective: the ranks exchange what they hold); then rank 0
// fetch()es the tensors it wants, in any order, and finish()es, while every other rank serve()s
// until then. With groups.world of one rank (or none) it is the module's own parameters.
class NEVA_API WholeParameterStream {
 public:
  WholeParameterStream(const torch::nn::Module& root, const ParallelGroups& groups, c10::Device device);
  ~WholeParameterStream();  // rank 0: finish()es if it has not (the others are released on errors too)
  WholeParameterStream(const WholeParameterStream&) = delete;
  WholeParameterStream& operator=(const WholeParameterStream&) = delete;

  // Every parameter (name, dtype, whole shape), by name; the same on every rank.
  const std::vector<SafetensorsWriter::Spec>& specs() const;
  // Rank 0: the parameter whole (a collective with the ranks holding it).
  at::Tensor fetch(const std::string& name);
  // Rank 0: no more fetches; the other ranks return from serve().
  void finish();
  // Every rank but 0: takes part in rank 0's fetches until it finishes.
  void serve();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Writes `model` at `directory`, replacing what is there in one step (readers see the old
// directory or the new one), with model.safetensors streamed a tensor at a time. `language_model`,
// when given, supplies the backbone's parameters whole from every rank (the other ranks serve() it
// meanwhile); without it, the backbone's own parameters are written.
NEVA_API void export_hf(const HfExportSource& source, LlavaModel& model, const std::filesystem::path& directory,
                        WholeParameterStream* language_model = nullptr);

}  // namespace neva
