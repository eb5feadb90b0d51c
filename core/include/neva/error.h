#pragma once
#include <stdexcept>
#include <string>

#include "neva/export.h"

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

}  // namespace neva
