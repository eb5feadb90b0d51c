#include "neva/parallel/rank_grid.h"

#include <algorithm>
#include <sstream>

#include "neva/error.h"
#include "neva/parallel_strategy.h"

namespace neva {

namespace {

const char* const kAxes[] = {"tp", "cp", "ep", "dp", "pp"};

std::vector<std::string> split_axes(const std::string& text) {
  std::vector<std::string> axes;
  std::stringstream in(text);
  std::string axis;
  while (std::getline(in, axis, '-')) axes.push_back(axis);
  if (!text.empty() && text.back() == '-') axes.emplace_back();
  return axes;
}

std::string describe(const std::map<std::string, int>& sizes) {
  std::string text;
  for (const char* axis : kAxes) {
    auto found = sizes.find(axis);
    text += (text.empty() ? "" : ", ") + std::string(axis) + " " + std::to_string(found == sizes.end() ? 1 : found->second);
  }
  return text;
}

}  // namespace

RankGrid::RankGrid(const std::string& order, const std::map<std::string, int>& sizes, int world_size)
    : world_size_(world_size) {
  for (const auto& [axis, size] : sizes) {
    if (std::find(std::begin(kAxes), std::end(kAxes), axis) == std::end(kAxes)) {
      throw Error("rank grid: unknown axis '" + axis + "' (expected tp, cp, ep, dp or pp)");
    }
    if (size < 1) throw Error("rank grid: the size of " + axis + " must be >= 1, got " + std::to_string(size));
  }
  for (const auto& axis : split_axes(order)) {
    if (std::find(std::begin(kAxes), std::end(kAxes), axis) == std::end(kAxes)) {
      throw Error("rank grid: order '" + order + "': unknown axis '" + axis +
                  "' (expected axes from tp, cp, ep, dp, pp joined by '-', e.g. tp-cp-ep-dp-pp)");
    }
    if (std::find(order_.begin(), order_.end(), axis) != order_.end()) {
      throw Error("rank grid: order '" + order + "' names " + axis + " twice");
    }
    order_.push_back(axis);
  }
  for (const char* axis : kAxes) {
    auto found = sizes.find(axis);
    const int size = found == sizes.end() ? 1 : found->second;
    if (std::find(order_.begin(), order_.end(), axis) == order_.end()) {
      if (size > 1) {
        throw Error("rank grid: order '" + order + "' leaves out " + axis + ", whose size is " + std::to_string(size));
      }
      order_.emplace_back(axis);
    }
  }
  std::int64_t product = 1;
  for (const auto& axis : order_) {
    auto found = sizes.find(axis);
    sizes_.push_back(found == sizes.end() ? 1 : found->second);
    product *= sizes_.back();
  }
  if (product != world_size) {
    throw Error("rank grid: the sizes (" + describe(sizes) + ") make " + std::to_string(product) +
                " ranks, but the world has " + std::to_string(world_size));
  }
}

int RankGrid::size(const std::string& axis) const {
  auto found = std::find(order_.begin(), order_.end(), axis);
  if (found == order_.end()) throw Error("rank grid: unknown axis '" + axis + "'");
  return sizes_[found - order_.begin()];
}

RankGroups RankGrid::groups(const std::string& axes) const {
  std::vector<bool> inside(order_.size(), false);
  for (const auto& axis : split_axes(axes)) {
    auto found = std::find(order_.begin(), order_.end(), axis);
    if (found == order_.end()) throw Error("rank grid: unknown axis '" + axis + "' in '" + axes + "'");
    inside[found - order_.begin()] = true;
  }
  int group_size = 1;
  for (std::size_t i = 0; i < order_.size(); ++i) group_size *= inside[i] ? sizes_[i] : 1;
  RankGroups groups(world_size_ / group_size, std::vector<int>(group_size));
  for (int rank = 0; rank < world_size_; ++rank) {
    // The rank's coordinates, mixed radix with the first axis fastest; split into the index of its
    // group (the coordinates outside `axes`) and its place in the group (those inside).
    int rest = rank, group = 0, place = 0, group_stride = 1, place_stride = 1;
    for (std::size_t i = 0; i < order_.size(); ++i) {
      const int coordinate = rest % sizes_[i];
      rest /= sizes_[i];
      if (inside[i]) {
        place += coordinate * place_stride;
        place_stride *= sizes_[i];
      } else {
        group += coordinate * group_stride;
        group_stride *= sizes_[i];
      }
    }
    groups[group][place] = rank;
  }
  return groups;
}

GroupLayout GroupLayout::megatron(int world_size, const ParallelSizes& sizes, const std::string& order) {
  const auto t = static_cast<int>(sizes.tensor), p = static_cast<int>(sizes.pipeline),
             c = static_cast<int>(sizes.context), e = static_cast<int>(sizes.expert);
  auto fail = [&](const std::string& why) {
    throw Error("parallel layout: " + why + " (tensor " + std::to_string(t) + ", pipeline " + std::to_string(p) +
                ", context " + std::to_string(c) + ", expert " + std::to_string(e) + "; world of " +
                std::to_string(world_size) + " ranks)");
  };
  if (t < 1 || p < 1 || c < 1 || e < 1) fail("every size must be >= 1");
  if (world_size % (t * c * p) != 0) fail("tensor x context x pipeline must divide the world");
  if (world_size % (t * e * p) != 0) fail("tensor x expert x pipeline must divide the world");
  GroupLayout layout;
  const int d = world_size / (t * c * p), d_e = world_size / (t * e * p);
  layout.data_size = d;
  layout.expert_data_size = d_e;
  // Megatron-core: the dense grid has no expert axis, the expert grid no context axis.
  const RankGrid dense(order, {{"tp", t}, {"cp", c}, {"ep", 1}, {"dp", d}, {"pp", p}}, world_size);
  const RankGrid expert(order, {{"tp", t}, {"cp", 1}, {"ep", e}, {"dp", d_e}, {"pp", p}}, world_size);
  layout.tensor = dense.groups("tp");
  layout.pipeline = dense.groups("pp");
  layout.data = dense.groups("dp");
  layout.context = dense.groups("cp");
  layout.data_and_context = dense.groups("dp-cp");
  layout.tensor_and_data = dense.groups("tp-dp-cp");
  layout.expert = expert.groups("ep");
  layout.expert_data = expert.groups("dp");
  layout.tensor_and_expert = expert.groups("tp-ep");
  if (expert.groups("pp") != layout.pipeline) {
    fail("order '" + order + "' gives the expert layers other pipeline groups than the dense ones; put pp last");
  }
  for (const auto& stages : layout.pipeline) {
    layout.embedding.push_back(stages.size() > 1 ? std::vector<int>{stages.front(), stages.back()}
                                                 : std::vector<int>{stages.front()});
    layout.position_embedding.push_back({stages.front()});
  }
  layout.world.emplace_back();
  for (int rank = 0; rank < world_size; ++rank) layout.world.back().push_back(rank);
  return layout;
}

}  // namespace neva
