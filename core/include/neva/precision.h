#pragma once
// The built-in precision recipes (trainer.precision and model.megatron_amp_O2, NeMo's names):
//   "32"                     fp32 weights and arithmetic
//   "bf16" / "bf16-mixed"    fp32 weights; matmuls and activations in bf16 under autocast
//   "bf16" + megatron_amp_O2 bf16 weights and arithmetic; the optimizer keeps fp32 main weights
// On CPU, bf16 matmuls go through oneDNN, which uses AMX tiles where the CPU has them and
// AVX512-BF16 otherwise.
#include <memory>
#include <string>

#include "neva/export.h"
#include "neva/precision_recipe.h"

namespace neva {

NEVA_API std::unique_ptr<PrecisionRecipe> make_precision_recipe(const std::string& precision, bool megatron_amp_O2);

}  // namespace neva
