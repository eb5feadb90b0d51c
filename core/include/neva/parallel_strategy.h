#pragma once
#include <cstdint>

#include "neva/component.h"
#include "neva/context.h"

namespace neva {

struct World;

// Degrees of parallelism, with NeMo's names (model.tensor_model_parallel_size, ...).
struct ParallelSizes {
  std::int64_t tensor = 1;
  std::int64_t pipeline = 1;
  std::int64_t virtual_pipeline = 1;
  std::int64_t context = 1;
  std::int64_t expert = 1;
  bool sequence_parallel = false;
  // Data-parallel size is what the world leaves: world / (tensor * pipeline * context).
  std::int64_t data(std::int64_t world_size) const { return world_size / (tensor * pipeline * context); }
};

// Decides which ranks form which groups (the rank grid) and creates them on c10d.
class NEVA_API ParallelStrategy : public Component {
 public:
  static constexpr const char* kKind = "parallel_strategy";
  ~ParallelStrategy() override;

  // Called on every rank with the same arguments; returns the groups this rank belongs to.
  virtual ParallelGroups build_groups(const World& world, const ParallelSizes& sizes, c10::Device device) = 0;
};

}  // namespace neva
