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

namespace {
ExpertWeights as_expert(const SwiGluWeights& s) { return {&s.gate_proj, &s.up_proj, &s.down_proj}; }
}  // namespace

void prepare_moe(Ops& ops, MoeWeights& m) {
  m.expert_set = ExpertSet();
  for (const SwiGluWeights& e : m.experts) m.expert_set.experts.push_back(as_expert(e));
  ops.prepare_experts(m.expert_set);
}

void prepare_swiglu(Ops& ops, SwiGluWeights& s) {
  s.fused = ExpertSet();
  s.fused.experts.push_back(as_expert(s));
  ops.prepare_experts(s.fused);
}

void swiglu_forward(Ops& ops, const SwiGluWeights& w, Tensor& out, const Tensor& x, bool accumulate) {
  const int64_t T = x.dim(0), I = w.gate_proj.out_features();
  if (T <= kFusedSwiGluMaxTokens && !w.fused.experts.empty()) return ops.swiglu(out, x, w.fused, accumulate);
  Tensor g = ops.empty({T, I}), u = ops.empty({T, I});
  ops.matmul_batch({{g.f32(), x.f32(), T, &w.gate_proj}, {u.f32(), x.f32(), T, &w.up_proj}});
  ops.silu_mul(g, g, u);
  if (!accumulate) return ops.matmul(out, g, w.down_proj);
  Tensor y = ops.empty(out.shape());
  ops.matmul(y, g, w.down_proj);
  ops.add(out, y);
}

void moe_forward(Ops& ops, const MoeWeights& w, const ModelConfig& c, Tensor& out, const Tensor& x, ExpertChoices* choices) {
  const int64_t T = x.dim(0);
  const int K = c.num_experts_per_tok, E = c.n_routed_experts;
  Tensor logits = ops.empty({T, E});
  ops.matmul(logits, x, w.gate);
  Tensor weights = ops.empty({T, K}), experts = ops.empty({T, K}, DType::I32);
  ops.moe_gate(weights, experts, logits,
               w.e_score_correction_bias.defined() ? w.e_score_correction_bias.f32() : nullptr, w.gate_params);
  if (choices) {
    choices->ids.resize(static_cast<size_t>(T * K));
    choices->top_k = K;
    ops.download(choices->ids.data(), experts);
  }
  FATHOM_ASSERT(w.expert_set.experts.size() == size_t(E), "MoE layer used before prepare_moe");
  // decode-sized batches run the shared experts in the routed experts' launches
  const bool with_routed = w.has_shared && T <= kFusedSwiGluMaxTokens && !w.shared_experts.fused.experts.empty();
  ops.moe_experts(out, x, weights, experts, w.expert_set, with_routed ? &w.shared_experts.fused : nullptr);
  if (w.has_shared && !with_routed) swiglu_forward(ops, w.shared_experts, out, x, /*accumulate=*/true);
}

}  // namespace fathom
