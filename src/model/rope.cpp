#include "model/rope.h"

#include <algorithm>
#include <cmath>

namespace fathom {

double yarn_get_mscale(double factor, double mscale) {
  if (factor <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(factor) + 1.0;
}

Rope::Rope(const ModelConfig& c) : dim_(c.qk_rope_head_dim) {
  const double base = c.rope_theta;
  const int half = dim_ / 2;
  inv_freq_.resize(half);
  // The reference computes these in float32; rounding each to float keeps us bit-close to it.
  for (int i = 0; i < half; ++i) inv_freq_[i] = float(1.0 / std::pow(base, double(2 * i) / dim_));
  const RopeScaling& s = c.rope_scaling;
  if (s.type != "yarn") return;

  // Dimension index (of `dim`) whose wavelength completes `rotations` turns over the original context.
  auto correction_dim = [&](double rotations) {
    return (dim_ * std::log(s.original_max_position_embeddings / (rotations * 2.0 * M_PI))) / (2.0 * std::log(base));
  };
  double low = correction_dim(s.beta_fast), high = correction_dim(s.beta_slow);
  if (s.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, double(dim_ - 1));
  if (low == high) high += 0.001;  // avoid a zero-width ramp
  for (int i = 0; i < half; ++i) {
    double pos_freq = std::pow(base, double(2 * i) / dim_);
    double extrapolation = 1.0 / pos_freq;              // keep: high frequencies
    double interpolation = 1.0 / (s.factor * pos_freq); // stretch: low frequencies
    double ramp = std::clamp((double(i) - low) / (high - low), 0.0, 1.0);
    double keep = 1.0 - ramp;  // 1 for fast-rotating dims, 0 for slow ones
    inv_freq_[i] = float(interpolation * (1.0 - keep) + extrapolation * keep);
  }
  if (s.attention_factor)
    attention_factor_ = float(*s.attention_factor);
  else if (s.mscale != 0.0 && s.mscale_all_dim != 0.0)
    attention_factor_ = float(yarn_get_mscale(s.factor, s.mscale) / yarn_get_mscale(s.factor, s.mscale_all_dim));
  else
    attention_factor_ = float(yarn_get_mscale(s.factor, 1.0));
}

void Rope::tables(const int64_t* positions, int64_t n, Tensor& cos, Tensor& sin) const {
  const int half = dim_ / 2;
  cos = Tensor::empty({n, half});
  sin = Tensor::empty({n, half});
  for (int64_t t = 0; t < n; ++t)
    for (int i = 0; i < half; ++i) {
      double angle = double(positions[t]) * inv_freq_[i];
      cos.f32()[t * half + i] = float(std::cos(angle) * attention_factor_);
      sin.f32()[t * half + i] = float(std::sin(angle) * attention_factor_);
    }
}

}  // namespace fathom
