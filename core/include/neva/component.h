#pragma once
#include "neva/api.h"

namespace neva {

// Base of everything a plugin builds. The host deletes components through this type, while the
// plugin's library is still loaded (the registry's handles guarantee it).
class NEVA_API Component {
 public:
  virtual ~Component();
};

// Base of a plugin's parsed configuration: a plugin derives its own typed struct, filled and
// validated from its recipe table before anything is built.
struct NEVA_API ComponentConfig {
  virtual ~ComponentConfig();
};

}  // namespace neva
