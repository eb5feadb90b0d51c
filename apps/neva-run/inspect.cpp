#include "inspect.h"

#include <ATen/autocast_mode.h>
#include <torch/nn/module.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <chrono>

#include "neva/model/llava.h"
#include <iomanip>

namespace neva {
namespace {

struct ParameterCounts {
  std::int64_t total = 0;
  std::int64_t trainable = 0;
};

ParameterCounts count_and_freeze(torch::nn::Module& module, bool freeze) {
  ParameterCounts counts;
  for (auto& parameter : module.parameters()) {
    if (freeze) parameter.set_requires_grad(false);
    counts.total += parameter.numel();
    if (parameter.requires_grad()) counts.trainable += parameter.numel();
  }
  return counts;
}

void describe(std::ostream& out, const Recipe& recipe, const ComponentSpec& spec, const ParameterCounts& counts) {
  const PluginInfo& info = recipe.registry->find(spec.kind, spec.plugin);
  out << "  " << spec.kind << " [" << spec.section << "]: '" << spec.plugin << "' -> plugin " << info.name << " "
      << info.version << " (" << info.path.filename().string() << ")\n"
      << "    parameters: " << counts.total << " (" << counts.trainable << " trainable"
      << (spec.freeze ? ", frozen" : "") << ")\n";
}

// bf16 mixed precision on CPU: weights stay as built, matmuls run in bf16 (oneDNN, AMX where present).
class AutocastScope {
 public:
  AutocastScope(const RuntimeContext& context)
      : enabled_(context.dtypes.compute != context.dtypes.params), device_(context.device.type()) {
    if (!enabled_) return;
    at::autocast::set_autocast_dtype(device_, context.dtypes.compute);
    at::autocast::set_autocast_enabled(device_, true);
  }
  ~AutocastScope() {
    if (!enabled_) return;
    at::autocast::set_autocast_enabled(device_, false);
    at::autocast::clear_cache();
  }

 private:
  bool enabled_;
  c10::DeviceType device_;
};

// The whole model: every component, then one forward pass of a micro-batch of random token ids with
// one random image each (placeholders first), reporting the logits.
void inspect_model(const Recipe& recipe, const RuntimeContext& context, std::ostream& out) {
  const MultimodalConfig& mm_cfg = recipe.model.mm_cfg;
  LlavaModel model = build_model(recipe, context);
  describe(out, recipe, *mm_cfg.llm, count_and_freeze(model.backbone(), false));
  if (model.encoder()) {
    describe(out, recipe, *mm_cfg.vision_encoder, count_and_freeze(*model.encoder(), false));
    describe(out, recipe, mm_cfg.connector, count_and_freeze(*model.connector(), false));
  }
  const std::int64_t batch = recipe.model.micro_batch_size, text = 16;
  const std::int64_t image_tokens = model.encoder() ? model.tokens_per_image() : 0;
  at::Tensor ids = at::randint(0, model.backbone().vocab_size(), {batch, image_tokens + text}, context.generator, at::kLong);
  ids.masked_fill_(ids == model.image_token_id(), 0);
  MultimodalInputs inputs;
  if (image_tokens) {
    ids.narrow(1, 0, image_tokens).fill_(model.image_token_id());
    const std::int64_t side = model.encoder()->image_size();
    inputs.pixel_values = at::randn({batch, 3, side, side}, context.generator);
  }
  inputs.input_ids = ids;
  model.backbone().eval();
  if (model.encoder()) model.encoder()->eval();
  torch::NoGradGuard no_grad;
  auto start = std::chrono::steady_clock::now();
  at::Tensor logits;
  {
    AutocastScope autocast(context);
    logits = model.forward(inputs).logits;
  }
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  out << "forward: " << batch << " x (" << image_tokens << " image + " << text << " text tokens) -> logits "
      << logits.sizes() << " " << c10::toString(logits.scalar_type()) << " in " << std::fixed << std::setprecision(1)
      << seconds * 1e3 << " ms\n";
  if (!logits.isfinite().all().item<bool>()) throw Error("the model's logits contain NaN or Inf");
}

}  // namespace

void run_inspect(const Recipe& recipe, std::ostream& out) {
  RuntimeContext context = recipe.runtime_context();
  const auto& parallel = recipe.model.parallel;
  out << "recipe: " << recipe.source << "\n"
      << "runtime: device " << context.device << ", precision " << recipe.trainer.precision << " (params "
      << c10::toString(context.dtypes.params) << ", compute " << c10::toString(context.dtypes.compute)
      << "), seed " << context.generator.current_seed() << "\n"
      << "parallel: tensor " << parallel.tensor << ", pipeline " << parallel.pipeline << ", context "
      << parallel.context << ", expert " << parallel.expert << (parallel.sequence_parallel ? ", sequence parallel" : "")
      << "; micro batch " << recipe.model.micro_batch_size << ", global batch " << recipe.model.global_batch_size
      << "\n"
      << "plugins: " << recipe.registry->list().size() << " found in";
  for (const auto& directory : recipe.registry->directories()) out << " " << directory.string();
  out << "\ncomponents:\n";

  const MultimodalConfig& mm_cfg = recipe.model.mm_cfg;
  if (mm_cfg.llm) {
    inspect_model(recipe, context, out);
    return;
  }
  const ComponentSpec& spec = mm_cfg.connector;
  auto connector = recipe.registry->create<Connector>(spec.plugin, *spec.config, context);
  describe(out, recipe, spec, count_and_freeze(*connector, spec.freeze));

  // Without an encoder there is no token count to take: CLIP ViT-L/14-336's 576 patch tokens.
  const std::int64_t tokens = 576;
  at::Tensor features = torch::randn({recipe.model.micro_batch_size, tokens, connector->input_size()},
                                     at::TensorOptions().device(context.device).dtype(context.dtypes.params));
  connector->eval();
  torch::NoGradGuard no_grad;
  at::Tensor projected;
  auto start = std::chrono::steady_clock::now();
  {
    AutocastScope autocast(context);
    projected = connector->forward(features);
  }
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  out << "forward: connector " << features.sizes() << " " << c10::toString(features.scalar_type()) << " -> "
      << projected.sizes() << " " << c10::toString(projected.scalar_type()) << " in " << std::fixed
      << std::setprecision(1) << seconds * 1e3 << " ms; output mean " << std::setprecision(4)
      << projected.to(at::kFloat).mean().item<double>() << ", std " << projected.to(at::kFloat).std().item<double>()
      << "\n";
  if (!projected.isfinite().all().item<bool>()) throw Error("connector output contains NaN or Inf");
}

}  // namespace neva
