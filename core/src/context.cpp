#include "neva/context.h"

#include <ATen/CPUGeneratorImpl.h>

#include <mutex>

#include "neva/parallel/process_group.h"

namespace neva {

int group_size(const std::shared_ptr<ProcessGroup>& group) { return group ? group->size() : 1; }
int group_rank(const std::shared_ptr<ProcessGroup>& group) { return group ? group->rank() : 0; }

at::Generator make_generator(std::uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

std::uint64_t draw_seed(const RuntimeContext& context) {
  auto* generator = at::check_generator<at::CPUGeneratorImpl>(context.generator);
  std::lock_guard<std::mutex> lock(generator->mutex_);
  return generator->random64();
}

RuntimeContext substream(const RuntimeContext& context, std::uint64_t base, std::uint64_t index) {
  RuntimeContext own = context;
  own.generator = make_generator(base + 0x9E3779B97F4A7C15ULL * (index + 1));
  return own;
}

RuntimeContext RuntimeContext::seeded(std::uint64_t seed, c10::Device device) {
  RuntimeContext context;
  context.device = device;
  context.generator = make_generator(seed);
  return context;
}

}  // namespace neva
