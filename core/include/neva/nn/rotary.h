#pragma once
// Rotary position embeddings computed exactly as transformers does (modeling_rope_utils.py):
// default, linear, dynamic (NTK) and llama3 inverse frequencies; half-split (NeoX) rotation;
// partial rotary (only the first rotary_dim dimensions of each head rotate).
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>

#include "neva/api.h"

namespace neva {

struct RopeConfig {
  std::string type = "default";  // default | linear | dynamic | llama3
  double theta = 10000.0;
  std::int64_t head_dim = 0;
  double partial_rotary_factor = 1.0;
  double factor = 1.0;                                // linear, dynamic, llama3
  double low_freq_factor = 1.0;                       // llama3
  double high_freq_factor = 4.0;                      // llama3
  std::int64_t original_max_position_embeddings = 0;  // llama3
  std::int64_t max_position_embeddings = 2048;        // dynamic: the length it starts scaling at

  std::int64_t rotary_dim() const { return static_cast<std::int64_t>(head_dim * partial_rotary_factor); }
};

class NEVA_API RotaryEmbedding {
 public:
  explicit RotaryEmbedding(RopeConfig config);
  const RopeConfig& config() const { return config_; }

  // Inverse frequencies [rotary_dim / 2] (fp32) for sequences up to `sequence_length` (dynamic only).
  at::Tensor inv_freq(std::int64_t sequence_length) const;
  // cos and sin [batch, seq, rotary_dim] in `dtype`, for positions [batch, seq].
  std::pair<at::Tensor, at::Tensor> cos_sin(const at::Tensor& positions, c10::ScalarType dtype) const;

 private:
  RopeConfig config_;
  at::Tensor base_inv_freq_;  // static types: computed once
};

// Rotates q [batch, heads, seq, head_dim] and k likewise with cos/sin [batch, seq, rotary_dim];
// dimensions past rotary_dim pass through unchanged.
NEVA_API std::pair<at::Tensor, at::Tensor> apply_rotary(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& cos, const at::Tensor& sin);
// The same for one tensor [batch, heads, seq, head_dim].
NEVA_API at::Tensor apply_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

}  // namespace neva
