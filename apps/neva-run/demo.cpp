// `neva-run demo`: the whole NeVA workflow on a problem small enough for two CPU cores, with
// nothing downloaded. It writes a deterministic synthetic dataset (one coloured shape per image,
// at one of four positions; captions for stage 1, questions and answers for stage 2, held-out
// images for evaluation), a tiny base model (a Llama and a CLIP tower, randomly initialised, saved
// as Hugging Face directories) and a byte-level BPE tokenizer for the dataset's words, then runs
// the recipes of configs/demo: stage 1, stage 2 (which exports a LlavaForConditionalGeneration
// directory), and generation on the held-out images, and reports exact-match accuracy.
#include "demo.h"

#include <ATen/ATen.h>

#include <cmath>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <type_traits>
#include <iomanip>
#include <chrono>

#include "embedded_recipe.h"
#include "inference.h"
#include "neva/io/atomic_file.h"
#include "neva/data/conversation.h"
#include "neva/error.h"
#include "neva/data/image.h"
#include "neva/io/safetensors.h"
#include "neva/data/tokenizer.h"
#include "train.h"

namespace neva {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr int kImageSize = 48;
const std::vector<std::string> kShapes = {"circle", "square", "triangle"};
const std::vector<std::pair<std::string, std::array<std::uint8_t, 3>>> kColors = {
    {"red", {220, 40, 40}}, {"green", {40, 170, 60}}, {"blue", {50, 80, 220}}, {"yellow", {225, 195, 30}}};
const std::vector<std::string> kPositions = {"top left", "top right", "bottom left", "bottom right"};
const std::vector<std::pair<std::string, int>> kQuestions = {  // question, which attribute answers it
    {"What color is the shape?", 0},
    {"What shape is in the image?", 1},
    {"Where is the shape?", 2}};

struct Scene {
  int shape, color, position;
  std::string answer(int attribute) const {
    return attribute == 0 ? kColors[color].first : attribute == 1 ? kShapes[shape] : kPositions[position];
  }
  std::string caption() const { return "a " + answer(0) + " " + answer(1) + " in the " + answer(2) + " corner"; }
};

Image render(const Scene& scene, std::mt19937_64& random) {
  auto uniform = [&](int low, int high) { return low + static_cast<int>(random() % static_cast<std::uint64_t>(high - low + 1)); };
  Image image;
  image.width = image.height = kImageSize;
  image.rgb.resize(static_cast<std::size_t>(kImageSize) * kImageSize * 3);
  const int shade = uniform(225, 250);
  for (auto& value : image.rgb) value = static_cast<std::uint8_t>(shade + uniform(-6, 5));
  const int quarter = kImageSize / 4;
  const int cx = (scene.position % 2 == 0 ? quarter : 3 * quarter) + uniform(-2, 2);
  const int cy = (scene.position < 2 ? quarter : 3 * quarter) + uniform(-2, 2);
  const int r = uniform(9, 11);
  const auto& color = kColors[scene.color].second;
  for (int y = 0; y < kImageSize; ++y) {
    for (int x = 0; x < kImageSize; ++x) {
      const int dx = x - cx, dy = y - cy;
      bool inside = false;
      if (scene.shape == 0) inside = dx * dx + dy * dy <= r * r;
      if (scene.shape == 1) inside = std::abs(dx) <= r - 1 && std::abs(dy) <= r - 1;  // a little smaller: same area feel
      if (scene.shape == 2) inside = dy >= -r && dy <= r && std::abs(dx) * 2 <= (dy + r);  // apex up
      if (!inside) continue;
      std::size_t at = (static_cast<std::size_t>(y) * kImageSize + x) * 3;
      for (int c = 0; c < 3; ++c) image.rgb[at + c] = color[c];
    }
  }
  return image;
}

const char* kSplitPattern = R"( ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+)";
const std::vector<std::string> kSpecialTokens = {"<unk>", "<s>", "</s>", "<image>", "<pad>"};

// A byte-level BPE tokenizer (the Llama 3 kind) whose vocabulary holds every pre-tokenized chunk of
// `texts` whole (ignore_merges), so the demo's words are one token each; anything else falls back to
// bytes.
json make_tokenizer(const std::vector<std::string>& texts) {
  std::set<std::string> chunks;
  std::regex split(kSplitPattern);
  for (const auto& text : texts) {
    std::string rest = text;
    for (const auto& special : kSpecialTokens) {
      for (std::size_t at = rest.find(special); at != std::string::npos; at = rest.find(special)) rest.replace(at, special.size(), "\x01");
    }
    std::stringstream pieces(rest);
    std::string piece;
    while (std::getline(pieces, piece, '\x01')) {
      for (std::sregex_iterator it(piece.begin(), piece.end(), split), end; it != end; ++it) {
        std::string symbols;
        for (unsigned char c : it->str()) symbols += byte_level_symbol(c);
        chunks.insert(symbols);
      }
    }
  }
  json vocab = json::object();
  json added = json::array();
  std::int64_t id = 0;
  for (const auto& token : kSpecialTokens) {
    vocab[token] = id;
    added.push_back({{"id", id++}, {"content", token}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                     {"normalized", false}, {"special", true}});
  }
  std::set<std::string> bytes;
  for (int b = 0; b < 256; ++b) {
    const std::string& symbol = byte_level_symbol(static_cast<std::uint8_t>(b));
    bytes.insert(symbol);
    vocab[symbol] = id++;
  }
  for (const auto& chunk : chunks) {
    if (!bytes.count(chunk)) vocab[chunk] = id++;
  }
  json bos = {{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}};
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", added},
          {"normalizer", nullptr},
          {"pre_tokenizer",
           {{"type", "Sequence"},
            {"pretokenizers",
             {{{"type", "Split"}, {"pattern", {{"Regex", kSplitPattern}}}, {"behavior", "Isolated"}, {"invert", false}},
              {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}}}}}},
          {"post_processor",
           {{"type", "TemplateProcessing"},
            {"single", {bos, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
            {"pair", {bos, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
            {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}}},
          {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
          {"model",
           {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
            {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", true},
            {"vocab", vocab}, {"merges", json::array()}}}};
}

void write_json(const fs::path& path, const json& value) { write_file_atomically(path.string(), value.dump(1) + "\n"); }

struct DemoData {
  std::int64_t vocab_size = 0;
  std::vector<std::pair<json, std::string>> test;  // request, expected answer
};

DemoData write_dataset(const fs::path& root, std::uint64_t seed) {
  std::mt19937_64 random(seed);
  fs::create_directories(root / "data/images/train");
  fs::create_directories(root / "data/images/test");
  const ConversationTemplate v1 = conversation_template("v1");
  std::vector<std::string> texts = {v1.system, "USER: ASSISTANT: \n"};
  json stage1 = json::array(), stage2 = json::array();
  auto scene_of = [&](std::uint64_t index) {
    return Scene{static_cast<int>(random() % kShapes.size()), static_cast<int>(random() % kColors.size()),
                 static_cast<int>(index % kPositions.size())};
  };
  constexpr int kTrain = 1600, kTest = 90;
  for (int i = 0; i < kTrain; ++i) {
    Scene scene = scene_of(random());
    std::string name = "train/" + std::to_string(i) + ".png";
    write_file_atomically((root / "data/images" / name).string(), encode_png(render(scene, random)));
    stage1.push_back({{"id", "caption-" + std::to_string(i)},
                      {"image", name},
                      {"conversations", {{{"from", "human"}, {"value", "<image>\nDescribe the image briefly."}},
                                         {{"from", "gpt"}, {"value", scene.caption()}}}}});
    texts.push_back(scene.caption());
    // Stage 2: all three questions, in a random order, as one conversation.
    std::vector<int> order = {0, 1, 2};
    for (int k = 2; k > 0; --k) std::swap(order[k], order[random() % (k + 1)]);
    json turns = json::array();
    for (int k = 0; k < 3; ++k) {
      const auto& [question, attribute] = kQuestions[order[k]];
      turns.push_back({{"from", "human"}, {"value", k == 0 ? "<image>\n" + question : question}});
      turns.push_back({{"from", "gpt"}, {"value", scene.answer(attribute)}});
      texts.push_back(question);
      texts.push_back(" " + scene.answer(attribute));
    }
    stage2.push_back({{"id", "qa-" + std::to_string(i)}, {"image", name}, {"conversations", turns}});
  }
  DemoData data;
  std::string requests;
  for (int i = 0; i < kTest; ++i) {
    Scene scene = scene_of(random());
    std::string name = "test/" + std::to_string(i) + ".png";
    write_file_atomically((root / "data/images" / name).string(), encode_png(render(scene, random)));
    const auto& [question, attribute] = kQuestions[i % kQuestions.size()];
    json request = {{"prompt", question}, {"image", name}, {"answer", scene.answer(attribute)}};
    requests += request.dump() + "\n";
    data.test.emplace_back(request, scene.answer(attribute));
  }
  write_json(root / "data/stage1.json", stage1);
  write_json(root / "data/stage2.json", stage2);
  write_file_atomically((root / "data/test.jsonl").string(), requests);

  fs::create_directories(root / "model/tokenizer");
  json tokenizer = make_tokenizer(texts);
  data.vocab_size = static_cast<std::int64_t>(tokenizer["model"]["vocab"].size());
  write_json(root / "model/tokenizer/tokenizer.json", tokenizer);
  write_json(root / "model/tokenizer/tokenizer_config.json",
             {{"tokenizer_class", "PreTrainedTokenizerFast"}, {"bos_token", "<s>"}, {"eos_token", "</s>"},
              {"unk_token", "<unk>"}, {"pad_token", "<pad>"}, {"model_max_length", 256}});
  return data;
}

template <class T>
struct Tag {
  using type = T;
};

// The tiny base model: config.json files and random weights, saved as transformers would.
void write_base_model(const fs::path& root, std::int64_t vocab_size, const Registry& registry, std::uint64_t seed) {
  fs::create_directories(root / "model/llm");
  fs::create_directories(root / "model/vision");
  write_json(root / "model/llm/config.json",
             {{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"}, {"vocab_size", vocab_size},
              {"hidden_size", 128}, {"intermediate_size", 384}, {"num_hidden_layers", 2}, {"num_attention_heads", 4},
              {"num_key_value_heads", 2}, {"max_position_embeddings", 256}, {"rms_norm_eps", 1e-5},
              {"rope_theta", 10000.0}, {"tie_word_embeddings", false}, {"bos_token_id", 1}, {"eos_token_id", 2},
              {"pad_token_id", 4}});
  write_json(root / "model/vision/config.json",
             {{"architectures", {"CLIPVisionModel"}}, {"model_type", "clip_vision_model"}, {"hidden_size", 128},
              {"intermediate_size", 256}, {"num_hidden_layers", 2}, {"num_attention_heads", 4},
              {"image_size", kImageSize}, {"patch_size", 8}, {"hidden_act", "quick_gelu"}, {"layer_norm_eps", 1e-5},
              {"num_channels", 3}});
  const RuntimeContext context = RuntimeContext::seeded(seed);  // the base model's random initialisation
  auto save = [&](auto kind_tag, const char* plugin, const fs::path& directory) {
    using Interface = typename decltype(kind_tag)::type;
    auto document = ConfigDocument::parse("config = \"" + (directory / "config.json").string() + "\"\n", "<demo>");
    auto config = registry.parse_config(Interface::kKind, plugin, document.root());
    auto component = registry.create<Interface>(plugin, *config, context);
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    for (const auto& item : component->named_parameters()) tensors.emplace_back(item.key(), item.value());
    write_safetensors((directory / "model.safetensors").string(), tensors, {{"format", "pt"}});
  };
  save(Tag<LanguageBackbone>{}, "llama", root / "model/llm");
  save(Tag<VisionEncoder>{}, "clip", root / "model/vision");
}

}  // namespace

int run_demo(const fs::path& directory, const std::vector<std::string>& overrides, const Registry::Options& options,
             bool prepare_only) {
  const auto started = std::chrono::steady_clock::now();
  const fs::path root = fs::absolute(directory);
  const fs::path marker = root / ".neva-demo";
  if (fs::exists(root) && !fs::is_empty(root) && !fs::exists(marker)) {
    throw Error(root.string() + " exists and is not a neva demo directory; choose another with --dir");
  }
  fs::remove_all(root / "runs");  // the demo's own earlier results; nothing else is touched
  fs::create_directories(root);
  write_file_atomically(marker.string(), "written by neva-run demo\n");

  std::cout << "neva demo in " << root.string() << "\n[1/4] writing the synthetic dataset and the tiny base model\n";
  DemoData data = write_dataset(root, 20261122);
  Registry registry(options);
  write_base_model(root, data.vocab_size, registry, 1234);
  for (const auto& [name, text] : std::vector<std::pair<const char*, const char*>>{
           {"stage1.toml", kDemoStage1Recipe}, {"stage2.toml", kDemoStage2Recipe}, {"eval.toml", kDemoEvalRecipe}}) {
    write_file_atomically((root / name).string(), text);
  }
  if (prepare_only) {
    std::cout << "prepared; run the stages with: neva-run " << (root / "stage1.toml").string() << " (then stage2.toml, "
              << "eval.toml)\n";
    return 0;
  }

  auto recipe = [&](const char* name) { return load_recipe(root / name, overrides, options); };
  const Recipe stage1_recipe = recipe("stage1.toml");
  warn_if_bf16_emulated(stage1_recipe);  // the stages share the precision overrides
  std::cout << "[2/4] stage 1: feature alignment (connector only)\n" << std::flush;
  TrainSummary stage1 = run_train(stage1_recipe, "stage 1");
  if (stage1.signal) return 128 + stage1.signal;  // checkpointed; running the demo again continues
  std::cout << "[3/4] stage 2: fine-tuning (connector and language model)\n" << std::flush;
  TrainSummary stage2 = run_train(recipe("stage2.toml"), "stage 2");
  if (stage2.signal) return 128 + stage2.signal;
  std::cout << "[4/4] answering questions about " << data.test.size() << " held-out images\n" << std::flush;
  Recipe eval = recipe("eval.toml");
  run_generate(eval);

  std::ifstream answers(eval.inference.output_file);
  std::string line;
  std::size_t correct = 0, index = 0;
  std::vector<std::string> examples;
  while (std::getline(answers, line) && index < data.test.size()) {
    json answer = json::parse(line);
    std::string got = answer.value("answer", "");
    got.erase(0, got.find_first_not_of(" \n"));
    got.erase(got.find_last_not_of(" \n") + 1);
    const auto& [request, expected] = data.test[index++];
    correct += got == expected;
    if (examples.size() < 6) {
      examples.push_back("  " + request["image"].get<std::string>() + "  " + request["prompt"].get<std::string>() +
                         "  -> \"" + got + "\"" + (got == expected ? "  (right)" : "  (expected \"" + expected + "\")"));
    }
  }
  const double accuracy = data.test.empty() ? 0 : 100.0 * static_cast<double>(correct) / static_cast<double>(data.test.size());
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  std::cout << "\nexamples:\n";
  for (const auto& example : examples) std::cout << example << "\n";
  std::cout << std::fixed << std::setprecision(4) << "\nstage 1: " << stage1.steps << " steps, final loss "
            << stage1.last_loss << "\nstage 2: " << stage2.steps << " steps, final loss " << stage2.last_loss << "\n"
            << "exact-match accuracy on held-out images: " << correct << "/" << data.test.size() << " = "
            << std::fixed << std::setprecision(1) << accuracy << "%\n"
            << "total time " << std::setprecision(0) << seconds << " s; loss curves: "
            << (stage1.run_dir / "loss.png").string() << ", " << (stage2.run_dir / "loss.png").string()
            << "; exported model: " << stage2.hf_dir.string() << "\n";
  return accuracy >= 90.0 ? 0 : 1;
}

}  // namespace neva
