// Training blocks that must not change the mathematics: activation checkpointing (same gradients,
// less memory), the fused attention kernel (same as the plain formula), sequence packing (same
// loss and gradients as padded rows).
#include <doctest/doctest.h>

#include <ATen/ATen.h>
#include <malloc.h>
#include <torch/autograd.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include <fstream>
#include <map>

#include "neva/data/dataset.h"
#include "neva/nn/attention.h"
#include "neva/model/decoder.h"
#include "neva/nn/linear.h"
#include "neva/nn/norm.h"
#include "neva/train/loss.h"
#include "neva/train/optim.h"
#include "neva/precision.h"
#include "tiny_decoder.h"

namespace {

using neva::test::tiny_decoder;

std::shared_ptr<neva::DecoderBackbone> backbone(const neva::DecoderConfig& config, const std::string& granularity = "",
                                                const std::string& method = "uniform", std::int64_t layers = 1) {
  neva::RuntimeContext context = neva::RuntimeContext::seeded(5);
  context.activations_checkpoint.granularity = granularity;
  context.activations_checkpoint.method = method;
  context.activations_checkpoint.num_layers = layers;
  auto model = std::make_shared<neva::DecoderBackbone>(config, context);
  model->train();
  return model;
}

// Loss (with the MoE auxiliary loss) and every parameter's gradient for one batch.
// With `logits_mask`, the backbone computes logits only where a labelled token follows (as the
// trainer does) and the loss is taken over those.
std::pair<double, std::map<std::string, at::Tensor>> loss_and_gradients(neva::DecoderBackbone& model,
                                                                        const neva::TrainingBatch& batch,
                                                                        bool logits_mask = false) {
  model.zero_grad();
  neva::BackboneInputs inputs;
  inputs.embeddings = model.embed(batch.input_ids);
  inputs.positions = batch.positions;
  inputs.attention_mask = batch.attention_mask;
  inputs.segment_ids = batch.segment_ids;
  auto positions = neva::labelled_positions(batch.labels);
  if (logits_mask) inputs.logits_mask = positions.mask;
  auto outputs = model.forward(inputs);
  at::Tensor loss = logits_mask ? neva::labelled_lm_loss(outputs.logits, positions)
                                : neva::causal_lm_loss(outputs.logits, batch.labels);
  if (outputs.aux_loss.defined()) loss = loss + outputs.aux_loss;
  loss.backward();
  std::map<std::string, at::Tensor> gradients;
  for (const auto& item : model.named_parameters()) {
    gradients[item.key()] = item.value().grad().defined() ? item.value().grad().clone() : at::Tensor();
  }
  return {loss.item<double>(), gradients};
}

std::vector<neva::TrainingSample> samples(std::vector<std::int64_t> lengths) {
  std::vector<neva::TrainingSample> out;
  at::manual_seed(11);
  for (auto length : lengths) {
    neva::TrainingSample sample;
    at::Tensor ids = at::randint(4, 97, {length}, at::kLong);
    sample.input_ids.assign(ids.data_ptr<std::int64_t>(), ids.data_ptr<std::int64_t>() + length);
    sample.labels = sample.input_ids;
    for (std::int64_t t = 0; t < length / 3; ++t) sample.labels[t] = neva::kIgnoreIndex;  // the "prompt"
    out.push_back(sample);
  }
  return out;
}

void check_same_gradients(const std::map<std::string, at::Tensor>& expected, const std::map<std::string, at::Tensor>& got,
                          double tolerance) {
  REQUIRE(expected.size() == got.size());
  for (const auto& [name, gradient] : expected) {
    CAPTURE(name);
    REQUIRE(got.at(name).defined() == gradient.defined());
    if (!gradient.defined()) continue;
    double scale = gradient.abs().max().item<double>() + 1e-12;
    CHECK((got.at(name) - gradient).abs().max().item<double>() / scale <= tolerance);
  }
}

// Bytes the C heap (and LibTorch's CPU allocator on it) has handed out and not taken back.
#if defined(__SANITIZE_ADDRESS__)
// The sanitizer runtime's allocator statistics (sanitizer/allocator_interface.h, which GCC does not install).
extern "C" std::size_t __sanitizer_get_current_allocated_bytes();
#endif

// Bytes the heap holds: glibc's count, or ASan's allocator's under NEVA_SANITIZE (malloc is its own).
std::size_t heap_in_use() {
#if defined(__SANITIZE_ADDRESS__)
  return __sanitizer_get_current_allocated_bytes();
#else
  struct mallinfo2 info = mallinfo2();
  return info.uordblks + info.hblkhd;
#endif
}

}  // namespace

TEST_CASE("activation checkpointing: full (uniform, block) and selective give the plain gradients") {
  for (const std::string mlp : {"gated", "moe"}) {
    CAPTURE(mlp);
    auto batch = neva::collate(samples({24, 17, 9}), false, 0);
    auto plain = backbone(tiny_decoder(mlp));
    auto [plain_loss, plain_gradients] = loss_and_gradients(*plain, batch);
    struct Setting {
      const char* granularity;
      const char* method;
      std::int64_t layers;
    };
    for (Setting setting : {Setting{"full", "uniform", 1}, Setting{"full", "uniform", 3}, Setting{"full", "block", 2},
                            Setting{"selective", "uniform", 1}}) {
      CAPTURE(setting.granularity);
      CAPTURE(setting.method);
      CAPTURE(setting.layers);
      auto recomputed = backbone(tiny_decoder(mlp), setting.granularity, setting.method, setting.layers);
      auto [loss, gradients] = loss_and_gradients(*recomputed, batch);
      CHECK(loss == plain_loss);  // the forward pass is the same computation
      check_same_gradients(plain_gradients, gradients, 1e-6);
      if (mlp == "moe") {  // the load-balancing loss reaches the routers through the recomputation
        CHECK(gradients.at("model.layers.0.block_sparse_moe.gate.weight").abs().sum().item<double>() > 0);
      }
    }
  }
}

TEST_CASE("activation checkpointing keeps less activation memory") {
  // Wider and longer than the gradient test, so that activations dominate what the graph holds.
  auto config = tiny_decoder();
  config.hidden_size = 256;
  config.intermediate_size = 1024;
  config.num_heads = 8;
  config.num_kv_heads = 8;
  config.head_dim = 32;
  config.rope.head_dim = 32;
  config.num_layers = 6;
  auto batch = neva::collate(samples({512, 512, 512, 512}), false, 0);
  auto held = [&](const std::string& granularity) {
    auto model = backbone(config, granularity, "uniform", 1);
    at::Tensor embeddings = model->embed(batch.input_ids).detach().requires_grad_(true);
    std::size_t before = heap_in_use();
    neva::BackboneInputs inputs;
    inputs.embeddings = embeddings;
    inputs.attention_mask = batch.attention_mask;
    auto outputs = model->forward(inputs);
    at::Tensor hidden = outputs.logits.sum();  // the graph is alive: its saved tensors are what we measure
    std::size_t after = heap_in_use();
    hidden.backward();
    return static_cast<double>(after - before);
  };
  const double plain = held(""), full = held("full"), selective = held("selective");
  MESSAGE("activation memory held after forward: plain " << plain / 1e6 << " MB, selective " << selective / 1e6
                                                         << " MB, full " << full / 1e6 << " MB");
  CHECK(full < 0.5 * plain);
  CHECK(selective < plain);  // the attention core's outputs are not kept
}

TEST_CASE("the fused attention kernel equals the plain formula, with every kind of mask") {
  neva::AttentionConfig config{64, 4, 2, 16, true, false};
  at::manual_seed(3);
  neva::SelfAttention attention(neva::RuntimeContext::seeded(3), config);
  neva::RopeConfig rope;
  rope.head_dim = 16;
  neva::RotaryEmbedding rotary(rope);
  const std::int64_t batch = 2, seq = 10;
  at::Tensor x = at::randn({batch, seq, 64});
  at::Tensor positions = at::arange(seq).expand({batch, seq});
  auto [cos, sin] = rotary.cos_sin(positions, at::kFloat);
  auto params = attention.named_parameters();

  struct Case {
    const char* name;
    at::Tensor attention_mask, segment_ids;
    std::int64_t window;
  };
  at::Tensor padding = at::ones({batch, seq}, at::kLong);
  padding[1].narrow(0, 7, 3).zero_();
  at::Tensor segments = at::tensor({0, 0, 0, 0, 1, 1, 1, 2, 2, 2}, at::kLong).expand({batch, seq}).contiguous();
  for (const Case& c : {Case{"causal", {}, {}, 0}, Case{"padding", padding, {}, 0}, Case{"packed", {}, segments, 0},
                        Case{"window", {}, {}, 4}}) {
    CAPTURE(c.name);
    auto mask = neva::AttentionMask::build(batch, seq, 0, c.attention_mask, c.segment_ids, c.window, at::kCPU);
    at::Tensor fused = attention.forward(x, cos, sin, mask, nullptr);

    // softmax(q k^T / sqrt(d) + mask) v, written out.
    at::Tensor q = at::linear(x, params["q_proj.weight"], params["q_proj.bias"]).view({batch, seq, 4, 16}).transpose(1, 2);
    at::Tensor k = at::linear(x, params["k_proj.weight"], params["k_proj.bias"]).view({batch, seq, 2, 16}).transpose(1, 2);
    at::Tensor v = at::linear(x, params["v_proj.weight"], params["v_proj.bias"]).view({batch, seq, 2, 16}).transpose(1, 2);
    std::tie(q, k) = neva::apply_rotary(q, k, cos, sin);
    k = k.repeat_interleave(2, 1);
    v = v.repeat_interleave(2, 1);
    at::Tensor scores = at::matmul(q, k.transpose(-1, -2)) / 4.0;
    // The mask from its definition, not from AttentionMask: query i sees key j when j <= i, j is not
    // padding, both are in the same packed sample, and j is within the window (i - j < window, Mistral's).
    at::Tensor visible = at::zeros({batch, 1, seq, seq}, at::kBool);
    for (std::int64_t b = 0; b < batch; ++b) {
      for (std::int64_t i = 0; i < seq; ++i) {
        for (std::int64_t j = 0; j <= i; ++j) {
          bool sees = true;
          if (c.attention_mask.defined()) sees = sees && c.attention_mask[b][j].item<std::int64_t>() == 1;
          if (c.segment_ids.defined()) sees = sees && c.segment_ids[b][i].item<std::int64_t>() == c.segment_ids[b][j].item<std::int64_t>();
          if (c.window > 0) sees = sees && i - j < c.window;
          visible[b][0][i][j] = sees;
        }
      }
    }
    // ... and what the kernel was given agrees (none given means plain causal).
    if (mask.visible.defined()) CHECK(at::equal(mask.visible.expand({batch, 1, seq, seq}), visible));
    scores = scores.masked_fill(visible.logical_not(), -std::numeric_limits<float>::infinity());
    at::Tensor plain = at::matmul(at::softmax(scores, -1), v).transpose(1, 2).reshape({batch, seq, 64});
    plain = at::linear(plain, params["o_proj.weight"]);
    // Padding rows are garbage in both and never used: compare real tokens only.
    at::Tensor real = c.attention_mask.defined() ? c.attention_mask.to(at::kBool) : at::ones({batch, seq}, at::kBool);
    CHECK((fused - plain).abs().amax(-1).masked_select(real).max().item<double>() < 1e-5);
  }
}

TEST_CASE("RMSNorm: LlamaRMSNorm's formula in fp32, with its two roundings in bf16") {
  at::manual_seed(3);
  neva::RMSNorm norm(neva::RuntimeContext{}, 48, 1e-5);
  at::Tensor weight = norm.named_parameters()["weight"];
  {
    at::NoGradGuard no_grad;
    weight.copy_(at::randn({48}));
  }
  const at::Tensor input = at::randn({3, 5, 48}) * 3;
  const at::Tensor upstream = at::randn({3, 5, 48});
  // The definition, written out: weight * (x * rsqrt(mean(x^2) + eps)).
  at::Tensor x = input.clone().requires_grad_(true), w = weight.detach().clone().requires_grad_(true);
  at::Tensor expected = w * (x * at::rsqrt(x.pow(2).mean(-1, true) + 1e-5));
  expected.backward(upstream);
  at::Tensor x_ours = input.clone().requires_grad_(true);
  at::Tensor got = norm.forward(x_ours);
  got.backward(upstream);
  CHECK((got - expected).abs().max().item<double>() < 1e-6);
  CHECK((x_ours.grad() - x.grad()).abs().max().item<double>() < 1e-5);
  CHECK((weight.grad() - w.grad()).abs().max().item<double>() < 1e-4);
  // bf16 input: normalised in fp32, rounded to bf16, then multiplied by the (bf16) weight.
  norm.to(at::kBFloat16);
  at::Tensor half = input.to(at::kBFloat16);
  at::Tensor half_weight = norm.named_parameters()["weight"].detach();
  at::Tensor x32 = half.to(at::kFloat);
  at::Tensor half_expected = half_weight * (x32 * at::rsqrt(x32.pow(2).mean(-1, true) + 1e-5)).to(at::kBFloat16);
  at::NoGradGuard no_grad;
  CHECK(at::equal(norm.forward(half), half_expected));
}

TEST_CASE("packed sequences give the loss and gradients of the same samples in padded rows") {
  auto model = backbone(tiny_decoder());
  auto parts = samples({13, 30, 7, 21});
  auto padded = neva::collate(parts, false, 0);
  auto packed = neva::collate(parts, true, 0);
  REQUIRE(packed.input_ids.size(0) == 1);
  CHECK(packed.labelled_tokens == padded.labelled_tokens);
  auto [padded_loss, padded_gradients] = loss_and_gradients(*model, padded);
  auto [packed_loss, packed_gradients] = loss_and_gradients(*model, packed);
  CHECK(packed_loss == doctest::Approx(padded_loss).epsilon(1e-6));
  check_same_gradients(padded_gradients, packed_gradients, 1e-5);
}

TEST_CASE("a logits mask gives the full forward's logits at exactly those positions, and the same gradients") {
  // The backbone then computes the last layer's outputs only at those positions (queries, MLP);
  // everything else must stay as the full forward computes it.
  struct Case {
    const char* name;
    neva::DecoderConfig config;
    bool packed, padding_mask;
    std::string granularity = "";
  };
  auto windowed = tiny_decoder();
  windowed.sliding_window = 5;
  auto mha = tiny_decoder();
  mha.num_kv_heads = mha.num_heads;
  for (const auto& c : {Case{"padded rows", tiny_decoder(), false, true}, Case{"packed", tiny_decoder(), true, true},
                        Case{"plain causal", mha, false, false}, Case{"sliding window", windowed, false, true},
                        Case{"full recomputation", tiny_decoder(), false, true, "full"},
                        Case{"selective recomputation", tiny_decoder(), false, true, "selective"},
                        Case{"moe (last layer whole)", tiny_decoder("moe"), false, true}}) {
    const std::string name = c.name;
    CAPTURE(name);
    auto model = backbone(c.config, c.granularity);
    // Equal lengths for the case without a padding mask; the labels leave the first third unlabelled.
    auto batch = neva::collate(c.padding_mask || c.packed ? samples({12, 30, 7}) : samples({21, 21}), c.packed, 0);
    if (!c.padding_mask) batch.attention_mask = at::Tensor();
    auto positions = neva::labelled_positions(batch.labels);
    REQUIRE(positions.mask.sum(1).max().item<std::int64_t>() < positions.mask.size(1));  // a strict subset
    neva::BackboneInputs inputs;
    inputs.embeddings = model->embed(batch.input_ids);
    inputs.positions = batch.positions;
    inputs.attention_mask = batch.attention_mask;
    inputs.segment_ids = batch.segment_ids;
    at::Tensor full = model->forward(inputs).logits;
    inputs.logits_mask = positions.mask;
    at::Tensor selected = model->forward(inputs).logits;
    REQUIRE(selected.dim() == 2);
    CHECK(selected.size(0) == positions.targets.size(0));
    CHECK((selected - full.index({positions.mask})).abs().max().item<double>() < 1e-5);
    if (name == "plain causal") {  // positions shared by the batch ([1, seq]) broadcast as in the full forward
      neva::BackboneInputs shared = inputs;
      shared.positions = batch.positions.narrow(0, 0, 1);
      REQUIRE(at::equal(shared.positions.expand_as(batch.positions), batch.positions));
      CHECK((model->forward(shared).logits - selected).abs().max().item<double>() < 1e-6);
    }
    auto [full_loss, full_gradients] = loss_and_gradients(*model, batch);
    auto [masked_loss, masked_gradients] = loss_and_gradients(*model, batch, true);
    CHECK(masked_loss == doctest::Approx(full_loss).epsilon(1e-6));
    check_same_gradients(full_gradients, masked_gradients, 1e-5);
    inputs.logits_mask = positions.mask.narrow(1, 0, positions.mask.size(1) - 1);
    CHECK_THROWS_WITH_AS(model->forward(inputs), doctest::Contains("logits_mask has shape"), neva::Error);
  }
}

namespace {

// Modules of every kind FrozenWeightCasts meets: autocast-cast layers (neva::nn's linear and
// convolution, and a plugin's own torch::nn::Linear), layers that read their weights as they are
// (norm, embedding), and a linear whose weight is tied to a plain module's parameter.
struct CastProbe : torch::nn::Module {
  struct Tied : torch::nn::Module {
    explicit Tied(const at::Tensor& shared) { register_parameter("weight", shared); }
  };
  neva::nn::Linear proj, head;
  neva::nn::Conv2d conv;
  std::shared_ptr<neva::LayerNorm> norm;
  neva::nn::Embedding embed;
  torch::nn::Linear plugin{nullptr};
  explicit CastProbe(const neva::RuntimeContext& context) {
    proj = register_module("proj", neva::nn::linear(context, 8, 16));
    conv = register_module("conv", neva::nn::conv2d(context, 3, 8, 2, 2));
    norm = register_module("norm", std::make_shared<neva::LayerNorm>(context, 16, 1e-5));
    embed = register_module("embed", neva::nn::embedding(context, 10, 8));
    head = register_module("head", neva::nn::linear(context, 8, 10, {false}));
    plugin = register_module("plugin", torch::nn::Linear(16, 16));
    register_module("tied", std::make_shared<Tied>(head->weight));
  }
  at::Tensor forward(const at::Tensor& ids, const at::Tensor& image) {
    at::Tensor patches = conv->forward(image).flatten(2).transpose(1, 2);  // [B, 4, 8]
    at::Tensor tokens = embed->forward(ids);
    at::Tensor h = plugin->forward(norm->forward(proj->forward(tokens + patches.mean(1, true))));
    return at::cat({h, head->forward(tokens)}, -1);
  }
};

}  // namespace

TEST_CASE("frozen linear and convolution weights cast once give autocast's results bitwise, and come back intact") {
  torch::manual_seed(5);
  CastProbe probe(neva::RuntimeContext::seeded(5));
  for (auto& parameter : probe.parameters()) parameter.set_requires_grad(false);
  const at::Tensor ids = torch::randint(0, 10, {2, 5}), image = torch::randn({2, 3, 4, 4});
  auto run = [&] {
    neva::AutocastScope scope(at::kCPU, at::kBFloat16);  // what the bf16 recipe enters
    return probe.forward(ids, image);
  };
  const at::Tensor expected = run();
  REQUIRE(at::equal(run(), expected));  // deterministic to begin with
  const at::Tensor proj_weight = probe.proj->weight.clone(), conv_weight = probe.conv->weight.clone(),
                   plugin_weight = probe.plugin->weight.clone();
  {
    neva::FrozenWeightCasts casts({&probe}, at::kBFloat16);
    CHECK(casts.count() == 3);  // the weights of proj, conv and plugin; the tied head is left alone
    CHECK((probe.proj->weight.scalar_type() == at::kBFloat16));
    CHECK((probe.conv->weight.scalar_type() == at::kBFloat16));
    CHECK((probe.plugin->weight.scalar_type() == at::kBFloat16));
    CHECK((probe.proj->bias.scalar_type() == at::kFloat));
    CHECK((probe.head->weight.scalar_type() == at::kFloat));
    CHECK((probe.norm->named_parameters()["weight"].scalar_type() == at::kFloat));
    CHECK((probe.embed->weight.scalar_type() == at::kFloat));
    CHECK(at::equal(run(), expected));
  }
  CHECK((probe.proj->weight.scalar_type() == at::kFloat));
  CHECK(at::equal(probe.proj->weight, proj_weight));
  // Without the originals kept, the cast stays (a run that never exports).
  {
    neva::FrozenWeightCasts dropped({&probe}, at::kBFloat16, /*keep_originals=*/false);
    CHECK(dropped.count() == 3);
  }
  CHECK((probe.proj->weight.scalar_type() == at::kBFloat16));
  CHECK(at::equal(probe.proj->weight, proj_weight.to(at::kBFloat16)));
  probe.proj->weight.set_data(proj_weight.clone());
  probe.conv->weight.set_data(conv_weight.clone());
  probe.plugin->weight.set_data(plugin_weight.clone());
  // Trained weights are autocast's to cast (and cache): untouched.
  probe.proj->weight.set_requires_grad(true);
  neva::FrozenWeightCasts trained({&probe}, at::kBFloat16);
  CHECK((probe.proj->weight.scalar_type() == at::kFloat));
  CHECK(trained.count() == 2);
}

TEST_CASE("bf16 on a CPU without native bf16 is announced as emulated, fp32 and accelerators are not") {
  // The reference is the kernel's view of the CPU (/proc/cpuinfo's flags), not the capability table
  // the warning reads.
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line, flags;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("flags", 0) == 0) {
      flags = line.substr(line.find(':') + 1) + " ";
      break;
    }
  }
  const std::string warning = neva::emulated_bf16_warning(c10::Device("cpu"), at::kBFloat16);
  CAPTURE(warning);
  if (flags.empty()) {
    MESSAGE("no x86 flags in /proc/cpuinfo: the CPU-dependent check is skipped");
  } else {
    const bool native = flags.find(" avx512_bf16 ") != std::string::npos || flags.find(" amx_bf16 ") != std::string::npos;
    CHECK(warning.empty() == native);
    if (!native) CHECK(warning.find("emulated") != std::string::npos);
  }
  CHECK(neva::emulated_bf16_warning(c10::Device("cpu"), at::kFloat).empty());
  CHECK(neva::emulated_bf16_warning(c10::Device(c10::DeviceType::CUDA, 0), at::kBFloat16).empty());
}
