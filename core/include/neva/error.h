#pragma once
#include <stdexcept>
#include <string>

#include "neva/api.h"

namespace neva {

// Base of every error neva reports. Messages put the cause first and name the file, key, tensor or
// rank involved, on one line.
class NEVA_API Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
  ~Error() override;
};

// The user's input is wrong: a recipe, a --set override, a command-line argument (exit code 2).
class NEVA_API RecipeError : public Error {
 public:
  using Error::Error;
  ~RecipeError() override;
};

// A plugin could not be found, loaded, trusted, or failed while building (exit code 1).
class NEVA_API PluginError : public Error {
 public:
  using Error::Error;
  ~PluginError() override;
};

// When `message` is LibTorch's report of a failed allocation ("DefaultCPUAllocator: can't allocate
// memory: you tried to allocate N bytes", CUDA's "out of memory"), what to tell the user instead:
// "out of memory: cannot allocate 256000000000000 bytes (232.8 TiB) for one tensor; this machine has
// 23.4 GiB" (the cgroup's limit where lower). "" for any other message.
NEVA_API std::string allocation_failure(const std::string& message);
// What to say for a std::bad_alloc: "out of memory (an allocation failed; this machine has ...)".
NEVA_API std::string out_of_memory();

}  // namespace neva
