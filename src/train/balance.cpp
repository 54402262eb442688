#include "train/balance.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace fathom::train {

std::vector<int64_t> expert_load(const Tensor& experts, int n_experts) {
  FATHOM_CHECK(experts.dtype() == DType::I32 && n_experts > 0, "expert_load: I32 expert ids and a positive count.");
  std::vector<int64_t> load(static_cast<size_t>(n_experts), 0);
  for (int64_t i = 0; i < experts.numel(); ++i) {
    const int32_t e = experts.ptr<int32_t>()[i];
    FATHOM_CHECK(e >= 0 && e < n_experts, "expert_load: expert id ", e, " at ", i, " is outside [0, ", n_experts, ").");
    ++load[size_t(e)];
  }
  return load;
}

double load_imbalance(const std::vector<int64_t>& load) {
  int64_t total = 0, mx = 0;
  for (int64_t l : load) total += l, mx = std::max(mx, l);
  return total == 0 ? 0.0 : double(mx) * double(load.size()) / double(total);
}

void update_expert_bias(Tensor& bias, const std::vector<int64_t>& load, float gamma) {
  FATHOM_CHECK(bias.dtype() == DType::F32 && bias.numel() == int64_t(load.size()), "update_expert_bias: a bias of ",
               bias.numel(), " for ", load.size(), " experts.");
  FATHOM_CHECK(gamma >= 0, "update_expert_bias: the bias update speed must not be negative (got ", gamma, ").");
  int64_t total = 0;
  for (int64_t l : load) total += l;
  // compare E · load_i with the total: the mean without rounding
  const int64_t E = int64_t(load.size());
  for (int64_t i = 0; i < E; ++i) {
    const int64_t scaled = load[size_t(i)] * E;
    if (scaled > total) bias.f32()[i] -= gamma;
    else if (scaled < total) bias.f32()[i] += gamma;
  }
}

double sequence_balance_loss(Tensor& dlogits, const Tensor& logits, const Tensor& experts,
                             const std::vector<int64_t>& seq_lens, float alpha, const MoeGateParams& p, float dloss) {
  const int E = p.n_experts, K = p.top_k;
  FATHOM_CHECK(E > 0 && K > 0 && logits.dtype() == DType::F32 && logits.numel() % E == 0 &&
                   experts.dtype() == DType::I32,
               "sequence_balance_loss: F32 logits for ", E, " experts and I32 ids expected.");
  const int64_t T = logits.numel() / E;
  FATHOM_CHECK(experts.numel() == T * K && dlogits.dtype() == DType::F32 && dlogits.numel() == T * E,
               "sequence_balance_loss: ", T, " tokens but ids ", shape_str(experts.shape()), " dlogits ",
               shape_str(dlogits.shape()));
  int64_t covered = 0;
  for (int64_t n : seq_lens) {
    FATHOM_CHECK(n > 0, "sequence_balance_loss: a sequence of ", n, " tokens.");
    covered += n;
  }
  FATHOM_CHECK(covered == T, "sequence_balance_loss: sequences of ", covered, " tokens for ", T, " rows.");
  const double n_seq = double(seq_lens.size());
  std::vector<double> s(static_cast<size_t>(E)), f(static_cast<size_t>(E)), ds(static_cast<size_t>(E));
  double loss = 0;
  int64_t t0 = 0;
  for (int64_t n : seq_lens) {
    std::fill(f.begin(), f.end(), 0.0);
    for (int64_t t = t0; t < t0 + n; ++t)
      for (int k = 0; k < K; ++k) {
        const int32_t e = experts.ptr<int32_t>()[t * K + k];
        FATHOM_CHECK(e >= 0 && e < E, "sequence_balance_loss: expert id ", e, " of token ", t, ".");
        f[size_t(e)] += double(E) / (double(K) * double(n));
      }
    for (int64_t t = t0; t < t0 + n; ++t) {
      const float* l = logits.f32() + t * E;
      double sum = 0;
      if (p.scoring == ScoringFunc::Sigmoid) {
        for (int e = 0; e < E; ++e) sum += (s[size_t(e)] = 1.0 / (1.0 + std::exp(-double(l[e]))));
      } else {
        const double mx = *std::max_element(l, l + E);
        for (int e = 0; e < E; ++e) sum += (s[size_t(e)] = std::exp(double(l[e]) - mx));
      }
      // token t adds α / (T · n_seq) Σ_i f_i s_i / sum
      const double c = double(alpha) / (double(n) * n_seq);
      double fs = 0;
      for (int e = 0; e < E; ++e) fs += f[size_t(e)] * s[size_t(e)];
      loss += c * fs / sum;
      // d/ds_j of (Σ_i f_i s_i) / sum = (f_j − Σ_i f_i s_i / sum) / sum
      for (int e = 0; e < E; ++e) ds[size_t(e)] = c * (f[size_t(e)] - fs / sum) / sum;
      float* dl = dlogits.f32() + t * E;
      if (p.scoring == ScoringFunc::Sigmoid) {
        for (int e = 0; e < E; ++e) dl[e] += float(dloss * ds[size_t(e)] * s[size_t(e)] * (1 - s[size_t(e)]));
      } else {
        // s are unnormalised exponentials here: s'_i = s_i / sum is the softmax, and
        // d/dl_j (Σ f_i s'_i) = s'_j (f_j − Σ f_i s'_i)
        for (int e = 0; e < E; ++e) dl[e] += float(dloss * ds[size_t(e)] * s[size_t(e)]);
      }
    }
    t0 += n;
  }
  return loss;
}

}  // namespace fathom::train
