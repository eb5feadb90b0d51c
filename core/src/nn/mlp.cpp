#include "neva/nn/mlp.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <mutex>
#include <tuple>

#include "neva/error.h"
#include "neva/parallel/mappings.h"
#include "neva/parallel/process_group.h"

namespace neva {

at::Tensor activation(const std::string& name, const at::Tensor& x) {
  if (name == "silu" || name == "swish") return at::silu(x);
  if (name == "gelu") return at::gelu(x);
  if (name == "gelu_pytorch_tanh") return at::gelu(x, "tanh");
  if (name == "quick_gelu") return x * at::sigmoid(1.702 * x);
  if (name == "relu") return at::relu(x);
  if (name == "relu2") return at::relu(x).pow(2);
  throw Error("unknown activation '" + name + "'");
}

void check_activation(const std::string& name, const std::string& where) {
  try {
    activation(name, at::zeros({1}));  // the one list of names is activation()'s
  } catch (const Error& error) {
    throw Error(where + ": " + error.what() + " (known: silu, swish, gelu, gelu_pytorch_tanh, quick_gelu, relu, relu2)");
  }
}

FeedForward::~FeedForward() = default;

namespace {
nn::LinearOptions column(bool bias) { return {bias, nn::Parallel::Column}; }
nn::LinearOptions row(bool bias) { return {bias, nn::Parallel::Row}; }
}  // namespace

GatedMLP::GatedMLP(const RuntimeContext& context, std::int64_t hidden_size, std::int64_t intermediate_size, bool bias,
                   std::string activation, Names names)
    : activation_(std::move(activation)), region_(context) {
  gate_ = register_module(names.gate, nn::linear(context, hidden_size, intermediate_size, column(bias)));
  up_ = register_module(names.up, nn::linear(context, hidden_size, intermediate_size, column(bias)));
  down_ = register_module(names.down, nn::linear(context, intermediate_size, hidden_size, row(bias)));
}

at::Tensor GatedMLP::forward(const at::Tensor& x) {
  const at::Tensor entered = region_.enter(x);
  return down_->forward(activation(activation_, gate_->forward_entered(entered)) * up_->forward_entered(entered));
}

at::Tensor GatedMLP::forward_partial(const at::Tensor& entered) {
  return down_->forward_unreduced(activation(activation_, gate_->forward_entered(entered)) * up_->forward_entered(entered));
}

PlainMLP::PlainMLP(const RuntimeContext& context, std::int64_t hidden_size, std::int64_t intermediate_size, bool bias,
                   std::string activation)
    : activation_(std::move(activation)), region_(context) {
  up_proj_ = register_module("up_proj", nn::linear(context, hidden_size, intermediate_size, column(bias)));
  down_proj_ = register_module("down_proj", nn::linear(context, intermediate_size, hidden_size, row(bias)));
}

at::Tensor PlainMLP::forward(const at::Tensor& x) {
  return down_proj_->forward(activation(activation_, up_proj_->forward_entered(region_.enter(x))));
}

SparseMoE::SparseMoE(const RuntimeContext& context, std::int64_t hidden_size, std::int64_t intermediate_size,
                     std::int64_t num_experts, std::int64_t top_k, std::string activation)
    : num_experts_(num_experts), top_k_(top_k), region_(context) {
  const int ep = group_size(context.groups.expert);
  if (num_experts % ep != 0) {
    throw Error(std::to_string(num_experts) + " experts do not split over " + std::to_string(ep) +
                " expert-parallel ranks (num_local_experts must be a multiple of expert_model_parallel_size)");
  }
  if (ep > 1) expert_group_ = context.groups.expert;
  local_experts_ = num_experts / ep;
  first_expert_ = group_rank(context.groups.expert) * local_experts_;
  gate_ = register_module("gate", nn::linear(context, hidden_size, num_experts, {false}));
  // One draw from the context's stream seeds every expert's own generator: each rank builds only its
  // experts, with the weights they have at any expert-parallel size.
  const std::uint64_t base = draw_seed(context);
  experts_ = register_module("experts", std::make_shared<torch::nn::Module>("Experts"));
  for (std::int64_t e = first_expert_; e < first_expert_ + local_experts_; ++e) {
    const RuntimeContext own = substream(context, base, static_cast<std::uint64_t>(e));
    auto expert = std::make_shared<GatedMLP>(own, hidden_size, intermediate_size, false, activation,
                                             GatedMLP::Names{"w1", "w3", "w2"});
    nn::set_expert(*expert, e);
    experts_->register_module(std::to_string(e), expert);
    local_.push_back(expert);
  }
}

at::Tensor SparseMoE::forward(const at::Tensor& x) { return forward_with_router(x).first; }

void SparseMoE::set_capacity(double factor, const std::string& policy) {
  if (factor < 0) throw Error("SparseMoE: a capacity factor must be > 0 (0: dropless), got " + std::to_string(factor));
  if (policy != "probs" && policy != "position") {
    throw Error("SparseMoE: the token drop policy is \"probs\" or \"position\", got \"" + policy + "\"");
  }
  capacity_factor_ = factor;
  drop_by_probability_ = policy == "probs";
}

std::int64_t SparseMoE::take_dropped() { return dropped_.exchange(0); }

std::pair<at::Tensor, at::Tensor> SparseMoE::forward_with_router(const at::Tensor& x) {
  const std::int64_t hidden = x.size(-1);
  // The router's input and the experts' (see the class comment): the whole sequence under sequence
  // parallelism, the experts' through the conjugate collectives.
  const bool split_sequence = region_.group && region_.sequence_parallel;
  const at::Tensor router_input =
      split_sequence ? gather_from_sequence_parallel_region(region_.group, x, 1, /*tensor_parallel_output_grad=*/false) : x;
  const at::Tensor expert_input = region_.enter(x);
  const auto shape = router_input.sizes().vec();
  at::Tensor tokens = router_input.reshape({-1, hidden});
  at::Tensor expert_tokens = expert_input.reshape({-1, hidden});
  at::Tensor router_logits = gate_->forward(tokens);
  at::Tensor probabilities = router_logits.softmax(1, at::kFloat);
  auto [weights, selected] = probabilities.topk(top_k_, -1);
  weights = (weights / weights.sum(-1, true)).to(tokens.scalar_type());
  // Every (token, slot) assignment sorted by expert once (a stable sort: within an expert, tokens in
  // order), the experts' inputs gathered in that order and each expert run on its contiguous rows.
  // One host read per layer (the rows per expert), none per expert.
  const at::Tensor assigned = selected.reshape({-1});  // [tokens x top_k], token-major
  at::Tensor order;
  if (capacity_factor_ > 0 && drop_by_probability_) {
    // Within each expert, its assignments by falling weight: a stable sort by weight, then by expert.
    const at::Tensor by_weight = std::get<1>(weights.reshape({-1}).detach().sort(std::optional<bool>(true), 0, true));
    order = by_weight.index_select(
        0, std::get<1>(assigned.index_select(0, by_weight).sort(std::optional<bool>(true), 0, false)));
  } else {
    order = std::get<1>(assigned.sort(std::optional<bool>(true), /*dim=*/0, /*descending=*/false));
  }
  at::Tensor counts = at::bincount(assigned, {}, num_experts_).cpu();
  if (capacity_factor_ > 0) {
    // Megatron's get_capacity over this rank's assignments; each expert keeps its first `capacity`
    // rows of the order above.
    const auto capacity = static_cast<std::int64_t>(
        std::ceil(static_cast<double>(assigned.numel()) / static_cast<double>(num_experts_) * capacity_factor_));
    const at::Tensor starts = (counts.cumsum(0) - counts).to(assigned.device());
    const at::Tensor rank_in_expert =
        at::arange(order.numel(), order.options()) - starts.index_select(0, assigned.index_select(0, order));
    order = order.masked_select(rank_in_expert < capacity);
    const at::Tensor kept = counts.clamp_max(capacity);
    if (at::GradMode::is_enabled()) dropped_ += (counts - kept).sum().item<std::int64_t>();
    counts = kept;
  }
  const at::Tensor token_of = at::div(order, top_k_, "floor");
  const std::int64_t* rows = counts.data_ptr<std::int64_t>();
  at::Tensor inputs = expert_tokens.index_select(0, token_of);
  // Expert parallelism: the rows go to the ranks holding their experts, and come back after.
  std::vector<std::int64_t> sent, received;
  at::Tensor regroup, ungroup;
  std::vector<std::int64_t> local_rows(rows + first_expert_, rows + first_expert_ + local_experts_);
  if (expert_group_) {
    std::tie(inputs, local_rows, sent, received, regroup, ungroup) = dispatch(inputs, counts);
  }
  std::vector<at::Tensor> partial;
  std::int64_t offset = 0;
  for (std::int64_t j = 0; j < local_experts_; ++j) {
    if (local_rows[j] == 0) continue;  // an expert without tokens is skipped
    partial.push_back(local_[j]->forward_partial(inputs.narrow(0, offset, local_rows[j])));
    offset += local_rows[j];
  }
  // Every expert's output summed over the tensor-parallel group at once (g).
  at::Tensor results = partial.empty() ? at::zeros({0, hidden}, tokens.options())
                                       : partial.size() == 1 ? partial.front() : at::cat(partial, 0);
  if (region_.group) results = reduce_from_tensor_parallel_region(region_.group, results);
  if (expert_group_) results = all_to_all(expert_group_, results.index_select(0, ungroup), sent, received);
  results = results * weights.reshape({-1}).index_select(0, order).unsqueeze(-1);
  at::Tensor out = at::zeros_like(tokens).index_add_(0, token_of, results.to(tokens.scalar_type()));
  out = out.view(shape);
  if (split_sequence) out = scatter_to_sequence_parallel_region(region_.group, out, 1);
  return {out, router_logits};
}

std::tuple<at::Tensor, std::vector<std::int64_t>, std::vector<std::int64_t>, std::vector<std::int64_t>, at::Tensor,
           at::Tensor>
SparseMoE::dispatch(const at::Tensor& inputs, const at::Tensor& counts) const {
  // counts [E] on the host: this rank's rows per expert, sorted by expert, hence by destination rank.
  const int ep = expert_group_->size();
  const std::int64_t* rows = counts.data_ptr<std::int64_t>();
  std::vector<std::int64_t> to_rank(ep, 0);
  for (std::int64_t e = 0; e < num_experts_; ++e) to_rank[e / local_experts_] += rows[e];
  // What each rank sends to each of this rank's experts: one all_to_all of E counts.
  at::Tensor incoming = at::empty({num_experts_}, at::kLong);
  {
    at::Tensor outgoing = counts.to(inputs.device());
    at::Tensor arrived = at::empty({num_experts_}, outgoing.options());
    expert_group_->all_to_all_single(arrived, outgoing).wait();
    incoming.copy_(arrived);
  }
  const std::int64_t* from = incoming.data_ptr<std::int64_t>();  // [source rank][local expert]
  std::vector<std::int64_t> from_rank(ep, 0), local_rows(local_experts_, 0);
  for (int r = 0; r < ep; ++r) {
    for (std::int64_t j = 0; j < local_experts_; ++j) {
      from_rank[r] += from[r * local_experts_ + j];
      local_rows[j] += from[r * local_experts_ + j];
    }
  }
  at::Tensor arrived = all_to_all(expert_group_, inputs, from_rank, to_rank);
  // The rows arrive by source rank, then expert; the experts want them by expert, then source.
  std::vector<std::int64_t> starts(ep * local_experts_, 0);
  std::int64_t position = 0;
  for (int r = 0; r < ep; ++r) {
    for (std::int64_t j = 0; j < local_experts_; ++j) {
      starts[r * local_experts_ + j] = position;
      position += from[r * local_experts_ + j];
    }
  }
  at::Tensor regroup = at::empty({position}, at::kLong);
  std::int64_t* index = regroup.data_ptr<std::int64_t>();
  for (std::int64_t j = 0; j < local_experts_; ++j) {
    for (int r = 0; r < ep; ++r) {
      for (std::int64_t i = 0; i < from[r * local_experts_ + j]; ++i) *index++ = starts[r * local_experts_ + j] + i;
    }
  }
  at::Tensor ungroup = at::empty_like(regroup);
  ungroup.index_copy_(0, regroup, at::arange(position, at::kLong));
  regroup = regroup.to(inputs.device());
  ungroup = ungroup.to(inputs.device());
  return {arrived.index_select(0, regroup), local_rows, to_rank, from_rank, regroup, ungroup};
}

at::Tensor load_balancing_loss(const std::vector<at::Tensor>& router_logits, std::int64_t num_experts,
                               std::int64_t top_k) {
  at::Tensor logits = at::cat(router_logits, 0);
  at::Tensor probabilities = logits.softmax(-1, at::kFloat);
  at::Tensor selected = std::get<1>(probabilities.topk(top_k, -1));
  at::Tensor mask = at::one_hot(selected, num_experts).to(at::kFloat);       // [tokens, k, experts]
  at::Tensor tokens_per_expert = mask.mean(0);                                // [k, experts]
  at::Tensor probability_per_expert = probabilities.mean(0);                  // [experts]
  return (tokens_per_expert * probability_per_expert.unsqueeze(0)).sum() * num_experts;
}

}  // namespace neva
