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
#include <map>
#include <optional>
#include <set>
#include <string>
#include <nlohmann/json.hpp>

#include "neva/io/atomic_file.h"
#include "neva/error.h"
#include "neva/nn/module.h"
#include "neva/parallel/process_group.h"
#include "neva/train/distributed_checkpoint.h"
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

// ---------------------------------------------------------------------------------------------

struct WholeParameterStream::Impl {
  std::shared_ptr<ProcessGroup> world, tensor;
  c10::Device device;
  int rank = 0;
  int tp_leader = 0;  // the world rank of this rank's tensor-parallel group's first rank
  std::map<std::string, std::pair<at::Tensor, nn::ParameterSharding>> local;
  std::vector<SafetensorsWriter::Spec> specs;
  std::map<std::string, std::size_t> index;
  std::vector<int> source;  // per spec: the tp_leader of the group that gathers it and sends it
  bool finished = false;

  // The collective for spec i: its group gathers it, its first rank sends it to rank 0.
  at::Tensor run(std::size_t i) {
    at::NoGradGuard no_grad;
    const int from = source[i];
    at::Tensor whole;
    if (tp_leader == from) {
      const auto& [shard, sharding] = local.at(specs[i].name);
      whole = nn::unshard(shard.detach(), sharding, tensor).contiguous();
    }
    if (from == 0) return rank == 0 ? whole : at::Tensor();
    const int tag = static_cast<int>(i % 1000000);
    if (rank == from) {
      world->isend(whole, 0, tag).wait();
      return {};
    }
    if (rank != 0) return {};
    whole = at::empty(specs[i].shape, at::TensorOptions(specs[i].dtype).device(device));
    world->irecv(whole, from, tag).wait();
    return whole;
  }

  // Rank 0 names the next spec (or -1: done) to every rank.
  std::int64_t announce(std::int64_t i) {
    at::Tensor value = at::full({1}, i, at::TensorOptions(at::kLong).device(device));
    world->broadcast(value, 0).wait();
    return value.cpu().item<std::int64_t>();
  }
};

WholeParameterStream::WholeParameterStream(const torch::nn::Module& root, const ParallelGroups& groups, c10::Device device)
    : impl_(std::make_unique<Impl>(Impl{groups.world, groups.tensor, device})) {
  Impl& s = *impl_;
  s.rank = group_rank(s.world);
  std::map<std::string, nn::ParameterSharding> shardings;
  for (auto& [name, sharding] : nn::parameter_shardings(root)) shardings.emplace(name, sharding);
  const int tp = group_size(s.tensor);
  json mine = json::array();
  for (const auto& item : root.named_parameters()) {
    const nn::ParameterSharding& sharding = shardings.at(item.key());
    s.local.emplace(item.key(), std::make_pair(item.value(), sharding));
    mine.push_back({{"name", item.key()}, {"dtype", static_cast<int>(item.value().scalar_type())},
                    {"shape", nn::whole_shape(item.value(), sharding, tp)}});
  }
  if (group_size(s.world) > 1) {
    s.tp_leader = std::stoi(all_gather_text(s.tensor, std::to_string(s.rank), device).front());
  }
  const std::vector<std::string> every =
      group_size(s.world) > 1 ? all_gather_text(s.world, json{{"leader", s.tp_leader}, {"tensors", mine}}.dump(), device)
                              : std::vector<std::string>{json{{"leader", 0}, {"tensors", mine}}.dump()};
  // The first rank (by world rank) holding a tensor picks the group that sends it.
  std::map<std::string, std::pair<SafetensorsWriter::Spec, int>> found;
  for (const std::string& text : every) {
    const json description = json::parse(text);
    for (const auto& tensor : description["tensors"]) {
      const std::string name = tensor["name"].get<std::string>();
      if (found.count(name)) continue;
      const auto dtype = static_cast<c10::ScalarType>(tensor["dtype"].get<int>());
      found.emplace(name, std::make_pair(SafetensorsWriter::Spec{name, dtype, tensor["shape"].get<std::vector<std::int64_t>>()},
                                         description["leader"].get<int>()));
    }
  }
  for (auto& [name, entry] : found) {
    s.index.emplace(name, s.specs.size());
    s.specs.push_back(std::move(entry.first));
    s.source.push_back(entry.second);
  }
}

WholeParameterStream::~WholeParameterStream() {
  try {
    if (impl_->rank == 0) finish();
  } catch (...) {  // the others then fail at their collective timeout, as on any rank's failure
  }
}

const std::vector<SafetensorsWriter::Spec>& WholeParameterStream::specs() const { return impl_->specs; }

at::Tensor WholeParameterStream::fetch(const std::string& name) {
  Impl& s = *impl_;
  if (s.rank != 0 || s.finished) throw Error("WholeParameterStream::fetch: only world rank 0, before finish()");
  auto found = s.index.find(name);
  if (found == s.index.end()) throw Error("export: no rank holds a parameter '" + name + "'");
  if (group_size(s.world) > 1) s.announce(static_cast<std::int64_t>(found->second));
  return s.run(found->second);
}

void WholeParameterStream::finish() {
  Impl& s = *impl_;
  if (s.rank != 0 || s.finished) return;
  s.finished = true;
  if (group_size(s.world) > 1) s.announce(-1);
}

void WholeParameterStream::serve() {
  Impl& s = *impl_;
  if (s.rank == 0) throw Error("WholeParameterStream::serve: every rank but world rank 0");
  for (std::int64_t i; (i = s.announce(0)) >= 0;) s.run(static_cast<std::size_t>(i));
}

void export_hf(const HfExportSource& source, LlavaModel& model, const fs::path& directory,
               WholeParameterStream* language_model) {
  const ExportPlan plan = plan_export(source, model);
  const VisionEncoderConfig* vision = plan.vision;
  const json& text_config = plan.text_config;
  const json& vision_config = plan.vision_config;
  std::optional<WholeParameterStream> own;
  if (!language_model) language_model = &own.emplace(model.backbone(), ParallelGroups{}, c10::Device(c10::kCPU));
  // The vision tower and the projector are whole on this rank; the language model's tensors come
  // from language_model one at a time as the file is written.
  std::map<std::string, at::Tensor> here;
  std::map<std::string, std::string> streamed;  // file name -> parameter name
  std::vector<SafetensorsWriter::Spec> specs;
  for (const auto& spec : language_model->specs()) {
    streamed.emplace("language_model." + spec.name, spec.name);
    specs.push_back({"language_model." + spec.name, spec.dtype, spec.shape});
  }
  auto add = [&](const std::string& name, const at::Tensor& tensor) {
    here.emplace(name, tensor);
    specs.push_back({name, tensor.scalar_type(), tensor.sizes().vec()});
  };
  for (const auto& item : model.encoder()->named_parameters()) {
    std::string name = item.key();
    if (name.rfind("vision_model.", 0) == 0) name = name.substr(13);
    if (name.rfind("head.", 0) == 0) continue;  // SigLIP's pooling head: not part of a LLaVA tower
    add("vision_tower." + name, item.value());
  }
  std::map<std::string, at::Tensor> projector;
  for (const auto& item : model.connector()->named_parameters()) projector[item.key()] = item.value();
  for (const char* layer : {"0", "2"}) {
    std::string target = std::string("multi_modal_projector.linear_") + (layer[0] == '0' ? "1." : "2.");
    add(target + "weight", projector[std::string(layer) + ".weight"]);
    add(target + "bias", projector[std::string(layer) + ".bias"]);
  }
  const at::ScalarType llm_dtype = language_model->specs().empty() ? at::kFloat : language_model->specs().front().dtype;

  // Say what neva does in transformers' terms ("default" there drops exactly one leading token): a
  // SigLIP tower is "full" there.
  const std::int64_t dropped = vision->dropped_tokens();
  const char* strategy = dropped == 1 ? "default" : "full";
  // LlavaProcessor counts (image_size / patch_size)^2 + num_additional_image_tokens image tokens, one
  // fewer under "default": pick the extra count that gives the number of features neva's tower yields.
  const std::int64_t side = model.encoder()->image_size() / plan.patch_size;
  const std::int64_t additional_tokens = model.tokens_per_image() - side * side + dropped;
  const char* dtype = llm_dtype == at::kBFloat16 ? "bfloat16" : "float32";
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
  {
    SafetensorsWriter weights((staging / "model.safetensors").string(), std::move(specs), {{"format", "pt"}});
    for (const auto& spec : weights.order()) {
      auto streaming = streamed.find(spec.name);
      weights.write(streaming != streamed.end() ? language_model->fetch(streaming->second) : here.at(spec.name));
    }
    weights.commit();
  }
  language_model->finish();
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
