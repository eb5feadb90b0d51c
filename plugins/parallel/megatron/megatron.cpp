// The `megatron` parallel strategy: every process group of ParallelGroups, on c10d, in
// Megatron-core's rank order (initialize_model_parallel's order, default tp-cp-ep-dp-pp; the grid is
// neva/parallel/rank_grid.h). Recipe table: [model.parallel_strategy] name = "megatron",
// order = "tp-cp-ep-dp-pp".
#include <algorithm>

#include "neva/error.h"
#include "neva/parallel/process_group.h"
#include "neva/parallel/rank_grid.h"
#include "neva/parallel_strategy.h"
#include "neva/plugin_abi.h"

namespace {

struct MegatronConfig : neva::ComponentConfig {
  std::string order = "tp-cp-ep-dp-pp";

  static MegatronConfig parse(const char* /*requested_name*/, const neva::ConfigSection& section) {
    MegatronConfig config;
    config.order = section.get<std::string>("order", config.order);
    try {
      neva::RankGrid(config.order, {}, 1);  // the axes and their spelling; sizes come at build time
    } catch (const neva::Error& error) {
      section.fail("order", error.what());
    }
    return config;
  }
};

class MegatronStrategy : public neva::ParallelStrategy {
 public:
  MegatronStrategy(const MegatronConfig& config, const neva::RuntimeContext& /*context*/) : order_(config.order) {}

  neva::ParallelGroups build_groups(const neva::World& world, const neva::ParallelSizes& sizes,
                                    c10::Device device) override {
    const neva::GroupLayout layout = neva::GroupLayout::megatron(world.size, sizes, order_);
    // Every rank walks the kinds in this order and joins the one group of each kind it belongs to:
    // the members of a group all reach it, whatever the groups of other kinds (no cycle of waits).
    auto join = [&](const char* kind, const neva::RankGroups& groups) -> std::shared_ptr<neva::ProcessGroup> {
      for (std::size_t index = 0; index < groups.size(); ++index) {
        const auto& members = groups[index];
        if (std::find(members.begin(), members.end(), world.rank) == members.end()) continue;
        return neva::new_group(world, std::string(kind) + "." + std::to_string(index), members, device, world.timeout);
      }
      return nullptr;  // not a member of any (e.g. position_embedding off the first stage)
    };
    neva::ParallelGroups groups;
    groups.tensor = join("tensor", layout.tensor);
    groups.pipeline = join("pipeline", layout.pipeline);
    groups.data = join("data", layout.data);
    groups.context = join("context", layout.context);
    groups.expert = join("expert", layout.expert);
    groups.expert_data = join("expert_data", layout.expert_data);
    groups.tensor_and_data = join("tensor_and_data", layout.tensor_and_data);
    groups.data_and_context = join("data_and_context", layout.data_and_context);
    groups.tensor_and_expert = join("tensor_and_expert", layout.tensor_and_expert);
    groups.embedding = join("embedding", layout.embedding);
    groups.position_embedding = join("position_embedding", layout.position_embedding);
    groups.world = join("world", layout.world);
    return groups;
  }

 private:
  std::string order_;
};

const neva::PluginDescriptor* describe() {
  static const neva::PluginDescriptor descriptor{
      NEVA_PLUGIN_ABI_FIELDS,
      neva::ParallelStrategy::kKind,
      "megatron",
      "0.1.0",
      NEVA_PLUGIN_TORCH_VERSION,
      "Megatron-core's process groups (tp, cp, ep, dp, pp and their products) in its rank order",
      nullptr,
      &neva::parse_plugin_config<MegatronConfig>,
      &neva::create_plugin_component<MegatronConfig, MegatronStrategy>,
  };
  return &descriptor;
}

}  // namespace

NEVA_PLUGIN(describe)
