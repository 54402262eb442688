// Attention's backward on the GPU (Ops::attention_backward; the CPU reference and its math are in
// src/ops/cpu/backward.cpp), F32, for n_seq sequences of equal length stacked row after row (a
// training batch): sequence b's queries, outputs and their gradients start at row b·n_q, its keys
// and values at row b·n_kv, its log-sum-exps at b·n_q·n_q_heads.
//
// Three ways, chosen by set_attention_backward_path (Auto by default: the GEMM path when one head's
// scores fit its scratch, else the tiled kernels), all deterministic (no atomics):
//
//  * GEMM (attention_gemm.cu): the scores materialized per sequence and head, the five
//    products as cuBLAS SGEMMs. Memory for speed; the default while T is a few thousand.
//  * tiled, FlashAttention-2's shape on CUDA cores, recomputing the probabilities instead of
//    storing them: a block of 256 threads owns a
//    tile of 32 queries (row pass) or 32 keys (key pass) of one head and walks the other side in
//    tiles of 32 staged through shared memory; each thread owns 4 entries of the 32×32 score tile
//    and 1/8 of the columns of its row's gradient. The row pass sweeps the keys twice: first the
//    online softmax and the output O (so D = dout·O needs no extra sweep), then dq. The key pass
//    sweeps the queries of each head of its KV group once for dk and dv. Sequences and heads are
//    grid dimensions, so one launch covers the whole batch. 2.1x the rows kernels' training step
//    at fathom-mini's shape on an H200 (bench/RESULTS.md, 2026-11-30); scripts/kernel-emu runs
//    them on the CPU for debugging.
//  * rows: a warp per (query, head) row and per (key, KV head), lanes over the dims, keys walked
//    one at a time with a warp reduction per dot product — the first, simple version.
//
// tests/test_cuda_backward.cpp (CudaBackward.Attention*) checks each against the CPU.
#include <cmath>

#include "core/error.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/device_util.cuh"

namespace fathom::cuda {
namespace {

// ---- the simple kernels (a warp per row), three passes without atomics:
//   row pass   (query i, head h), one warp: lse_ih and D_ih = Σ_j P_ij dP_ij (= dout_i · out_i),
//              then dq_i = scale Σ_j P_ij (dP_ij − D_ih) k_j;
//   key pass   (key j, KV head g), one warp: over the queries that see j and the heads of g,
//              dk_j = scale Σ dS_ij q_i and dv_j = Σ P_ij dout_i.
// A lane holds dims lane, lane + 32, ... of a row (up to kMaxD = 256).
constexpr int kMaxD = 256, kPer = kMaxD / 32;

struct AttnBwd {
  AttentionParams p;
  const float* dout;
  float *dq, *dk, *dv;
  float *lse, *delta;  // (n_q, n_q_heads)
};

__device__ inline int64_t visible_keys(const AttentionParams& p, int64_t i) {
  return p.causal ? min(max(p.q_pos0 + i + 1, int64_t(0)), p.n_kv) : p.n_kv;
}
__device__ inline void load_row(float (&r)[kPer], const float* src, int d) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int c = 0; c < kPer; ++c) r[c] = lane + 32 * c < d ? src[lane + 32 * c] : 0.f;
}
// The passes' results: the row pass writes dq of (query i, head h), its log-sum-exp and D; the key
// pass dk and dv of (key j, KV head g). A lane holds dims lane, lane + 32, ...
__device__ inline void store_row(float* dst, const float (&r)[kPer], int d) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int c = 0; c < kPer; ++c)
    if (lane + 32 * c < d) dst[lane + 32 * c] = r[c];
}
__device__ inline void write_row_results(const AttnBwd& a, int64_t i, int h, const float (&dq)[kPer], float lse,
                                         float delta) {
  const AttentionParams& p = a.p;
  store_row(a.dq + i * p.q_token_stride + int64_t(h) * p.q_head_stride, dq, p.d_qk);
  if (threadIdx.x % 32 == 0) {
    a.lse[i * p.n_q_heads + h] = lse;
    a.delta[i * p.n_q_heads + h] = delta;
  }
}
__device__ inline void write_key_results(const AttnBwd& a, int64_t j, int g, const float (&dk)[kPer],
                                         const float (&dv)[kPer]) {
  const AttentionParams& p = a.p;
  store_row(a.dk + j * p.k_token_stride + int64_t(g) * p.k_head_stride, dk, p.d_qk);
  store_row(a.dv + j * p.v_token_stride + int64_t(g) * p.v_head_stride, dv, p.d_v);
}
__device__ inline float dot_row(const float (&a)[kPer], const float* b, int d) {
  const int lane = threadIdx.x % 32;
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < kPer; ++c)
    if (lane + 32 * c < d) s += a[c] * b[lane + 32 * c];
  return warp_sum(s);
}

__global__ void attention_backward_rows_kernel(AttnBwd a) {
  pdl_wait();
  const AttentionParams& p = a.p;
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (row >= p.n_q * p.n_q_heads) return;
  const int64_t i = row / p.n_q_heads;
  const int h = int(row % p.n_q_heads), g = h / (p.n_q_heads / p.n_kv_heads);
  const float* K = static_cast<const float*>(p.k);
  const float* Vv = static_cast<const float*>(p.v);
  float q[kPer], go[kPer];
  load_row(q, p.q + i * p.q_token_stride + int64_t(h) * p.q_head_stride, p.d_qk);
  load_row(go, a.dout + i * p.out_token_stride + int64_t(h) * p.out_head_stride, p.d_v);
  const int64_t n = visible_keys(p, i);
  auto krow = [&](int64_t j) { return K + j * p.k_token_stride + int64_t(g) * p.k_head_stride; };
  auto vrow = [&](int64_t j) { return Vv + j * p.v_token_stride + int64_t(g) * p.v_head_stride; };
  float mx = -INFINITY, sum = 0.f;  // online softmax
  for (int64_t j = 0; j < n; ++j) {
    const float s = dot_row(q, krow(j), p.d_qk) * p.scale;
    const float m2 = fmaxf(mx, s);
    sum = sum * expf(mx - m2) + expf(s - m2);
    mx = m2;
  }
  const float lse = n > 0 ? mx + logf(sum) : 0.f;
  float delta = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float pj = expf(dot_row(q, krow(j), p.d_qk) * p.scale - lse);
    delta += pj * dot_row(go, vrow(j), p.d_v);
  }
  float dq[kPer] = {};
  for (int64_t j = 0; j < n; ++j) {
    const float* kj = krow(j);
    const float pj = expf(dot_row(q, kj, p.d_qk) * p.scale - lse);
    const float ds = pj * (dot_row(go, vrow(j), p.d_v) - delta) * p.scale;
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int c = 0; c < kPer; ++c)
      if (lane + 32 * c < p.d_qk) dq[c] += ds * kj[lane + 32 * c];
  }
  write_row_results(a, i, h, dq, lse, delta);
}

__global__ void attention_backward_keys_kernel(AttnBwd a) {
  pdl_wait();
  const AttentionParams& p = a.p;
  const int64_t item = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (item >= p.n_kv * p.n_kv_heads) return;
  const int64_t j = item / p.n_kv_heads;
  const int g = int(item % p.n_kv_heads), group = p.n_q_heads / p.n_kv_heads;
  float k[kPer], v[kPer];
  load_row(k, static_cast<const float*>(p.k) + j * p.k_token_stride + int64_t(g) * p.k_head_stride, p.d_qk);
  load_row(v, static_cast<const float*>(p.v) + j * p.v_token_stride + int64_t(g) * p.v_head_stride, p.d_v);
  float dk[kPer] = {}, dv[kPer] = {};
  const int lane = threadIdx.x % 32;
  // the queries that see key j: all, or (causal) those with q_pos0 + i >= j
  const int64_t i0 = p.causal ? max(int64_t(0), j - p.q_pos0) : 0;
  for (int64_t i = i0; i < p.n_q; ++i)
    for (int h = g * group; h < (g + 1) * group; ++h) {
      const int64_t row = i * p.n_q_heads + h;
      const float* qi = p.q + i * p.q_token_stride + int64_t(h) * p.q_head_stride;
      const float* goi = a.dout + i * p.out_token_stride + int64_t(h) * p.out_head_stride;
      const float pj = expf(dot_row(k, qi, p.d_qk) * p.scale - a.lse[row]);
      const float ds = pj * (dot_row(v, goi, p.d_v) - a.delta[row]) * p.scale;
#pragma unroll
      for (int c = 0; c < kPer; ++c) {
        if (lane + 32 * c < p.d_qk) dk[c] += ds * qi[lane + 32 * c];
        if (lane + 32 * c < p.d_v) dv[c] += pj * goi[lane + 32 * c];
      }
    }
  write_key_results(a, j, g, dk, dv);
}


// ---- the tiled kernels
constexpr int kTile = 32;                  // queries and keys per tile
constexpr int kSub = 8;                    // threads per tile row: 32 rows × 8 = 256 threads
constexpr int kTileThreads = kTile * kSub;
constexpr int kCols = kMaxD / kSub;        // gradient columns a thread may own (column sub + 8c)
constexpr int kPerRow = kTile / kSub;      // score-tile entries a thread owns (column sub + 8m)

// Shared-memory rows get an odd stride, so the 8 rows a warp reads at once fall in 8 banks.
__host__ __device__ inline int smem_stride(int d) { return d % 2 == 0 ? d + 1 : d; }

// Tile rows [r0, r0 + kTile) of a (rows, d) strided matrix into shared memory; rows past `n` as zeros.
__device__ inline void stage_tile(float* dst, int stride, const float* src, int64_t row_stride, int64_t r0, int64_t n,
                                  int d) {
  for (int e = threadIdx.x; e < kTile * d; e += blockDim.x) {
    const int r = e / d, c = e % d;
    dst[r * stride + c] = r0 + r < n ? src[(r0 + r) * row_stride + c] : 0.f;
  }
}
__device__ inline float dot_smem(const float* a, const float* b, int d) {
  float s = 0.f;
  for (int c = 0; c < d; ++c) s = fmaf(a[c], b[c], s);
  return s;
}
// Sum / max over the kSub threads of a tile row (adjacent lanes of one warp).
__device__ inline float row_sum(float v) {
#pragma unroll
  for (int off = 1; off < kSub; off <<= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}
__device__ inline float row_max(float v) {
#pragma unroll
  for (int off = 1; off < kSub; off <<= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}
// acc[c] (column sub + 8c of the thread's row) += Σ_x w[x] · M[x][sub + 8c] over the tile's 32 rows x.
__device__ inline void accumulate(float (&acc)[kCols], const float* w, const float* M, int stride, int d, int sub) {
  for (int x = 0; x < kTile; ++x) {
    const float wx = w[x];
    const float* m = M + x * stride;
#pragma unroll
    for (int c = 0; c < kCols; ++c)
      if (sub + kSub * c < d) acc[c] = fmaf(wx, m[sub + kSub * c], acc[c]);
  }
}
__device__ inline void store_cols(float* dst, const float (&acc)[kCols], int d, int sub) {
#pragma unroll
  for (int c = 0; c < kCols; ++c)
    if (sub + kSub * c < d) dst[sub + kSub * c] = acc[c];
}

size_t rows_tiled_smem(const AttentionParams& p) {
  return sizeof(float) * size_t(kTile) * (2 * smem_stride(p.d_qk) + 2 * smem_stride(p.d_v) + kTile + 1);
}
size_t keys_tiled_smem(const AttentionParams& p) {
  return sizeof(float) * size_t(kTile) * (2 * smem_stride(p.d_qk) + 2 * smem_stride(p.d_v) + 2 * (kTile + 1) + 2);
}

// grid (ceil(n_q / 32), n_q_heads, n_seq): dq, lse and D of 32 queries of one head.
__global__ void __launch_bounds__(kTileThreads) attention_backward_rows_tiled_kernel(AttnBwd a) {
  pdl_wait();
  extern __shared__ float sm[];
  const AttentionParams& p = a.p;
  const int sq = smem_stride(p.d_qk), sv = smem_stride(p.d_v);
  float* Qs = sm;                  // the block's queries
  float* Gs = Qs + kTile * sq;     // their output gradients
  float* Ks = Gs + kTile * sv;     // a tile of keys
  float* Vs = Ks + kTile * sq;     // and of values
  float* Ps = Vs + kTile * sv;     // probabilities (sweep 1) or dS (sweep 2), (kTile, kTile + 1)
  const int64_t b = blockIdx.z, i0 = int64_t(blockIdx.x) * kTile;
  const int h = blockIdx.y, g = h / (p.n_q_heads / p.n_kv_heads);
  const int r = threadIdx.x / kSub, sub = threadIdx.x % kSub;
  const float* Q = p.q + b * p.n_q * p.q_token_stride + int64_t(h) * p.q_head_stride;
  const float* G = a.dout + b * p.n_q * p.out_token_stride + int64_t(h) * p.out_head_stride;
  const float* K = static_cast<const float*>(p.k) + b * p.n_kv * p.k_token_stride + int64_t(g) * p.k_head_stride;
  const float* V = static_cast<const float*>(p.v) + b * p.n_kv * p.v_token_stride + int64_t(g) * p.v_head_stride;
  stage_tile(Qs, sq, Q, p.q_token_stride, i0, p.n_q, p.d_qk);
  stage_tile(Gs, sv, G, p.out_token_stride, i0, p.n_q, p.d_v);
  __syncthreads();  // (read below even when no key tile follows)
  const int64_t i = i0 + r;
  const int64_t mine = i < p.n_q ? visible_keys(p, i) : 0;  // keys this row sees
  const int64_t last = min(i0 + kTile, p.n_q) - 1;
  const int64_t span = visible_keys(p, last);               // keys any row of the tile sees
  const float* q = Qs + r * sq;
  const float* go = Gs + r * sv;
  float* prow = Ps + r * (kTile + 1);
  auto scores = [&](float (&s)[kPerRow], int64_t j0) {
#pragma unroll
    for (int m = 0; m < kPerRow; ++m) {
      const int x = sub + kSub * m;
      s[m] = j0 + x < mine ? dot_smem(q, Ks + x * sq, p.d_qk) * p.scale : -INFINITY;
    }
  };
  // sweep 1: online softmax and the output row O (unnormalised: o / l)
  float mx = -INFINITY, l = 0.f, o[kCols] = {};
  for (int64_t j0 = 0; j0 < span; j0 += kTile) {
    __syncthreads();  // the previous tile is no longer read
    stage_tile(Ks, sq, K, p.k_token_stride, j0, p.n_kv, p.d_qk);
    stage_tile(Vs, sv, V, p.v_token_stride, j0, p.n_kv, p.d_v);
    __syncthreads();
    float s[kPerRow];
    scores(s, j0);
    float tmax = fmaxf(fmaxf(s[0], s[1]), fmaxf(s[2], s[3]));
    const float mnew = fmaxf(mx, row_max(tmax));
    const float alpha = mnew == -INFINITY ? 1.f : expf(mx - mnew);
    float psum = 0.f;
#pragma unroll
    for (int m = 0; m < kPerRow; ++m) {
      const float pm = s[m] == -INFINITY ? 0.f : expf(s[m] - mnew);
      prow[sub + kSub * m] = pm;
      psum += pm;
    }
    l = l * alpha + row_sum(psum);
    mx = mnew;
#pragma unroll
    for (int c = 0; c < kCols; ++c) o[c] *= alpha;
    __syncwarp();
    accumulate(o, prow, Vs, sv, p.d_v, sub);
  }
  const float lse = l > 0.f ? mx + logf(l) : 0.f;
  float dsum = 0.f;
#pragma unroll
  for (int c = 0; c < kCols; ++c)
    if (sub + kSub * c < p.d_v) dsum += go[sub + kSub * c] * o[c];
  // every lane sums (the shuffle names the whole warp; a warp's rows past n_q have l = 0 and would
  // otherwise skip it and hang the others)
  const float dsum_row = row_sum(dsum);
  const float delta = l > 0.f ? dsum_row / l : 0.f;
  // sweep 2: dq = scale Σ_j P_ij (dP_ij − D_i) k_j
  float dq[kCols] = {};
  for (int64_t j0 = 0; j0 < span; j0 += kTile) {
    __syncthreads();
    stage_tile(Ks, sq, K, p.k_token_stride, j0, p.n_kv, p.d_qk);
    stage_tile(Vs, sv, V, p.v_token_stride, j0, p.n_kv, p.d_v);
    __syncthreads();
    float s[kPerRow];
    scores(s, j0);
#pragma unroll
    for (int m = 0; m < kPerRow; ++m) {
      const int x = sub + kSub * m;
      const float pm = s[m] == -INFINITY ? 0.f : expf(s[m] - lse);
      const float dp = pm != 0.f ? dot_smem(go, Vs + x * sv, p.d_v) : 0.f;
      prow[x] = pm * (dp - delta) * p.scale;
    }
    __syncwarp();
    accumulate(dq, prow, Ks, sq, p.d_qk, sub);
  }
  if (i >= p.n_q) return;
  const int64_t row = b * p.n_q + i;
  store_cols(a.dq + row * p.q_token_stride + int64_t(h) * p.q_head_stride, dq, p.d_qk, sub);
  if (sub == 0) {
    a.lse[row * p.n_q_heads + h] = lse;
    a.delta[row * p.n_q_heads + h] = delta;
  }
}

// grid (ceil(n_kv / 32), n_kv_heads, n_seq): dk and dv of 32 keys of one KV head, over the queries
// that see them and the query heads of the group.
__global__ void __launch_bounds__(kTileThreads) attention_backward_keys_tiled_kernel(AttnBwd a) {
  pdl_wait();
  extern __shared__ float sm[];
  const AttentionParams& p = a.p;
  const int sq = smem_stride(p.d_qk), sv = smem_stride(p.d_v);
  float* Ks = sm;                  // the block's keys
  float* Vs = Ks + kTile * sq;     // and values
  float* Qs = Vs + kTile * sv;     // a tile of queries
  float* Gs = Qs + kTile * sq;     // their output gradients
  float* Ps = Gs + kTile * sv;     // P, (kTile keys, kTile + 1)
  float* Ds = Ps + kTile * (kTile + 1);  // dS
  float* Ls = Ds + kTile * (kTile + 1);  // the query tile's log-sum-exps
  float* Es = Ls + kTile;                // and D
  const int64_t b = blockIdx.z, j0 = int64_t(blockIdx.x) * kTile;
  const int g = blockIdx.y, group = p.n_q_heads / p.n_kv_heads;
  const int r = threadIdx.x / kSub, sub = threadIdx.x % kSub;
  stage_tile(Ks, sq, static_cast<const float*>(p.k) + b * p.n_kv * p.k_token_stride + int64_t(g) * p.k_head_stride,
             p.k_token_stride, j0, p.n_kv, p.d_qk);
  stage_tile(Vs, sv, static_cast<const float*>(p.v) + b * p.n_kv * p.v_token_stride + int64_t(g) * p.v_head_stride,
             p.v_token_stride, j0, p.n_kv, p.d_v);
  const int64_t j = j0 + r;
  const float* k = Ks + r * sq;
  const float* v = Vs + r * sv;
  float* prow = Ps + r * (kTile + 1);
  float* drow = Ds + r * (kTile + 1);
  // the first query that sees a key of the tile: all, or (causal) q_pos0 + i >= j0
  const int64_t first = p.causal ? max(int64_t(0), j0 - p.q_pos0) : 0;
  float dk[kCols] = {}, dv[kCols] = {};
  for (int h = g * group; h < (g + 1) * group; ++h) {
    const float* Q = p.q + b * p.n_q * p.q_token_stride + int64_t(h) * p.q_head_stride;
    const float* G = a.dout + b * p.n_q * p.out_token_stride + int64_t(h) * p.out_head_stride;
    for (int64_t i0 = first; i0 < p.n_q; i0 += kTile) {
      __syncthreads();
      stage_tile(Qs, sq, Q, p.q_token_stride, i0, p.n_q, p.d_qk);
      stage_tile(Gs, sv, G, p.out_token_stride, i0, p.n_q, p.d_v);
      if (threadIdx.x < kTile) {
        const int64_t i = i0 + threadIdx.x;
        const int64_t row = (b * p.n_q + i) * p.n_q_heads + h;
        Ls[threadIdx.x] = i < p.n_q ? a.lse[row] : 0.f;
        Es[threadIdx.x] = i < p.n_q ? a.delta[row] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int m = 0; m < kPerRow; ++m) {
        const int x = sub + kSub * m;
        const int64_t i = i0 + x;
        const bool seen = j < p.n_kv && i < p.n_q && (!p.causal || p.q_pos0 + i >= j);
        float pm = 0.f, ds = 0.f;
        if (seen) {
          pm = expf(dot_smem(k, Qs + x * sq, p.d_qk) * p.scale - Ls[x]);
          ds = pm * (dot_smem(v, Gs + x * sv, p.d_v) - Es[x]) * p.scale;
        }
        prow[x] = pm;
        drow[x] = ds;
      }
      __syncwarp();
      accumulate(dv, prow, Gs, sv, p.d_v, sub);
      accumulate(dk, drow, Qs, sq, p.d_qk, sub);
    }
  }
  if (j >= p.n_kv) return;
  const int64_t row = b * p.n_kv + j;
  store_cols(a.dk + row * p.k_token_stride + int64_t(g) * p.k_head_stride, dk, p.d_qk, sub);
  store_cols(a.dv + row * p.v_token_stride + int64_t(g) * p.v_head_stride, dv, p.d_v, sub);
}

AttentionBackwardPath g_path = AttentionBackwardPath::Auto;

}  // namespace

void set_attention_backward_path(AttentionBackwardPath path) { g_path = path; }

void attention_backward(float* dq, float* dk, float* dv, const float* dout, const AttentionParams& p, int64_t n_seq,
                        Stream stream) {
  FATHOM_CHECK(p.kv_dtype == DType::F32 && !p.block_table && !p.kv_len && p.k != p.v, "attention_backward: F32 keys "
               "and values in separate buffers, without a block table or device key count (the training layout).");
  FATHOM_CHECK(p.n_kv_heads > 0 && p.n_q_heads % p.n_kv_heads == 0 && p.d_qk > 0 && p.d_qk <= kMaxD && p.d_v > 0 &&
                   p.d_v <= kMaxD,
               "attention_backward: ", p.n_q_heads, " query heads over ", p.n_kv_heads, " KV heads, d_qk ", p.d_qk,
               ", d_v ", p.d_v, " (the CUDA op takes head dims up to ", kMaxD, ").");
  FATHOM_CHECK(n_seq >= 1 && n_seq < 65536 && p.n_q_heads < 65536, "attention_backward: ", n_seq, " sequences of ",
               p.n_q_heads, " heads (at most 65535 of each).");
  FATHOM_ASSERT(dq && dk && dv && dout && p.q && p.k && p.v, "attention_backward with a null pointer");
  if (g_path == AttentionBackwardPath::Flash || (g_path == AttentionBackwardPath::Auto && train_flash_takes(p, n_seq))) {
    attention_backward_train_flash(dq, dk, dv, dout, p, n_seq, stream);
    return;
  }
  if (g_path == AttentionBackwardPath::Gemm || (g_path == AttentionBackwardPath::Auto && attention_backward_gemm_fits(p))) {
    attention_backward_gemm(dq, dk, dv, dout, p, n_seq, stream);
    return;
  }
  const int64_t rows = p.n_q * p.n_q_heads, keys = p.n_kv * p.n_kv_heads;
  StreamScratch stats(size_t(std::max<int64_t>(rows * n_seq, 1)) * 2 * sizeof(float), as_cuda(stream),
                      "attention_backward");
  float* lse = stats.as<float>();
  float* delta = lse + rows * n_seq;
  if (g_path != AttentionBackwardPath::Rows) {
    // More than 48 KiB of shared memory from head dims of ~96 up: allowed up to the widest heads'
    // need, on each call (the setting is per device, and the same value every time).
    AttentionParams widest;
    widest.d_qk = widest.d_v = kMaxD;
    check(cudaFuncSetAttribute(attention_backward_rows_tiled_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               int(rows_tiled_smem(widest))),
          "attention_backward (shared memory)");
    check(cudaFuncSetAttribute(attention_backward_keys_tiled_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               int(keys_tiled_smem(widest))),
          "attention_backward (shared memory)");
    const AttnBwd a{p, dout, dq, dk, dv, lse, delta};
    if (rows > 0) {
      const dim3 grid(unsigned((p.n_q + kTile - 1) / kTile), unsigned(p.n_q_heads), unsigned(n_seq));
      launch_kernel(attention_backward_rows_tiled_kernel, grid, kTileThreads, rows_tiled_smem(p), as_cuda(stream), a);
      check_launch("attention_backward (rows)");
    }
    if (keys > 0) {
      const dim3 grid(unsigned((p.n_kv + kTile - 1) / kTile), unsigned(p.n_kv_heads), unsigned(n_seq));
      launch_kernel(attention_backward_keys_tiled_kernel, grid, kTileThreads, keys_tiled_smem(p), as_cuda(stream), a);
      check_launch("attention_backward (keys)");
    }
    return;
  }
  const int threads = 256, warps = threads / 32;
  for (int64_t b = 0; b < n_seq; ++b) {  // the simple kernels: one sequence per launch
    const AttnBwd a{sequence_of(p, b), dout + b * p.n_q * p.out_token_stride, dq + b * p.n_q * p.q_token_stride,
                    dk + b * p.n_kv * p.k_token_stride, dv + b * p.n_kv * p.v_token_stride, lse + b * rows,
                    delta + b * rows};
    if (rows > 0) {
      launch_kernel(attention_backward_rows_kernel, grid_blocks(rows, warps), threads, 0, as_cuda(stream), a);
      check_launch("attention_backward (rows)");
    }
    if (keys > 0) {
      launch_kernel(attention_backward_keys_kernel, grid_blocks(keys, warps), threads, 0, as_cuda(stream), a);
      check_launch("attention_backward (keys)");
    }
  }
}

}  // namespace fathom::cuda
