#include "inference.h"
#include "session.h"

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

// The templated prompt's ids and its images' pixel values.
GenerationRequest prepare(const Session& session, const Request& request) {
  std::vector<at::Tensor> images;
  for (const auto& image : request.images) images.push_back(session.load_image(image, request.where));
  return session.prepare_conversation({{Turn::Role::User, request.prompt}}, {request.images.size()}, std::move(images), "",
                                      request.where);
}

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
  for (const auto& request : requests) prepared.push_back(prepare(session, request));
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
    GenerationRequest prepared = prepare(session, request);
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
