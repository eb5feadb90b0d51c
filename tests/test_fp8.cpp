// The fp8 precision recipe (plugins/precision/fp8): which linear layers it swaps, what it refuses,
// training through it (close to fp32, resumed bitwise with its scaling state) and its fallback of a
// layer whose FP8 output is wrong. The numerics themselves are checked against the oracle in
// tests/oracle/test_fp8_oracle.cpp.
#include <doctest/doctest.h>

#include <ATen/ATen.h>
#include <torch/nn/modules/linear.h>

#include "builtin_plugins.h"
#include "neva/config.h"
#include "neva/error.h"
#include "neva/model/llava.h"
#include "neva/precision_recipe.h"
#include "neva/registry.h"
#include "neva/train/checkpoints.h"
#include "neva/train/trainer.h"
#include "random_sample.h"
#include "test_support.h"
#include "tiny_decoder.h"

namespace {

neva::Registry& registry() {
  static neva::Registry instance(neva::test::builtin_plugins());
  return instance;
}

// The fp8 recipe over `base` (trainer.precision) with the model-section keys `keys`.
std::shared_ptr<neva::PrecisionRecipe> fp8_recipe(const std::string& keys, const std::string& base = "32") {
  const neva::ConfigDocument document = neva::ConfigDocument::parse("[model]\nfp8 = true\n" + keys, "test.toml");
  const neva::ConfigSection model = document.root().section("model");
  const std::string name = "fp8:" + base;
  auto config = registry().parse_config(neva::PrecisionRecipe::kKind, name, model);
  model.reject_unknown_keys();
  return registry().create<neva::PrecisionRecipe>(name, *config, neva::RuntimeContext());
}

struct Setup {
  std::shared_ptr<neva::PrecisionRecipe> precision;
  neva::RuntimeContext context = neva::RuntimeContext::seeded(3);
  std::shared_ptr<neva::DecoderBackbone> backbone;
  std::unique_ptr<neva::LlavaModel> model;

  explicit Setup(std::shared_ptr<neva::PrecisionRecipe> recipe, const std::string& mlp = "gated")
      : precision(std::move(recipe)) {
    context.dtypes = precision->dtype_policy();
    backbone = std::make_shared<neva::DecoderBackbone>(neva::test::tiny_decoder(mlp), context);
    precision->prepare(*backbone, context);
    model = std::make_unique<neva::LlavaModel>(nullptr, nullptr, backbone, -1);
  }
  neva::TrainerOptions options() const {
    neva::TrainerOptions options;
    options.optim.lr = 1e-3;
    options.optim.max_steps = 10;
    options.title = "test";
    options.source = "test_fp8.cpp";
    return options;
  }
  std::map<std::string, at::Tensor> weights() const {
    std::map<std::string, at::Tensor> out;
    for (const auto& item : backbone->named_parameters()) out[item.key()] = item.value().detach().clone();
    return out;
  }
  std::map<std::string, std::string> modes() const {
    std::map<std::string, std::string> out;
    for (const auto& [path, layer] : neva::nn::linear_layers(*backbone)) {
      out[path] = layer->kernel() ? layer->kernel()->mode() : "none";
    }
    return out;
  }
};

std::vector<std::vector<neva::TrainingSample>> batches(int steps) {
  std::vector<std::vector<neva::TrainingSample>> out;
  for (int i = 0; i < steps; ++i) {
    out.push_back({neva::test::random_sample(14 + i, 40 + 2 * i, 4), neva::test::random_sample(11 + i, 41 + 2 * i, 3)});
  }
  return out;
}

}  // namespace

TEST_CASE("fp8 recipe: the decoder layers' linear layers run in FP8, not the embeddings, head, router or the first / "
          "last N layers") {
  Setup setup(fp8_recipe("fp8_hybrid = true\nnum_layers_at_start_in_bf16 = 1\nnum_layers_at_end_in_bf16 = 1\n"), "moe");
  int fp8 = 0;
  for (const auto& [path, mode] : setup.modes()) {
    INFO(path);
    const bool middle = path.find("layers.1.") != std::string::npos || path.find("layers.2.") != std::string::npos;
    const bool router = path.size() > 5 && path.substr(path.size() - 5) == ".gate";
    CHECK(mode == (middle && !router ? "fp8" : "none"));
    fp8 += mode == "fp8";
  }
  // Layers 1 and 2: q, k, v, o and 4 experts x (w1, w2, w3).
  CHECK(fp8 == 2 * (4 + 4 * 3));
  CHECK((setup.precision->dtype_policy().compute == at::kFloat));
  CHECK((fp8_recipe("fp8_e4m3 = true\n", "bf16")->dtype_policy().compute == at::kBFloat16));
  CHECK((fp8_recipe("fp8_e4m3 = true\nmegatron_amp_O2 = true\n", "bf16")->dtype_policy().params == at::kBFloat16));
}

TEST_CASE("fp8 recipe: bad settings and a linear layer built outside the factory are refused by name") {
  auto refused = [](const std::string& keys, const std::string& expected, const std::string& base = "32") {
    INFO(keys);
    CHECK_THROWS_WITH_AS(fp8_recipe(keys, base), doctest::Contains(expected.c_str()), neva::Error);
  };
  refused("fp8_hybrid = true\nfp8_amax_history_len = 0\n", "fp8_amax_history_len");
  refused("fp8_hybrid = true\nfp8_margin = -1\n", "fp8_margin");
  refused("fp8_hybrid = true\nfp8_interval = 0\n", "fp8_interval");
  refused("fp8_hybrid = true\nfp8_e4m3 = true\n", "both true");
  refused("fp8_margin = 1\n", "neither fp8_e4m3 nor fp8_hybrid");
  refused("fp8_hybrid = true\nfp8_amax_compute_algo = \"mean\"\n", "fp8_amax_compute_algo");
  refused("fp8_hybrid = true\nfp8_max_relative_error = 0\n", "fp8_max_relative_error");
  refused("fp8_hybrid = true\nmegatron_amp_O2 = true\n", "megatron_amp_O2");
  refused("fp8_hybrid = true\n", "over trainer.precision 32 or bf16", "16");

  // Layers kept out of FP8 are counted against the model when it is prepared: 2 + 2 of 4 layers.
  auto recipe = fp8_recipe("fp8_hybrid = true\nnum_layers_at_start_in_bf16 = 2\nnum_layers_at_end_in_bf16 = 2\n");
  neva::RuntimeContext context = neva::RuntimeContext::seeded(1);
  neva::DecoderBackbone backbone(neva::test::tiny_decoder(), context);
  CHECK_THROWS_WITH_AS(recipe->prepare(backbone, context), doctest::Contains("leave none of the 4 decoder layers"),
                       neva::Error);
  // A plugin's own torch::nn::Linear cannot be swapped: refused, naming the module.
  neva::DecoderBackbone mixed(neva::test::tiny_decoder(), context);
  mixed.register_module("side_proj", torch::nn::Linear(4, 4));
  CHECK_THROWS_WITH_AS(fp8_recipe("fp8_hybrid = true\n")->prepare(mixed, context),
                       doctest::Contains("module 'side_proj' is a torch::nn::Linear built outside neva::nn::linear"),
                       neva::Error);
}

TEST_CASE("fp8 recipe: training follows fp32 closely, every layer's scaling state is checkpointed and a resumed run "
          "continues bitwise") {
  const auto steps = batches(4);
  const std::string keys = "fp8_hybrid = true\nfp8_amax_history_len = 4\nfp8_amax_compute_algo = \"max\"\n";
  Setup fp32(registry().create<neva::PrecisionRecipe>(
      "fp32", *registry().parse_config(neva::PrecisionRecipe::kKind, "fp32",
                                       neva::ConfigDocument::parse("", "t").root()),
      neva::RuntimeContext()));
  Setup straight(fp8_recipe(keys));
  neva::Trainer reference(*fp32.model, *fp32.precision, fp32.context, fp32.options());
  neva::Trainer uninterrupted(*straight.model, *straight.precision, straight.context, straight.options());
  for (const auto& batch : steps) {
    const double expected = reference.train_step({neva::collate(batch, false, 0)}).loss;
    const neva::StepReport report = uninterrupted.train_step({neva::collate(batch, false, 0)});
    CHECK(report.loss == doctest::Approx(expected).epsilon(0.01));
    CHECK(report.linear_modes == std::map<std::string, std::int64_t>{{"fp8", 4 * 7}});
    CHECK(report.linear_notes.empty());
  }

  neva::test::TempDir dir;
  {
    Setup first(fp8_recipe(keys));
    neva::Trainer trainer(*first.model, *first.precision, first.context, first.options());
    for (int step = 0; step < 3; ++step) (void)trainer.train_step({neva::collate(steps[step], false, 0)});
    neva::CheckpointManager::write_manifest(dir.path(), 3, trainer.save(dir.path(), {7}));
  }
  const neva::CheckpointReader checkpoint(dir.path());
  const std::string q = "llm.model.layers.0.self_attn.q_proj.";
  REQUIRE(checkpoint.contains(q + "fp8_input_amax_history"));
  CHECK(checkpoint.shape(q + "fp8_input_amax_history") == std::vector<std::int64_t>{4});
  CHECK(checkpoint.read_whole(q + "fp8_counters")[0].item<std::int64_t>() == 3);
  CHECK(checkpoint.read_whole(q + "fp8_weight_scale").item<float>() != 1.0f);  // updated from the amaxes

  Setup resumed(fp8_recipe(keys));
  neva::Trainer trainer(*resumed.model, *resumed.precision, resumed.context, resumed.options());
  (void)trainer.restore(dir.path());
  CHECK(trainer.restore_note().empty());
  (void)trainer.train_step({neva::collate(steps[3], false, 0)});
  const auto expected = straight.weights(), actual = resumed.weights();
  for (const auto& [name, tensor] : expected) {
    INFO(name);
    CHECK(at::equal(tensor, actual.at(name)));
  }

  // A checkpoint written without FP8 resumes with the scaling afresh, and says so.
  neva::test::TempDir plain;
  neva::CheckpointManager::write_manifest(plain.path(), 4, reference.save(plain.path(), {9}));
  Setup switched(fp8_recipe(keys));
  neva::Trainer from_fp32(*switched.model, *switched.precision, switched.context, switched.options());
  (void)from_fp32.restore(plain.path());
  CHECK(from_fp32.restore_note().find("scaling starts afresh") != std::string::npos);
}

TEST_CASE("fp8 recipe: a layer whose FP8 output is wrong (massive activations) falls back to the base precision, "
          "the others stay in FP8") {
  // Current scaling, every step checked, one bad check enough. Layer 2's attention input gets one
  // channel a million times the others (its norm's weight), which its projections ignore (zero
  // columns): scaled to fit that channel, every other input value underflows E4M3, and the FP8
  // product of what matters is zero.
  Setup setup(fp8_recipe("fp8_e4m3 = true\nfp8_recipe = \"tensorwise\"\nfp8_check_interval = 1\n"
                         "fp8_fallback_checks = 1\n"));
  {
    at::NoGradGuard no_grad;
    for (auto& item : setup.backbone->named_parameters()) {
      const std::string& name = item.key();
      if (name == "model.layers.2.input_layernorm.weight") item.value()[0] = 1e6;
      if (name.find("model.layers.2.self_attn.") != std::string::npos && name.find("_proj.weight") != std::string::npos &&
          name.find("o_proj") == std::string::npos) {
        item.value().select(1, 0).zero_();
      }
    }
  }
  neva::Trainer trainer(*setup.model, *setup.precision, setup.context, setup.options());
  const neva::StepReport report = trainer.train_step({neva::collate(batches(1)[0], false, 0)});
  REQUIRE(report.linear_notes.size() == 3);
  for (const auto& note : report.linear_notes) {
    CHECK(note.find("llm.model.layers.2.self_attn.") == 0);
    CHECK(note.find("computed in fp32 from now on") != std::string::npos);
  }
  CHECK(report.linear_modes == std::map<std::string, std::int64_t>{{"fp8", 4 * 7 - 3}, {"fp32", 3}});
  const auto modes = setup.modes();
  CHECK(modes.at("model.layers.2.self_attn.q_proj") == "fp32");
  CHECK(modes.at("model.layers.2.self_attn.o_proj") == "fp8");
  CHECK(modes.at("model.layers.1.self_attn.q_proj") == "fp8");
  // Later steps keep it (and report no change).
  const neva::StepReport next = trainer.train_step({neva::collate(batches(2)[1], false, 0)});
  CHECK(next.linear_notes.empty());
  CHECK(next.linear_modes.at("fp32") == 3);
}
