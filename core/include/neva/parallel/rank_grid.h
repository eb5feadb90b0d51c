#pragma once
// Which global ranks form which process groups: Megatron-core's rank grid (parallel_state's
// RankGenerator and generate_masked_orthogonal_rank_groups), as plain data, computed the same way
// on every rank and testable without any process.
//
// The order string lists the axes fastest-varying first. With the default "tp-cp-ep-dp-pp" and sizes
// [t, c, e, d, p]:   rank = tp + t * (cp + c * (ep + e * (dp + d * pp)))
// so a tensor-parallel group is adjacent ranks (one node) and the pipeline spans nodes.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "neva/api.h"

namespace neva {

struct ParallelSizes;

using RankGroups = std::vector<std::vector<int>>;  // every group of one kind; each lists global ranks

class NEVA_API RankGrid {
 public:
  // `order`: axes from {tp, cp, ep, dp, pp} joined by '-'. An axis of size 1 may be left out (it is
  // appended); one of size > 1 may not. Sizes must multiply to `world_size`. Errors name the problem.
  RankGrid(const std::string& order, const std::map<std::string, int>& sizes, int world_size);

  // One group per combination of the other axes' coordinates: the ranks that differ only along
  // `axes` (e.g. "tp-dp"), listed by those coordinates, the first axis of the order fastest.
  RankGroups groups(const std::string& axes) const;
  const std::vector<std::string>& order() const { return order_; }
  int size(const std::string& axis) const;

 private:
  std::vector<std::string> order_;
  std::vector<int> sizes_;  // in order_'s order
  int world_size_;
};

// Every group ParallelGroups holds, for every rank: the dense grid (tp, cp, dp, pp) and the expert
// grid (tp, ep, expert dp = world / (tp * ep * pp), pp), as Megatron-core builds them; the embedding
// group is the first and last stage of each pipeline, the position-embedding group its first stage.
struct NEVA_API GroupLayout {
  RankGroups tensor, pipeline, data, context, expert, expert_data, tensor_and_data, data_and_context,
      tensor_and_expert, embedding, position_embedding, world;
  std::int64_t data_size = 1;         // dp
  std::int64_t expert_data_size = 1;  // expert dp

  // `order` is Megatron's initialize_model_parallel(order=...). Errors when the sizes do not divide
  // the world, name the sizes and the world.
  static GroupLayout megatron(int world_size, const ParallelSizes& sizes, const std::string& order = "tp-cp-ep-dp-pp");
};

}  // namespace neva
