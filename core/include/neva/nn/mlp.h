#pragma once
// Feed-forward blocks of decoder layers, with transformers' parameter names.
#include <torch/nn/modules/container/modulelist.h>

#include <string>
#include <tuple>
#include <vector>

#include "neva/api.h"
#include "neva/context.h"
#include "neva/nn/linear.h"

namespace neva {

// Applies a transformers activation by its config name: silu, gelu, gelu_pytorch_tanh, quick_gelu, relu2, relu.
NEVA_API at::Tensor activation(const std::string& name, const at::Tensor& x);
// Throws neva::Error for a name activation() does not know.
NEVA_API void check_activation(const std::string& name, const std::string& where);

class NEVA_API FeedForward : public nn::Module {
 public:
  ~FeedForward() override;
  virtual at::Tensor forward(const at::Tensor& x) = 0;
};

// down(act(gate(x)) * up(x)): the SwiGLU family. Names: gate_proj/up_proj/down_proj (Llama, Mistral)
// or w1/w3/w2 (Mixtral experts).
class NEVA_API GatedMLP : public FeedForward {
 public:
  struct Names {
    const char* gate = "gate_proj";
    const char* up = "up_proj";
    const char* down = "down_proj";
  };
  // gate and up split their outputs over the tensor-parallel group, down its input.
  GatedMLP(const RuntimeContext& context, std::int64_t hidden_size, std::int64_t intermediate_size, bool bias,
           std::string activation, Names names);
  GatedMLP(const RuntimeContext& context, std::int64_t hidden_size, std::int64_t intermediate_size, bool bias,
           std::string activation)
      : GatedMLP(context, hidden_size, intermediate_size, bias, std::move(activation), Names{}) {}
  at::Tensor forward(const at::Tensor& x) override;
  // For an input already entered into the tensor-parallel region, this rank's partial output
  // (down's product not summed over the group, no down bias): an MoE layer's experts.
  at::Tensor forward_partial(const at::Tensor& entered);

 private:
  nn::Linear gate_, up_, down_;
  std::string activation_;
  nn::TensorParallelRegion region_;
};

// down_proj(act(up_proj(x))), no gate (Nemotron's relu2 MLP).
class NEVA_API PlainMLP : public FeedForward {
 public:
  PlainMLP(const RuntimeContext& context, std::int64_t hidden_size, std::int64_t intermediate_size, bool bias,
           std::string activation);
  at::Tensor forward(const at::Tensor& x) override;

 private:
  nn::Linear up_proj_, down_proj_;
  std::string activation_;
  nn::TensorParallelRegion region_;
};

// Mixtral's sparse mixture of experts: router softmax in fp32 over all experts, top-k, renormalised
// weights, SwiGLU experts (gate, experts.N.w1/w2/w3). Experts are separate modules so that expert
// parallelism can place them on different ranks.
//
// Under tensor parallelism every expert is split as a GatedMLP is (w1/w3 by output, w2 by input) and
// the router is replicated: the router reads the tokens as they are, the experts through f (under
// sequence parallelism: both through an all-gather of the sequence, the router's without the
// reduction of its gradient); the experts' partial outputs are summed over the group at once (one
// all-reduce per layer), so the routing weights, the router and its load-balancing loss see whole
// values, the same on every rank.
//
// Under expert parallelism (groups.expert of ep ranks) a rank holds experts
// [rank x E/ep, (rank + 1) x E/ep), named by their global index; every (token, slot) assignment is
// sorted by expert once, sent to the rank holding its expert with one all_to_all (dropless), computed
// there and sent back the same way. Each expert initialises from its own generator, seeded from one
// draw of the context's: the same weights whatever the expert-parallel size.
class NEVA_API SparseMoE : public FeedForward {
 public:
  // The router is replicated; each expert's parameters carry its index (nn::ParameterSharding::expert).
  SparseMoE(const RuntimeContext& context, std::int64_t hidden_size, std::int64_t intermediate_size,
            std::int64_t num_experts, std::int64_t top_k, std::string activation);
  at::Tensor forward(const at::Tensor& x) override;
  // The output and the router logits [tokens, experts] (for the load-balancing loss). Returned, not
  // kept: a module holds no per-call state, so one instance serves concurrent callers.
  std::pair<at::Tensor, at::Tensor> forward_with_router(const at::Tensor& x);
  std::int64_t num_experts() const { return num_experts_; }
  std::int64_t first_expert() const { return first_expert_; }  // this rank's experts: first_expert() ...
  std::int64_t local_experts() const { return local_experts_; }  // ... + local_experts()
  std::int64_t top_k() const { return top_k_; }
  // Token dropping (Megatron's moe_expert_capacity_factor): each expert takes at most
  // ceil(tokens x top_k / experts x factor) of the assignments this rank routes — by `policy`, its
  // most probable ones ("probs") or its first ones ("position") — and the others contribute nothing
  // (their weights are not renormalised). 0: dropless (the default).
  void set_capacity(double factor, const std::string& policy);
  double capacity_factor() const { return capacity_factor_; }
  // The assignments dropped by forward passes that recorded gradients since the last call (a
  // recomputed forward counts once), and reset.
  std::int64_t take_dropped();

 private:
  // Expert parallelism's exchange: the rows (sorted by expert) sent to the ranks holding their experts;
  // returns them grouped by this rank's experts, the rows per local expert, the splits sent and
  // received, and the permutations into and out of the expert grouping.
  std::tuple<at::Tensor, std::vector<std::int64_t>, std::vector<std::int64_t>, std::vector<std::int64_t>, at::Tensor,
             at::Tensor>
  dispatch(const at::Tensor& inputs, const at::Tensor& counts) const;

  std::int64_t num_experts_, top_k_;
  nn::TensorParallelRegion region_;
  std::shared_ptr<ProcessGroup> expert_group_;  // null: every expert here
  std::int64_t first_expert_ = 0, local_experts_ = 0;
  nn::Linear gate_;
  std::shared_ptr<torch::nn::Module> experts_;          // this rank's experts, by global index
  std::vector<std::shared_ptr<GatedMLP>> local_;        // the same, in order
  double capacity_factor_ = 0;
  bool drop_by_probability_ = true;
  std::atomic<std::int64_t> dropped_{0};
};

// Mixtral's load_balancing_loss_func over the router logits of every layer (unweighted):
// E * sum(fraction of tokens routed to each expert * mean router probability of that expert).
NEVA_API at::Tensor load_balancing_loss(const std::vector<at::Tensor>& router_logits, std::int64_t num_experts,
                                        std::int64_t top_k);

}  // namespace neva
