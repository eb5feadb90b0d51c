// The Hugging Face export (neva/train/hf_export.h). The vision tower's names lose their
// vision_model. prefix; SigLIP's pooling head is not part of a LLaVA tower.
#include "neva/train/hf_export.h"

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <nlohmann/json.hpp>

#include "neva/io/atomic_file.h"
#include "neva/error.h"
#include "neva/io/json.h"
#include "neva/data/image.h"
#include "neva/io/safetensors.h"
#include "neva/data/tokenizer.h"

namespace neva {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// The component's own config.json (a llava-hf directory contributes its text_config or vision_config).
json component_config(const HfExportSource::Part& part, const char* llava_key) {
  if (part.hf_config.empty()) {
    throw Error("export: " + part.section + " has neither config nor from_pretrained, so there is no config.json to "
                "describe it with");
  }
  fs::path path = fs::is_directory(part.hf_config) ? fs::path(part.hf_config) / "config.json" : fs::path(part.hf_config);
  json config = read_json_file(path.string());
  if (!config.is_object()) throw Error("export: " + path.string() + ": not a JSON object");
  if (config.value("model_type", "") == "llava") return config.at(llava_key);
  if (std::string(llava_key) == "vision_config" && config.contains("vision_config")) return config["vision_config"];
  return config;
}

// What the export writes besides the weights, checked: the configs the components were built from
// (each read once) and the image-token arithmetic LlavaProcessor will redo.
struct ExportPlan {
  const VisionEncoderConfig* vision;
  json text_config, vision_config;
  std::int64_t patch_size;
};

ExportPlan plan_export(const HfExportSource& source, LlavaModel& model) {
  if (!model.encoder() || !source.vision_config) {
    throw Error("export: LlavaForConditionalGeneration needs a vision encoder");
  }
  if (!model.connector()) throw Error("export: LlavaForConditionalGeneration needs a connector");
  std::set<std::string> projector;
  for (const auto& item : model.connector()->named_parameters()) projector.insert(item.key());
  if (projector != std::set<std::string>{"0.weight", "0.bias", "2.weight", "2.bias"}) {
    throw Error("export: LlavaForConditionalGeneration's projector is two linear layers with a GELU between "
                "(mm_mlp_adapter_type = \"mlp2x_gelu\"); this model's connector '" + source.connector + "' is not");
  }
  ExportPlan plan{source.vision_config, component_config(source.llm, "text_config"),
                  component_config(source.vision, "vision_config"), 0};
  if (plan.vision->dropped_tokens() > 1) {
    throw Error("export: the vision encoder drops " + std::to_string(plan.vision->dropped_tokens()) +
                " leading tokens (class_token_length), which LlavaForConditionalGeneration cannot express (its "
                "\"default\" drops one)");
  }
  // LlavaProcessor needs it, and without it transformers would fall back on its own class default.
  if (!plan.vision_config.contains("patch_size") || !plan.vision_config["patch_size"].is_number_integer()) {
    throw Error("export: the vision encoder's config.json (" + source.vision.hf_config +
                ") has no integer patch_size, which LlavaProcessor needs");
  }
  plan.patch_size = plan.vision_config["patch_size"].get<std::int64_t>();
  return plan;
}

}  // namespace

void check_hf_exportable(const HfExportSource& source, LlavaModel& model) { plan_export(source, model); }

void export_hf(const HfExportSource& source, LlavaModel& model, const fs::path& directory,
               const std::vector<std::pair<std::string, at::Tensor>>& llm_weights) {
  const ExportPlan plan = plan_export(source, model);
  const VisionEncoderConfig* vision = plan.vision;
  const json& text_config = plan.text_config;
  const json& vision_config = plan.vision_config;
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  if (llm_weights.empty()) {
    for (const auto& item : model.backbone().named_parameters()) tensors.emplace_back("language_model." + item.key(), item.value());
  } else {
    for (const auto& [name, tensor] : llm_weights) tensors.emplace_back("language_model." + name, tensor);
  }
  for (const auto& item : model.encoder()->named_parameters()) {
    std::string name = item.key();
    if (name.rfind("vision_model.", 0) == 0) name = name.substr(13);
    if (name.rfind("head.", 0) == 0) continue;  // SigLIP's pooling head: not part of a LLaVA tower
    tensors.emplace_back("vision_tower." + name, item.value());
  }
  std::map<std::string, at::Tensor> projector;
  for (const auto& item : model.connector()->named_parameters()) projector[item.key()] = item.value();
  for (const char* layer : {"0", "2"}) {
    std::string target = std::string("multi_modal_projector.linear_") + (layer[0] == '0' ? "1." : "2.");
    tensors.emplace_back(target + "weight", projector[std::string(layer) + ".weight"]);
    tensors.emplace_back(target + "bias", projector[std::string(layer) + ".bias"]);
  }

  // Say what neva does in transformers' terms ("default" there drops exactly one leading token): a
  // SigLIP tower is "full" there.
  const std::int64_t dropped = vision->dropped_tokens();
  const char* strategy = dropped == 1 ? "default" : "full";
  // LlavaProcessor counts (image_size / patch_size)^2 + num_additional_image_tokens image tokens, one
  // fewer under "default": pick the extra count that gives the number of features neva's tower yields.
  const std::int64_t side = model.encoder()->image_size() / plan.patch_size;
  const std::int64_t additional_tokens = model.tokens_per_image() - side * side + dropped;
  const char* dtype = model.backbone().parameters().front().scalar_type() == at::kBFloat16 ? "bfloat16" : "float32";
  json config = {{"architectures", {"LlavaForConditionalGeneration"}},
                 {"model_type", "llava"},
                 {"dtype", dtype},
                 {"image_token_index", model.image_token_id()},
                 {"image_seq_length", model.tokens_per_image()},
                 {"projector_hidden_act", "gelu"},
                 {"multimodal_projector_bias", true},
                 {"vision_feature_layer", vision->vision_select_layer},
                 {"vision_feature_select_strategy", strategy},
                 {"tie_word_embeddings", text_config.value("tie_word_embeddings", false)},
                 {"text_config", text_config},
                 {"vision_config", vision_config}};

  // Written beside the target, then swapped in: a reader sees the old directory or the new one.
  fs::path staging = directory.string() + ".tmp." + std::to_string(::getpid());
  fs::remove_all(staging);
  fs::create_directories(staging);
  write_safetensors((staging / "model.safetensors").string(), tensors, {{"format", "pt"}});
  write_file_atomically((staging / "config.json").string(), config.dump(2) + "\n");
  // What LlavaProcessor / AutoProcessor need to prepare images and expand <image> as we do.
  ImageProcessorConfig images = model.encoder()->image_processor();
  const bool shortest_edge = images.resize == ImageProcessorConfig::Resize::ShortestEdge;
  json preprocessor = {{"image_processor_type", shortest_edge ? "CLIPImageProcessor" : "SiglipImageProcessor"},
                       {"do_resize", true},
                       {"resample", 3},
                       {"do_rescale", true},
                       {"rescale_factor", 1.0 / 255.0},
                       {"do_normalize", true},
                       {"do_convert_rgb", true},
                       {"image_mean", images.mean},
                       {"image_std", images.std}};
  if (shortest_edge) {
    preprocessor["size"] = {{"shortest_edge", images.size}};
    preprocessor["do_center_crop"] = true;
    preprocessor["crop_size"] = {{"height", images.crop_size}, {"width", images.crop_size}};
  } else {
    preprocessor["size"] = {{"height", images.size}, {"width", images.size}};
  }
  write_file_atomically((staging / "preprocessor_config.json").string(), preprocessor.dump(2) + "\n");
  json processor = {{"processor_class", "LlavaProcessor"},
                    {"patch_size", plan.patch_size},
                    {"vision_feature_select_strategy", strategy},
                    {"num_additional_image_tokens", additional_tokens},
                    {"image_token", "<image>"}};
  write_file_atomically((staging / "processor_config.json").string(), processor.dump(2) + "\n");
  fs::path tokenizer(source.tokenizer);
  fs::path tokenizer_dir = fs::is_directory(tokenizer) ? tokenizer : tokenizer.parent_path();
  // Without a tokenizer in the recipe there is nothing to write (not the current directory's files).
  if (!tokenizer.empty()) {
    // The tokenizer as neva ran it, as one tokenizer.json: under this config.json's model type
    // ("llava") transformers runs a tokenizer.json as written, and would read a copied tokenizer.model
    // or an old Llama-2-style file differently from the LlamaTokenizer pipeline neva trained with.
    write_file_atomically((staging / "tokenizer.json").string(), Tokenizer::describe(tokenizer.string()) + "\n");
    json tokenizer_config = json::object();
    if (fs::exists(tokenizer_dir / "tokenizer_config.json")) {
      tokenizer_config = read_json_file((tokenizer_dir / "tokenizer_config.json").string());
      if (!tokenizer_config.is_object()) {
        throw Error("export: " + (tokenizer_dir / "tokenizer_config.json").string() + ": not a JSON object");
      }
    }
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast";  // the file is the whole pipeline
    for (const char* key : {"added_tokens_decoder", "legacy", "add_prefix_space", "add_bos_token", "add_eos_token"}) {
      tokenizer_config.erase(key);  // already in tokenizer.json
    }
    write_file_atomically((staging / "tokenizer_config.json").string(), tokenizer_config.dump(2) + "\n");
    for (const char* name : {"special_tokens_map.json", "chat_template.jinja"}) {
      if (fs::exists(tokenizer_dir / name)) fs::copy_file(tokenizer_dir / name, staging / name, fs::copy_options::overwrite_existing);
    }
  }
  sync_directory(staging.string());
  if (fs::exists(directory)) {
    // Exchanged in one step (Linux renameat2): readers see the old directory or the new one.
    if (::renameat2(AT_FDCWD, staging.c_str(), AT_FDCWD, directory.c_str(), RENAME_EXCHANGE) != 0) {
      throw Error("export: cannot move " + staging.string() + " into place at " + directory.string() + ": " +
                  std::strerror(errno));
    }
    fs::remove_all(staging);  // now the previous export
  } else {
    fs::rename(staging, directory);
  }
  sync_directory(directory.parent_path().empty() ? "." : directory.parent_path().string());
}

}  // namespace neva
