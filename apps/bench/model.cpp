// neva-bench-model RECIPE [--prompt-tokens P] [--new-tokens N] [--precision 32|bf16] [--batch B] [--encode-only]
// Prefill and decode tokens/s of the recipe's language model (B sequences, greedy, KV cache) and the
// encode time of one image through its vision encoder, on the recipe's weights (random unless it
// names from_pretrained) and random inputs, prefill timed on its second run; then the time from the
// process's start to the end of the first prefill (the first token) and the peak resident memory. scripts/bench_model.sh and scripts/bench_decode.sh run it
// beside the same measurement with transformers (and llama.cpp).
#include <CLI/CLI.hpp>
#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "neva/nn/linear.h"
#include "neva/recipe.h"

namespace {
double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}
// Seconds since this process started (its start time in /proc/self/stat, against CLOCK_BOOTTIME):
// what a user waits, loading LibTorch and the plugins included.
double seconds_since_process_start() {
  std::ifstream stat("/proc/self/stat");
  std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  std::istringstream fields(text.substr(text.rfind(')') + 2));  // after "pid (comm) "
  std::string field;
  for (int i = 3; i <= 22 && fields >> field; ++i) {}  // field 22: starttime, in clock ticks since boot
  timespec now{};
  clock_gettime(CLOCK_BOOTTIME, &now);
  return now.tv_sec + now.tv_nsec * 1e-9 - std::stod(field) / static_cast<double>(sysconf(_SC_CLK_TCK));
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Prefill/decode tokens per second and image encode time of a recipe's model (random weights)"};
  std::string recipe_path, precision = "32";
  std::int64_t prompt_tokens = 256, new_tokens = 32, batch = 1;
  app.add_option("recipe", recipe_path)->required();
  app.add_option("--prompt-tokens", prompt_tokens);
  app.add_option("--new-tokens", new_tokens);
  app.add_option("--precision", precision)->check(CLI::IsMember({"32", "bf16"}));
  app.add_option("--batch", batch, "Sequences prefilled and decoded together")->check(CLI::Range(1, 4096));
  bool encode_only = false;
  app.add_flag("--encode-only", encode_only, "Only the image through the vision encoder (no language model timing)");
  CLI11_PARSE(app, argc, argv);

  neva::Recipe recipe = neva::load_recipe(recipe_path, {"trainer.precision=" + precision});
  neva::RuntimeContext context = recipe.runtime_context();
  context.dtypes.params = context.dtypes.compute;  // inference: weights in the compute dtype
  at::manual_seed(0);
  neva::LlavaModel model = neva::build_model(recipe, context);
  torch::NoGradGuard no_grad;
  model.backbone().eval();

  double first_token = 0;
  if (!encode_only) {
    at::Tensor prompt = at::randint(0, model.backbone().vocab_size(), {batch, prompt_tokens}, at::kLong);
    auto timed_prefill = [&](neva::KVCache* cache) {
      neva::BackboneInputs inputs;
      inputs.embeddings = model.backbone().embed(prompt);
      inputs.cache = cache;
      return model.backbone().forward(inputs).logits;
    };
    // The first prefill is what a user waits for: its end, counted from the process's start, is the
    // time to the first token (loading, and the first touch of memory-mapped weights, included).
    { auto warm = model.backbone().new_cache(batch, prompt_tokens + new_tokens); timed_prefill(warm.get()); }
    first_token = seconds_since_process_start();
    auto cache = model.backbone().new_cache(batch, prompt_tokens + new_tokens);
    auto start = std::chrono::steady_clock::now();
    at::Tensor logits = timed_prefill(cache.get());
    double prefill = seconds_since(start);  // the second, warm prefill
    start = std::chrono::steady_clock::now();
    for (std::int64_t i = 0; i < new_tokens; ++i) {
      neva::BackboneInputs step;
      step.embeddings = model.backbone().embed(logits.select(1, -1).argmax(-1, true));
      step.cache = cache.get();
      logits = model.backbone().forward(step).logits;
    }
    double decode = seconds_since(start);
    if (batch == 1) {
      std::printf("neva   %-5s prefill %5lld tokens: %8.1f tokens/s   decode %4lld tokens: %7.2f tokens/s\n",
                  precision.c_str(), static_cast<long long>(prompt_tokens), prompt_tokens / prefill,
                  static_cast<long long>(new_tokens), new_tokens / decode);
    } else {
      std::printf("neva   %-5s batch %lld  prefill %5lld tokens: %8.1f tokens/s   decode %4lld tokens: %7.2f tokens/s\n",
                  precision.c_str(), static_cast<long long>(batch), static_cast<long long>(prompt_tokens),
                  batch * prompt_tokens / prefill, static_cast<long long>(new_tokens), batch * new_tokens / decode);
    }
  }
  if (model.encoder()) {
    model.encoder()->eval();
    const std::int64_t side = model.encoder()->image_size();
    at::Tensor pixels = at::randn({1, 3, side, side});
    model.encoder()->forward(pixels);  // warm-up
    const auto start = std::chrono::steady_clock::now();
    at::Tensor features = model.encoder()->forward(pixels);
    std::printf("neva   %-5s encode 1 image %lldx%lld -> %lld tokens: %8.1f ms\n", precision.c_str(),
                static_cast<long long>(side), static_cast<long long>(side), static_cast<long long>(features.size(1)),
                seconds_since(start) * 1e3);
  }
  if (encode_only) return 0;
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  std::printf("neva   %-5s from process start to the first token: %.2f s (the end of the first, cold prefill); "
              "peak RSS %.0f MiB\n", precision.c_str(), first_token, usage.ru_maxrss / 1024.0);
  std::printf("neva   %-5s fp32 linear layers without autograd: %s\n", precision.c_str(), neva::nn::cpu_fp32_gemv_name().c_str());
  std::printf("neva   %-5s bf16 linear layers without autograd: %s\n", precision.c_str(), neva::nn::cpu_bf16_gemv_name().c_str());
  return 0;
}
