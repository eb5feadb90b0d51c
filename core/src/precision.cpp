#include "neva/precision.h"

#include <ATen/ATen.h>
#include <ATen/cpu/Utils.h>
#include <ATen/autocast_mode.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

#include <set>

#include "neva/error.h"
#include "neva/nn/linear.h"

namespace neva {

AutocastScope::AutocastScope(c10::DeviceType device, at::ScalarType dtype)
    : device_(device),
      was_enabled_(at::autocast::is_autocast_enabled(device)),
      previous_dtype_(at::autocast::get_autocast_dtype(device)) {
  at::autocast::set_autocast_enabled(device_, true);
  at::autocast::set_autocast_dtype(device_, dtype);
}

AutocastScope::~AutocastScope() {
  at::autocast::set_autocast_enabled(device_, was_enabled_);
  at::autocast::set_autocast_dtype(device_, previous_dtype_);
  if (!was_enabled_) at::autocast::clear_cache();
}

std::string emulated_bf16_warning(const c10::Device& device, at::ScalarType compute) {
  if (!device.is_cpu() || compute != at::kBFloat16) return "";
  const auto capabilities = at::cpu::get_cpu_capabilities();
  auto has = [&](const char* key) {
    auto found = capabilities.find(key);
    return found != capabilities.end() && found->second.isBool() && found->second.toBool();
  };
  // x86 only: other architectures (e.g. Arm's BF16 extension) have capabilities of their own names.
  auto architecture = capabilities.find("architecture");
  if (architecture == capabilities.end() || !architecture->second.isString() ||
      architecture->second.toStringRef() != "x86_64") {
    return "";
  }
  if (has("avx512_bf16") || has("amx_bf16")) return "";
  auto name = capabilities.find("cpu_name");
  const std::string cpu = name != capabilities.end() && name->second.isString() ? name->second.toStringRef() : "this CPU";
  return cpu + " has neither AVX512-BF16 nor AMX-BF16: bf16 matrix multiplications are emulated, " +
         "many times slower than fp32 (about 50x for a training step on a 2-core AVX2 EPYC); " +
         "trainer.precision = \"32\" is the fast choice here";
}

namespace {

bool autocast_casts_parameters(const torch::nn::Module& module) {
  return dynamic_cast<const nn::LinearImpl*>(&module) || dynamic_cast<const nn::Conv2dImpl*>(&module) ||
         dynamic_cast<const torch::nn::LinearImpl*>(&module) || dynamic_cast<const torch::nn::Conv1dImpl*>(&module) ||
         dynamic_cast<const torch::nn::Conv2dImpl*>(&module) || dynamic_cast<const torch::nn::Conv3dImpl*>(&module);
}

}  // namespace

FrozenWeightCasts::FrozenWeightCasts(const std::vector<torch::nn::Module*>& modules, at::ScalarType compute,
                                     bool keep_originals) {
  if (compute == at::kFloat) return;
  // Storage used by parameters of other modules: those tensors are read without autocast's cast.
  std::set<const void*> elsewhere;
  std::set<const c10::TensorImpl*> seen;
  std::vector<at::Tensor> candidates;
  auto visit = [&](const torch::nn::Module& module) {
    const bool cast = autocast_casts_parameters(module);
    for (const auto& parameter : module.named_parameters(/*recurse=*/false)) {
      const at::Tensor& tensor = parameter.value();
      if (!cast) {
        elsewhere.insert(tensor.storage().data());
      } else if (parameter.key() == "weight" && !tensor.requires_grad() && tensor.scalar_type() == at::kFloat &&
                 seen.insert(tensor.unsafeGetTensorImpl()).second) {
        candidates.push_back(tensor);
      }
    }
  };
  for (auto* root : modules) {
    if (!root) continue;
    visit(*root);  // the root itself need not be held by a shared_ptr
    for (const auto& module : root->modules(/*include_self=*/false)) visit(*module);
  }
  at::NoGradGuard no_grad;
  for (auto& tensor : candidates) {
    if (elsewhere.count(tensor.storage().data())) continue;
    at::Tensor original = tensor.data();
    tensor.set_data(original.to(compute));
    if (keep_originals) originals_.emplace_back(tensor, original);
    ++count_;
  }
}

void FrozenWeightCasts::restore() {
  for (auto& [tensor, original] : originals_) tensor.set_data(original);
  originals_.clear();
}

FrozenWeightCasts::~FrozenWeightCasts() { restore(); }

std::unique_ptr<PrecisionScope> mixed_precision_scope(const RuntimeContext& context) {
  const DTypePolicy& dtypes = context.dtypes;
  if (dtypes.compute == at::kFloat) return nullptr;
  if (dtypes.params == dtypes.compute && dtypes.main_params == dtypes.compute) return nullptr;
  return std::make_unique<AutocastScope>(context.device.type(), dtypes.compute);
}

}  // namespace neva
