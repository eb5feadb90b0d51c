#include "neva/nn/recompute.h"

#include "neva/nn/linear.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>

#include <algorithm>

namespace neva {

namespace {

struct AutocastState {
  bool cpu = false, cuda = false;
  at::ScalarType cpu_dtype = at::kBFloat16, cuda_dtype = at::kHalf;

  static AutocastState current() {
    return {at::autocast::is_autocast_enabled(at::kCPU), at::autocast::is_autocast_enabled(at::kCUDA),
            at::autocast::get_autocast_dtype(at::kCPU), at::autocast::get_autocast_dtype(at::kCUDA)};
  }
  void apply() const {
    at::autocast::set_autocast_enabled(at::kCPU, cpu);
    at::autocast::set_autocast_enabled(at::kCUDA, cuda);
    at::autocast::set_autocast_dtype(at::kCPU, cpu_dtype);
    at::autocast::set_autocast_dtype(at::kCUDA, cuda_dtype);
  }
};

struct CastCacheOff {
  bool was = at::autocast::is_autocast_cache_enabled();
  CastCacheOff() { at::autocast::set_autocast_cache_enabled(false); }
  ~CastCacheOff() { at::autocast::set_autocast_cache_enabled(was); }
};

// The function, and the autocast state it first ran under, travel with the graph node (saved_data
// holds them as a capsule) until backward.
struct FunctionHolder : torch::CustomClassHolder {
  explicit FunctionHolder(RecomputedFunction f) : fn(std::move(f)) {}
  RecomputedFunction fn;
  AutocastState autocast = AutocastState::current();
};

class Recompute : public torch::autograd::Function<Recompute> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const c10::intrusive_ptr<FunctionHolder>& holder, at::TensorList inputs) {
    // Autograd does not record inside a Function's forward: nothing fn computes is kept.
    ctx->saved_data["fn"] = c10::IValue::make_capsule(holder);
    ctx->save_for_backward(inputs.vec());
    // Autocast's weight-cast cache must stay out of both passes: a cast made here (no autograd
    // history) or in the recomputation (stale after the optimizer step) would be reused later.
    CastCacheOff off;
    // The recomputation records with at::linear: this pass must compute exactly as it will.
    nn::AtenLinearScope exact;
    return holder->fn(inputs.vec());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    auto holder = c10::static_intrusive_pointer_cast<FunctionHolder>(ctx->saved_data["fn"].toCapsule());
    std::vector<at::Tensor> inputs;
    for (const auto& tensor : saved) {
      at::Tensor input = tensor.detach();
      if (tensor.requires_grad()) input.requires_grad_(true);
      inputs.push_back(input);
    }
    AutocastState previous = AutocastState::current();
    holder->autocast.apply();
    std::vector<at::Tensor> outputs;
    {
      at::AutoGradMode enable(true);
      CastCacheOff off;
      outputs = holder->fn(inputs);
    }
    previous.apply();
    std::vector<at::Tensor> roots, grads;
    for (std::size_t i = 0; i < outputs.size(); ++i) {
      if (!outputs[i].requires_grad() || !grad_outputs[i].defined()) continue;
      roots.push_back(outputs[i]);
      grads.push_back(grad_outputs[i]);
    }
    if (!roots.empty()) torch::autograd::backward(roots, grads);
    torch::autograd::variable_list result;
    result.emplace_back();  // fn
    for (const auto& input : inputs) result.push_back(input.requires_grad() ? input.grad() : at::Tensor());
    return result;
  }
};

}  // namespace

std::vector<at::Tensor> recomputed(const RecomputedFunction& fn, const std::vector<at::Tensor>& inputs) {
  // Without an input that needs a gradient the Function's outputs would not need one either, and the
  // parameters inside fn would silently get none: run it plainly then.
  const bool any = std::any_of(inputs.begin(), inputs.end(), [](const at::Tensor& t) { return t.requires_grad(); });
  if (!at::GradMode::is_enabled() || !any) return fn(inputs);
  return Recompute::apply(c10::make_intrusive<FunctionHolder>(fn), at::TensorList(inputs));
}

}  // namespace neva
