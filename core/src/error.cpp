#include "neva/error.h"

#include <unistd.h>

#include <cstdio>
#include <regex>

namespace neva {

// Out-of-line destructors: the typeinfo of each error has one owner, libneva_core, so the host
// catches by type what a plugin threw.
Error::~Error() = default;
RecipeError::~RecipeError() = default;
PluginError::~PluginError() = default;

namespace {

std::string bytes_text(double bytes) {
  const char* units[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int unit = 0;
  while (bytes >= 1024 && unit < 6) {
    bytes /= 1024;
    ++unit;
  }
  char text[32];
  std::snprintf(text, sizeof text, unit == 0 ? "%.0f %s" : "%.1f %s", bytes, units[unit]);
  return text;
}

// Physical memory, or the cgroup's limit when it is lower (a container, a Slurm job).
double memory_available() {
  double memory = static_cast<double>(::sysconf(_SC_PHYS_PAGES)) * static_cast<double>(::sysconf(_SC_PAGESIZE));
  for (const char* limit : {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    if (std::FILE* file = std::fopen(limit, "r")) {
      unsigned long long bytes = 0;
      if (std::fscanf(file, "%llu", &bytes) == 1 && bytes > 0 && static_cast<double>(bytes) < memory) {
        memory = static_cast<double>(bytes);
      }
      std::fclose(file);
    }
  }
  return memory;
}

}  // namespace

std::string allocation_failure(const std::string& message) {
  static const std::regex cpu("can't allocate memory: you tried to allocate ([0-9]+) bytes");
  static const std::regex cuda("CUDA out of memory. Tried to allocate ([0-9.]+ [KMGT]?i?B)");
  std::smatch match;
  if (std::regex_search(message, match, cpu)) {
    const double bytes = std::stod(match[1].str());
    return "out of memory: cannot allocate " + match[1].str() + " bytes (" + bytes_text(bytes) +
           ") for one tensor; this machine has " + bytes_text(memory_available());
  }
  if (std::regex_search(message, match, cuda)) {
    return "out of GPU memory: cannot allocate " + match[1].str() + " for one tensor";
  }
  return {};
}

std::string out_of_memory() {
  return "out of memory (an allocation failed; this machine has " + bytes_text(memory_available()) + ")";
}

}  // namespace neva
