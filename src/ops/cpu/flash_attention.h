// Flash attention's reference on the CPU (arguments: src/ops/flash_attention.h): the plain
// definition, scores and softmax of each (query, head) in double from the bf16 inputs — what the
// GPU kernels (src/ops/cuda/flash_attention.cu) are checked against, and the readable statement
// of what they compute without ever materializing a score matrix.
#pragma once
#include "core/thread_pool.h"
#include "ops/flash_attention.h"

namespace fathom::cpu {

// Checks the arguments as the GPU launcher does (fathom::Error naming what is wrong); cu_seqlens
// are host arrays here. Writes p.out (bf16) and p.lse when set; out_f32, when given, receives the
// output before its rounding to bf16 (same layout as out, contiguous: (total_q, n_heads, d_v)).
void flash_attention_forward(const FlashAttentionParams& p, ThreadPool& pool, float* out_f32 = nullptr);

// dq, dk, dv (FlashAttentionGrads) of the loss whose gradient at out is dout: with P the softmax
// and D_i = Σ_d dout_i · out_i, dV = Pᵀ dO, dS = P ∘ (dO Vᵀ - D), dQ = scale · dS K,
// dK = scale · dSᵀ Q. out and lse are recomputed here in double (p.out, p.lse unused).
void flash_attention_backward(const FlashAttentionParams& p, const FlashAttentionGrads& g, ThreadPool& pool);

}  // namespace fathom::cpu
