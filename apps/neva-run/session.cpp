#include "session.h"

#include <filesystem>

#include "neva/data/image_tokens.h"
#include "neva/error.h"

namespace neva {

namespace {

namespace fs = std::filesystem;

// Generation and scoring run on one model-parallel group (tensor x pipeline x expert): every rank
// computes the same tokens (the logits are gathered over the tensor group and broadcast from the
// last pipeline stage, and sampling draws from one seed), rank 0 writes them.
World inference_world(const Recipe& recipe) {
  // Checked before joining the others: a wrong launch is refused without waiting for them.
  const ParallelSizes& sizes = recipe.model.parallel;
  // Under expert parallelism the dense part is replicated over the expert-parallel ranks: all of
  // them run the same requests, each its experts.
  const int launched = World::launched_size();
  const std::int64_t group = sizes.tensor * sizes.pipeline * sizes.context * sizes.expert;
  if (launched != group) {
    throw RecipeError(recipe.source + ": run.mode = \"" + recipe.run.mode + "\" runs on one model-parallel group, but " +
                      std::to_string(launched) + " process" + (launched == 1 ? " was" : "es were") +
                      " launched for model.tensor_model_parallel_size = " + std::to_string(sizes.tensor) +
                      (sizes.pipeline > 1 ? " x pipeline_model_parallel_size = " + std::to_string(sizes.pipeline) : "") +
                      (sizes.expert > 1 ? " x expert_model_parallel_size = " + std::to_string(sizes.expert) : "") +
                      " (data-parallel " + recipe.run.mode + " is not implemented: launch " + std::to_string(group) +
                      " processes)");
  }
  const auto timeout = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::duration<double, std::ratio<60>>(recipe.trainer.distributed_timeout_minutes));
  return World::from_environment(timeout);
}

}  // namespace

Session::Session(const Recipe& recipe)
    : recipe_(recipe),
      world_(inference_world(recipe)),
      context_(recipe.runtime_context(world_)),
      model_(build_model(recipe, context_)),
      tokenizer_(Tokenizer::load(recipe.model.tokenizer)),
      conversation_(conversation_template(recipe.model.data.conv_template)) {
  if (model_.encoder()) processor_ = with_aspect_ratio(model_.encoder()->image_processor(), recipe.model.data.image_aspect_ratio);
}

std::int64_t Session::max_image_pixels() const {
  return recipe_.inference.max_image_pixels > 0 ? recipe_.inference.max_image_pixels : kDefaultMaxImagePixels;
}

at::Tensor Session::preprocess(const Image& image, const std::string& where) const {
  if (!model_.encoder()) throw Error(where + ": the request has images, but the model has no vision encoder");
  try {
    return preprocess_image(image, processor_, max_image_pixels());
  } catch (const Error& error) {
    throw Error(where + ": " + error.what());
  }
}

at::Tensor Session::load_image(const std::string& image, const std::string& where) const {
  if (!model_.encoder()) throw Error(where + ": the request has images, but the model has no vision encoder");
  fs::path path(image);
  if (path.is_relative() && !recipe_.model.data.image_folder.empty()) path = fs::path(recipe_.model.data.image_folder) / path;
  return load_and_preprocess_image(path.string(), processor_, max_image_pixels());
}

GenerationRequest Session::prepare_conversation(std::vector<Turn> turns, const std::vector<std::size_t>& images_per_turn,
                                                std::vector<at::Tensor> images, const std::string& system,
                                                const std::string& where) const {
  for (std::size_t t = 0; t < turns.size(); ++t) {
    std::string& text = turns[t].text;
    const std::size_t own = t < images_per_turn.size() ? images_per_turn[t] : 0;
    if (own > 0 && text.find("<image>") == std::string::npos) {
      for (std::size_t i = 0; i < own; ++i) text = "<image>\n" + text;  // LLaVA's convention
    }
    if (recipe_.model.mm_cfg.use_im_start_end) text = wrap_image_markers(text, *tokenizer_, recipe_.model.tokenizer);
  }
  const std::string prompt =
      render_conversation(conversation_, turns, true, system.empty() ? recipe_.inference.system : system);
  const std::size_t markers = count_image_markers(prompt);
  if (markers != images.size()) {
    throw Error(where + ": the prompt holds " + std::to_string(markers) + " <image> placeholder(s) but " +
                std::to_string(images.size()) + " image(s) were given");
  }
  GenerationRequest prepared;
  prepared.images = std::move(images);
  std::vector<std::int64_t> counts;
  for (const auto& image : prepared.images) counts.push_back(model_.tokens_for_image(image.size(1), image.size(2)));
  prepared.prompt_ids = tokenize_with_images(*tokenizer_, prompt, model_.image_token_id(), counts);
  return prepared;
}

SamplingConfig Session::sampling() const {
  const InferenceConfig& inference = recipe_.inference;
  SamplingConfig config;
  config.greedy = inference.greedy;
  config.top_k = inference.top_k;
  config.top_p = inference.top_p;
  config.temperature = inference.temperature;
  config.repetition_penalty = inference.repetition_penalty;
  config.max_new_tokens = inference.tokens_to_generate;
  config.seed = recipe_.run.seed;
  config.stop_strings = inference.end_strings;
  config.stop_strings.push_back(assistant_end(conversation_));
  const std::int64_t image_token = model_.image_token_id();
  if (image_token >= 0 && image_token < model_.backbone().vocab_size()) {
    config.suppressed_ids.push_back(image_token);
  }
  for (const char* end : {"</s>", "<|eot_id|>", "<|end_of_text|>", "<extra_id_1>"}) {
    auto id = tokenizer_->token_id(end);
    if (id && tokenizer_->is_special(*id)) config.stop_token_ids.push_back(*id);
  }
  return config;
}

}  // namespace neva
