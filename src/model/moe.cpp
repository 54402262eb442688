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
  m.gate_params = moe_gate_params(c);
  return m;
}

MoeGateParams moe_gate_params(const ModelConfig& c) {
  MoeGateParams g;
  g.scoring = c.scoring_func == "sigmoid" ? ScoringFunc::Sigmoid : ScoringFunc::Softmax;
  g.n_experts = c.n_routed_experts;
  g.top_k = c.num_experts_per_tok;
  // greedy routing ignores groups even when the config lists them
  const bool grouped = c.topk_method != "greedy";
  g.n_group = grouped ? c.n_group : 1;
  g.topk_group = grouped ? c.topk_group : 1;
  g.group_by_top2_sum = c.topk_method == "noaux_tc";
  g.norm_topk_prob = c.norm_topk_prob;
  g.routed_scaling_factor = float(c.routed_scaling_factor);
  return g;
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

void swiglu_forward(Ops& ops, const SwiGluWeights& w, Tensor& out, const Tensor& x, bool accumulate, InputNorm norm) {
  const int64_t T = x.dim(0), I = w.gate_proj.out_features();
  if (T <= kFusedSwiGluMaxTokens && !w.fused.experts.empty()) return ops.swiglu(out, x, w.fused, accumulate, norm);
  Tensor g = ops.empty({T, I}), u = ops.empty({T, I});
  ops.matmul_batch({{g.f32(), x.f32(), T, &w.gate_proj, norm}, {u.f32(), x.f32(), T, &w.up_proj, norm}});
  ops.silu_mul(g, g, u);
  ops.matmul_batch({{out.f32(), g.f32(), T, &w.down_proj, {}, accumulate}});
}

void moe_forward(Ops& ops, const MoeWeights& w, const ModelConfig& c, Tensor& out, const Tensor& x, ExpertChoices* choices,
                 InputNorm norm, bool accumulate) {
  const int64_t T = x.dim(0);
  const int K = c.num_experts_per_tok, E = c.n_routed_experts;
  Tensor weights = ops.empty({T, K}), experts = ops.empty({T, K}, DType::I32);
  // the experts' input: x, or the normalised rows the router may leave (one norm for both)
  Tensor xin = x, xn;
  if (ops.moe_route(weights, experts, norm ? &xn : nullptr, x, w.gate, norm,
                    w.e_score_correction_bias.defined() ? w.e_score_correction_bias.f32() : nullptr, w.gate_params)) {
    xin = xn;
    norm = {};
  }
  if (choices) {
    choices->ids.resize(static_cast<size_t>(T * K));
    choices->top_k = K;
    ops.download(choices->ids.data(), experts);
  }
  FATHOM_ASSERT(w.expert_set.experts.size() == size_t(E), "MoE layer used before prepare_moe");
  // decode-sized batches run the shared experts in the routed experts' launches (and batched
  // decode too where the backend's routed kernels take them: CUDA's grouped small tiles)
  const bool with_routed = w.has_shared && !w.shared_experts.fused.experts.empty() &&
                           (T <= kFusedSwiGluMaxTokens || ops.moe_takes_shared(T, K, E));
  // Run apart (long inputs), the routed and the shared experts must both see x as it was before
  // either adds to out: the normalised rows (or, writing over x, a copy) are made once.
  const bool apart = w.has_shared && !with_routed;
  if (apart && (norm || out.data() == xin.data())) {
    xin = ops.empty(x.shape());
    if (norm) {
      ops.rmsnorm(xin, x, *norm.weight, norm.eps);
      norm = {};
    } else {
      CopyParams cp;
      cp.out = xin.f32();
      cp.in = x.f32();
      cp.out_token_stride = cp.in_token_stride = x.dim(1);
      cp.n_tokens = T;
      cp.cols = int(x.dim(1));
      ops.copy(cp);
    }
  }
  ops.moe_experts(out, xin, weights, experts, w.expert_set, with_routed ? &w.shared_experts.fused : nullptr,
                  accumulate, norm);
  if (apart) swiglu_forward(ops, w.shared_experts, out, xin, /*accumulate=*/true, norm);
}

}  // namespace fathom
