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

}  // namespace

std::string allocation_failure(const std::string& message) {
  static const std::regex cpu("can't allocate memory: you tried to allocate ([0-9]+) bytes");
  static const std::regex cuda("CUDA out of memory. Tried to allocate ([0-9.]+ [KMGT]?i?B)");
  std::smatch match;
  const double memory = static_cast<double>(::sysconf(_SC_PHYS_PAGES)) * static_cast<double>(::sysconf(_SC_PAGESIZE));
  if (std::regex_search(message, match, cpu)) {
    const double bytes = std::stod(match[1].str());
    return "out of memory: cannot allocate " + match[1].str() + " bytes (" + bytes_text(bytes) +
           ") for one tensor; this machine has " + bytes_text(memory);
  }
  if (std::regex_search(message, match, cuda)) {
    return "out of GPU memory: cannot allocate " + match[1].str() + " for one tensor";
  }
  if (message == "std::bad_alloc" || message.find("bad_alloc") != std::string::npos) {
    return "out of memory (an allocation failed; this machine has " + bytes_text(memory) + ")";
  }
  return {};
}

}  // namespace neva
