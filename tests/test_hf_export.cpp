// The Hugging Face export as a library, in this process: the tensor layout transformers 5 loads,
// the config and processor arithmetic, the one-step replacement of an earlier export, and the
// refusals of what LlavaForConditionalGeneration cannot express. (test_train.cpp loads neva-run's
// exports in transformers and compares its logits.)
#include <doctest/doctest.h>

#include <ATen/ATen.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/linear.h>

#include <nlohmann/json.hpp>
#include <set>

#include "neva/error.h"
#include "neva/io/json.h"
#include "neva/io/safetensors.h"
#include "neva/train/hf_export.h"
#include "test_support.h"
#include "tiny_decoder.h"

using neva::test::TempDir;

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// A CLIP-shaped tower: 16x16 images, 4x4 patches (16 + 1 class token, the class token dropped),
// parameters under vision_model. and a pooling head the LLaVA tower does not have.
class FakeTower : public neva::VisionEncoder {
 public:
  FakeTower() {
    register_parameter("patch", at::randn({8, 3, 4, 4}));
    auto model = register_module("vision_model", std::make_shared<torch::nn::Module>());
    model->register_parameter("norm", at::randn({8}));
    auto head = register_module("head", std::make_shared<torch::nn::Module>());
    head->register_parameter("probe", at::randn({1, 1, 8}));
  }
  at::Tensor forward(const at::Tensor& pixels) override { return at::zeros({pixels.size(0), 16, 8}); }
  std::int64_t hidden_size() const override { return 8; }
  std::int64_t image_size() const override { return 16; }
  std::int64_t num_tokens() const override { return 16; }
  neva::ImageProcessorConfig image_processor() const override {
    neva::ImageProcessorConfig config;
    config.size = config.crop_size = 16;
    return config;
  }
};

// LLaVA's mlp2x_gelu projector (names 0.* and 2.*), or a single linear layer.
class FakeProjector : public neva::Connector {
 public:
  explicit FakeProjector(bool two_layers) {
    register_module("0", torch::nn::Linear(8, 64));
    if (two_layers) register_module("2", torch::nn::Linear(64, 64));
  }
  at::Tensor forward(const at::Tensor& features) override { return features; }
  std::int64_t input_size() const override { return 8; }
  std::int64_t output_size() const override { return 64; }
};

struct Fixture {
  TempDir dir;
  neva::RuntimeContext context = neva::RuntimeContext::seeded(5);
  neva::VisionEncoderConfig vision;
  neva::HfExportSource source;

  Fixture() {
    vision.class_token_length = 1;
    vision.vision_select_layer = -2;
    json text = {{"model_type", "llama"}, {"hidden_size", 64}, {"tie_word_embeddings", false}};
    json tower = {{"model_type", "clip_vision_model"}, {"hidden_size", 8}, {"image_size", 16}, {"patch_size", 4}};
    source.llm = {"model.mm_cfg.llm", dir.write("llm.json", text.dump()).string()};
    source.vision = {"model.mm_cfg.vision_encoder", dir.write("vision.json", tower.dump()).string()};
    source.vision_config = &vision;
    source.connector = "mlp";
  }
  neva::LlavaModel model(bool two_layers = true) {
    auto backbone = std::make_shared<neva::DecoderBackbone>(neva::test::tiny_decoder(), context);
    return neva::LlavaModel(std::make_shared<FakeTower>(), std::make_shared<FakeProjector>(two_layers), backbone, 3);
  }
};

json read(const fs::path& path) { return neva::read_json_file(path.string()); }

}  // namespace

TEST_CASE("hf export: transformers' tensor names, the weights as they are, LlavaProcessor's arithmetic") {
  Fixture f;
  neva::LlavaModel model = f.model();
  const fs::path out = f.dir.path() / "hf";
  neva::export_hf(f.source, model, out);

  neva::SafetensorsCheckpoint written((out / "model.safetensors").string());
  std::set<std::string> names;
  for (const auto& name : written.names()) names.insert(name);
  std::set<std::string> expected = {"vision_tower.patch", "vision_tower.norm", "multi_modal_projector.linear_1.weight",
                                    "multi_modal_projector.linear_1.bias", "multi_modal_projector.linear_2.weight",
                                    "multi_modal_projector.linear_2.bias"};
  for (const auto& item : model.backbone().named_parameters()) {
    expected.insert("language_model." + item.key());
    CHECK(at::equal(written.tensor("language_model." + item.key()), item.value()));
  }
  CHECK(names == expected);  // the pooling head is not exported
  CHECK(at::equal(written.tensor("vision_tower.norm"), model.encoder()->named_parameters()["vision_model.norm"]));
  CHECK(at::equal(written.tensor("multi_modal_projector.linear_2.bias"), model.connector()->named_parameters()["2.bias"]));

  json config = read(out / "config.json");
  CHECK(config["model_type"] == "llava");
  CHECK(config["architectures"] == json::array({"LlavaForConditionalGeneration"}));
  CHECK(config["image_token_index"] == 3);
  CHECK(config["image_seq_length"] == 16);
  CHECK(config["vision_feature_layer"] == -2);
  CHECK(config["vision_feature_select_strategy"] == "default");
  CHECK(config["dtype"] == "float32");
  CHECK(config["text_config"]["model_type"] == "llama");
  CHECK(config["vision_config"]["patch_size"] == 4);
  json processor = read(out / "processor_config.json");
  CHECK(processor["patch_size"] == 4);
  // (16 / 4)^2 patches + 1 class token, one of which "default" drops: 16 features.
  CHECK(processor["num_additional_image_tokens"] == 1);
  json images = read(out / "preprocessor_config.json");
  CHECK(images["image_processor_type"] == "CLIPImageProcessor");
  CHECK(images["crop_size"]["height"] == 16);
  CHECK(!fs::exists(out / "tokenizer.json"));  // no tokenizer given: none written

  // SigLIP-like (no class token): "full" in transformers' terms, no additional token.
  f.vision.class_token_length = 0;
  neva::export_hf(f.source, model, out);
  CHECK(read(out / "config.json")["vision_feature_select_strategy"] == "full");
  CHECK(read(out / "processor_config.json")["num_additional_image_tokens"] == 0);
}

TEST_CASE("hf export: an earlier export is replaced in one step, with nothing left beside it") {
  Fixture f;
  neva::LlavaModel model = f.model();
  const fs::path out = f.dir.path() / "hf";
  fs::create_directories(out);
  f.dir.write("hf/stale.bin", "from an earlier export");
  neva::export_hf(f.source, model, out);
  CHECK(!fs::exists(out / "stale.bin"));
  CHECK(fs::exists(out / "model.safetensors"));
  std::set<std::string> entries;
  for (const auto& entry : fs::directory_iterator(f.dir.path())) entries.insert(entry.path().filename().string());
  CHECK(entries == std::set<std::string>{"hf", "llm.json", "vision.json"});
}

TEST_CASE("hf export: what LlavaForConditionalGeneration cannot express is refused before anything is written") {
  Fixture f;
  const fs::path out = f.dir.path() / "hf";
  SUBCASE("a projector that is not mlp2x_gelu") {
    neva::LlavaModel model = f.model(false);
    f.source.connector = "linear";
    CHECK_THROWS_WITH_AS(neva::check_hf_exportable(f.source, model),
                         doctest::Contains("connector 'linear' is not"), neva::Error);
  }
  SUBCASE("no vision encoder") {
    f.source.vision_config = nullptr;
    neva::LlavaModel model = f.model();
    CHECK_THROWS_WITH_AS(neva::export_hf(f.source, model, out), doctest::Contains("needs a vision encoder"),
                         neva::Error);
  }
  SUBCASE("a part without a config.json") {
    f.source.llm.hf_config.clear();
    neva::LlavaModel model = f.model();
    CHECK_THROWS_WITH_AS(neva::check_hf_exportable(f.source, model),
                         doctest::Contains("model.mm_cfg.llm has neither config nor from_pretrained"), neva::Error);
  }
  SUBCASE("a vision config.json without patch_size") {
    f.source.vision.hf_config = f.dir.write("nopatch.json", R"({"model_type": "clip_vision_model"})").string();
    neva::LlavaModel model = f.model();
    CHECK_THROWS_WITH_AS(neva::check_hf_exportable(f.source, model), doctest::Contains("no integer patch_size"),
                         neva::Error);
  }
  SUBCASE("two dropped class tokens") {
    f.vision.class_token_length = 2;
    neva::LlavaModel model = f.model();
    CHECK_THROWS_WITH_AS(neva::check_hf_exportable(f.source, model), doctest::Contains("drops 2 leading tokens"),
                         neva::Error);
  }
  CHECK(!fs::exists(out));
}
