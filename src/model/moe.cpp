#include "model/moe.h"

#include <cstring>

#include "core/error.h"

namespace fathom {

SwiGluWeights load_swiglu(const WeightLoader& w, const std::string& p, int64_t hidden, int64_t inter) {
  SwiGluWeights s;
  s.gate_proj = w.linear(p + "gate_proj.weight", inter, hidden);
  s.up_proj = w.linear(p + "up_proj.weight", inter, hidden);
  s.down_proj = w.linear(p + "down_proj.weight", hidden, inter);
  return s;
}

MoeWeights load_moe(const WeightLoader& w, const ModelConfig& c, const std::string& p) {
  MoeWeights m;
  const int64_t E = c.n_routed_experts, D = c.hidden_size, I = c.moe_intermediate_size;
  m.gate = w.linear(p + "gate.weight", E, D);
  if (c.topk_method == "noaux_tc") m.e_score_correction_bias = w.f32(p + "gate.e_score_correction_bias", {E});
  m.experts.reserve(size_t(E));
  for (int64_t e = 0; e < E; ++e) m.experts.push_back(load_swiglu(w, cat(p, "experts.", e, "."), D, I));
  if (c.n_shared_experts > 0) {
    m.shared_experts = load_swiglu(w, p + "shared_experts.", D, I * c.n_shared_experts);
    m.has_shared = true;
  }
  MoeGateParams& g = m.gate_params;
  g.scoring = c.scoring_func == "sigmoid" ? ScoringFunc::Sigmoid : ScoringFunc::Softmax;
  g.n_experts = int(E);
  g.top_k = c.num_experts_per_tok;
  // greedy routing ignores groups even when the config lists them
  const bool grouped = c.topk_method != "greedy";
  g.n_group = grouped ? c.n_group : 1;
  g.topk_group = grouped ? c.topk_group : 1;
  g.group_by_top2_sum = c.topk_method == "noaux_tc";
  g.norm_topk_prob = c.norm_topk_prob;
  g.routed_scaling_factor = float(c.routed_scaling_factor);
  return m;
}

void swiglu_forward(Ops& ops, const SwiGluWeights& w, Tensor& out, const Tensor& x) {
  const int64_t T = x.dim(0), I = w.gate_proj.out_features();
  Tensor g = Tensor::empty({T, I}), u = Tensor::empty({T, I});
  ops.matmul_batch({{g.f32(), x.f32(), T, &w.gate_proj}, {u.f32(), x.f32(), T, &w.up_proj}});
  ops.silu_mul(g, g, u);
  ops.matmul(out, g, w.down_proj);
}

void moe_forward(Ops& ops, const MoeWeights& w, const ModelConfig& c, Tensor& out, const Tensor& x, ExpertLoad* load) {
  const int64_t T = x.dim(0), D = c.hidden_size;
  const int K = c.num_experts_per_tok, E = c.n_routed_experts;
  Tensor logits = Tensor::empty({T, E});
  ops.matmul(logits, x, w.gate);
  Tensor weights = Tensor::empty({T, K}), experts = Tensor::empty({T, K}, DType::I32);
  ops.moe_gate(weights, experts, logits,
               w.e_score_correction_bias.defined() ? w.e_score_correction_bias.f32() : nullptr, w.gate_params);

  // Group the (token, slot) pairs by expert so each expert runs once over its tokens.
  std::vector<std::vector<int64_t>> rows(static_cast<size_t>(E));  // token indices per expert
  std::vector<std::vector<float>> mix(static_cast<size_t>(E));     // their routing weights
  for (int64_t t = 0; t < T; ++t)
    for (int k = 0; k < K; ++k) {
      int e = experts.ptr<int32_t>()[t * K + k];
      rows[size_t(e)].push_back(t);
      mix[size_t(e)].push_back(weights.f32()[t * K + k]);
    }
  // Every expert with tokens (and the shared experts over all tokens) as one batch of
  // gate/up matmuls, then one batch of down matmuls.
  struct Active {
    const SwiGluWeights* w;
    int expert;      // routed expert index, -1 for the shared experts
    const float* x;  // (n, D)
    int64_t n;
    Tensor xe, g, u, y;
  };
  std::vector<Active> active;
  if (w.has_shared) active.push_back({&w.shared_experts, -1, x.f32(), T, Tensor(), Tensor(), Tensor(), Tensor()});
  for (int e = 0; e < E; ++e) {
    const auto& r = rows[size_t(e)];
    if (load) load->tokens_per_expert[size_t(e)] += int64_t(r.size());
    if (r.empty()) continue;
    const int64_t n = int64_t(r.size());
    Active a{&w.experts[size_t(e)], e, nullptr, n, Tensor::empty({n, D}), Tensor(), Tensor(), Tensor()};
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(a.xe.f32() + i * D, x.f32() + r[size_t(i)] * D, sizeof(float) * size_t(D));
    a.x = a.xe.f32();
    active.push_back(std::move(a));
  }
  std::vector<MatmulJob> jobs;
  for (Active& a : active) {
    const int64_t I = a.w->gate_proj.out_features();
    a.g = Tensor::empty({a.n, I});
    a.u = Tensor::empty({a.n, I});
    a.y = Tensor::empty({a.n, D});
    jobs.push_back({a.g.f32(), a.x, a.n, &a.w->gate_proj});
    jobs.push_back({a.u.f32(), a.x, a.n, &a.w->up_proj});
  }
  ops.matmul_batch(jobs);
  jobs.clear();
  for (Active& a : active) {
    ops.silu_mul(a.g, a.g, a.u);
    jobs.push_back({a.y.f32(), a.g.f32(), a.n, &a.w->down_proj});
  }
  ops.matmul_batch(jobs);

  std::memset(out.data(), 0, out.nbytes());
  for (size_t i = 0; i < active.size(); ++i) {
    const Active& a = active[i];
    const int e = a.expert;
    if (e < 0) {
      ops.add(out, a.y);
      continue;
    }
    const auto& r = rows[size_t(e)];
    for (int64_t j = 0; j < a.n; ++j) {
      float* o = out.f32() + r[size_t(j)] * D;
      const float* y = a.y.f32() + j * D;
      const float m = mix[size_t(e)][size_t(j)];
      for (int64_t d = 0; d < D; ++d) o[d] += m * y[d];
    }
  }
}

}  // namespace fathom
