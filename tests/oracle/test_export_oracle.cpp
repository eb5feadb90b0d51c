// Exported models against transformers loading the directory by itself (reference data:
// export_oracle.py, export_compositions.py): the processor's token ids and pixel values, the logits,
// and for the demo's trained model (runs/stage2/hf) a greedy answer.
#include <doctest/doctest.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <nlohmann/json.hpp>

#include "neva/inference/generation.h"
#include "neva/data/image.h"
#include "neva/model/llava.h"
#include "neva/recipe.h"
#include "neva/io/safetensors.h"
#include "neva/train/distributed_checkpoint.h"
#include "neva/data/tokenizer.h"
#include "test_support.h"
#include "builtin_plugins.h"

namespace fs = std::filesystem;

namespace {

// Rebuilds the exported directory the oracle recorded in `oracle` through neva's own plugins (like
// any llava-hf checkpoint) and checks transformers' token ids, pixel values and logits against it,
// and when asked its greedy answer.
void check_export(const fs::path& oracle, bool check_answer) {
  nlohmann::json facts = nlohmann::json::parse(std::ifstream(oracle / "export.json"));
  neva::SafetensorsFile reference((oracle / "export.safetensors").string());
  const std::string hf = facts["hf"];
  const std::string llm = facts["llm_plugin"], vision = facts["vision_plugin"];
  CAPTURE(hf);
  std::string text = "[model.mm_cfg]\nmm_mlp_adapter_type = \"mlp2x_gelu\"\n[model.mm_cfg.mm_mlp_adapter]\nfrom_pretrained = \"" +
                     hf + "\"\n[model.mm_cfg.llm]\nplugin = \"" + llm + "\"\nfrom_pretrained = \"" + hf +
                     "\"\n[model.mm_cfg.vision_encoder]\nplugin = \"" + vision + "\"\nfrom_pretrained = \"" + hf + "\"\n";
  neva::Recipe recipe = neva::parse_recipe(neva::ConfigDocument::parse(text, "export.toml"), fs::path(hf),
                                           neva::test::builtin_plugins());
  neva::LlavaModel model = neva::build_model(recipe, recipe.runtime_context());
  auto tokenizer = neva::Tokenizer::load(hf);

  // The export holds what the run trained: every tensor of its last checkpoint, bit for bit.
  const neva::CheckpointReader checkpoint(facts["checkpoint"].get<std::string>());  // the step directory
  std::map<std::string, at::Tensor> exported;
  for (const auto& item : model.backbone().named_parameters()) exported["llm." + item.key()] = item.value();
  for (const auto& item : model.connector()->named_parameters()) exported["connector." + item.key()] = item.value();
  std::size_t weights = 0;
  for (const auto& name : checkpoint.names()) {
    if (name.rfind("exp_avg", 0) == 0 || name.rfind("step.", 0) == 0) continue;  // AdamW's state
    CAPTURE(name);
    REQUIRE(exported.count(name));
    CHECK(torch::equal(exported[name], checkpoint.read_whole(name)));
    ++weights;
  }
  CHECK(weights > 0);

  // LlavaProcessor expands <image> to as many tokens as neva's tower yields features.
  at::Tensor expected_ids = reference.tensor("input_ids");
  auto ids = neva::tokenize_with_images(*tokenizer, facts["prompt"].get<std::string>(), model.image_token_id(),
                                        model.tokens_per_image());
  CHECK(torch::equal(torch::tensor(ids).view({1, -1}), expected_ids));
  at::Tensor pixels = neva::preprocess_image(neva::load_image(facts["image"].get<std::string>()),
                                             model.encoder()->image_processor());
  CHECK((pixels.unsqueeze(0) - reference.tensor("pixel_values")).abs().max().item<double>() < 1e-5);

  neva::MultimodalInputs inputs;
  inputs.input_ids = expected_ids;
  inputs.pixel_values = reference.tensor("pixel_values");
  at::Tensor logits = model.forward(inputs).logits;
  at::Tensor expected = reference.tensor("logits");
  double difference = (logits - expected).abs().max().item<double>();
  MESSAGE(llm << " + " << vision << ": max |logit difference| " << difference << " (logits up to "
              << expected.abs().max().item<double>() << ")");
  CHECK(difference <= 1e-4 * std::max(1.0, expected.abs().max().item<double>()));
  if (!check_answer) return;

  neva::GenerationRequest request;
  request.prompt_ids = ids;
  request.pixel_values = inputs.pixel_values;
  neva::SamplingConfig greedy;
  greedy.max_new_tokens = 6;
  greedy.stop_token_ids = {*tokenizer->token_id("</s>")};  // transformers stops at config.json's eos_token_id
  auto answer = neva::generate(model, *tokenizer, {request}, greedy);
  at::Tensor answer_ids = reference.tensor("answer_ids");
  std::vector<std::int64_t> reference_answer(answer_ids.data_ptr<std::int64_t>(),
                                             answer_ids.data_ptr<std::int64_t>() + answer_ids.numel());
  if (!reference_answer.empty() && reference_answer.back() == greedy.stop_token_ids[0]) reference_answer.pop_back();
  CHECK(!reference_answer.empty());
  CHECK(answer[0].token_ids == reference_answer);
  MESSAGE("transformers answers \"" << facts["answer"].get<std::string>() << "\", neva \"" << answer[0].text << "\"");
}

fs::path oracle_directory() { return neva::test::oracle_directory(); }

}  // namespace

TEST_CASE("an exported model loads in transformers and gives neva's tokens, pixels, logits and answer") {
  torch::NoGradGuard no_grad;
  check_export(oracle_directory() / "export", /*check_answer=*/true);
}

// Two training steps of each, so the weights are not just the random initialisation; the answers of
// such models are near-ties, so only ids, pixels and logits are compared.
TEST_CASE("SigLIP towers and Mistral, Mixtral and Nemotron-4 backbones export to what transformers reads the same way") {
  torch::NoGradGuard no_grad;
  for (std::string name : {"mistral_siglip", "nemotron4_siglip", "mixtral_clip"}) {
    CAPTURE(name);
    check_export(oracle_directory() / "export_compositions" / name, /*check_answer=*/false);
  }
}
