#include <doctest/doctest.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/sgd.h>
#include <torch/types.h>

#include <cmath>
#include <utility>

#include "neva/error.h"
#include "neva/train/loss.h"
#include "neva/train/optim.h"

TEST_CASE("learning rate: linear warmup, then cosine from lr to min_lr") {
  neva::OptimizerConfig config;
  config.lr = 1.0;
  config.min_lr = 0.1;
  config.warmup_steps = 4;
  config.max_steps = 14;
  CHECK(neva::learning_rate(config, 0) == doctest::Approx(0.25));
  CHECK(neva::learning_rate(config, 3) == doctest::Approx(1.0));
  CHECK(neva::learning_rate(config, 4) == doctest::Approx(1.0));       // cosine starts at lr
  CHECK(neva::learning_rate(config, 9) == doctest::Approx(0.55));      // halfway: (lr + min_lr) / 2
  CHECK(neva::learning_rate(config, 14) == doctest::Approx(0.1));
  CHECK(neva::learning_rate(config, 100) == doctest::Approx(0.1));
  for (std::int64_t step = 5; step < 14; ++step) {
    CHECK(neva::learning_rate(config, step) < neva::learning_rate(config, step - 1));
  }
}

TEST_CASE("AdamW decays matrices only: norm weights and biases are left alone") {
  torch::nn::Linear linear(4, 3);
  torch::nn::LayerNorm norm(torch::nn::LayerNormOptions({3}));
  neva::OptimizerConfig config;
  config.lr = 0.1;
  config.weight_decay = 0.5;
  auto optimizer = neva::make_adamw({linear.ptr().get(), norm.ptr().get()}, config);
  REQUIRE(optimizer->param_groups().size() == 2);
  auto& decayed = optimizer->param_groups()[0];
  auto& plain = optimizer->param_groups()[1];
  CHECK(decayed.params().size() == 1);  // linear.weight
  CHECK(plain.params().size() == 3);    // linear.bias, norm.weight, norm.bias
  CHECK(static_cast<torch::optim::AdamWOptions&>(decayed.options()).weight_decay() == doctest::Approx(0.5));
  CHECK(static_cast<torch::optim::AdamWOptions&>(plain.options()).weight_decay() == doctest::Approx(0.0));
  neva::set_learning_rate(*optimizer, 0.01);
  for (auto& group : optimizer->param_groups()) CHECK(group.options().get_lr() == doctest::Approx(0.01));
  linear->weight.set_requires_grad(false);
  linear->bias.set_requires_grad(false);
  norm->weight.set_requires_grad(false);
  norm->bias.set_requires_grad(false);
  CHECK_THROWS_AS(neva::make_adamw({linear.ptr().get(), norm.ptr().get()}, config), neva::Error);
}

TEST_CASE("causal_lm_loss is next-token cross entropy over labelled positions only") {
  torch::manual_seed(0);
  at::Tensor logits = torch::randn({2, 5, 7});
  at::Tensor labels = torch::randint(0, 7, {2, 5}, at::kLong);
  labels.index_put_({0, torch::indexing::Slice(0, 3)}, neva::kIgnoreIndex);
  // Written out: position t predicts label t + 1.
  at::Tensor log_probs = logits.log_softmax(-1);
  double total = 0;
  int count = 0;
  for (int b = 0; b < 2; ++b) {
    for (int t = 0; t < 4; ++t) {
      std::int64_t target = labels[b][t + 1].item<std::int64_t>();
      if (target == neva::kIgnoreIndex) continue;
      total -= log_probs[b][t][target].item<double>();
      ++count;
    }
  }
  CHECK(neva::causal_lm_loss(logits, labels).item<double>() == doctest::Approx(total / count).epsilon(1e-6));
  CHECK_THROWS_AS(neva::causal_lm_loss(logits, labels.narrow(1, 0, 4)), neva::Error);
}

TEST_CASE("gradient_norm: the global norm in fp64 terms, and clip_grad_norm_'s factor, on any gradient layout") {
  torch::manual_seed(3);
  for (double max_norm : {0.5, 1e6, 0.0}) {
    CAPTURE(max_norm);
    std::vector<at::Tensor> parameters;
    double squares = 0;
    for (auto [shape, dtype] : std::vector<std::pair<std::vector<std::int64_t>, at::ScalarType>>{
             {{300, 70}, at::kFloat}, {{70}, at::kFloat}, {{40, 30}, at::kBFloat16}, {{3, 5, 7}, at::kFloat}}) {
      at::Tensor grad = torch::randn(shape).to(dtype);
      if (shape.size() == 3) grad = grad.transpose(0, 2).contiguous().transpose(0, 2);  // non-contiguous
      at::Tensor p = torch::zeros(shape, at::TensorOptions().dtype(dtype).requires_grad(true));
      p.mutable_grad() = grad;
      parameters.push_back(p);
      squares += grad.to(at::kDouble).pow(2).sum().item<double>();
    }
    const auto norm = neva::gradient_norm(parameters, max_norm);
    CHECK(norm.norm == doctest::Approx(std::sqrt(squares)).epsilon(1e-6));
    // PyTorch's rule (torch.nn.utils.clip_grad_norm_): max_norm / (norm + 1e-6), at most 1; 0 is off.
    CHECK(norm.clip_scale == doctest::Approx(max_norm > 0 ? std::min(1.0, max_norm / (norm.norm + 1e-6)) : 1.0).epsilon(1e-12));
  }
  // LibTorch's clip_grad_norm_ on fp32 gradients: the same norm, and its gradients are ours scaled by clip_scale.
  at::Tensor a = torch::randn({64, 32}, at::TensorOptions().requires_grad(true)), b = torch::randn({32}, at::TensorOptions().requires_grad(true));
  a.mutable_grad() = torch::randn({64, 32});
  b.mutable_grad() = torch::randn({32});
  const at::Tensor a_grad = a.grad().clone(), b_grad = b.grad().clone();
  const auto norm = neva::gradient_norm({a, b}, 1.0);
  REQUIRE(norm.clip_scale < 1);
  CHECK(norm.norm == doctest::Approx(torch::nn::utils::clip_grad_norm_(std::vector<at::Tensor>{a, b}, 1.0)).epsilon(1e-6));
  CHECK(torch::allclose(a.grad(), a_grad * norm.clip_scale, 1e-6, 1e-8));
  CHECK(torch::allclose(b.grad(), b_grad * norm.clip_scale, 1e-6, 1e-8));
}

TEST_CASE("the fused AdamW update equals LibTorch's reference AdamW, state included") {
  torch::manual_seed(1);
  torch::nn::Linear fused_layer(6, 4), reference_layer(6, 4);
  {
    torch::NoGradGuard no_grad;
    reference_layer->weight.copy_(fused_layer->weight);
    reference_layer->bias.copy_(fused_layer->bias);
  }
  neva::OptimizerConfig config;
  config.lr = 0.05;
  config.weight_decay = 0.1;
  auto fused = neva::make_adamw({fused_layer.ptr().get()}, config);
  // The reference, with the same two groups (decay on the matrix only).
  std::vector<torch::optim::OptimizerParamGroup> groups;
  auto options = [&](double decay) {
    return std::make_unique<torch::optim::AdamWOptions>(
        torch::optim::AdamWOptions(config.lr).betas({config.beta1, config.beta2}).eps(config.eps).weight_decay(decay));
  };
  groups.emplace_back(std::vector<at::Tensor>{reference_layer->weight}, options(config.weight_decay));
  groups.emplace_back(std::vector<at::Tensor>{reference_layer->bias}, options(0.0));
  torch::optim::AdamW reference(groups, torch::optim::AdamWOptions(config.lr));
  for (int step = 0; step < 6; ++step) {
    at::Tensor input = torch::randn({3, 6});
    for (auto* layer : {&fused_layer, &reference_layer}) {
      (*layer)->zero_grad();
      (*layer)->forward(input).pow(2).sum().backward();
    }
    fused->step();
    reference.step();
  }
  CHECK(torch::allclose(fused_layer->weight, reference_layer->weight, 1e-6, 1e-7));
  CHECK(torch::allclose(fused_layer->bias, reference_layer->bias, 1e-6, 1e-7));
  // Both moments and the step of both groups (decayed matrix, undecayed bias).
  for (auto [ours, theirs] : {std::pair{fused_layer->weight, reference_layer->weight}, std::pair{fused_layer->bias, reference_layer->bias}}) {
    auto& state = static_cast<torch::optim::AdamWParamState&>(*fused->state().at(ours.unsafeGetTensorImpl()));
    auto& expected = static_cast<torch::optim::AdamWParamState&>(*reference.state().at(theirs.unsafeGetTensorImpl()));
    CHECK(state.step() == 6);
    CHECK(expected.step() == 6);
    // fp32 rounding of the fused kernel's lerp against the reference's mul-add: ~1 ulp of the O(1) terms.
    CHECK(torch::allclose(state.exp_avg(), expected.exp_avg(), 1e-6, 1e-7));
    CHECK(torch::allclose(state.exp_avg_sq(), expected.exp_avg_sq(), 1e-6, 1e-9));
  }
}

TEST_CASE("scaled_step with gradient_norm's factor is clip_grad_norm_ then step(), fused into AdamW or not") {
  // The reference: LibTorch's clip_grad_norm_, then the optimizer's own step() (make_adamw's AdamW
  // is checked against LibTorch's AdamW above).
  torch::manual_seed(4);
  neva::OptimizerConfig config;
  config.lr = 0.05;
  config.weight_decay = 0.1;
  config.clip_grad = 0.3;
  torch::nn::Linear folded_layer(6, 4), clipped_layer(6, 4), sgd_layer(6, 4), sgd_reference_layer(6, 4);
  {
    torch::NoGradGuard no_grad;
    for (auto* layer : {&clipped_layer, &sgd_layer, &sgd_reference_layer}) {
      (*layer)->weight.copy_(folded_layer->weight);
      (*layer)->bias.copy_(folded_layer->bias);
    }
  }
  auto folded = neva::make_adamw({folded_layer.ptr().get()}, config);
  auto clipped = neva::make_adamw({clipped_layer.ptr().get()}, config);
  // Any other optimizer: the gradients are scaled, then it steps.
  torch::optim::SGD sgd(sgd_layer->parameters(), torch::optim::SGDOptions(0.1));
  torch::optim::SGD sgd_reference(sgd_reference_layer->parameters(), torch::optim::SGDOptions(0.1));
  int clipped_steps = 0;
  for (int step = 0; step < 5; ++step) {
    at::Tensor input = torch::randn({3, 6}) * (step + 1);
    for (auto* layer : {&folded_layer, &clipped_layer, &sgd_layer, &sgd_reference_layer}) {
      (*layer)->zero_grad();
      (*layer)->forward(input).pow(2).sum().backward();
    }
    const auto norm = neva::gradient_norm(folded_layer->parameters(), config.clip_grad);
    if (norm.clip_scale < 1) ++clipped_steps;
    neva::scaled_step(*folded, norm.clip_scale);
    torch::nn::utils::clip_grad_norm_(clipped_layer->parameters(), config.clip_grad);
    clipped->step();
    neva::scaled_step(sgd, neva::gradient_norm(sgd_layer->parameters(), config.clip_grad).clip_scale);
    torch::nn::utils::clip_grad_norm_(sgd_reference_layer->parameters(), config.clip_grad);
    sgd_reference.step();
    CHECK(torch::allclose(folded_layer->weight.grad(), clipped_layer->weight.grad(), 1e-5, 1e-8));  // left scaled
  }
  REQUIRE(clipped_steps > 0);  // the clipping was exercised
  // Dividing by 1/scale in fp32 inside the kernel, and the norm summed in fp64 against LibTorch's
  // linalg_vector_norm: within a few fp32 ulps.
  CHECK(torch::allclose(folded_layer->weight, clipped_layer->weight, 1e-6, 1e-7));
  CHECK(torch::allclose(folded_layer->bias, clipped_layer->bias, 1e-6, 1e-7));
  CHECK(torch::allclose(sgd_layer->weight, sgd_reference_layer->weight, 1e-6, 1e-7));
  CHECK(torch::allclose(sgd_layer->bias, sgd_reference_layer->bias, 1e-6, 1e-7));
}

TEST_CASE("logits at labelled positions only give causal_lm_loss exactly") {
  torch::manual_seed(2);
  at::Tensor logits = torch::randn({3, 6, 11});
  at::Tensor labels = torch::randint(0, 11, {3, 6}, at::kLong);
  labels.index_put_({0, torch::indexing::Slice(0, 4)}, neva::kIgnoreIndex);
  labels.index_put_({2, torch::indexing::Slice(2, 6)}, neva::kIgnoreIndex);
  auto positions = neva::labelled_positions(labels);
  CHECK(positions.mask.sum().item<std::int64_t>() == positions.targets.size(0));
  CHECK(!positions.mask.select(1, 5).any().item<bool>());  // the last position predicts nothing
  at::Tensor selected = logits.index({positions.mask});
  double expected = neva::causal_lm_loss(logits, labels).item<double>();
  CHECK(neva::labelled_lm_loss(selected, positions).item<double>() == doctest::Approx(expected).epsilon(1e-7));
  CHECK(neva::labelled_lm_loss(logits, positions).item<double>() == doctest::Approx(expected).epsilon(1e-7));
  CHECK_THROWS_AS(neva::labelled_lm_loss(selected.narrow(0, 0, 2), positions), neva::Error);
}
