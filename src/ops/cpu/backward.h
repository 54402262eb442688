// Backward passes of the model's elementwise and linear ops, on the CPU: the reference the
// training engine's gradients are checked against (finite differences in tests/test_backward.cpp)
// and the CUDA backward is compared with (tests/test_cuda_backward.cpp). The CPU backend's
// Ops::*_backward methods are these; src/train/backward.h names them for the training code.
//
// Each function sits beside the forward it differentiates in meaning and keeps its argument
// order (outputs first, then the forward's inputs, then its dims), as llm.c pairs
// layernorm_forward with layernorm_backward:
//   forward  Ops::rmsnorm(out, x, weight, eps)
//   backward rmsnorm_backward(dx, dweight, dout, x, weight, eps)
// Input gradients are written (dx = ...); parameter gradients accumulate (dweight += ...), so
// gradient accumulation over micro-batches and tied weights need nothing more. All tensors are
// F32 host tensors, rows contiguous; shapes are given beside each function.
#pragma once

#include "core/tensor.h"
#include "ops/ops.h"

namespace fathom::cpu {

// forward: Ops::embedding(out (T, H), ids (T) I32, table (V, H))
// dtable (V, H) += dout rows scattered to their ids (a token seen twice gets both rows).
void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids);

// forward: Ops::rmsnorm(out (M, N), x (M, N), weight (N), eps): out = x · r · weight with
// r = 1 / sqrt(mean(x²) + eps) per row.
// dx (M, N) = r · (dout ⊙ weight) − x · r³ / N · Σ(dout ⊙ weight ⊙ x);  dweight (N) += Σ_rows dout ⊙ x · r.
// Row sums in double.
void rmsnorm_backward(Tensor& dx, Tensor& dweight, const Tensor& dout, const Tensor& x, const Tensor& weight,
                      float eps);

// forward: Ops::matmul(out (M, N), x (M, K), W (N, K)): out = x · Wᵀ, with W the F32 master weight.
// dx (M, K) = dout · W (skipped when dx is undefined: the first layer's input needs none);
// dw (N, K) += doutᵀ · x. OpenBLAS sgemm.
void matmul_backward(Tensor& dx, Tensor& dw, const Tensor& dout, const Tensor& x, const Tensor& w);

// forward: Ops::silu_mul(out (M, N), gate (M, N), up (M, N)): out = silu(gate) · up,
// silu(g) = g · σ(g). dgate = dout · up · σ(g) · (1 + g · (1 − σ(g)));  dup = dout · silu(g).
void silu_mul_backward(Tensor& dgate, Tensor& dup, const Tensor& dout, const Tensor& gate, const Tensor& up);

// forward: Ops::rope(p), rotating each pair (a, b) of a head's rope slice by its angle:
// (a cos − b sin, a sin + b cos). Its gradient is the transposed rotation of the output gradient:
// p.x holds d(out) at the rope slices and receives d(in) there, in place (p.out must be null;
// the other columns are the identity's and are left as they are). Same layout fields as the
// forward: tokens, heads, strides, offset, rope_dim, cos/sin (T, rope_dim/2), interleaved.
void rope_backward(const RopeParams& p);

// forward: Ops::attention(p) (F32 q/k/v, no block table, no device key count): per query row i
// and head h, S = scale · q·kᵀ over the visible keys (causal: key j ≤ q_pos0 + i), P = softmax(S),
// out = P·V. Given dout (the layout of p.out), writes
//   dv[j] = Σ_i P_ij dout_i,   dS_ij = P_ij (dout_i·v_j − Σ_j' P_ij' dout_i·v_j'),
//   dq_i = scale Σ_j dS_ij k_j,   dk_j = scale Σ_i dS_ij q_i,
// summed over the query heads that share a KV head (GQA/MQA). dq, dk, dv have the strides of
// q, k, v; every element of theirs that the forward reads is written. P is recomputed (the
// recomputation FlashAttention's backward does), everything in double.
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const AttentionParams& p);

// forward: Ops::moe_gate(weights (T, K), experts (T, K), logits (T, E), bias, p). The choice of
// experts is discrete (and the bias only steers it), so the gradient flows through the routing
// weights of the chosen experts alone: w_k = score(e_k) [/ Σ_k score(e_k) with norm_topk_prob]
// · routed_scaling_factor, score = sigmoid(logit) or the softmax over all E logits. Given
// dweights (T, K), writes dlogits (T, E) (zero for experts whose score no weight used; with
// softmax every logit gets some). The experts are the forward's ids.
void moe_gate_backward(Tensor& dlogits, const Tensor& dweights, const Tensor& logits, const Tensor& experts,
                       const MoeGateParams& p);

// The LM head's loss, fused and memory-light: for each row of logits (T, V), with target
// targets[t] (I32; < 0: no target, loss 0 and zero gradient — padding), losses[t] =
// logsumexp(logits[t]) − logits[t, target] and dlogits[t] = (softmax(logits[t]) − onehot) · dloss.
// dlogits may be logits itself (the (T, V) gradient then takes no memory of its own). Sums and
// the log-sum-exp in double. Returns the number of rows with a target.
int64_t cross_entropy_backward(Tensor& losses, Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                               float dloss);

// The optimizer's passes (Ops::adamw_step, sum_squares): one AdamW update of w, m, v (F32, same
// size as grad) by the formula of AdamWStepParams, element by element in F32; Σ x² in double.
void adamw_step(Tensor& w, Tensor& m, Tensor& v, const Tensor& grad, const AdamWStepParams& p);
double sum_squares(const Tensor& x);

}  // namespace fathom::cpu
