// Rotary position embedding with YaRN scaling, as DeepSeek-V2/V3 use it on the decoupled
// rope part of queries and keys (qk_rope_head_dim dims per head).
//
// YaRN ("Yet another RoPE extensioN") interpolates the low frequencies by `factor` and keeps
// the high ones, with a linear ramp between the dimensions that rotate beta_fast and
// beta_slow times over the original context; cos/sin are scaled by an attention factor
// mscale(factor, mscale) / mscale(factor, mscale_all_dim), and MLA multiplies its softmax
// scale by mscale(factor, mscale_all_dim)² (ModelConfig::softmax_scale).
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"

namespace fathom {

class Rope {
 public:
  explicit Rope(const ModelConfig& c);

  int dim() const { return dim_; }
  float attention_factor() const { return attention_factor_; }
  const std::vector<double>& inv_freq() const { return inv_freq_; }  // (dim/2)

  // cos and sin (n, dim/2) F32 for the given absolute positions, attention factor applied.
  void tables(const int64_t* positions, int64_t n, Tensor& cos, Tensor& sin) const;

 private:
  int dim_;
  float attention_factor_ = 1.0f;
  std::vector<double> inv_freq_;
};

// YaRN's mscale: 0.1 * mscale * ln(factor) + 1 for factor > 1, else 1.
double yarn_get_mscale(double factor, double mscale);

}  // namespace fathom
