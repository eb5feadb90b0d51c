// The model `neva-run demo` trained and exported (runs/stage2/hf) against transformers loading that
// directory by itself (reference data: export_oracle.py): the processor's token ids and pixel values,
// the logits, and a greedy answer.
#include <doctest/doctest.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>

#include "neva/generation.h"
#include "neva/image.h"
#include "neva/llava_model.h"
#include "neva/recipe.h"
#include "neva/safetensors.h"
#include "neva/tokenizer.h"
#include "builtin_plugins.h"

namespace fs = std::filesystem;

TEST_CASE("an exported model loads in transformers and gives neva's tokens, pixels, logits and answer") {
  torch::NoGradGuard no_grad;
  const char* directory = std::getenv("NEVA_ORACLE_DIR");
  REQUIRE_MESSAGE(directory, "NEVA_ORACLE_DIR is not set (ctest sets it after running export_oracle.py)");
  fs::path oracle = fs::path(directory) / "export";
  nlohmann::json facts = nlohmann::json::parse(std::ifstream(oracle / "export.json"));
  neva::SafetensorsFile reference((oracle / "export.safetensors").string());
  const std::string hf = facts["hf"];

  // The exported directory, read back through neva's own plugins like any llava-hf checkpoint.
  std::string text = "[model.mm_cfg]\nmm_mlp_adapter_type = \"mlp2x_gelu\"\n[model.mm_cfg.mm_mlp_adapter]\nfrom_pretrained = \"" +
                     hf + "\"\n[model.mm_cfg.llm]\nplugin = \"llama\"\nfrom_pretrained = \"" + hf +
                     "\"\n[model.mm_cfg.vision_encoder]\nplugin = \"clip\"\nfrom_pretrained = \"" + hf + "\"\n";
  neva::Recipe recipe = neva::parse_recipe(neva::ConfigDocument::parse(text, "export.toml"), fs::path(hf),
                                           neva::test::builtin_plugins());
  neva::LlavaModel model = neva::build_model(recipe, recipe.runtime_context());
  auto tokenizer = neva::Tokenizer::load(hf);

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
  MESSAGE("max |logit difference| " << difference << " (logits up to " << expected.abs().max().item<double>() << ")");
  CHECK(difference <= 1e-4 * std::max(1.0, expected.abs().max().item<double>()));

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
