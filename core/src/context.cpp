#include "neva/context.h"

#include "neva/parallel/process_group.h"

namespace neva {

int group_size(const std::shared_ptr<ProcessGroup>& group) { return group ? group->size() : 1; }
int group_rank(const std::shared_ptr<ProcessGroup>& group) { return group ? group->rank() : 0; }

}  // namespace neva
