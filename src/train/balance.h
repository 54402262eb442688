// Keeping DeepSeekMoE's experts evenly loaded while training, as DeepSeek-V3 does it:
//
// - Auxiliary-loss-free balancing (V3 §2.1.2): each expert's e_score_correction_bias is added
//   to its score only to choose the top-k (moe_gate), never to the routing weight. After every
//   step the bias of an expert that received more than the mean load drops by γ, of one that
//   received less rises by γ — the router's choice drifts toward balance without a loss term
//   pulling on the model's weights.
// - A small sequence-wise balance loss (V3 eq. 17–20) for extreme imbalance inside one sequence:
//   L = α Σ_i f_i P_i with f_i = E / (K T) · #{tokens of the sequence that chose i} and
//   P_i = 1/T Σ_t s'_{i,t}, s' the token's scores normalised to sum to 1.
#pragma once

#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "ops/ops.h"

namespace fathom::train {

// Tokens routed to each expert: counts of the ids (T, K) I32, each in [0, n_experts).
std::vector<int64_t> expert_load(const Tensor& experts, int n_experts);

// max load / mean load (1 = perfectly even; 0 for no tokens).
double load_imbalance(const std::vector<int64_t>& load);

// bias (E) F32: − γ for experts above the mean load, + γ below it, unchanged at it.
void update_expert_bias(Tensor& bias, const std::vector<int64_t>& load, float gamma);

// The sequence-wise balance loss of logits (T, E) F32 routed to experts (T, K) I32 (moe_gate's
// choice), the T rows cut into sequences of seq_lens (summing to T): α Σ_i f_i P_i per sequence,
// averaged over the sequences. Adds dloss · dL/dlogits to dlogits (T, E) (f_i, a count, is
// constant; the gradient flows through the scores) and returns L.
double sequence_balance_loss(Tensor& dlogits, const Tensor& logits, const Tensor& experts,
                             const std::vector<int64_t>& seq_lens, float alpha, const MoeGateParams& p,
                             float dloss = 1.0f);

}  // namespace fathom::train
