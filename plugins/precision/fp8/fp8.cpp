// The `fp8` precision recipe (model.fp8 = true, NeMo's keys): the decoder layers' linear layers run
// their three GEMMs in FP8 with Transformer Engine's scaling (neva::fp8; delayed or current), over
// the base precision trainer.precision names (32: fp32 weights and arithmetic around the GEMMs;
// bf16: bf16 autocast, or bf16 weights with megatron_amp_O2). What a careful user wants and TE
// does not do by itself:
//   - only decoder layers' linears (attention and MLP projections, experts) are swapped; the
//     embeddings, the LM head, the MoE router, norms, the connector and the vision encoder keep the
//     base precision, and so can the first / last N decoder layers (num_layers_at_start_in_bf16,
//     num_layers_at_end_in_bf16, Megatron's keys);
//   - every fp8_check_interval steps each FP8 layer also computes its output in the base precision
//     and records the relative error ||y_fp8 - y|| / ||y|| (the largest over micro-batches and
//     replicas); a layer whose error stays above fp8_max_relative_error for fp8_fallback_checks checks
//     in a row computes in the base precision from then on, and the trainer logs it.
// The host selects this plugin as "fp8:<trainer.precision>" when model.fp8 is true.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <sstream>
#include <string>

#include "neva/error.h"
#include "neva/language_backbone.h"
#include "neva/model/decoder.h"
#include "neva/nn/fp8.h"
#include "neva/nn/linear.h"
#include "neva/nn/mlp.h"
#include "neva/parallel/process_group.h"
#include "neva/plugin_abi.h"
#include "neva/precision.h"
#include "neva/precision_recipe.h"

namespace {

struct Settings {
  neva::fp8::LinearConfig linear;
  neva::fp8::AmaxAlgorithm algorithm = neva::fp8::AmaxAlgorithm::MostRecent;
  std::int64_t history_length = 1, interval = 1;
  std::int64_t check_interval = 100, fallback_checks = 3;
  double max_relative_error = 0.3;
  std::string base = "fp32";  // what a layer computes in when not in FP8
};

struct Fp8Config : neva::ComponentConfig {
  Settings settings;
  bool bf16 = false, megatron_amp_O2 = false;
  std::int64_t bf16_first = 0, bf16_last = 0;

  static Fp8Config parse(const char* requested_name, const neva::ConfigSection& model) {
    Fp8Config config;
    const std::string name(requested_name);
    const std::string base = name.rfind("fp8:", 0) == 0 ? name.substr(4) : "";
    if (base == "bf16" || base == "bf16-mixed") {
      config.bf16 = true;
    } else if (base != "32" && base != "32-true" && base != "fp32") {
      model.fail("fp8", "FP8 is turned on with model.fp8 = true over trainer.precision 32 or bf16 (got the precision "
                        "recipe '" + name + "')");
    }
    if (!model.get<bool>("fp8", false)) model.fail("fp8", "the fp8 recipe runs with model.fp8 = true");
    config.megatron_amp_O2 = model.get<bool>("megatron_amp_O2", false);
    if (config.megatron_amp_O2 && !config.bf16) {
      model.fail("megatron_amp_O2", "O2 keeps bf16 weights with fp32 main weights; it needs trainer.precision = \"bf16\"");
    }
    Settings& s = config.settings;
    s.base = config.bf16 ? "bf16" : "fp32";
    const bool e4m3 = model.get<bool>("fp8_e4m3", false), hybrid = model.get<bool>("fp8_hybrid", false);
    if (e4m3 == hybrid) {
      model.fail(e4m3 ? "fp8_hybrid" : "fp8_e4m3", std::string(e4m3 ? "fp8_e4m3 and fp8_hybrid are both true" : "neither fp8_e4m3 nor fp8_hybrid is true") +
                                                       ": set one (E4M3 everywhere, or E4M3 forward and E5M2 gradients)");
    }
    s.linear.format = hybrid ? neva::fp8::Format::Hybrid : neva::fp8::Format::E4M3;
    s.linear.margin = static_cast<double>(model.integer("fp8_margin", 0, 0, 64));
    s.interval = model.integer("fp8_interval", 1, 1);
    s.history_length = model.integer("fp8_amax_history_len", 1, 1, 1 << 20);
    s.algorithm = model.choice("fp8_amax_compute_algo", "most_recent", {"max", "most_recent"}) == "max"
                      ? neva::fp8::AmaxAlgorithm::Max
                      : neva::fp8::AmaxAlgorithm::MostRecent;
    const std::string recipe = model.choice("fp8_recipe", "delayed", {"delayed", "tensorwise", "current"});
    s.linear.current_scaling = recipe != "delayed";
    config.bf16_first = model.integer("num_layers_at_start_in_bf16", 0, 0);
    config.bf16_last = model.integer("num_layers_at_end_in_bf16", 0, 0);
    s.check_interval = model.integer("fp8_check_interval", s.check_interval, 0);
    s.max_relative_error = model.get<double>("fp8_max_relative_error", s.max_relative_error);
    if (!(s.max_relative_error > 0)) model.fail("fp8_max_relative_error", "expected a number > 0");
    s.fallback_checks = model.integer("fp8_fallback_checks", s.fallback_checks, 1);
    return config;
  }
};

// One decoder linear layer's FP8 computation and its state.
class Fp8Kernel : public neva::nn::LinearKernel {
 public:
  Fp8Kernel(std::shared_ptr<const Settings> settings, c10::Device device)
      : settings_(std::move(settings)),
        config_(settings_->linear),
        state_(settings_->history_length, device),
        error_(at::zeros({1}, at::TensorOptions(at::kFloat).device(device))),
        counters_(at::zeros({3}, at::kLong)) {}

  at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) override {
    if (fallen_back()) return at::linear(x, weight, bias);
    // The GEMMs' output in the dtype the base precision computes in (autocast's, when it is on).
    config_.out_dtype = at::autocast::is_autocast_enabled(x.device().type())
                            ? at::autocast::get_autocast_dtype(x.device().type())
                            : x.scalar_type();
    at::Tensor y = neva::fp8::linear(x, weight, bias, state_, config_);
    const std::int64_t step = counters_.data_ptr<std::int64_t>()[0] + 1;  // the step this forward belongs to
    if (settings_->check_interval > 0 && step % settings_->check_interval == 0) {
      at::NoGradGuard no_grad;
      const at::Tensor reference = at::linear(x.detach(), weight.detach(), bias.defined() ? bias.detach() : bias).to(at::kFloat);
      const at::Tensor difference = (y.detach().to(at::kFloat) - reference).norm();
      const at::Tensor relative = difference / reference.norm().clamp_min(1e-30);
      error_.copy_(at::maximum(error_, relative.reshape({1}).to(error_.device())));
    }
    return y;
  }

  std::vector<at::Tensor> shared_maxima() override {
    std::vector<at::Tensor> out{error_};
    // This step's amaxes only (entry 0): the older entries are what earlier steps reduced already.
    if (!settings_->linear.current_scaling) {
      for (auto* role : {&state_.input, &state_.weight, &state_.grad_output}) out.push_back(role->amax_history.narrow(0, 0, 1));
    }
    return out;
  }

  std::string step_finished() override {
    std::int64_t* counters = counters_.data_ptr<std::int64_t>();
    if (!settings_->linear.current_scaling) {
      for (auto* role : {&state_.input, &state_.weight, &state_.grad_output}) role->updates = counters[0];
      neva::fp8::update(state_, config_, settings_->algorithm, settings_->interval);
    }
    const std::int64_t step = ++counters[0];
    std::string note;
    if (!fallen_back() && settings_->check_interval > 0 && step % settings_->check_interval == 0) {
      const double error = error_.item<double>();
      counters[1] = error > settings_->max_relative_error || !std::isfinite(error) ? counters[1] + 1 : 0;
      if (counters[1] >= settings_->fallback_checks) {
        counters[2] = 1;
        std::ostringstream out;
        out << "FP8 output's relative error " << error << " above fp8_max_relative_error " << settings_->max_relative_error
            << " at " << counters[1] << " check(s) in a row: computed in " << settings_->base << " from now on";
        note = out.str();
      }
    }
    error_.zero_();
    return note;
  }

  std::vector<std::pair<std::string, at::Tensor>> state() override {
    return {{"fp8_input_amax_history", state_.input.amax_history},
            {"fp8_input_scale", state_.input.scale},
            {"fp8_input_scale_inv", state_.input.scale_inv},
            {"fp8_weight_amax_history", state_.weight.amax_history},
            {"fp8_weight_scale", state_.weight.scale},
            {"fp8_weight_scale_inv", state_.weight.scale_inv},
            {"fp8_grad_output_amax_history", state_.grad_output.amax_history},
            {"fp8_grad_output_scale", state_.grad_output.scale},
            {"fp8_grad_output_scale_inv", state_.grad_output.scale_inv},
            // steps finished, checks in a row above the error bound, fallen back (0 / 1)
            {"fp8_counters", counters_}};
  }

  std::string mode() const override { return fallen_back() ? settings_->base : "fp8"; }

 private:
  bool fallen_back() const { return counters_.data_ptr<std::int64_t>()[2] != 0; }

  std::shared_ptr<const Settings> settings_;
  neva::fp8::LinearConfig config_;
  neva::fp8::LinearState state_;
  at::Tensor error_;     // [1] float: the largest relative error measured this step
  at::Tensor counters_;  // [3] int64, on the CPU
};

// The decoder layer a module path lies in ("model.layers.7.mlp.up_proj": 7), or -1.
std::int64_t layer_index(const std::string& path) { return neva::nn::path_index("." + path, ".layers."); }

class Fp8Precision : public neva::PrecisionRecipe {
 public:
  Fp8Precision(const Fp8Config& config, const neva::RuntimeContext& /*context*/)
      : config_(config), settings_(std::make_shared<Settings>(config.settings)) {
    if (config.bf16) policy_.compute = at::kBFloat16;
    if (config.megatron_amp_O2) policy_.params = at::kBFloat16;
  }

  neva::DTypePolicy dtype_policy() const override { return policy_; }

  void prepare(torch::nn::Module& module, const neva::RuntimeContext& context) const override {
    module.to(context.device, context.dtypes.params);
    auto* backbone = dynamic_cast<neva::LanguageBackbone*>(&module);
    if (!backbone) return;  // the vision encoder and the connector keep the base precision
    std::map<std::string, torch::nn::Module*> modules{{"", &module}};
    for (const auto& item : module.named_modules("", /*include_self=*/false)) {
      if (dynamic_cast<torch::nn::LinearImpl*>(item.value().get())) {
        throw neva::Error("module '" + item.key() + "' is a torch::nn::Linear built outside neva::nn::linear; model.fp8 "
                          "swaps linear layers through that factory and cannot run this one in FP8 (build it with "
                          "neva::nn::linear, see docs/plugins.md, or set model.fp8 = false)");
      }
      modules.emplace(item.key(), item.value().get());
    }
    const auto* decoder = dynamic_cast<const neva::DecoderBackbone*>(backbone);
    std::vector<std::pair<std::string, neva::nn::LinearImpl*>> chosen;
    std::int64_t layers = decoder ? decoder->num_layers() : 0;
    for (auto& [path, layer] : neva::nn::linear_layers(module)) {
      const std::int64_t index = layer_index(path);
      if (index < 0) continue;  // the LM head and anything outside the decoder layers
      const std::size_t dot = path.rfind('.');
      const auto parent = modules.find(dot == std::string::npos ? "" : path.substr(0, dot));
      if (parent != modules.end() && dynamic_cast<neva::SparseMoE*>(parent->second) && path.substr(dot + 1) == "gate") {
        continue;  // the MoE router
      }
      if (!decoder) layers = std::max(layers, index + 1);
      chosen.emplace_back(path, layer);
    }
    if (!decoder && neva::group_size(context.groups.pipeline) > 1 && (config_.bf16_first > 0 || config_.bf16_last > 0)) {
      throw neva::Error("num_layers_at_start_in_bf16 / num_layers_at_end_in_bf16 under pipeline parallelism need a "
                        "neva::DecoderBackbone (it knows every stage's layer count); this backbone is not one");
    }
    if (layers > 0 && config_.bf16_first + config_.bf16_last >= layers) {
      throw neva::Error("num_layers_at_start_in_bf16 (" + std::to_string(config_.bf16_first) +
                        ") + num_layers_at_end_in_bf16 (" + std::to_string(config_.bf16_last) + ") leave none of the " +
                        std::to_string(layers) + " decoder layers in FP8");
    }
    if (layers == 0) {
      throw neva::Error("model.fp8 found no decoder layers (linear layers under 'layers.<i>.') in this backbone to run "
                        "in FP8");
    }
    for (auto& [path, layer] : chosen) {
      const std::int64_t index = layer_index(path);
      if (index < config_.bf16_first || index >= layers - config_.bf16_last) continue;
      layer->set_kernel(std::make_shared<Fp8Kernel>(settings_, context.device));
    }
  }

  std::unique_ptr<neva::PrecisionScope> enter_forward(const neva::RuntimeContext& context) const override {
    return neva::mixed_precision_scope(context);
  }

 private:
  Fp8Config config_;
  std::shared_ptr<const Settings> settings_;
  neva::DTypePolicy policy_;
};

bool answers_to(const char* name) { return std::strncmp(name, "fp8:", 4) == 0; }

const neva::PluginDescriptor* describe() {
  static const neva::PluginDescriptor descriptor{
      NEVA_PLUGIN_ABI_FIELDS,
      neva::PrecisionRecipe::kKind,
      "fp8",
      "0.1.0",
      NEVA_PLUGIN_TORCH_VERSION,
      "FP8 GEMMs in the decoder layers (model.fp8, Transformer Engine's delayed or current scaling) over fp32 or bf16",
      &answers_to,
      &neva::parse_plugin_config<Fp8Config>,
      &neva::create_plugin_component<Fp8Config, Fp8Precision>,
  };
  return &descriptor;
}

}  // namespace

NEVA_PLUGIN(describe)
