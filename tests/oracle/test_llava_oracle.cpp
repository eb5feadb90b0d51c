// A LLaVA model composed from the llama, clip and mlp plugins through a recipe, against
// transformers' LlavaForConditionalGeneration (reference data: llava_oracle.py).
#include <doctest/doctest.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <utility>

#include "neva/data/conversation.h"
#include "neva/inference/generation.h"
#include "neva/data/image.h"
#include "neva/model/llava.h"
#include "neva/recipe.h"
#include "neva/io/safetensors.h"
#include "builtin_plugins.h"
#include "test_support.h"

namespace fs = std::filesystem;

namespace {

fs::path oracle_directory() { return neva::test::oracle_directory("llava"); }

neva::Recipe recipe_for(const fs::path& directory, const std::string& extra = "") {
  std::string text = "[model.mm_cfg]\nmm_mlp_adapter_type = \"mlp2x_gelu\"\npretrain_mm_mlp_adapter = \"" +
                     directory.string() + "\"\n" + extra +
                     "[model.mm_cfg.llm]\nplugin = \"llama\"\nfrom_pretrained = \"" + directory.string() +
                     "\"\n[model.mm_cfg.vision_encoder]\nplugin = \"clip\"\nfrom_pretrained = \"" + directory.string() +
                     "\"\n";
  neva::Registry::Options options = neva::test::builtin_plugins();
  return neva::parse_recipe(neva::ConfigDocument::parse(text, "llava.toml"), directory, options);
}

}  // namespace

TEST_CASE("a LLaVA recipe over one llava-hf directory matches transformers in every key layout") {
  torch::NoGradGuard no_grad;
  for (const char* layout : {"transformers5", "hub", "nested"}) {
    CAPTURE(std::string(layout));
    auto directory = oracle_directory() / layout;
    neva::SafetensorsFile reference((directory / "reference.safetensors").string());
    neva::Recipe recipe = recipe_for(directory);
    CHECK(recipe.model.mm_cfg.image_token_index == 2);  // from config.json
    neva::LlavaModel model = neva::build_model(recipe, recipe.runtime_context());
    CHECK(model.tokens_per_image() == 16);

    neva::MultimodalInputs inputs;
    inputs.input_ids = reference.tensor("input_ids");
    inputs.pixel_values = reference.tensor("pixel_values");
    at::Tensor logits = model.forward(inputs).logits;
    double difference = (logits - reference.tensor("logits")).abs().max().item<double>();
    MESSAGE(layout << ": max |logit difference| " << difference);
    CHECK(difference <= 1e-4);

    // Greedy continuation with the KV cache: images only in the prefill step.
    at::Tensor expected = reference.tensor("greedy");
    auto cache = model.backbone().new_cache(1, inputs.input_ids.size(1) + expected.size(1));
    inputs.cache = cache.get();
    at::Tensor step_logits = model.forward(inputs).logits;
    std::vector<std::int64_t> tokens;
    for (std::int64_t i = 0; i < expected.size(1); ++i) {
      at::Tensor next = step_logits.select(1, -1).argmax(-1, true);
      tokens.push_back(next.item<std::int64_t>());
      neva::MultimodalInputs step;
      step.input_ids = next;
      step.cache = cache.get();
      step_logits = model.forward(step).logits;
    }
    CHECK(torch::equal(torch::tensor(tokens).view({1, -1}), expected));
  }
}

TEST_CASE("the connector's widths come from the encoder and the language model") {
  auto recipe = recipe_for(oracle_directory() / "hub");
  auto* connector = dynamic_cast<neva::ConnectorConfig*>(recipe.model.mm_cfg.connector.config.get());
  REQUIRE(connector);
  CHECK(connector->input_size == 32);
  CHECK(connector->output_size == 64);
  CHECK_THROWS_WITH_AS(recipe_for(oracle_directory() / "hub", "[model.mm_cfg.mm_mlp_adapter]\noutput_size = 4096\n"),
                       doctest::Contains("model.mm_cfg.mm_mlp_adapter.output_size: 4096 disagrees with the language "
                                         "model's hidden size (64)"),
                       neva::RecipeError);
}

TEST_CASE("image placeholders that do not match the images are an error, not a silent mismatch") {
  torch::NoGradGuard no_grad;
  auto directory = oracle_directory() / "hub";
  neva::SafetensorsFile reference((directory / "reference.safetensors").string());
  neva::Recipe recipe = recipe_for(directory);
  neva::LlavaModel model = neva::build_model(recipe, recipe.runtime_context());
  neva::MultimodalInputs inputs;
  inputs.input_ids = reference.tensor("input_ids");
  inputs.pixel_values = reference.tensor("pixel_values").narrow(0, 0, 1);
  CHECK_THROWS_WITH_AS(model.forward(inputs),
                       "image tokens and images do not match: the text holds 32 image placeholder tokens (id 2), "
                       "but the 1 image(s) need 16",
                       neva::Error);
}

TEST_CASE("freeze keeps the frozen components out of training") {
  auto directory = oracle_directory() / "hub";
  neva::Recipe recipe = recipe_for(directory);
  recipe.model.mm_cfg.llm->freeze = true;
  neva::LlavaModel model = neva::build_model(recipe, recipe.runtime_context());
  for (const auto& parameter : model.backbone().parameters()) CHECK(!parameter.requires_grad());
  for (const auto& parameter : model.encoder()->parameters()) CHECK(!parameter.requires_grad());  // default: frozen
  for (const auto& parameter : model.connector()->parameters()) CHECK(parameter.requires_grad());
}

namespace {

std::vector<std::int64_t> to_vector(const at::Tensor& tensor) {
  at::Tensor flat = tensor.contiguous().view({-1}).to(at::kLong);
  return std::vector<std::int64_t>(flat.data_ptr<std::int64_t>(), flat.data_ptr<std::int64_t>() + flat.numel());
}

std::unique_ptr<neva::Tokenizer> any_tokenizer() { return neva::Tokenizer::load((oracle_directory() / "hub").string()); }

}  // namespace

TEST_CASE("generate: greedy and seeded sampling reproduce transformers' generate") {
  auto directory = oracle_directory() / "hub";
  neva::SafetensorsFile reference((directory / "reference.safetensors").string());
  neva::Recipe recipe = recipe_for(directory);
  neva::LlavaModel model = neva::build_model(recipe, recipe.runtime_context());
  auto tokenizer = any_tokenizer();
  neva::GenerationRequest request{to_vector(reference.tensor("input_ids")), reference.tensor("pixel_values")};

  neva::SamplingConfig greedy;
  greedy.max_new_tokens = 8;
  auto result = neva::generate(model, *tokenizer, {request}, greedy);
  CHECK(result[0].token_ids == to_vector(reference.tensor("greedy")));
  CHECK(result[0].finish_reason == "length");

  neva::SamplingConfig sampling;
  sampling.greedy = false;
  sampling.temperature = 0.7;
  sampling.top_k = 50;
  sampling.top_p = 0.9;
  sampling.repetition_penalty = 1.3;
  sampling.max_new_tokens = 12;
  sampling.seed = 42;
  CHECK(neva::generate(model, *tokenizer, {request}, sampling)[0].token_ids == to_vector(reference.tensor("sampled")));
}

TEST_CASE("generate: a batch with padding gives each prompt its own answer, and stop tokens end it") {
  auto directory = oracle_directory() / "hub";
  neva::SafetensorsFile reference((directory / "reference.safetensors").string());
  neva::Recipe recipe = recipe_for(directory);
  neva::LlavaModel model = neva::build_model(recipe, recipe.runtime_context());
  auto tokenizer = any_tokenizer();
  neva::GenerationRequest with_images{to_vector(reference.tensor("input_ids")), reference.tensor("pixel_values")};
  neva::GenerationRequest short_text{{1, 17, 42, 99}, {}};
  neva::SamplingConfig greedy;
  greedy.max_new_tokens = 8;
  auto alone = neva::generate(model, *tokenizer, {short_text}, greedy);
  auto batch = neva::generate(model, *tokenizer, {short_text, with_images}, greedy);
  CHECK(batch[0].token_ids == alone[0].token_ids);
  CHECK(batch[1].token_ids == to_vector(reference.tensor("greedy")));

  auto expected = to_vector(reference.tensor("greedy"));
  std::size_t first_new = 1;  // the first token not generated before: stopping on it keeps the ones before
  while (std::find(expected.begin(), expected.begin() + first_new, expected[first_new]) != expected.begin() + first_new) ++first_new;
  greedy.stop_token_ids = {expected[first_new]};
  auto stopped = neva::generate(model, *tokenizer, {with_images}, greedy);
  CHECK(stopped[0].token_ids == std::vector<std::int64_t>(expected.begin(), expected.begin() + first_new));
  CHECK(stopped[0].finish_reason == "stop_token");
}

TEST_CASE("score: per-token log-probabilities of a continuation match transformers") {
  auto directory = oracle_directory() / "hub";
  neva::SafetensorsFile reference((directory / "reference.safetensors").string());
  neva::Recipe recipe = recipe_for(directory);
  neva::LlavaModel model = neva::build_model(recipe, recipe.runtime_context());
  neva::GenerationRequest prompt{to_vector(reference.tensor("input_ids")), reference.tensor("pixel_values")};
  auto scores = neva::score_continuation(model, prompt, to_vector(reference.tensor("greedy")));
  auto expected = reference.tensor("greedy_log_probs");
  REQUIRE(scores.size() == static_cast<std::size_t>(expected.numel()));
  for (std::size_t i = 0; i < scores.size(); ++i) CHECK(scores[i] == doctest::Approx(expected[i].item<double>()).epsilon(1e-5));
}

namespace {

std::string llava_recipe(const std::string& mode, const std::string& inference) {
  std::string hub = (oracle_directory() / "hub").string();
  return "[run]\nmode = \"" + mode + "\"\n[model]\nmicro_batch_size = 2\n[model.data]\nconv_template = \"v1\"\n" +
         "[model.mm_cfg]\nmm_mlp_adapter_type = \"mlp2x_gelu\"\npretrain_mm_mlp_adapter = \"" + hub + "\"\n" +
         "[model.mm_cfg.llm]\nplugin = \"llama\"\nfrom_pretrained = \"" + hub + "\"\n" +
         "[model.mm_cfg.vision_encoder]\nplugin = \"clip\"\nfrom_pretrained = \"" + hub + "\"\n[inference]\n" + inference;
}

neva::test::CommandResult neva_run(const std::string& arguments) {
  return neva::test::run_command(neva::test::binary("neva-run").string() + " " + arguments, 300);
}

std::vector<nlohmann::json> json_lines(const fs::path& path) {
  std::ifstream in(path);
  std::vector<nlohmann::json> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
  return lines;
}

}  // namespace

TEST_CASE("neva-run generate answers a batch of prompts with and without images, as JSON lines") {
  neva::test::TempDir dir;
  std::string image = (oracle_directory().parent_path() / "images" / "wide.png").string();
  auto recipe = dir.write("generate.toml", llava_recipe("generate", "tokens_to_generate = 6\nprompts = [\"What is in the "
                                                                    "image?\", \"Describe it.\"]\nimages = [\"" + image +
                                                                    "\", \"\"]\noutput_file = \"answers.jsonl\"\n"));
  auto result = neva_run(recipe.string());
  INFO(result.err);
  REQUIRE(result.exit_code == 0);
  auto lines = json_lines(dir.path() / "answers.jsonl");
  REQUIRE(lines.size() == 2);
  CHECK(lines[0]["images"].size() == 1);
  CHECK(lines[1]["images"].size() == 0);
  for (const auto& line : lines) {
    CHECK(line["answer"].is_string());
    CHECK(line["tokens"].get<int>() <= 6);
  }
  std::size_t leftovers = 0;
  for (const auto& entry : fs::directory_iterator(dir.path())) leftovers += entry.path().string().find(".tmp.") != std::string::npos;
  CHECK(leftovers == 0);
}

// The values themselves are checked against transformers in "score: per-token log-probabilities of a
// continuation match transformers"; this is the command's plumbing: requests in, one line each out.
TEST_CASE("neva-run score writes a line per request with a log-probability for every continuation token") {
  neva::test::TempDir dir;
  std::string image = (oracle_directory().parent_path() / "images" / "photo.jpg").string();
  dir.write("requests.jsonl", "{\"prompt\": \"What shape is it?\", \"image\": \"" + image +
                                  "\", \"continuation\": \"A red circle.\"}\n\n{\"prompt\": \"Say hi\", \"continuation\": "
                                  "\"hi\"}\n");
  auto recipe = dir.write("score.toml", llava_recipe("score", "input_file = \"requests.jsonl\"\noutput_file = \"scores.jsonl\"\n"));
  auto result = neva_run(recipe.string());
  INFO(result.err);
  REQUIRE(result.exit_code == 0);
  auto lines = json_lines(dir.path() / "scores.jsonl");
  REQUIRE(lines.size() == 2);
  for (const auto& line : lines) {
    auto log_probs = line["token_logprobs"].get<std::vector<double>>();
    CHECK(log_probs.size() == line["token_ids"].size());
    CHECK(!log_probs.empty());
    double total = 0;
    for (double value : log_probs) {
      CHECK(value <= 0);
      total += value;
    }
    CHECK(line["logprob"].get<double>() == doctest::Approx(total));
  }
}

TEST_CASE("bad requests give one clear error and no partial output") {
  neva::test::TempDir dir;
  auto missing = dir.write("missing.toml", llava_recipe("generate", "prompts = [\"Hi\"]\nimages = [\"" +
                                                                        (dir.path() / "nowhere.png").string() +
                                                                        "\"]\noutput_file = \"out.jsonl\"\n"));
  auto result = neva_run(missing.string());
  CHECK(result.exit_code == 1);
  CHECK(result.err.find("nowhere.png: cannot open image") != std::string::npos);
  CHECK(!fs::exists(dir.path() / "out.jsonl"));

  dir.write("bad.jsonl", "{\"prompt\": \"ok\", \"continuation\": \"x\"}\n{\"prompt\": oops}\n");
  auto bad = dir.write("bad.toml", llava_recipe("score", "input_file = \"bad.jsonl\"\n"));
  result = neva_run(bad.string());
  CHECK(result.exit_code == 1);
  CHECK(result.err.find("bad.jsonl:2:12: invalid JSON") != std::string::npos);

  auto long_prompt = dir.write("long.toml", llava_recipe("generate", "prompts = [\"" + std::string(2000, '~') + "\"]\n"));
  result = neva_run(long_prompt.string());
  CHECK(result.exit_code == 1);
  CHECK(result.err.find("exceeds the model's context of 512 tokens") != std::string::npos);

  auto no_prompts = dir.write("none.toml", llava_recipe("generate", ""));
  result = neva_run("validate " + no_prompts.string());
  CHECK(result.exit_code == 2);
  CHECK(result.err.find("inference.prompts: missing: mode 'generate' needs prompts") != std::string::npos);
}

TEST_CASE("an llm directory of another model type is refused by name") {
  neva::test::TempDir dir;
  dir.write("config.json", R"({"model_type": "mistral", "hidden_size": 64})");
  std::string text = "[model.mm_cfg]\nmm_mlp_adapter_type = 'linear'\n[model.mm_cfg.mm_mlp_adapter]\ninput_size = 4\n"
                     "[model.mm_cfg.llm]\nplugin = 'llama'\nconfig = '" + (dir.path() / "config.json").string() + "'\n";
  neva::Registry::Options options = neva::test::builtin_plugins();
  CHECK_THROWS_WITH_AS(neva::parse_recipe(neva::ConfigDocument::parse(text, "r.toml"), dir.path(), options),
                       doctest::Contains("config.json: model_type: expected \"llama\""), neva::RecipeError);
}

TEST_CASE("neva-run generate in bf16, and use_im_start_end needs its tokens") {
  neva::test::TempDir dir;
  std::string image = (oracle_directory().parent_path() / "images" / "wide.png").string();
  auto recipe = dir.write("bf16.toml", llava_recipe("generate", "tokens_to_generate = 4\nprompts = [\"What?\"]\nimages = [\"" +
                                                                    image + "\"]\noutput_file = \"a.jsonl\"\n"));
  auto result = neva_run(recipe.string() + " --set trainer.precision=bf16");
  INFO(result.err);
  CHECK(result.exit_code == 0);
  CHECK(json_lines(dir.path() / "a.jsonl").size() == 1);
  result = neva_run(recipe.string() + " --set model.mm_cfg.use_im_start_end=true");
  CHECK(result.exit_code == 1);
  CHECK(result.err.find("use_im_start_end is set, but the tokenizer") != std::string::npos);
}

TEST_CASE("end to end: prompt text and an image file give transformers' LlavaProcessor inputs and answer") {
  auto directory = oracle_directory() / "hub";
  neva::SafetensorsFile reference((directory / "reference.safetensors").string());
  std::ifstream prompt_file(oracle_directory() / "e2e_prompt.txt");
  std::string expected_prompt((std::istreambuf_iterator<char>(prompt_file)), std::istreambuf_iterator<char>());

  std::string prompt = neva::render_conversation(neva::conversation_template("v1"),
                                                 {{neva::Turn::Role::User, "<image>\nWhat is in the image?"}}, true);
  CHECK(prompt == expected_prompt);

  neva::Recipe recipe = recipe_for(directory);
  neva::LlavaModel model = neva::build_model(recipe, recipe.runtime_context());
  auto tokenizer = neva::Tokenizer::load(directory.string());
  auto ids = neva::tokenize_with_images(*tokenizer, prompt, model.image_token_id(), model.tokens_per_image());
  CHECK(ids == to_vector(reference.tensor("e2e_input_ids")));

  at::Tensor pixels = neva::preprocess_image(neva::load_image((oracle_directory() / "scene.png").string()),
                                             model.encoder()->image_processor())
                          .unsqueeze(0);
  at::Tensor expected_pixels = reference.tensor("e2e_pixel_values");
  REQUIRE(pixels.sizes() == expected_pixels.sizes());
  CHECK((pixels - expected_pixels).abs().max().item<double>() <= 1.0 / 255);

  neva::SamplingConfig greedy;
  greedy.max_new_tokens = 8;
  auto answer = neva::generate(model, *tokenizer, {{ids, pixels}}, greedy);
  CHECK(answer[0].token_ids == to_vector(reference.tensor("e2e_greedy")));

  // The same through neva-run: a prompt and an image file in a recipe.
  neva::test::TempDir dir;
  auto recipe_file = dir.write("e2e.toml", llava_recipe("generate", "tokens_to_generate = 8\nprompts = [\"What is in the "
                                                                    "image?\"]\nimages = [\"" +
                                                                    (oracle_directory() / "scene.png").string() +
                                                                    "\"]\noutput_file = \"a.jsonl\"\n"));
  auto result = neva_run(recipe_file.string());
  INFO(result.err);
  REQUIRE(result.exit_code == 0);
  CHECK(json_lines(dir.path() / "a.jsonl")[0]["answer"] == tokenizer->decode(to_vector(reference.tensor("e2e_greedy")), true));
}

TEST_CASE("a Mistral + SigLIP composition matches transformers' LlavaForConditionalGeneration") {
  torch::NoGradGuard no_grad;
  // 'full' keeps all 16 patches; transformers' 'default' drops one leading token even though SigLIP
  // has no class token, so its first patch goes (15 image tokens).
  for (auto [name, tokens] : {std::pair<std::string, std::int64_t>{"mistral_siglip", 16}, {"mistral_siglip_default", 15}}) {
    CAPTURE(name);
    auto directory = oracle_directory() / name;
    neva::SafetensorsFile reference((directory / "reference.safetensors").string());
    std::string path = directory.string();
    std::string text = "[model.mm_cfg]\nmm_mlp_adapter_type = \"mlp2x_gelu\"\npretrain_mm_mlp_adapter = \"" + path +
                       "\"\n[model.mm_cfg.llm]\nplugin = \"mistral\"\nfrom_pretrained = \"" + path +
                       "\"\n[model.mm_cfg.vision_encoder]\nplugin = \"siglip\"\nfrom_pretrained = \"" + path + "\"\n";
    neva::Registry::Options options = neva::test::builtin_plugins();
    neva::Recipe recipe = neva::parse_recipe(neva::ConfigDocument::parse(text, "ms.toml"), directory, options);
    neva::LlavaModel model = neva::build_model(recipe, recipe.runtime_context());
    CHECK(model.tokens_per_image() == tokens);
    neva::MultimodalInputs inputs;
    inputs.input_ids = reference.tensor("input_ids");
    inputs.pixel_values = reference.tensor("pixel_values");
    CHECK((model.forward(inputs).logits - reference.tensor("logits")).abs().max().item<double>() <= 1e-4);
    auto tokenizer = neva::Tokenizer::load(path);
    neva::SamplingConfig greedy;
    greedy.max_new_tokens = 8;
    auto answer = neva::generate(model, *tokenizer, {{to_vector(inputs.input_ids), inputs.pixel_values}}, greedy);
    CHECK(answer[0].token_ids == to_vector(reference.tensor("greedy")));
  }
}

TEST_CASE("images of different sizes (aspect ratio 'keep') batch together and match separate runs") {
  auto directory = oracle_directory() / "hub";
  neva::Recipe recipe = recipe_for(directory);
  neva::LlavaModel model = neva::build_model(recipe, recipe.runtime_context());
  auto tokenizer = any_tokenizer();
  torch::manual_seed(5);
  at::Tensor square = torch::randn({3, 28, 28}), wide = torch::randn({3, 28, 42});
  CHECK(model.tokens_for_image(28, 28) == 16);
  CHECK(model.tokens_for_image(28, 42) == 24);
  auto prompt_for = [&](const at::Tensor& image) {
    neva::GenerationRequest request;
    request.prompt_ids = neva::tokenize_with_images(*tokenizer, "<image>\nWhat?", model.image_token_id(),
                                                    std::vector<std::int64_t>{model.tokens_for_image(image.size(1), image.size(2))});
    request.images = {image};
    return request;
  };
  neva::SamplingConfig greedy;
  greedy.max_new_tokens = 6;
  auto together = neva::generate(model, *tokenizer, {prompt_for(square), prompt_for(wide)}, greedy);
  CHECK(together[0].token_ids == neva::generate(model, *tokenizer, {prompt_for(square)}, greedy)[0].token_ids);
  CHECK(together[1].token_ids == neva::generate(model, *tokenizer, {prompt_for(wide)}, greedy)[0].token_ids);
}
