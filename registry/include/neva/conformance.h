#pragma once
// The plugin conformance battery behind neva-conformance: which checks a plugin of a kind must pass,
// and each check's body. The tool runs every check in its own process, so a plugin that crashes
// fails that check instead of the run.
#include <filesystem>
#include <string>
#include <vector>

#include "neva/api.h"

namespace neva {

struct ConformanceCheck {
  std::string name;
  std::string description;
};

// The checks for a plugin of `kind` (connector, vision_encoder, language_backbone).
NEVA_API std::vector<ConformanceCheck> conformance_checks(const std::string& kind);

// Runs check `name` on the plugin file, built from `config_toml` (its recipe table as TOML text).
// Returns normally when it passes; throws neva::Error saying what is wrong otherwise.
NEVA_API void run_conformance_check(const std::string& name, const std::filesystem::path& plugin,
                                    const std::string& config_toml);

// The kind the plugin file declares (loads it; throws PluginError when it is not a valid plugin).
NEVA_API std::string plugin_kind(const std::filesystem::path& plugin);

}  // namespace neva
