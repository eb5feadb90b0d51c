// The vision encoder plugins (clip, siglip) against transformers' CLIPVisionModel, CLIPModel,
// SiglipVisionModel and SiglipModel (reference data: vision_oracle.py).
#include <doctest/doctest.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <cstdlib>

#include "neva/registry.h"
#include "neva/io/safetensors.h"
#include "neva/vision_encoder.h"
#include "builtin_plugins.h"
#include "test_support.h"

namespace fs = std::filesystem;

namespace {

fs::path oracle_directory() { return neva::test::oracle_directory("vision"); }

std::shared_ptr<neva::VisionEncoder> load(const fs::path& directory, const std::string& keys,
                                          c10::ScalarType dtype = at::kFloat, const std::string& plugin = "clip") {
  neva::Registry::Options options = neva::test::builtin_plugins();
  neva::Registry registry(options);
  auto document = neva::ConfigDocument::parse("from_pretrained = \"" + directory.string() + "\"\n" + keys, "o.toml");
  auto config = registry.parse_config("vision_encoder", plugin, document.root());
  document.root().reject_unknown_keys();
  neva::RuntimeContext context;
  context.dtypes.params = context.dtypes.compute = dtype;
  return registry.create<neva::VisionEncoder>(plugin, *config, context);
}

struct Selection {
  const char* keys;
  std::int64_t hidden_state;  // index into transformers' hidden_states
  std::int64_t dropped;       // leading tokens removed
};

// Each selection's features against the hidden state transformers recorded, for each model directory.
void check_selections(const std::string& plugin, const std::vector<const char*>& models,
                      const std::vector<Selection>& selections) {
  torch::NoGradGuard no_grad;
  for (const char* model : models) {
    auto directory = oracle_directory() / model;
    neva::SafetensorsFile reference((directory / "reference.safetensors").string());
    at::Tensor pixels = reference.tensor("pixel_values");
    at::Tensor hidden = reference.tensor("hidden_states");
    for (const auto& selection : selections) {
      std::string context = std::string(model) + " with keys: " + selection.keys;
      CAPTURE(context);
      auto encoder = load(directory, selection.keys, at::kFloat, plugin);
      at::Tensor expected = hidden[selection.hidden_state].narrow(1, selection.dropped,
                                                                  hidden.size(2) - selection.dropped);
      at::Tensor features = encoder->forward(pixels);
      CHECK(encoder->num_tokens() == expected.size(1));
      REQUIRE(features.sizes() == expected.sizes());
      CHECK((features - expected).abs().max().item<double>() <= 1e-5);
    }
  }
}

}  // namespace

TEST_CASE("clip features match transformers' hidden states for each select layer and strategy") {
  const Selection selections[] = {
      {"", 2, 1},                                                      // LLaVA's default: layer -2, drop CLS
      {"vision_select_layer = -1\nvision_feature_select_strategy = 'full'\n", 3, 0},
      {"vision_select_layer = -2\nvision_feature_select_strategy = 'full'\n", 2, 0},
      {"vision_select_layer = 0\n", 0, 1},                             // the pre_layrnorm output
      {"vision_select_layer = 1\nclass_token_length = 0\n", 1, 0},     // NeMo's key: nothing to drop
  };
  check_selections("clip", {"vision_model", "clip_model"}, {std::begin(selections), std::end(selections)});
}

TEST_CASE("clip on a non-square image interpolates its positions as transformers' interpolate_pos_encoding") {
  torch::NoGradGuard no_grad;
  auto directory = oracle_directory() / "vision_model";
  neva::SafetensorsFile reference((directory / "reference.safetensors").string());
  auto encoder = load(directory, "");
  at::Tensor pixels = reference.tensor("wide_pixel_values");  // 28 x 42: a 4 x 6 patch grid
  at::Tensor expected = reference.tensor("wide_hidden_states")[2].narrow(1, 1, 24);
  CHECK(encoder->num_tokens_for(28, 42) == 24);
  at::Tensor features = encoder->forward(pixels);
  REQUIRE(features.sizes() == expected.sizes());
  CHECK((features - expected).abs().max().item<double>() <= 1e-5);
}

TEST_CASE("clip in bf16 stays close to fp32 transformers") {
  torch::NoGradGuard no_grad;
  auto directory = oracle_directory() / "vision_model";
  neva::SafetensorsFile reference((directory / "reference.safetensors").string());
  auto encoder = load(directory, "", at::kBFloat16);
  at::Tensor features = encoder->forward(reference.tensor("pixel_values"));
  at::Tensor expected = reference.tensor("hidden_states")[2].narrow(1, 1, 16);
  double scale = expected.abs().max().item<double>();
  CHECK((features.to(at::kFloat) - expected).abs().max().item<double>() <= 0.03 * scale);
}

TEST_CASE("clip refuses images of the wrong size and out-of-range select layers") {
  auto directory = oracle_directory() / "vision_model";
  auto encoder = load(directory, "");
  CHECK_THROWS_WITH_AS(encoder->forward(torch::zeros({1, 4, 28, 28})),
                       doctest::Contains("clip: pixel_values have shape [1, 4, 28, 28], expected [images, 3, height, width]"),
                       neva::Error);
  CHECK_THROWS_WITH_AS(load(directory, "vision_select_layer = -5\n"),
                       doctest::Contains("vision_select_layer -5 is out of range for an encoder of 3 layers"),
                       neva::RecipeError);
}

TEST_CASE("siglip features match transformers' hidden states, with or without the pooling head") {
  const Selection selections[] = {
      {"", 2, 0},                               // layer -2; SigLIP has no class token to drop
      {"vision_select_layer = -1\n", 3, 0},    // the last layer, without post_layernorm
      {"vision_select_layer = 0\n", 0, 0},     // the embeddings
      {"vision_feature_select_strategy = 'full'\n", 2, 0},
  };
  check_selections("siglip", {"siglip_vision_model", "siglip_headless", "siglip_model"},
                   {std::begin(selections), std::end(selections)});
}

TEST_CASE("the so400m-patch14-384 SigLIP shape loads: 1152 wide, 27 layers, 729 tokens") {
  neva::test::TempDir dir;
  dir.write("config.json", R"({"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
    "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 384, "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6})");
  neva::Registry::Options options = neva::test::builtin_plugins();
  neva::Registry registry(options);
  auto document = neva::ConfigDocument::parse("config = \"" + (dir.path() / "config.json").string() + "\"\n", "s.toml");
  auto config = registry.parse_config("vision_encoder", "siglip", document.root());
  neva::RuntimeContext context;
  context.dtypes.params = at::kBFloat16;  // 400M parameters: half the memory
  auto encoder = registry.create<neva::VisionEncoder>("siglip", *config, context);
  CHECK(encoder->num_tokens() == 729);
  CHECK(encoder->hidden_size() == 1152);
  CHECK(encoder->image_processor().size == 384);
  std::int64_t parameters = 0;
  for (const auto& parameter : encoder->parameters()) parameters += parameter.numel();
  CHECK(parameters > 400'000'000);
}
