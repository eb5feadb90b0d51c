#pragma once
#include <string>
#include <string_view>
#include <vector>

#include "neva/api.h"

namespace neva {

// The candidate closest to `word` by edit distance, or "" when none is close enough to be a likely
// typo. Used for "did you mean ...?" in errors about unknown keys, values and plugin names.
NEVA_API std::string closest_match(std::string_view word, const std::vector<std::string>& candidates);

// " (did you mean 'x'?)" or "".
NEVA_API std::string did_you_mean(std::string_view word, const std::vector<std::string>& candidates);

// "a, b, c" — for messages that list what is available.
NEVA_API std::string join(const std::vector<std::string>& items, std::string_view separator = ", ");

}  // namespace neva
