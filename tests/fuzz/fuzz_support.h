#pragma once
// What the fuzz targets share: a scratch directory of their own (in /dev/shm when there is one), a
// file writer, the registry over the fuzz build's plugins, and the assets scripts/fuzz.sh prepares
// (NEVA_FUZZ_ASSETS: the demo's tokenizer, images and a tiny model config).
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>

#include "neva/registry.h"

namespace neva::fuzz {

// A directory for this process, created once: <scratch>/<name>.
std::filesystem::path scratch(const std::string& name);
// Writes `size` bytes to `path` (truncating).
void write(const std::filesystem::path& path, const std::uint8_t* data, std::size_t size);
void write(const std::filesystem::path& path, const std::string& text);
// The fuzz build's plugin directory, and only it (its plugins stay loaded for the process).
Registry::Options plugin_options();
// NEVA_FUZZ_ASSETS, or the fuzz process aborts naming it (the assets are part of the harness).
std::filesystem::path assets();
// configs/tiny/models/<model>/config.json of the source tree.
std::filesystem::path tiny_model(const std::string& model);

}  // namespace neva::fuzz
