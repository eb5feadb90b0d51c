#include "neva/nn/rotary.h"

#include <ATen/ATen.h>

#include <cmath>

#include "neva/error.h"

namespace neva {

namespace {

// 1 / base^(arange(0, dim, 2) / dim) in fp32, the way transformers computes it.
at::Tensor default_inv_freq(const at::Scalar& base, std::int64_t dim) {
  at::Tensor exponents = at::arange(0, dim, 2, at::kLong).to(at::kFloat) / static_cast<float>(dim);
  return 1.0 / at::pow(base, exponents);
}

}  // namespace

RotaryEmbedding::RotaryEmbedding(RopeConfig config) : config_(std::move(config)) {
  const std::int64_t dim = config_.rotary_dim();
  if (dim <= 0 || dim % 2 != 0) {
    throw Error("rotary embedding: rotary dimension " + std::to_string(dim) + " must be positive and even");
  }
  base_inv_freq_ = default_inv_freq(config_.theta, dim);
  if (config_.type == "linear") {
    base_inv_freq_ = base_inv_freq_ / static_cast<float>(config_.factor);
  } else if (config_.type == "llama3") {
    const double factor = config_.factor, low = config_.low_freq_factor, high = config_.high_freq_factor;
    const double context = static_cast<double>(config_.original_max_position_embeddings);
    const double low_wavelen = context / low, high_wavelen = context / high;
    at::Tensor wavelen = 2 * M_PI / base_inv_freq_;
    at::Tensor scaled = at::where(wavelen > low_wavelen, base_inv_freq_ / factor, base_inv_freq_);
    at::Tensor smooth = (context / wavelen - low) / (high - low);
    at::Tensor smoothed = (1 - smooth) * scaled / factor + smooth * scaled;
    at::Tensor medium = at::logical_not(wavelen < high_wavelen) * at::logical_not(wavelen > low_wavelen);
    base_inv_freq_ = at::where(medium, smoothed, scaled);
  } else if (config_.type != "default" && config_.type != "dynamic") {
    throw Error("rotary embedding: unsupported rope type '" + config_.type +
                "' (supported: default, linear, dynamic, llama3)");
  }
}

at::Tensor RotaryEmbedding::inv_freq(std::int64_t sequence_length) const {
  if (config_.type != "dynamic" || sequence_length <= config_.max_position_embeddings) return base_inv_freq_;
  // NTK scaling past the trained length; transformers computes the new base with fp32 tensors here.
  const std::int64_t dim = config_.rotary_dim();
  at::Tensor length = at::scalar_tensor(sequence_length, at::kLong);
  at::Tensor base = config_.theta * at::pow((config_.factor * length / static_cast<double>(config_.max_position_embeddings)) -
                                                (config_.factor - 1),
                                            static_cast<double>(dim) / (dim - 2));
  at::Tensor exponents = at::arange(0, dim, 2, at::kLong).to(at::kFloat) / static_cast<float>(dim);
  return 1.0 / at::pow(base, exponents);
}

std::pair<at::Tensor, at::Tensor> RotaryEmbedding::cos_sin(const at::Tensor& positions, c10::ScalarType dtype) const {
  std::int64_t longest = positions.numel() ? positions.max().item<std::int64_t>() + 1 : 0;
  at::Tensor frequencies = inv_freq(longest).to(positions.device());
  at::Tensor angles = positions.unsqueeze(-1).to(at::kFloat) * frequencies;
  at::Tensor embedding = at::cat({angles, angles}, -1);
  return {embedding.cos().to(dtype), embedding.sin().to(dtype)};
}

namespace {

at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const std::int64_t rotary = cos.size(-1);
  at::Tensor part = rotary == x.size(-1) ? x : x.narrow(-1, 0, rotary);
  at::Tensor first = part.narrow(-1, 0, rotary / 2), second = part.narrow(-1, rotary / 2, rotary / 2);
  at::Tensor rotated = part * cos + at::cat({-second, first}, -1) * sin;
  if (rotary == x.size(-1)) return rotated;
  return at::cat({rotated, x.narrow(-1, rotary, x.size(-1) - rotary)}, -1);
}

}  // namespace

std::pair<at::Tensor, at::Tensor> apply_rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                               const at::Tensor& sin) {
  at::Tensor c = cos.unsqueeze(1), s = sin.unsqueeze(1);  // broadcast over heads
  return {rotate(q, c, s), rotate(k, c, s)};
}

at::Tensor apply_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return rotate(x, cos.unsqueeze(1), sin.unsqueeze(1));
}

}  // namespace neva
