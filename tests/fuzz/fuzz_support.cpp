#include "fuzz_support.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>

namespace neva::fuzz {

namespace fs = std::filesystem;

fs::path scratch(const std::string& name) {
  static const fs::path root = [] {
    std::error_code error;
    const fs::path base = fs::is_directory("/dev/shm", error) ? fs::path("/dev/shm") : fs::temp_directory_path();
    fs::path path = base / ("neva-fuzz-" + std::to_string(::getpid()));
    fs::create_directories(path);
    return path;
  }();
  fs::path path = root / name;
  fs::create_directories(path);
  return path;
}

void write(const fs::path& path, const std::uint8_t* data, std::size_t size) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
}

void write(const fs::path& path, const std::string& text) {
  write(path, reinterpret_cast<const std::uint8_t*>(text.data()), text.size());
}

Registry::Options plugin_options() {
  Registry::Options options;
  options.search_paths = {NEVA_FUZZ_PLUGIN_DIR};
  options.use_environment = false;
  options.use_install_directory = false;
  // One registry held for the whole process keeps every plugin loaded: libFuzzer keeps writing the
  // coverage counters of each instrumented library, so none may be unloaded when a recipe's own
  // registry goes.
  static const Registry keep_loaded(options);
  return options;
}

fs::path assets() {
  const char* directory = std::getenv("NEVA_FUZZ_ASSETS");
  if (!directory || !fs::is_directory(directory)) {
    std::fprintf(stderr, "NEVA_FUZZ_ASSETS must name the assets directory scripts/fuzz.sh prepares\n");
    std::abort();
  }
  return directory;
}

fs::path tiny_model(const std::string& model) {
  return fs::path(NEVA_FUZZ_SOURCE_DIR) / "configs/tiny/models" / model / "config.json";
}

}  // namespace neva::fuzz
