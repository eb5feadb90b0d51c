#pragma once
#include <string>

#include "neva/recipe.h"

namespace neva {

struct ServeOptions {
  std::string api_key;  // "" = none; else every /v1 request needs "Authorization: Bearer <key>"
};

// Mode "serve": an OpenAI-compatible HTTP server for the recipe's model (docs/serving.md). Returns
// the exit status: 0 after a SIGTERM/SIGINT drain.
int run_serve(const Recipe& recipe, const ServeOptions& options);

}  // namespace neva
