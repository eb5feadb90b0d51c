#pragma once
// Building blocks of precision recipes (the PrecisionRecipe plugins, plugins/precision/: `fp32`,
// `bf16` with and without megatron_amp_O2; selected by trainer.precision).
// On CPU, bf16 matmuls go through oneDNN, which uses AMX tiles where the CPU has them and
// AVX512-BF16 otherwise (seen in ONEDNN_VERBOSE: brg_matmul:avx10_1_512_amx on a Xeon with AMX).
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "neva/api.h"
#include "neva/context.h"
#include "neva/precision_recipe.h"

namespace neva {

// Autocast to `dtype` on `device`'s type for as long as it lives; what was set before comes back.
class NEVA_API AutocastScope : public PrecisionScope {
 public:
  AutocastScope(c10::DeviceType device, at::ScalarType dtype);
  ~AutocastScope() override;
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  c10::DeviceType device_;
  bool was_enabled_;
  at::ScalarType previous_dtype_;
};

// What a recipe computing in a lower dtype than its weights enters around each forward pass: an
// AutocastScope to context.dtypes.compute on the context's device; null when compute is fp32 or the
// model is held in the compute dtype throughout (inference with bf16 weights, no fp32 copy).
NEVA_API std::unique_ptr<PrecisionScope> mixed_precision_scope(const RuntimeContext& context);

// Empty, or a warning when bf16 arithmetic on `device` would be emulated: an x86-64 CPU with neither
// AVX512-BF16 nor AMX-BF16 (oneDNN then converts in software; measured about 50x slower than
// fp32 for a training step on a 2-core AVX2 EPYC).
NEVA_API std::string emulated_bf16_warning(const c10::Device& device, at::ScalarType compute);

// Under autocast, every linear and convolution weight is cast to the compute dtype at each
// forward, and autocast caches the cast only for weights that require grad. The frozen ones of
// `modules` are therefore cast here once, in place: exactly the values autocast would produce, so
// results under autocast are bitwise unchanged. Biases stay fp32 (LibTorch's Linear adds its bias
// in place, outside autocast's cast), and a weight shared with a module of another kind (tied
// embeddings) is left alone. With `keep_originals`, restore() (or destruction) puts the fp32
// originals back, for whatever reads the weights outside autocast (export); that keeps both copies
// (+50% memory for the frozen weights). Without it the originals are dropped and the weights stay
// in the compute dtype: for a run that never reads them outside autocast again.
class NEVA_API FrozenWeightCasts {
 public:
  FrozenWeightCasts(const std::vector<torch::nn::Module*>& modules, at::ScalarType compute, bool keep_originals = true);
  ~FrozenWeightCasts();
  FrozenWeightCasts(const FrozenWeightCasts&) = delete;
  FrozenWeightCasts& operator=(const FrozenWeightCasts&) = delete;
  void restore();
  std::size_t count() const { return count_; }

 private:
  std::size_t count_ = 0;
  std::vector<std::pair<at::Tensor, at::Tensor>> originals_;  // (parameter, its fp32 data), when kept
};

}  // namespace neva
