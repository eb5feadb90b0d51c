#pragma once
#include "neva/recipe.h"

namespace neva {

// Mode "generate": answers for the recipe's prompts (inference.prompts/images or input_file), streamed
// to a terminal for a single prompt, else one JSON line per request (stdout or inference.output_file).
void run_generate(const Recipe& recipe);

// Mode "score": for each JSONL request {prompt, continuation, image?} the log-probability of every
// continuation token after the templated prompt, as JSON lines.
void run_score(const Recipe& recipe);

}  // namespace neva
