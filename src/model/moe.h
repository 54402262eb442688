// Feed-forward blocks: the dense SwiGLU MLP of the first `first_k_dense_replace` layers and
// DeepSeekMoE — many small routed experts, of which each token uses `num_experts_per_tok`,
// plus `n_shared_experts` that every token uses (stored as one SwiGLU of
// n_shared * moe_intermediate_size).
//
// Routing (MoeGateParams in ops.h): V2 scores experts with a softmax; V3 with a sigmoid and
// adds a per-expert bias `e_score_correction_bias` for *choosing* experts only — the
// auxiliary-loss-free balancing of DeepSeek-V3 — while the weights that mix expert outputs
// use the unbiased scores. Group-limited routing first keeps the best `topk_group` of
// `n_group` expert groups (V3 ranks a group by the sum of its two best biased scores).
#pragma once
#include <vector>

#include "model/config.h"
#include "model/weights.h"
#include "ops/ops.h"

namespace fathom {

struct SwiGluWeights {
  LinearWeight gate_proj;  // (inter, hidden)
  LinearWeight up_proj;    // (inter, hidden)
  LinearWeight down_proj;  // (hidden, inter)
  ExpertSet fused;         // the three as one expert for Ops::swiglu (prepare_swiglu)
  int64_t nbytes() const { return int64_t(gate_proj.nbytes() + up_proj.nbytes() + down_proj.nbytes()); }
};

struct MoeWeights {
  LinearWeight gate;              // (n_routed_experts, hidden) router
  Tensor e_score_correction_bias; // (n_routed_experts) F32, V3 only (undefined otherwise)
  std::vector<SwiGluWeights> experts;
  SwiGluWeights shared_experts;   // undefined weights when n_shared_experts == 0
  bool has_shared = false;
  MoeGateParams gate_params;
  ExpertSet expert_set;  // the routed experts in the backend's form (prepare_moe)
};

SwiGluWeights load_swiglu(const WeightLoader& w, const std::string& prefix, int64_t hidden, int64_t inter);
MoeWeights load_moe(const WeightLoader& w, const ModelConfig& c, const std::string& prefix);
// The router's settings from a config (scoring, top-k, groups, normalisation, scaling).
MoeGateParams moe_gate_params(const ModelConfig& c);
// Points expert_set at `experts` and lets the backend prepare it; call once the weights sit
// where they will stay (after placement on the device).
void prepare_moe(Ops& ops, MoeWeights& m);
void prepare_swiglu(Ops& ops, SwiGluWeights& s);

// Up to this many tokens a SwiGLU (dense MLP, shared experts) runs as Ops::swiglu's two fused
// passes, which stream the weights once per token; longer inputs use batched matmuls.
constexpr int64_t kFusedSwiGluMaxTokens = 8;

// out (T, hidden) = down(silu(gate(x)) * up(x)), or out += that with accumulate (out may then be
// x); x normalised first when norm is set
void swiglu_forward(Ops& ops, const SwiGluWeights& w, Tensor& out, const Tensor& x, bool accumulate = false,
                    InputNorm norm = {});

// What routing chose, when asked: the (T, top_k) expert ids of one call, row by row (expert
// load statistics and routing comparisons are computed from it).
struct ExpertChoices {
  std::vector<int32_t> ids;
  int top_k = 0;
};

// out (T, hidden) = Σ_k weight_k · expert_k(x) + shared(x), or out += that with accumulate (out
// may then be x: the residual add, fused into the experts' down projection); x normalised first
// (by the router and the experts as they read it) when norm is set
void moe_forward(Ops& ops, const MoeWeights& w, const ModelConfig& c, Tensor& out, const Tensor& x,
                 ExpertChoices* choices = nullptr, InputNorm norm = {}, bool accumulate = false);

}  // namespace fathom
