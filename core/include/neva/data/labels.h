#pragma once
// The label of a token that is not learned (prompt, image, padding): LLaVA's IGNORE_INDEX and
// PyTorch cross_entropy's default ignore_index. The data writes it; the loss skips it.
#include <cstdint>

namespace neva {

inline constexpr std::int64_t kIgnoreIndex = -100;

}  // namespace neva
