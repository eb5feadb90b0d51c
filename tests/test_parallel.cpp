// The rank grid against Megatron-core's own examples (parallel_state.py's docstrings, and the worked
// examples of ../shared/reference/parallelism.md, re-derived from its formula).
#include <doctest/doctest.h>

#include "neva/error.h"
#include "neva/parallel/rank_grid.h"
#include "neva/parallel_strategy.h"

using neva::GroupLayout;
using neva::RankGroups;

namespace {

neva::ParallelSizes sizes(std::int64_t tensor, std::int64_t pipeline, std::int64_t context = 1, std::int64_t expert = 1) {
  neva::ParallelSizes result;
  result.tensor = tensor;
  result.pipeline = pipeline;
  result.context = context;
  result.expert = expert;
  return result;
}

}  // namespace

TEST_CASE("generate_masked_orthogonal_rank_groups' docstring example: 8 ranks, order tp-pp-dp, 2-2-2") {
  const neva::RankGrid grid("tp-pp-dp", {{"tp", 2}, {"pp", 2}, {"dp", 2}}, 8);
  CHECK(grid.groups("dp") == RankGroups{{0, 4}, {1, 5}, {2, 6}, {3, 7}});
  CHECK(grid.groups("tp") == RankGroups{{0, 1}, {2, 3}, {4, 5}, {6, 7}});
  CHECK(grid.groups("pp") == RankGroups{{0, 2}, {1, 3}, {4, 6}, {5, 7}});
  CHECK(grid.groups("tp-pp") == RankGroups{{0, 1, 2, 3}, {4, 5, 6, 7}});
  CHECK(grid.order() == std::vector<std::string>{"tp", "pp", "dp", "cp", "ep"});  // size-1 axes appended
}

TEST_CASE("16 ranks, tensor 2, data 4, pipeline 2 (initialize_model_parallel's docstring)") {
  const GroupLayout layout = GroupLayout::megatron(16, sizes(2, 2));
  CHECK(layout.data_size == 4);
  CHECK(layout.tensor == RankGroups{{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}, {12, 13}, {14, 15}});
  CHECK(layout.data == RankGroups{{0, 2, 4, 6}, {1, 3, 5, 7}, {8, 10, 12, 14}, {9, 11, 13, 15}});
  CHECK(layout.pipeline ==
        RankGroups{{0, 8}, {1, 9}, {2, 10}, {3, 11}, {4, 12}, {5, 13}, {6, 14}, {7, 15}});
  CHECK(layout.embedding == layout.pipeline);  // two stages: the first and the last are all of them
  CHECK(layout.position_embedding == RankGroups{{0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}});
  CHECK(layout.tensor_and_data == RankGroups{{0, 1, 2, 3, 4, 5, 6, 7}, {8, 9, 10, 11, 12, 13, 14, 15}});
  CHECK(layout.world == RankGroups{{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}});
}

TEST_CASE("8 ranks, tensor 2, context 2, data 2: the context and data x context groups") {
  const GroupLayout layout = GroupLayout::megatron(8, sizes(2, 1, 2));
  CHECK(layout.tensor == RankGroups{{0, 1}, {2, 3}, {4, 5}, {6, 7}});
  CHECK(layout.context == RankGroups{{0, 2}, {1, 3}, {4, 6}, {5, 7}});
  CHECK(layout.data == RankGroups{{0, 4}, {1, 5}, {2, 6}, {3, 7}});
  CHECK(layout.data_and_context == RankGroups{{0, 2, 4, 6}, {1, 3, 5, 7}});
  CHECK(layout.tensor_and_data == RankGroups{{0, 1, 2, 3, 4, 5, 6, 7}});
}

TEST_CASE("8 ranks, tensor 2, data 4, expert 4: the expert grid re-partitions a stage's ranks") {
  const GroupLayout layout = GroupLayout::megatron(8, sizes(2, 1, 1, 4));
  CHECK(layout.expert_data_size == 1);
  CHECK(layout.data == RankGroups{{0, 2, 4, 6}, {1, 3, 5, 7}});
  CHECK(layout.expert == RankGroups{{0, 2, 4, 6}, {1, 3, 5, 7}});
  CHECK(layout.expert_data == RankGroups{{0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}});
  CHECK(layout.tensor_and_expert == RankGroups{{0, 1, 2, 3, 4, 5, 6, 7}});
  // Expert tensor 1 (the reference's example C: t_e = 1, e = 4 over 8 ranks): EP [0-3] [4-7], EDP pairs.
  const GroupLayout experts_only = GroupLayout::megatron(8, sizes(1, 1, 1, 4));
  CHECK(experts_only.expert == RankGroups{{0, 1, 2, 3}, {4, 5, 6, 7}});
  CHECK(experts_only.expert_data == RankGroups{{0, 4}, {1, 5}, {2, 6}, {3, 7}});
}

TEST_CASE("one rank: every group is that rank") {
  const GroupLayout layout = GroupLayout::megatron(1, sizes(1, 1));
  for (const RankGroups* groups : {&layout.tensor, &layout.pipeline, &layout.data, &layout.embedding, &layout.world}) {
    CHECK(*groups == RankGroups{{0}});
  }
}

TEST_CASE("layouts the world cannot hold, and malformed orders, are errors that say why") {
  CHECK_THROWS_WITH_AS(GroupLayout::megatron(6, sizes(4, 1)),
                       "parallel layout: tensor x context x pipeline must divide the world (tensor 4, pipeline 1, "
                       "context 1, expert 1; world of 6 ranks)",
                       neva::Error);
  CHECK_THROWS_WITH_AS(GroupLayout::megatron(4, sizes(1, 1, 1, 3)),
                       doctest::Contains("tensor x expert x pipeline must divide the world"), neva::Error);
  CHECK_THROWS_WITH_AS(GroupLayout::megatron(4, sizes(2, 2), "tp-cp-ep-dp-pq"),
                       doctest::Contains("order 'tp-cp-ep-dp-pq': unknown axis 'pq'"), neva::Error);
  CHECK_THROWS_WITH_AS(GroupLayout::megatron(4, sizes(2, 2), "tp-dp"),
                       "rank grid: order 'tp-dp' leaves out pp, whose size is 2", neva::Error);
  CHECK_THROWS_WITH_AS(neva::RankGrid("tp-tp", {}, 1), "rank grid: order 'tp-tp' names tp twice", neva::Error);
  CHECK_THROWS_WITH_AS(GroupLayout::megatron(8, sizes(2, 2, 1, 2), "tp-dp-pp-ep"),
                       doctest::Contains("other pipeline groups than the dense ones; put pp last"), neva::Error);
}
