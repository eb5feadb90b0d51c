#pragma once
// A registry limited to the plugins this build made (no NEVA_PLUGIN_PATH, no install directory).
#include "neva/registry.h"
#include "test_support.h"

namespace neva::test {

inline Registry::Options builtin_plugins() {
  Registry::Options options;
  options.search_paths = {plugin_directory()};
  options.use_environment = false;
  options.use_install_directory = false;
  return options;
}

}  // namespace neva::test
