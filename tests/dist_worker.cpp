// One rank of the distributed proof: joins the world from torchrun-style environment variables,
// forms a Gloo process group over all ranks, and checks collectives against their known results.
#include <torch/types.h>

#include <iostream>

#include "neva/parallel/process_group.h"
#include "neva/error.h"

int main() {
  try {
    neva::World world = neva::World::from_environment(std::chrono::seconds(60));
    std::vector<int> everyone(world.size);
    for (int rank = 0; rank < world.size; ++rank) everyone[rank] = rank;
    auto group = neva::new_group(world, "world", everyone, c10::Device(c10::DeviceType::CPU), std::chrono::seconds(60));

    // all_reduce(sum) of (rank + 1) * [1, 2, 3]: (1 + ... + n) * [1, 2, 3] on every rank.
    at::Tensor values = torch::tensor({1.0f, 2.0f, 3.0f}) * static_cast<float>(world.rank + 1);
    group->all_reduce(values, neva::ReduceOp::Sum);
    float factor = world.size * (world.size + 1) / 2.0f;
    bool sum_ok = torch::equal(values, torch::tensor({1.0f, 2.0f, 3.0f}) * factor);

    at::Tensor biggest = torch::tensor({static_cast<double>(world.rank)});
    group->all_reduce(biggest, neva::ReduceOp::Max);
    bool max_ok = biggest.item<double>() == world.size - 1;

    at::Tensor average = torch::tensor({static_cast<double>(world.rank)});
    group->all_reduce(average, neva::ReduceOp::Avg);
    bool avg_ok = average.item<double>() == (world.size - 1) / 2.0;

    at::Tensor message = world.rank == 0 ? torch::arange(4, at::kLong) : torch::zeros({4}, at::kLong);
    group->broadcast(message, 0);
    bool broadcast_ok = torch::equal(message, torch::arange(4, at::kLong));
    group->barrier();

    std::cout << "rank " << world.rank << "/" << world.size << " backend " << group->backend_name()
              << " sum " << (sum_ok ? "ok" : "WRONG") << " max " << (max_ok ? "ok" : "WRONG") << " avg "
              << (avg_ok ? "ok" : "WRONG") << " broadcast " << (broadcast_ok ? "ok" : "WRONG") << std::endl;
    return sum_ok && max_ok && avg_ok && broadcast_ok ? 0 : 3;
  } catch (const std::exception& error) {
    std::cerr << "dist_worker: " << error.what() << std::endl;
    return 1;
  }
}
