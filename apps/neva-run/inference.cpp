#include "inference.h"

#include <unistd.h>

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "neva/io/atomic_file.h"
#include "neva/data/conversation.h"
#include "neva/error.h"
#include "neva/io/json.h"
#include "neva/inference/generation.h"
#include "neva/data/image.h"
#include "neva/model/llava.h"
#include "neva/data/tokenizer.h"
#include "neva/parallel/process_group.h"

namespace neva {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

struct Request {
  std::string prompt;
  std::vector<std::string> images;
  std::string continuation;  // score mode
  std::string where;         // "file:line" or "inference.prompts[i]", for messages
};

std::vector<Request> read_requests(const Recipe& recipe, bool need_continuation) {
  const InferenceConfig& inference = recipe.inference;
  std::vector<Request> requests;
  if (inference.input_file.empty()) {
    for (std::size_t i = 0; i < inference.prompts.size(); ++i) {
      Request request{inference.prompts[i], {}, "", "inference.prompts[" + std::to_string(i) + "]"};
      if (i < inference.images.size() && !inference.images[i].empty()) request.images.push_back(inference.images[i]);
      requests.push_back(request);
    }
    return requests;
  }
  for_each_line(inference.input_file, [&](std::string_view line, std::size_t number) {
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) return;
    std::string where = inference.input_file + ":" + std::to_string(number);
    json item = parse_json_line(line, inference.input_file, number);
    if (!item.is_object() || !item.contains("prompt") || !item["prompt"].is_string()) {
      throw Error(where + ": expected an object with a string \"prompt\"");
    }
    Request request{item["prompt"].get<std::string>(), {}, "", where};
    if (item.contains("image")) {
      if (!item["image"].is_string()) throw Error(where + ": \"image\" must be a string (a path)");
      request.images.push_back(item["image"].get<std::string>());
    }
    if (item.contains("images")) {
      if (!item["images"].is_array()) throw Error(where + ": \"images\" must be an array of paths");
      for (const auto& image : item["images"]) {
        if (!image.is_string()) throw Error(where + ": \"images\" must be an array of paths, got " + json_excerpt(image));
        request.images.push_back(image.get<std::string>());
      }
    }
    if (need_continuation) {
      if (!item.contains("continuation") || !item["continuation"].is_string()) {
        throw Error(where + ": expected a string \"continuation\" to score");
      }
      request.continuation = item["continuation"].get<std::string>();
    }
    requests.push_back(request);
  });
  return requests;
}

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

class Session {
 public:
  explicit Session(const Recipe& recipe)
      : recipe_(recipe),
        world_(inference_world(recipe)),
        context_(recipe.runtime_context(world_)),
        model_(build_model(recipe, context_)),
        tokenizer_(Tokenizer::load(recipe.model.tokenizer)),
        conversation_(conversation_template(recipe.model.data.conv_template)) {
    if (model_.encoder()) processor_ = with_aspect_ratio(model_.encoder()->image_processor(), recipe.model.data.image_aspect_ratio);
  }

  // The templated prompt's ids and its images' pixel values.
  GenerationRequest prepare(const Request& request) {
    std::string text = request.prompt;
    if (!request.images.empty() && text.find("<image>") == std::string::npos) {
      for (std::size_t i = 0; i < request.images.size(); ++i) text = "<image>\n" + text;  // LLaVA's convention
    }
    if (recipe_.model.mm_cfg.use_im_start_end) text = wrap_image_markers(text, *tokenizer_, recipe_.model.tokenizer);
    std::string prompt = render_conversation(conversation_, {{Turn::Role::User, text}}, true, recipe_.inference.system);
    GenerationRequest prepared;
    if (!request.images.empty()) {
      if (!model_.encoder()) throw Error(request.where + ": the request has images, but the model has no vision encoder");
      for (const auto& image : request.images) {
        fs::path path(image);
        if (path.is_relative() && !recipe_.model.data.image_folder.empty()) path = fs::path(recipe_.model.data.image_folder) / path;
        std::int64_t budget = recipe_.inference.max_image_pixels > 0 ? recipe_.inference.max_image_pixels : kDefaultMaxImagePixels;
        prepared.images.push_back(load_and_preprocess_image(path.string(), processor_, budget));
      }
    }
    const std::size_t markers = count_image_markers(prompt);
    if (markers != request.images.size()) {
      throw Error(request.where + ": the prompt holds " + std::to_string(markers) + " <image> placeholder(s) but " +
                  std::to_string(request.images.size()) + " image(s) were given");
    }
    std::vector<std::int64_t> counts;
    for (const auto& image : prepared.images) counts.push_back(model_.tokens_for_image(image.size(1), image.size(2)));
    prepared.prompt_ids = tokenize_with_images(*tokenizer_, prompt, model_.image_token_id(), counts);
    return prepared;
  }

  SamplingConfig sampling() const {
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
    for (const char* end : {"</s>", "<|eot_id|>", "<|end_of_text|>", "<extra_id_1>"}) {
      auto id = tokenizer_->token_id(end);
      if (id && tokenizer_->is_special(*id)) config.stop_token_ids.push_back(*id);
    }
    return config;
  }

  LlavaModel& model() { return model_; }
  bool writes() const { return world_.rank == 0; }  // the rank that prints and writes the answers
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  // The precision recipe's forward scope (none for a model held in bf16 or fp32 throughout).
  std::unique_ptr<PrecisionScope> enter_forward() const { return recipe_.precision->enter_forward(context_); }

 private:
  const Recipe& recipe_;
  World world_;
  RuntimeContext context_;
  LlavaModel model_;
  std::unique_ptr<Tokenizer> tokenizer_;
  ConversationTemplate conversation_;
  ImageProcessorConfig processor_;  // the encoder's, with image_aspect_ratio (checked at construction)
};

// Lines of JSON: to stdout as they come, or into an AtomicFile committed when complete.
class JsonlOutput {
 public:
  // `silent`: another rank writes the answers (tensor parallelism).
  JsonlOutput(const std::string& path, bool silent) : silent_(silent) {
    if (!path.empty() && !silent) file_ = std::make_unique<AtomicFile>(path);
  }
  void write(const json& line) {
    if (silent_) return;
    if (file_) {
      file_->write(line.dump() + "\n");
    } else {
      std::cout << line.dump() << "\n" << std::flush;
    }
  }
  void commit() {
    if (file_) file_->commit();
  }

 private:
  bool silent_;
  std::unique_ptr<AtomicFile> file_;
};

}  // namespace

void run_generate(const Recipe& recipe) {
  Session session(recipe);
  std::vector<Request> requests = read_requests(recipe, false);
  std::vector<GenerationRequest> prepared;
  for (const auto& request : requests) prepared.push_back(session.prepare(request));
  SamplingConfig sampling = session.sampling();
  const std::int64_t context = session.model().backbone().max_position_embeddings();

  // One request to a terminal: stream the answer as it is written. Otherwise one JSON line each.
  const bool stream =
      session.writes() && recipe.inference.output_file.empty() && requests.size() == 1 && ::isatty(STDOUT_FILENO);
  JsonlOutput output(recipe.inference.output_file, !session.writes());
  const std::size_t batch = static_cast<std::size_t>(recipe.model.micro_batch_size);
  for (std::size_t start = 0; start < prepared.size(); start += batch) {
    std::vector<GenerationRequest> chunk(prepared.begin() + start,
                                         prepared.begin() + std::min(prepared.size(), start + batch));
    TextCallback on_text;
    if (stream) on_text = [](std::size_t, const std::string& text) { std::cout << text << std::flush; };
    std::vector<GenerationResult> results;
    {
      auto scope = session.enter_forward();
      results = generate(session.model(), session.tokenizer(), chunk, sampling, on_text, context);
    }
    for (std::size_t i = 0; i < results.size(); ++i) {
      if (stream) {
        std::cout << "\n";
        continue;
      }
      if (!session.writes()) continue;
      const Request& request = requests[start + i];
      output.write({{"prompt", request.prompt}, {"images", request.images}, {"answer", results[i].text},
                    {"tokens", results[i].token_ids.size()}, {"finish_reason", results[i].finish_reason}});
    }
  }
  output.commit();
}

void run_score(const Recipe& recipe) {
  Session session(recipe);
  JsonlOutput output(recipe.inference.output_file, !session.writes());
  const std::int64_t context = session.model().backbone().max_position_embeddings();
  for (const auto& request : read_requests(recipe, true)) {
    GenerationRequest prepared = session.prepare(request);
    std::vector<std::int64_t> continuation = session.tokenizer().encode(request.continuation, false);
    if (static_cast<std::int64_t>(prepared.prompt_ids.size() + continuation.size()) > context) {
      throw Error(request.where + ": prompt and continuation are " +
                  std::to_string(prepared.prompt_ids.size() + continuation.size()) +
                  " tokens, longer than the model's context of " + std::to_string(context));
    }
    std::vector<double> log_probs;
    {
      auto scope = session.enter_forward();
      log_probs = score_continuation(session.model(), prepared, continuation);
    }
    double total = 0;
    for (double value : log_probs) total += value;
    json tokens = json::array();
    for (std::int64_t id : continuation) tokens.push_back(session.tokenizer().decode({id}, false));
    output.write({{"prompt", request.prompt}, {"continuation", request.continuation}, {"token_ids", continuation},
                  {"tokens", tokens}, {"token_logprobs", log_probs}, {"logprob", total}});
  }
  output.commit();
}

}  // namespace neva
