// Plugins with one behavioural fault each (NEVA_FAULT), which neva-conformance must catch:
// a connector whose forward is not deterministic, one through which no gradient flows, one that
// crashes in forward, one whose outputs depend on the rest of the batch, one that keeps per-call
// state in a static tensor, a language backbone whose KV cache is ignored, and one with a
// torch::nn::Linear of its own (which model.fp8 cannot swap).
#include <ATen/ATen.h>
#include <torch/nn/modules/linear.h>

#include <cstdlib>

#include "neva/connector.h"
#include "neva/model/decoder.h"
#include "neva/plugin_abi.h"

#define FAULT_NONDETERMINISTIC 1
#define FAULT_NO_GRADIENT 2
#define FAULT_CRASH 3
#define FAULT_BROKEN_CACHE 4
#define FAULT_BATCH_COUPLED 5
#define FAULT_SHARED_STATE 6
#define FAULT_OWN_LINEAR 7
#define FAULT_IGNORED_SLOTS 8

namespace {

#if NEVA_FAULT == FAULT_BROKEN_CACHE || NEVA_FAULT == FAULT_OWN_LINEAR || NEVA_FAULT == FAULT_IGNORED_SLOTS
void read_llama_shape(const neva::HfConfig& hf, neva::DecoderConfig& d) {
  neva::read_decoder_shape(hf, {32000, 4096, 11008, 32, 32, 0, "silu", 10000.0, 2048}, d);
}

#if NEVA_FAULT == FAULT_BROKEN_CACHE
// Decodes every step as if it were the whole sequence: the cache is silently ignored.
class ForgetfulBackbone : public neva::DecoderBackbone {
 public:
  ForgetfulBackbone(const neva::DecoderPluginConfig& config, const neva::RuntimeContext& context)
      : DecoderBackbone(config.decoder, context) {}
  neva::BackboneOutputs forward(const neva::BackboneInputs& inputs) override {
    neva::BackboneInputs without = inputs;
    without.cache = nullptr;
    return DecoderBackbone::forward(without);
  }
};
#elif NEVA_FAULT == FAULT_IGNORED_SLOTS
// Reads cache_lengths but not cache_rows: every call's rows are the cache's first rows.
class ForgetfulBackbone : public neva::DecoderBackbone {
 public:
  ForgetfulBackbone(const neva::DecoderPluginConfig& config, const neva::RuntimeContext& context)
      : DecoderBackbone(config.decoder, context) {}
  neva::BackboneOutputs forward(const neva::BackboneInputs& inputs) override {
    neva::BackboneInputs without = inputs;
    without.cache_rows = at::Tensor();
    return DecoderBackbone::forward(without);
  }
};
#else
// A Llama with an extra projection of the logits built as a torch::nn::Linear, outside neva::nn.
class ForgetfulBackbone : public neva::DecoderBackbone {
 public:
  ForgetfulBackbone(const neva::DecoderPluginConfig& config, const neva::RuntimeContext& context)
      : DecoderBackbone(config.decoder, context) {
    side_ = register_module("side_proj", torch::nn::Linear(config.decoder.vocab_size, config.decoder.vocab_size));
    side_->to(context.device, context.dtypes.params);
  }
  neva::BackboneOutputs forward(const neva::BackboneInputs& inputs) override {
    neva::BackboneOutputs out = DecoderBackbone::forward(inputs);
    out.logits = out.logits + 0.0 * side_->forward(out.logits);
    return out;
  }

 private:
  torch::nn::Linear side_{nullptr};
};
#endif

neva::ComponentConfig* parse(const char*, const neva::ConfigSection& section) {
  return neva::parse_decoder_plugin_config(section, "Forgetful", "llama", &read_llama_shape);
}

const neva::PluginDescriptor* describe() {
  static const neva::PluginDescriptor descriptor{
      NEVA_PLUGIN_ABI_FIELDS, neva::LanguageBackbone::kKind, NEVA_TEST_PLUGIN_NAME, "0.0.1", NEVA_PLUGIN_TORCH_VERSION,
      "test backbone that ignores its KV cache", nullptr, &parse,
      &neva::create_plugin_component<neva::DecoderPluginConfig, ForgetfulBackbone>};
  return &descriptor;
}
#else
struct Config : neva::ConnectorConfig {
  static Config parse(const char*, const neva::ConfigSection& section) {
    Config config;
    config.read_sizes(section);
    return config;
  }
};

class FaultyConnector : public neva::Connector {
 public:
  FaultyConnector(const Config& config, const neva::RuntimeContext& context) {
    linear_ = register_module("linear", neva::nn::linear(context, config.input_size, config.output_size));
  }
  at::Tensor forward(const at::Tensor& x) override {
#if NEVA_FAULT == FAULT_NONDETERMINISTIC
    return linear_->forward(x) + 1e-3 * at::randn({1}, x.options());
#elif NEVA_FAULT == FAULT_NO_GRADIENT
    return at::linear(x, linear_->weight.detach(), linear_->bias);
#elif NEVA_FAULT == FAULT_BATCH_COUPLED
    // Normalised over the whole batch: each sample's output depends on its company.
    at::Tensor out = linear_->forward(x);
    return out - out.mean(0, /*keepdim=*/true);
#elif NEVA_FAULT == FAULT_SHARED_STATE
    // A scratch buffer kept across calls in a function-level static: shared by every instance and
    // thread, and returned, so a later call overwrites an earlier result.
    static at::Tensor scratch;
    at::Tensor out = linear_->forward(x);
    if (!scratch.defined() || scratch.sizes() != out.sizes()) scratch = at::empty_like(out);
    return scratch.copy_(out);
#else
    std::abort();
#endif
  }
  std::int64_t input_size() const override { return linear_->in_features(); }
  std::int64_t output_size() const override { return linear_->out_features(); }

 private:
  neva::nn::Linear linear_;
};

const neva::PluginDescriptor* describe() {
  static const neva::PluginDescriptor descriptor{
      NEVA_PLUGIN_ABI_FIELDS, neva::Connector::kKind, NEVA_TEST_PLUGIN_NAME, "0.0.1", NEVA_PLUGIN_TORCH_VERSION,
      "test connector with a behavioural fault", nullptr, &neva::parse_plugin_config<Config>,
      &neva::create_plugin_component<Config, FaultyConnector>};
  return &descriptor;
}
#endif

}  // namespace

NEVA_PLUGIN(describe)
