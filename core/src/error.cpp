#include "neva/error.h"

namespace neva {

// Out-of-line destructors: the typeinfo of each error has one owner, libneva_core, so the host
// catches by type what a plugin threw.
Error::~Error() = default;
RecipeError::~RecipeError() = default;
PluginError::~PluginError() = default;

}  // namespace neva
