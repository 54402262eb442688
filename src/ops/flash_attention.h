// The arguments of flash attention: bf16 queries, keys and values of several sequences packed row
// after row (variable lengths, `cu_seqlens`), fp32 softmax and accumulation, bf16 output and the
// log-sum-exp of every (query, head) — the interface of FlashAttention 2/3's varlen functions.
// Computed on the CPU by cpu::flash_attention_forward (the reference, src/ops/cpu/flash_attention.h)
// and on the GPU by cuda::flash_attention_forward (src/ops/cuda/flash_attention.cu); the idea in
// words: docs/flash-attention.md.
//
// Sequence b has queries [cu_seqlens_q[b], cu_seqlens_q[b+1]) and keys [cu_seqlens_k[b],
// cu_seqlens_k[b+1]). Query head h reads key/value head h / (n_heads / n_kv_heads) (GQA; MQA
// when n_kv_heads = 1). Causal masking is aligned to the bottom right, as in chunked prefill:
// query i of a sequence with Lq queries and Lk keys sees keys j <= i + Lk - Lq (a query that sees
// no key gets a zero output and a log-sum-exp of -inf).
#pragma once
#include <cstdint>

#include "core/error.h"

namespace fathom {

struct FlashAttentionParams {
  // bf16 bits; element (token t, head h, dim d) at ptr[t * token_stride + h * head_stride + d]
  const uint16_t* q = nullptr;  // (total_q, n_heads, d_qk)
  const uint16_t* k = nullptr;  // (total_k, n_kv_heads, d_qk)
  const uint16_t* v = nullptr;  // (total_k, n_kv_heads, d_v)
  uint16_t* out = nullptr;      // (total_q, n_heads, d_v)
  int64_t q_token_stride = 0, q_head_stride = 0;
  int64_t k_token_stride = 0, k_head_stride = 0;
  int64_t v_token_stride = 0, v_head_stride = 0;
  int64_t out_token_stride = 0, out_head_stride = 0;
  // (n_heads, total_q) fp32, natural log of Σ_j exp(scale · q·k_j) over the keys the query sees;
  // may be null in the forward
  float* lse = nullptr;
  const int32_t* cu_seqlens_q = nullptr;  // (batch + 1), on the device that computes
  const int32_t* cu_seqlens_k = nullptr;  // (batch + 1)
  int batch = 0;
  int64_t total_q = 0, total_k = 0;
  int max_seqlen_q = 0, max_seqlen_k = 0;  // bounds on every sequence's lengths (the GPU's grid)
  int n_heads = 0, n_kv_heads = 0, d_qk = 0, d_v = 0;
  float scale = 1.0f;
  bool causal = true;
};

// The backward's extra arguments: dout the output's gradient (bf16, out's layout), out and lse
// from the forward; dq (total_q, n_heads, d_qk), dk (total_k, n_kv_heads, d_qk) and dv
// (total_k, n_kv_heads, d_v) fp32, contiguous, overwritten (a KV head's gradient sums over the
// query heads that read it).
struct FlashAttentionGrads {
  const uint16_t* dout = nullptr;
  int64_t dout_token_stride = 0, dout_head_stride = 0;
  float* dq = nullptr;
  float* dk = nullptr;
  float* dv = nullptr;
  // The same bits run after run: on the GPU, the backward whose every gradient has one owner (7
  // products) instead of the one-pass kernel, whose dQ is summed by atomics in L2 (5 products;
  // Hopper, head dims 128/128). The CPU's is always deterministic.
  bool deterministic = false;
};

// The argument checks every backend makes (fathom::Error naming what is wrong): shapes, strides,
// the head mapping and, when host_seqlens (the CPU's), the sequence table itself — the GPU
// kernels read theirs on the device and treat a sequence that runs past total_q / total_k as
// ending there. `who` starts each message.
inline void check_flash_attention(const FlashAttentionParams& p, bool host_seqlens, const char* who) {
  FATHOM_CHECK(p.q && p.k && p.v && p.out && p.cu_seqlens_q && p.cu_seqlens_k, who,
               ": q, k, v, out and both cu_seqlens must be given.");
  FATHOM_CHECK(p.batch >= 1 && p.total_q >= 0 && p.total_k >= 0 && p.max_seqlen_q >= 0 && p.max_seqlen_k >= 0, who,
               ": invalid batch ", p.batch, " or totals (", p.total_q, " queries, ", p.total_k, " keys).");
  FATHOM_CHECK(p.n_heads >= 1 && p.n_kv_heads >= 1 && p.n_heads % p.n_kv_heads == 0, who, ": ", p.n_heads,
               " query heads cannot share ", p.n_kv_heads, " key/value heads evenly.");
  FATHOM_CHECK(p.d_qk >= 1 && p.d_v >= 1 && p.d_qk <= 256 && p.d_v <= 256, who, ": head dims qk ", p.d_qk, " / v ",
               p.d_v, " are outside 1..256.");
  FATHOM_CHECK(p.scale > 0.0f && p.scale < 1e6f, who, ": softmax scale ", p.scale, " is not a positive finite number.");
  auto rows = [&](int64_t token, int64_t head, int heads, int d, const char* name) {
    FATHOM_CHECK(head >= d && token >= head * (heads - 1) + d, who, ": ", name, " strides (token ", token, ", head ",
                 head, ") overlap its ", heads, " heads of ", d, ".");
  };
  rows(p.q_token_stride, p.q_head_stride, p.n_heads, p.d_qk, "q");
  rows(p.k_token_stride, p.k_head_stride, p.n_kv_heads, p.d_qk, "k");
  rows(p.v_token_stride, p.v_head_stride, p.n_kv_heads, p.d_v, "v");
  rows(p.out_token_stride, p.out_head_stride, p.n_heads, p.d_v, "out");
  if (!host_seqlens) return;
  FATHOM_CHECK(p.cu_seqlens_q[0] == 0 && p.cu_seqlens_k[0] == 0, who, ": cu_seqlens must start at 0.");
  for (int b = 0; b < p.batch; ++b) {
    const int64_t lq = int64_t(p.cu_seqlens_q[b + 1]) - p.cu_seqlens_q[b];
    const int64_t lk = int64_t(p.cu_seqlens_k[b + 1]) - p.cu_seqlens_k[b];
    FATHOM_CHECK(lq >= 0 && lk >= 0 && lq <= p.max_seqlen_q && lk <= p.max_seqlen_k, who, ": sequence ", b, " has ",
                 lq, " queries and ", lk, " keys (cu_seqlens must not decrease; max_seqlen ", p.max_seqlen_q, " / ",
                 p.max_seqlen_k, ").");
  }
  FATHOM_CHECK(p.cu_seqlens_q[p.batch] == p.total_q && p.cu_seqlens_k[p.batch] == p.total_k, who,
               ": cu_seqlens end at ", p.cu_seqlens_q[p.batch], " queries / ", p.cu_seqlens_k[p.batch],
               " keys, not the totals ", p.total_q, " / ", p.total_k, ".");
}

}  // namespace fathom
