#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace neva {

// loss.png (800 x 480, Cairo): the loss per optimizer step (grey) and its exponential moving average
// (blue), with ticks and labels on both axes, axis titles, a legend and "<title>: training loss" on
// top. Written atomically; nothing when there is no finite point.
void write_loss_plot(const std::string& path, const std::vector<std::pair<std::int64_t, double>>& losses,
                     const std::string& title);

}  // namespace neva
