#include "neva/context.h"

#include <ATen/CPUGeneratorImpl.h>

#include "neva/parallel/process_group.h"

namespace neva {

int group_size(const std::shared_ptr<ProcessGroup>& group) { return group ? group->size() : 1; }
int group_rank(const std::shared_ptr<ProcessGroup>& group) { return group ? group->rank() : 0; }

at::Generator make_generator(std::uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

RuntimeContext RuntimeContext::seeded(std::uint64_t seed, c10::Device device) {
  RuntimeContext context;
  context.device = device;
  context.generator = make_generator(seed);
  return context;
}

}  // namespace neva
