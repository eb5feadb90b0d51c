#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace neva {

// loss.png: the loss per optimizer step (grey) and its running mean (blue), with the step range
// and the loss range written on the axes. Written atomically; nothing when there is no point.
void write_loss_plot(const std::string& path, const std::vector<std::pair<std::int64_t, double>>& losses,
                     const std::string& title);

}  // namespace neva
