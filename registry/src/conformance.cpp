#include "neva/conformance.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <functional>
#include <map>
#include <optional>
#include <sstream>
#include <thread>
#include <unistd.h>

#include "neva/connector.h"
#include "neva/error.h"
#include "neva/language_backbone.h"
#include "neva/nn/linear.h"
#include "neva/precision_recipe.h"
#include "neva/registry.h"
#include "neva/io/safetensors.h"
#include "neva/vision_encoder.h"

namespace neva {

namespace {

namespace fs = std::filesystem;

struct Subject {
  std::shared_ptr<Registry> registry;
  PluginInfo info;
  std::string config_toml;

  static Subject open(const fs::path& plugin, const std::string& config_toml) {
    Registry::Options options;
    options.plugin_files = {fs::absolute(plugin)};
    options.use_environment = false;
    options.use_install_directory = false;
    auto registry = std::make_shared<Registry>(options);
    for (const auto& info : registry->list()) {
      if (fs::equivalent(info.path, plugin)) return {registry, info, config_toml};
    }
    throw Error(plugin.string() + ": not loaded");
  }

  std::shared_ptr<ComponentConfig> parse(const std::string& toml) const {
    auto document = ConfigDocument::parse(toml, "conformance config");
    // A connector's widths, which a recipe derives from the components around it: 16 and 32 unless
    // the config gives them (docs/plugins.md).
    if (info.kind == Connector::kKind) {
      for (const char* key : {"input_size=16", "output_size=32"}) {
        const std::string name = std::string(key).substr(0, std::string(key).find('='));
        if (!document.root().has(name)) document.set(key);
      }
    }
    auto config = registry->parse_config(info.kind, info.name, document.root());
    document.root().reject_unknown_keys();
    return config;
  }

  // A fresh component; `dtype` for its parameters and compute, initialised from a context seeded with
  // `seed` (and the global generator seeded with `global_seed`, the same by default: it must not matter).
  std::shared_ptr<torch::nn::Module> build(c10::ScalarType dtype = at::kFloat, std::uint64_t seed = 0,
                                           std::optional<std::uint64_t> global_seed = std::nullopt) const {
    auto config = parse(config_toml);
    RuntimeContext context = RuntimeContext::seeded(seed);
    context.dtypes.params = context.dtypes.compute = dtype;
    at::manual_seed(global_seed.value_or(seed));
    if (info.kind == Connector::kKind) return registry->create<Connector>(info.name, *config, context);
    if (info.kind == VisionEncoder::kKind) return registry->create<VisionEncoder>(info.name, *config, context);
    if (info.kind == LanguageBackbone::kKind) return registry->create<LanguageBackbone>(info.name, *config, context);
    throw Error("no conformance battery for plugins of kind '" + info.kind + "'");
  }
};

// The kind's standard input (deterministic): features, pixels or token ids.
at::Tensor standard_input(torch::nn::Module& module, std::int64_t batch = 2, std::uint64_t seed = 1234) {
  at::manual_seed(seed);
  if (auto* connector = dynamic_cast<Connector*>(&module)) {
    return at::randn({batch, 7, connector->input_size()}).to(module.parameters()[0].scalar_type());
  }
  if (auto* encoder = dynamic_cast<VisionEncoder*>(&module)) {
    return at::randn({batch, 3, encoder->image_size(), encoder->image_size()});
  }
  auto& backbone = dynamic_cast<LanguageBackbone&>(module);
  return at::randint(0, backbone.vocab_size(), {batch, 12}, at::kLong);
}

// One forward pass, returning the main output (logits for a backbone).
at::Tensor forward_on(torch::nn::Module& module, const at::Tensor& input) {
  if (auto* connector = dynamic_cast<Connector*>(&module)) return connector->forward(input);
  if (auto* encoder = dynamic_cast<VisionEncoder*>(&module)) return encoder->forward(input);
  auto& backbone = dynamic_cast<LanguageBackbone&>(module);
  BackboneInputs inputs;
  inputs.embeddings = backbone.embed(input);
  return backbone.forward(inputs).logits;
}

at::Tensor run_forward(const Subject&, torch::nn::Module& module, std::int64_t batch = 2) {
  return forward_on(module, standard_input(module, batch));
}

void expect(bool condition, const std::string& what) {
  if (!condition) throw Error(what);
}

double max_difference(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kFloat) - b.to(at::kFloat)).abs().max().item<double>();
}

double scale_of(const at::Tensor& t) { return std::max(t.to(at::kFloat).abs().max().item<double>(), 1e-6); }

void check_forward(const Subject& subject) {
  auto module = subject.build();
  module->eval();
  torch::NoGradGuard no_grad;
  if (auto* connector = dynamic_cast<Connector*>(module.get())) {
    expect(connector->input_size() >= 1 && connector->output_size() >= 1,
           "connector reports input_size() = " + std::to_string(connector->input_size()) + " and output_size() = " +
               std::to_string(connector->output_size()) + " (expected widths >= 1)");
  }
  at::Tensor out = run_forward(subject, *module);
  if (auto* connector = dynamic_cast<Connector*>(module.get())) {
    expect(out.dim() == 3 && out.size(0) == 2 && out.size(1) == connector->output_tokens(7) &&
               out.size(2) == connector->output_size(),
           "connector output has shape " + std::string(c10::str(out.sizes())) + ", expected [2, output_tokens(7), " +
               std::to_string(connector->output_size()) + "]");
  } else if (auto* encoder = dynamic_cast<VisionEncoder*>(module.get())) {
    expect(out.dim() == 3 && out.size(0) == 2 && out.size(1) == encoder->num_tokens() &&
               out.size(2) == encoder->hidden_size(),
           "encoder output has shape " + std::string(c10::str(out.sizes())) + ", expected [2, num_tokens() = " +
               std::to_string(encoder->num_tokens()) + ", hidden_size() = " + std::to_string(encoder->hidden_size()) + "]");
  } else {
    auto& backbone = dynamic_cast<LanguageBackbone&>(*module);
    expect(out.dim() == 3 && out.size(0) == 2 && out.size(1) == 12 && out.size(2) == backbone.vocab_size(),
           "logits have shape " + std::string(c10::str(out.sizes())) + ", expected [2, 12, vocab_size() = " +
               std::to_string(backbone.vocab_size()) + "]");
  }
  expect(out.is_floating_point(), "output is not floating point");
  expect(out.isfinite().all().item<bool>(), "output contains NaN or Inf");
}

void check_determinism(const Subject& subject) {
  auto module = subject.build();
  module->eval();
  torch::NoGradGuard no_grad;
  at::Tensor input = standard_input(*module);  // no reseeding between the two passes
  at::Tensor first = forward_on(*module, input), second = forward_on(*module, input);
  expect(at::equal(first, second), "two forward passes on the same input differ (max |diff| " +
                                       std::to_string(max_difference(first, second)) + ")");
}

void check_gradients(const Subject& subject) {
  auto module = subject.build();
  module->train();
  std::vector<std::pair<std::string, at::Tensor>> trainable, fixed;
  for (const auto& item : module->named_parameters()) {
    (item.value().requires_grad() ? trainable : fixed).emplace_back(item.key(), item.value());
  }
  expect(!trainable.empty(), "the component has no trainable parameters");
  auto backward = [&] {
    for (auto& item : module->named_parameters()) item.value().mutable_grad().reset();
    run_forward(subject, *module, 4).to(at::kFloat).pow(2).mean().backward();
  };
  // Every trainable parameter gets a gradient; none of those the plugin holds frozen does.
  backward();
  for (const auto& [name, parameter] : trainable) {
    expect(parameter.grad().defined(), "no gradient reached trainable parameter '" + name + "'");
    expect(parameter.grad().isfinite().all().item<bool>(), "gradient of '" + name + "' is not finite");
  }
  for (const auto& [name, parameter] : fixed) {
    expect(!parameter.grad().defined(), "frozen parameter '" + name + "' received a gradient");
  }
  // Freezing a parameter from outside (as NeVA's stages do) keeps its gradient away.
  trainable.front().second.set_requires_grad(false);
  backward();
  expect(!trainable.front().second.grad().defined(),
         "parameter '" + trainable.front().first + "' received a gradient after requires_grad(false)");
}

void check_kv_cache(const Subject& subject) {
  auto module = subject.build();
  module->eval();
  torch::NoGradGuard no_grad;
  auto& backbone = dynamic_cast<LanguageBackbone&>(*module);
  at::manual_seed(7);
  at::Tensor ids = at::randint(0, backbone.vocab_size(), {1, 10}, at::kLong);
  BackboneInputs full;
  full.embeddings = backbone.embed(ids);
  at::Tensor expected = backbone.forward(full).logits;
  auto cache = backbone.new_cache(1, 10);
  std::vector<at::Tensor> pieces;
  for (std::int64_t start = 0; start < 10;) {
    std::int64_t length = start == 0 ? 4 : 1;  // a prefill, then one token at a time
    BackboneInputs step;
    step.embeddings = backbone.embed(ids.narrow(1, start, length));
    step.cache = cache.get();
    pieces.push_back(backbone.forward(step).logits);
    start += length;
  }
  at::Tensor incremental = at::cat(pieces, 1);
  double difference = max_difference(incremental, expected);
  expect(difference <= 1e-4 * scale_of(expected) + 1e-5,
         "incremental decoding with the KV cache differs from the full forward pass by " + std::to_string(difference));
}

// Continuous batching (plugin ABI 2.5, neva-run serve): cache rows as slots of their own lengths.
void check_kv_slots(const Subject& subject) {
  expect(subject.info.abi.major > 2 || subject.info.abi.minor >= 5,
         "built for plugin ABI " + std::to_string(subject.info.abi.major) + "." + std::to_string(subject.info.abi.minor) +
             ", before KV-cache slots (2.5): neva-run serve refuses it; rebuild it against this neva");
  auto module = subject.build();
  module->eval();
  torch::NoGradGuard no_grad;
  auto& backbone = dynamic_cast<LanguageBackbone&>(*module);
  at::manual_seed(9);
  const std::vector<std::int64_t> lengths{6, 3};  // prompts of two sequences, each followed by two tokens
  std::vector<at::Tensor> ids, expected;
  for (std::int64_t length : lengths) {
    ids.push_back(at::randint(0, backbone.vocab_size(), {1, length + 2}, at::kLong));
    BackboneInputs full;
    full.embeddings = backbone.embed(ids.back());
    expected.push_back(backbone.forward(full).logits[0]);
  }
  auto cache = backbone.new_cache(3, 12);
  auto run = [&](const std::vector<std::int64_t>& rows, const std::vector<std::int64_t>& past, const at::Tensor& tokens) {
    BackboneInputs step;
    step.embeddings = backbone.embed(tokens);
    step.cache = cache.get();
    step.cache_rows = at::tensor(rows, at::kLong);
    step.cache_lengths = at::tensor(past, at::kLong);
    return backbone.forward(step).logits;
  };
  double difference = 0;
  // Prefill the first into row 2 and the second into row 0, one at a time.
  for (std::size_t i = 0; i < 2; ++i) {
    at::Tensor logits = run({i == 0 ? 2 : 0}, {0}, ids[i].narrow(1, 0, lengths[i]))[0];
    difference = std::max(difference, max_difference(logits, expected[i].narrow(0, 0, lengths[i])));
  }
  // Then decode both together twice, rows in either order.
  for (std::int64_t t = 0; t < 2; ++t) {
    const bool swapped = t == 1;
    const std::size_t a = swapped ? 1 : 0, b = swapped ? 0 : 1;
    at::Tensor tokens = at::cat({ids[a].narrow(1, lengths[a] + t, 1), ids[b].narrow(1, lengths[b] + t, 1)}, 0);
    at::Tensor logits = run({a == 0 ? 2 : 0, b == 0 ? 2 : 0}, {lengths[a] + t, lengths[b] + t}, tokens);
    difference = std::max(difference, max_difference(logits[0][0], expected[a][lengths[a] + t]));
    difference = std::max(difference, max_difference(logits[1][0], expected[b][lengths[b] + t]));
  }
  const double scale = std::max(scale_of(expected[0]), scale_of(expected[1]));
  expect(difference <= 1e-4 * scale + 1e-5,
         "decoding two sequences of other lengths in KV-cache rows 2 and 0 (BackboneInputs::cache_rows / "
         "cache_lengths) differs from each one's full forward pass by " + std::to_string(difference));
}

void check_batch_padding(const Subject& subject) {
  auto module = subject.build();
  module->eval();
  torch::NoGradGuard no_grad;
  auto& backbone = dynamic_cast<LanguageBackbone&>(*module);
  at::manual_seed(8);
  at::Tensor sample = at::randint(0, backbone.vocab_size(), {1, 6}, at::kLong);
  at::Tensor other = at::randint(0, backbone.vocab_size(), {1, 9}, at::kLong);
  BackboneInputs alone;
  alone.embeddings = backbone.embed(sample);
  at::Tensor expected = backbone.forward(alone).logits[0];
  // The sample left-padded to 9 in a batch with a longer one.
  at::Tensor ids = at::cat({at::cat({at::zeros({1, 3}, at::kLong), sample}, 1), other});
  at::Tensor mask = at::ones({2, 9}, at::kLong);
  mask[0].narrow(0, 0, 3).fill_(0);
  BackboneInputs batch;
  batch.embeddings = backbone.embed(ids);
  batch.attention_mask = mask;
  batch.positions = (mask.cumsum(1) - 1).clamp_min(0);
  at::Tensor got = backbone.forward(batch).logits[0].narrow(0, 3, 6);
  double difference = max_difference(got, expected);
  expect(difference <= 1e-4 * scale_of(expected) + 1e-5,
         "a sample's logits change when it is left-padded in a batch (max |diff| " + std::to_string(difference) + ")");
}

void check_save_load(const Subject& subject) {
  auto original = subject.build(at::kFloat, 1);
  original->eval();
  char directory[] = "/tmp/neva-conformance-XXXXXX";
  expect(::mkdtemp(directory) != nullptr, "cannot create a temporary directory");
  std::string file = std::string(directory) + "/state.safetensors";
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& item : original->named_parameters()) tensors.emplace_back(item.key(), item.value());
  for (const auto& item : original->named_buffers()) tensors.emplace_back(item.key(), item.value());
  write_safetensors(file, tensors);
  auto copy = subject.build(at::kFloat, 2);  // different initialisation
  copy->eval();
  {
    SafetensorsFile saved(file);
    torch::NoGradGuard no_grad;
    for (auto& item : copy->named_parameters()) item.value().copy_(saved.tensor(item.key()));
    for (auto& item : copy->named_buffers()) item.value().copy_(saved.tensor(item.key()));
  }
  fs::remove_all(directory);
  torch::NoGradGuard no_grad;
  expect(at::equal(run_forward(subject, *original), run_forward(subject, *copy)),
         "a copy loaded from the saved parameters and buffers computes something else: state lives outside them");
}

// Random initialisation draws from the context's generator, never the global one: a component built
// twice from the same context seed is the same whatever the global generator holds.
void check_initialisation(const Subject& subject) {
  auto first = subject.build(at::kFloat, 11, 1), second = subject.build(at::kFloat, 11, 2);
  auto theirs = second->named_parameters();
  for (const auto& item : first->named_parameters()) {
    expect(at::equal(item.value(), theirs[item.key()]),
           "parameter '" + item.key() + "' differs between two builds from the same context seed: it is initialised "
           "from the global random generator (draw from RuntimeContext::generator, e.g. through neva::nn's factories)");
  }
}

void check_bf16(const Subject& subject) {
  auto full = subject.build(at::kFloat, 3), half = subject.build(at::kBFloat16, 3);
  full->eval();
  half->eval();
  torch::NoGradGuard no_grad;
  at::Tensor reference = run_forward(subject, *full), low = run_forward(subject, *half);
  double difference = max_difference(low, reference), scale = scale_of(reference);
  expect(difference <= 0.05 * scale, "bf16 output differs from fp32 by " + std::to_string(difference) +
                                         ", more than 5% of the output scale " + std::to_string(scale));
}

// model.fp8 on this backbone: neva's own fp8 precision recipe (E4M3, current scaling: no training
// steps to delay over) prepared on it must find decoder layers whose linear layers it can swap (built
// through neva::nn::linear; a torch::nn::Linear of the plugin's own is refused naming the module), its
// logits must stay within 15% of the fp32 output scale (the largest difference against the largest
// logit; E4M3 keeps 3 mantissa bits: 2.3-4.6% on the built-in backbones' tiny configs), and gradients
// must reach every parameter of the FP8 layers, finite.
void check_fp8(const Subject& subject) {
  if (subject.info.kind != LanguageBackbone::kKind) return;
  Registry::Options options;
  options.use_environment = false;  // neva's own plugins: the fp8 recipe the host would use
  Registry host(options);
  auto document = ConfigDocument::parse("fp8 = true\nfp8_e4m3 = true\nfp8_recipe = \"tensorwise\"\n", "conformance fp8");
  auto config = host.parse_config(PrecisionRecipe::kKind, "fp8:32", document.root());
  auto recipe = host.create<PrecisionRecipe>("fp8:32", *config, RuntimeContext());
  auto reference = subject.build(at::kFloat, 3), module = subject.build(at::kFloat, 3);
  const RuntimeContext context = RuntimeContext::seeded(3);
  recipe->prepare(*module, context);
  std::vector<nn::LinearImpl*> swapped;
  for (auto& [path, layer] : nn::linear_layers(*module)) {
    if (layer->kernel()) swapped.push_back(layer);
  }
  expect(!swapped.empty(), "model.fp8 swapped no linear layer (none under 'layers.<i>.' built with neva::nn::linear)");
  {
    reference->eval();
    module->eval();
    torch::NoGradGuard no_grad;
    const at::Tensor expected = run_forward(subject, *reference), got = run_forward(subject, *module);
    const double difference = max_difference(got, expected), scale = scale_of(expected);
    expect(got.isfinite().all().item<bool>(), "FP8 logits contain NaN or Inf");
    expect(difference <= 0.15 * scale, "FP8 logits differ from fp32 by " + std::to_string(difference) +
                                           ", more than 15% of the output scale " + std::to_string(scale));
  }
  module->train();
  const at::Tensor logits = run_forward(subject, *module);
  logits.to(at::kFloat).pow(2).mean().backward();
  for (auto* layer : swapped) {
    for (const auto& parameter : layer->parameters()) {
      expect(parameter.grad().defined() && parameter.grad().isfinite().all().item<bool>(),
             "an FP8 layer's parameter got no finite gradient");
    }
  }
}

// Each sample's output is its own: the same whatever else is in the batch, and wherever it sits.
void check_batch_independence(const Subject& subject) {
  auto module = subject.build();
  module->eval();
  torch::NoGradGuard no_grad;
  at::Tensor batch = standard_input(*module, 3);
  at::Tensor together = forward_on(*module, batch);
  at::Tensor reversed = forward_on(*module, batch.flip(0));
  for (std::int64_t i = 0; i < 3; ++i) {
    at::Tensor alone = forward_on(*module, batch.narrow(0, i, 1))[0];
    const double scale = scale_of(alone), tolerance = 1e-4 * scale + 1e-5;
    const double in_batch = max_difference(together[i], alone), moved = max_difference(reversed[2 - i], alone);
    expect(in_batch <= tolerance, "sample " + std::to_string(i) + "'s output changes when other samples share its batch " +
                                      "(max |diff| " + std::to_string(in_batch) + ")");
    expect(moved <= tolerance, "sample " + std::to_string(i) + "'s output changes with its place in the batch (max |diff| " +
                                   std::to_string(moved) + ")");
  }
}

// Concurrent inference: several instances, several threads, many calls each, every result compared
// with the serial one for that instance and input, right away and again at the end (so that state
// shared between instances or threads, and outputs that alias such state, are caught). Compared to
// 1e-5 of the output's scale, not bitwise: BLAS may split a product among fewer threads when called
// from several at once, which reorders its sums; shared state is off by the output's own size.
void check_threads(const Subject& subject) {
  constexpr int kInstances = 2, kThreads = 4, kCalls = 12;
  auto close = [](const at::Tensor& a, const at::Tensor& b) {
    return a.sizes() == b.sizes() && max_difference(a, b) <= 1e-5 * scale_of(b) + 1e-6;
  };
  std::vector<std::shared_ptr<torch::nn::Module>> modules;
  for (int i = 0; i < kInstances; ++i) {
    modules.push_back(subject.build(at::kFloat, 100 + i));  // different weights per instance
    modules.back()->eval();
  }
  torch::NoGradGuard no_grad;
  std::vector<at::Tensor> inputs;
  std::vector<at::Tensor> expected;  // [instance][input]
  for (int k = 0; k < kThreads; ++k) inputs.push_back(standard_input(*modules[0], 2, 500 + k));
  for (int i = 0; i < kInstances; ++i) {
    for (int k = 0; k < kThreads; ++k) expected.push_back(forward_on(*modules[i], inputs[k]).clone());
  }
  std::vector<std::string> failures(kThreads);
  std::vector<std::vector<std::pair<int, at::Tensor>>> kept(kThreads);
  std::vector<std::thread> workers;
  for (int t = 0; t < kThreads; ++t) {
    workers.emplace_back([&, t] {
      torch::NoGradGuard guard;  // grad mode is per thread
      try {  // an exception must not leave the thread (std::terminate): it is this check's failure
        for (int call = 0; call < kCalls && failures[t].empty(); ++call) {
          const int instance = (t + call) % kInstances;
          at::Tensor out = forward_on(*modules[instance], inputs[t]);
          if (!close(out, expected[instance * kThreads + t])) {
            failures[t] = "thread " + std::to_string(t) + ", call " + std::to_string(call) + " on instance " +
                          std::to_string(instance) + " got another result than the same call alone";
          }
          kept[t].emplace_back(instance, out);
        }
      } catch (const c10::Error& error) {
        failures[t] = "thread " + std::to_string(t) + " threw: " + error.what_without_backtrace();
      } catch (const std::exception& error) {
        failures[t] = "thread " + std::to_string(t) + " threw: " + error.what();
      }
    });
  }
  for (auto& worker : workers) worker.join();
  for (const auto& failure : failures) {
    expect(failure.empty(), "concurrent inference (" + std::to_string(kInstances) + " instances, " +
                                std::to_string(kThreads) + " threads): " + failure + " (state shared between calls?)");
  }
  for (int t = 0; t < kThreads; ++t) {
    for (const auto& [instance, out] : kept[t]) {
      expect(close(out, expected[instance * kThreads + t]),
             "an output changed after it was returned: it aliases state that later calls overwrite");
    }
  }
}

void check_bad_config(const Subject& subject) {
  // Garbled values for each key of the working config, and no keys at all: each must be refused with
  // an error (or, with defaults, still build), never crash.
  std::vector<std::string> candidates = {""};
  std::istringstream lines(subject.config_toml);
  for (std::string line; std::getline(lines, line);) {
    std::size_t equals = line.find('=');
    if (equals == std::string::npos || line.find('[') == 0) continue;
    candidates.push_back(line.substr(0, equals) + "= \"not a valid value\"\n");
    candidates.push_back(line.substr(0, equals) + "= -7\n");
  }
  for (const auto& toml : candidates) {
    try {
      auto config = subject.parse(toml);
      RuntimeContext context;
      if (subject.info.kind == Connector::kKind) subject.registry->create<Connector>(subject.info.name, *config, context);
    } catch (const Error&) {
      // a clear refusal is what we want
    }
  }
}

const std::map<std::string, std::function<void(const Subject&)>>& check_bodies() {
  static const std::map<std::string, std::function<void(const Subject&)>> bodies = {
      {"descriptor", [](const Subject&) {}},  // opening the subject already checked ABI, fields, LibTorch
      {"build", [](const Subject& s) { s.build(); }},
      {"bad_config", check_bad_config},
      {"forward", check_forward},
      {"determinism", check_determinism},
      {"gradients", check_gradients},
      {"kv_cache", check_kv_cache},
      {"kv_slots", check_kv_slots},
      {"batch_padding", check_batch_padding},
      {"save_load", check_save_load},
      {"initialisation", check_initialisation},
      {"bf16", check_bf16},
      {"fp8", check_fp8},
      {"batch_independence", check_batch_independence},
      {"threads", check_threads},
  };
  return bodies;
}

}  // namespace

std::vector<ConformanceCheck> conformance_checks(const std::string& kind) {
  std::vector<ConformanceCheck> checks = {
      {"descriptor", "the descriptor is valid: ABI version, fields, LibTorch version"},
      {"build", "the factory builds the component from the given config"},
      {"bad_config", "garbled or missing config values give an error, not a crash"},
      {"forward", "forward gives the interface's shapes and dtypes, all finite"},
      {"determinism", "the same input gives the same output twice"},
      {"gradients", "gradients reach every trainable parameter and none reaches a frozen one"},
  };
  if (kind == LanguageBackbone::kKind) {
    checks.push_back({"kv_cache", "incremental decoding with the KV cache equals the full forward pass"});
    checks.push_back({"kv_slots", "KV-cache rows as slots of other lengths decode together as each alone (serve)"});
    checks.push_back({"batch_padding", "left padding and batch company do not change a sample's logits"});
    checks.push_back({"fp8", "model.fp8 swaps the decoder layers' linears; logits within 15% of fp32's scale, gradients finite"});
  }
  checks.push_back({"save_load", "a copy loaded from the saved parameters computes the same output"});
  checks.push_back({"initialisation", "random initialisation draws from the context's generator, not the global one"});
  checks.push_back({"bf16", "bf16 stays within 5% of the fp32 output scale"});
  checks.push_back({"batch_independence", "a sample's output does not depend on the rest of its batch or its place"});
  checks.push_back({"threads", "instances and threads running inference concurrently get the serial results"});
  return checks;
}

void run_conformance_check(const std::string& name, const fs::path& plugin, const std::string& config_toml) {
  auto body = check_bodies().find(name);
  if (body == check_bodies().end()) throw Error("unknown conformance check '" + name + "'");
  body->second(Subject::open(plugin, config_toml));
}

std::string plugin_kind(const fs::path& plugin) { return Subject::open(plugin, "").info.kind; }

}  // namespace neva
