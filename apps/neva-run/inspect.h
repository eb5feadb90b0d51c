#pragma once
#include <ostream>

#include "neva/recipe.h"

namespace neva {

// Mode "inspect": builds every component the recipe names through the registry, reports what was
// built (plugin, library, parameters, trainable or frozen) and runs one forward pass through each
// on deterministic random input, reporting shapes, dtypes and time.
void run_inspect(const Recipe& recipe, std::ostream& out);

}  // namespace neva
