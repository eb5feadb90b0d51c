// neva-bench-model RECIPE [--prompt-tokens P] [--new-tokens N] [--precision 32|bf16]
// Prefill and decode tokens/s of the recipe's language model (batch 1, KV cache) and the encode
// time of one image through its vision encoder, on random weights and inputs. scripts/bench_model.sh
// runs it beside the same measurement with transformers.
#include <CLI/CLI.hpp>
#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <chrono>
#include <cstdio>

#include "neva/recipe.h"

namespace {
double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Prefill/decode tokens per second and image encode time of a recipe's model (random weights)"};
  std::string recipe_path, precision = "32";
  std::int64_t prompt_tokens = 256, new_tokens = 32;
  app.add_option("recipe", recipe_path)->required();
  app.add_option("--prompt-tokens", prompt_tokens);
  app.add_option("--new-tokens", new_tokens);
  app.add_option("--precision", precision)->check(CLI::IsMember({"32", "bf16"}));
  CLI11_PARSE(app, argc, argv);

  neva::Recipe recipe = neva::load_recipe(recipe_path, {"trainer.precision=" + precision});
  neva::RuntimeContext context = recipe.runtime_context();
  context.dtypes.params = context.dtypes.compute;  // inference: weights in the compute dtype
  at::manual_seed(0);
  neva::LlavaModel model = neva::build_model(recipe, context);
  torch::NoGradGuard no_grad;
  model.backbone().eval();

  at::Tensor prompt = at::randint(0, model.backbone().vocab_size(), {1, prompt_tokens}, at::kLong);
  auto timed_prefill = [&](neva::KVCache* cache) {
    neva::BackboneInputs inputs;
    inputs.embeddings = model.backbone().embed(prompt);
    inputs.cache = cache;
    return model.backbone().forward(inputs).logits;
  };
  { auto warm = model.backbone().new_cache(1, prompt_tokens + new_tokens); timed_prefill(warm.get()); }
  auto cache = model.backbone().new_cache(1, prompt_tokens + new_tokens);
  auto start = std::chrono::steady_clock::now();
  at::Tensor logits = timed_prefill(cache.get());
  double prefill = seconds_since(start);
  start = std::chrono::steady_clock::now();
  for (std::int64_t i = 0; i < new_tokens; ++i) {
    neva::BackboneInputs step;
    step.embeddings = model.backbone().embed(logits.select(1, -1).argmax(-1, true));
    step.cache = cache.get();
    logits = model.backbone().forward(step).logits;
  }
  double decode = seconds_since(start);
  std::printf("neva   %-5s prefill %5lld tokens: %8.1f tokens/s   decode %4lld tokens: %7.2f tokens/s\n",
              precision.c_str(), static_cast<long long>(prompt_tokens), prompt_tokens / prefill,
              static_cast<long long>(new_tokens), new_tokens / decode);
  if (model.encoder()) {
    model.encoder()->eval();
    const std::int64_t side = model.encoder()->image_size();
    at::Tensor pixels = at::randn({1, 3, side, side});
    model.encoder()->forward(pixels);  // warm-up
    start = std::chrono::steady_clock::now();
    at::Tensor features = model.encoder()->forward(pixels);
    std::printf("neva   %-5s encode 1 image %lldx%lld -> %lld tokens: %8.1f ms\n", precision.c_str(),
                static_cast<long long>(side), static_cast<long long>(side), static_cast<long long>(features.size(1)),
                seconds_since(start) * 1e3);
  }
  return 0;
}
