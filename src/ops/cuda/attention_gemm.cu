// Attention as batched GEMMs over a materialized score matrix, forward (cuda::attention takes it
// for a long F32 self-attention: training's forward, F32 prefill) and backward (one of the kernel
// sets behind cuda::attention_backward; see attention_backward.cu for the others and the
// contract). The forward is S, the softmax, then O_h = P V_g.
//
// FlashAttention never writes the n_q × n_kv probabilities to memory; this path does, one
// sequence and a few heads at a time, so that the five products of the backward run as cuBLAS
// GEMMs (gemm_f32: F32, or bf16 tensor cores in mixed-precision training) instead of CUDA-core
// loops. For query head h of KV head g, with scale s:
//
//   P  = softmax(s · Q_h K_gᵀ)    (causal rows cut at key q_pos0 + t; masked entries 0)
//   dV_g += Pᵀ dO_h               dP = dO_h V_gᵀ
//   dS = P ∘ (dP − D),  D_t = Σ_i P_ti dP_ti  (= dO_t · O_t, so O itself is never needed)
//   dQ_h = s · dS K_g             dK_g += s · dSᵀ Q_h
//
// The query heads of a KV group (GQA) take turns (j = 0 … r−1), each a strided batch over the KV
// heads; dK and dV accumulate over them (β = 1 after the first). Memory: two n_q × n_kv F32
// matrices per KV head in flight, heads chunked to stay under the scratch limit; a sequence whose
// one head would not fit goes to the tiled kernels (attention_backward decides). The causal half
// of each product is computed and thrown away: at T = 2,048 that is still far faster than the
// tiled kernels on CUDA cores (bench/RESULTS.md).
#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "ops/cuda/cublas_util.cuh"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/device_util.cuh"

namespace fathom::cuda {
namespace {

unsigned warp_row_blocks(int64_t rows, int warps_per_block) {
  const int64_t g = (rows + warps_per_block - 1) / warps_per_block;
  return unsigned(g < (int64_t(1) << 30) ? (g > 0 ? g : 1) : (int64_t(1) << 30));
}

// Row r of `s` (n_rows × n_kv, rows of n_q queries per head) becomes its softmax over the keys
// query t = r mod n_q sees; the others become 0. One warp per row: an online max and sum per lane,
// merged across the warp, then the probabilities written.
__global__ void softmax_rows_kernel(float* s, int64_t n_rows, int64_t n_q, int64_t n_kv, int64_t q_pos0, bool causal) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = int(threadIdx.x % 32);
  pdl_wait();
  if (row >= n_rows) return;  // whole warps leave together: row is the same for all 32 lanes
  float* x = s + row * n_kv;
  const int64_t t = row % n_q;
  const int64_t last = q_pos0 + t + 1;  // keys [0, last) are visible to query t in a causal row
  const int64_t visible = !causal ? n_kv : last < 0 ? 0 : last < n_kv ? last : n_kv;
  float m = -INFINITY, l = 0.0f;
  for (int64_t i = lane; i < visible; i += 32) {
    const float v = x[i];
    if (v > m) {
      l = l * expf(m - v) + 1.0f;
      m = v;
    } else {
      l += expf(v - m);
    }
  }
  for (int o = 16; o > 0; o /= 2) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), l2 = __shfl_xor_sync(0xffffffffu, l, o);
    const float mm = fmaxf(m, m2);
    l = (m == -INFINITY ? 0.0f : l * expf(m - mm)) + (m2 == -INFINITY ? 0.0f : l2 * expf(m2 - mm));
    m = mm;
  }
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  for (int64_t i = lane; i < n_kv; i += 32) x[i] = i < visible ? expf(x[i] - m) * inv : 0.0f;
}

// dp (n_rows × n_kv) becomes dS = P ∘ (dP − D) with D = Σ_i P_i dP_i of its row. One warp per row.
__global__ void softmax_grad_rows_kernel(float* dp, const float* p, int64_t n_rows, int64_t n_kv) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = int(threadIdx.x % 32);
  pdl_wait();
  if (row >= n_rows) return;
  float* g = dp + row * n_kv;
  const float* pr = p + row * n_kv;
  float d = 0.0f;
  for (int64_t i = lane; i < n_kv; i += 32) d += pr[i] * g[i];
  for (int o = 16; o > 0; o /= 2) d += __shfl_xor_sync(0xffffffffu, d, o);
  for (int64_t i = lane; i < n_kv; i += 32) g[i] = pr[i] * (g[i] - d);
}

// One strided-batched GEMM in cuBLAS's column-major terms: C (m × n) = α op(A) op(B) + β C.
void sgemm(cudaStream_t s, cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n, int64_t k, float alpha,
           const float* a, int64_t lda, int64_t sa, const float* b, int64_t ldb, int64_t sb, float beta, float* c,
           int64_t ldc, int64_t sc, int64_t batch) {
  gemm_f32(ta, tb, m, n, k, alpha, a, lda, sa, b, ldb, sb, beta, c, ldc, sc, batch, s, "attention_backward (GEMM)");
}

int64_t g_scratch_limit = kAttentionGemmScratchDefault;
int64_t g_forward_min_queries = kAttentionGemmForwardMinQueries;

}  // namespace

void set_attention_gemm_scratch_limit(int64_t bytes) { g_scratch_limit = bytes; }
void set_attention_gemm_forward_min_queries(int64_t n) { g_forward_min_queries = n; }

bool attention_backward_gemm_fits(const AttentionParams& p) {
  return 2 * p.n_q * p.n_kv * int64_t(sizeof(float)) <= g_scratch_limit;
}

void attention_backward_gemm(float* dq, float* dk, float* dv, const float* dout, const AttentionParams& p,
                             int64_t n_seq, Stream stream) {
  FATHOM_CHECK(attention_backward_gemm_fits(p), "attention_backward (GEMM path): ", p.n_q, " x ", p.n_kv,
               " scores per head need more than the ", g_scratch_limit, " bytes of scratch allowed");
  if (p.n_q == 0 || p.n_kv == 0) return;
  // All row-major (token, head, dim) buffers seen by cuBLAS (column-major) as their transposes:
  // Q_h is Qᵀ, a d_qk × n_q matrix with leading dimension q_token_stride, and so on.
  const cudaStream_t cs = as_cuda(stream);
  const int64_t r = p.n_q_heads / p.n_kv_heads;
  const int64_t per_head = p.n_q * p.n_kv;  // floats of one score matrix
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(p.n_kv_heads, g_scratch_limit / (2 * per_head * 4)));
  StreamScratch scratch(size_t(2 * chunk * per_head) * sizeof(float), cs, "attention_backward (scores)");
  float* P = scratch.as<float>();
  float* dP = P + chunk * per_head;
  const float s = p.scale;
  for (int64_t b = 0; b < n_seq; ++b) {
    const AttentionParams sp = sequence_of(p, b);
    const float* q = sp.q;
    const float* k = static_cast<const float*>(sp.k);
    const float* v = static_cast<const float*>(sp.v);
    const float* o = dout + b * p.n_q * p.out_token_stride;
    float* gq = dq + b * p.n_q * p.q_token_stride;
    float* gk = dk + b * p.n_kv * p.k_token_stride;
    float* gv = dv + b * p.n_kv * p.v_token_stride;
    for (int64_t g0 = 0; g0 < p.n_kv_heads; g0 += chunk) {
      const int64_t nb = std::min<int64_t>(chunk, p.n_kv_heads - g0);
      const float* kg = k + g0 * p.k_head_stride;
      const float* vg = v + g0 * p.v_head_stride;
      for (int64_t j = 0; j < r; ++j) {
        const int64_t h0 = g0 * r + j;  // query head j of the chunk's first KV group; next group r heads on
        const float* qh = q + h0 * p.q_head_stride;
        const float* oh = o + h0 * p.out_head_stride;
        const float first = j == 0 ? 0.0f : 1.0f;
        // Sᵀ (n_kv × n_q) = K_g Q_hᵀ, scaled
        sgemm(cs, CUBLAS_OP_T, CUBLAS_OP_N, p.n_kv, p.n_q, p.d_qk, s, kg, p.k_token_stride, p.k_head_stride, qh,
              p.q_token_stride, r * p.q_head_stride, 0.0f, P, p.n_kv, per_head, nb);
        const int64_t rows = nb * p.n_q;
        const int warps = 8;
        launch_kernel(softmax_rows_kernel, warp_row_blocks(rows, warps), warps * 32, 0, cs, P, rows, p.n_q, p.n_kv,
                      p.q_pos0, p.causal);
        check_launch("attention_backward (softmax)");
        // dV_gᵀ (d_v × n_kv) += dO_hᵀ P
        sgemm(cs, CUBLAS_OP_N, CUBLAS_OP_T, p.d_v, p.n_kv, p.n_q, 1.0f, oh, p.out_token_stride, r * p.out_head_stride, P,
              p.n_kv, per_head, first, gv + g0 * p.v_head_stride, p.v_token_stride, p.v_head_stride, nb);
        // dPᵀ (n_kv × n_q) = V_g dO_hᵀ
        sgemm(cs, CUBLAS_OP_T, CUBLAS_OP_N, p.n_kv, p.n_q, p.d_v, 1.0f, vg, p.v_token_stride, p.v_head_stride, oh,
              p.out_token_stride, r * p.out_head_stride, 0.0f, dP, p.n_kv, per_head, nb);
        launch_kernel(softmax_grad_rows_kernel, warp_row_blocks(rows, warps), warps * 32, 0, cs, dP,
                      static_cast<const float*>(P), rows, p.n_kv);
        check_launch("attention_backward (softmax gradient)");
        // dQ_hᵀ (d_qk × n_q) = s K_gᵀ dSᵀ
        sgemm(cs, CUBLAS_OP_N, CUBLAS_OP_N, p.d_qk, p.n_q, p.n_kv, s, kg, p.k_token_stride, p.k_head_stride, dP, p.n_kv,
              per_head, 0.0f, gq + h0 * p.q_head_stride, p.q_token_stride, r * p.q_head_stride, nb);
        // dK_gᵀ (d_qk × n_kv) += s Q_hᵀ dS
        sgemm(cs, CUBLAS_OP_N, CUBLAS_OP_T, p.d_qk, p.n_kv, p.n_q, s, qh, p.q_token_stride, r * p.q_head_stride, dP,
              p.n_kv, per_head, first, gk + g0 * p.k_head_stride, p.k_token_stride, p.k_head_stride, nb);
      }
    }
  }
}

}  // namespace fathom::cuda

namespace fathom::cuda {

bool attention_gemm_forward_takes(const AttentionParams& p) {
  // F32 keys and values of their own (not MLA's latent cache, not a paged one), a long block of
  // queries (fewer are the fused kernel's), one head's scores within the limit
  return p.kv_dtype == DType::F32 && !p.block_table && !p.kv_len && p.k != p.v && p.n_q >= g_forward_min_queries &&
         p.n_q * p.n_kv * int64_t(sizeof(float)) <= g_scratch_limit;
}

void attention_forward_gemm(const AttentionParams& p, Stream stream) {
  FATHOM_CHECK(attention_gemm_forward_takes(p), "attention (GEMM path): not an F32 self-attention of ", p.n_q,
               " x ", p.n_kv, " that fits the scratch limit of ", g_scratch_limit, " bytes");
  if (p.n_kv == 0) return;
  const cudaStream_t cs = as_cuda(stream);
  const int64_t r = p.n_q_heads / p.n_kv_heads;
  const int64_t per_head = p.n_q * p.n_kv;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(p.n_kv_heads, g_scratch_limit / (per_head * 4)));
  StreamScratch scratch(size_t(chunk * per_head) * sizeof(float), cs, "attention (scores)");
  float* P = scratch.as<float>();
  const float* k = static_cast<const float*>(p.k);
  const float* v = static_cast<const float*>(p.v);
  for (int64_t g0 = 0; g0 < p.n_kv_heads; g0 += chunk) {
    const int64_t nb = std::min<int64_t>(chunk, p.n_kv_heads - g0);
    const float* kg = k + g0 * p.k_head_stride;
    const float* vg = v + g0 * p.v_head_stride;
    for (int64_t j = 0; j < r; ++j) {
      const int64_t h0 = g0 * r + j;
      // Sᵀ (n_kv × n_q) = s K_g Q_hᵀ, then P by rows
      sgemm(cs, CUBLAS_OP_T, CUBLAS_OP_N, p.n_kv, p.n_q, p.d_qk, p.scale, kg, p.k_token_stride, p.k_head_stride,
            p.q + h0 * p.q_head_stride, p.q_token_stride, r * p.q_head_stride, 0.0f, P, p.n_kv, per_head, nb);
      const int64_t rows = nb * p.n_q;
      const int warps = 8;
      launch_kernel(softmax_rows_kernel, warp_row_blocks(rows, warps), warps * 32, 0, cs, P, rows, p.n_q, p.n_kv,
                    p.q_pos0, p.causal);
      check_launch("attention (softmax)");
      // O_hᵀ (d_v × n_q) = V_gᵀ Pᵀ
      sgemm(cs, CUBLAS_OP_N, CUBLAS_OP_N, p.d_v, p.n_q, p.n_kv, 1.0f, vg, p.v_token_stride, p.v_head_stride, P, p.n_kv,
            per_head, 0.0f, p.out + h0 * p.out_head_stride, p.out_token_stride, r * p.out_head_stride, nb);
    }
  }
}

}  // namespace fathom::cuda
