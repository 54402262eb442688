// The kernels built on the tensor-core GEMV core (mma_gemv.cuh), as the work of one block: the
// .cu files wrap each in a __global__ kernel (grid, programmatic-launch wait, L2 prefetches,
// shared memory), and scripts/kernel-emu/mma_gemv_emu.cpp runs the same bodies on the CPU
// against a double reference (the KernelEmu.MmaGemv test). Also the row bookkeeping the expert
// kernels share (hidden_row, gate_up_unit; the grouped path's ExpertRouting).
#pragma once
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/mma_gemv.cuh"
#ifndef FATHOM_KERNEL_EMU
#include "ops/cuda/gemv.cuh"  // norm_scale
#endif

namespace fathom::cuda {

// This thread's rows of the 16-row tile from row r0 of an (N, K) weight w (bytes): rows r0 + g
// and r0 + g + 8 (null past N) and, for FP8, their rows of the block scales.
template <DType D>
__device__ inline MmaRows weight_tile_rows(const uint8_t* w, const float* scale, int64_t r0, int64_t N, int64_t K,
                                           int64_t block) {
  constexpr int E = ElemSize<D>::value;
  const int g = (threadIdx.x % 32) / 4;
  const int64_t kb = ceil_div(K, block);
  MmaRows rows;
  if (r0 + g < N) {
    rows.a = w + (r0 + g) * K * E;
    if (D == DType::F8_E4M3) rows.sa = scale + (r0 + g) / block * kb;
  }
  if (r0 + g + 8 < N) {
    rows.b = w + (r0 + g + 8) * K * E;
    if (D == DType::F8_E4M3) rows.sb = scale + (r0 + g + 8) / block * kb;
  }
  return rows;
}

// The rows of h: the routed (token, slot) pairs (pairs, inter), then with has_shared one row
// per token for the shared expert (T, shared_inter).
struct HiddenRow {
  int64_t t, inter, offset;  // token, row length, offset of the row in h
  bool shared;
};
__device__ inline HiddenRow hidden_row(const MoeExpertsParams& p, int64_t pair) {
  const int64_t routed = p.n_tokens * p.top_k;
  if (pair < routed) return {pair / p.top_k, p.inter, pair * p.inter, false};
  return {pair - routed, p.shared_inter, routed * p.inter + (pair - routed) * p.shared_inter, true};
}

// The block's h row and its rows n0 .. n0+R-1: the grid is one flat list of R-row units, the
// shared expert's first (its weights are known before the router finishes, so their blocks
// start streaming first), then every routed pair's. No block is idle, whatever the two row
// lengths.
struct GateUpUnit {
  int64_t pair, n0;
};
template <int R>
__device__ inline GateUpUnit gate_up_unit(const MoeExpertsParams& p, int64_t b) {
  const int64_t routed = p.n_tokens * p.top_k;
  if (p.has_shared) {
    const int64_t per = ceil_div(p.shared_inter, R);
    if (b < p.n_tokens * per) return {routed + b / per, b % per * R};
    b -= p.n_tokens * per;
  }
  const int64_t per = ceil_div(p.inter, R);
  return {b / per, b % per * R};
}

// The grouped path's routing (moe_grouped.cu's moe_route_kernel writes it): pairs sorted by expert
// into rows, tiles of one expert's rows.
struct ExpertRouting {
  int32_t* token_of_row;  // (pairs): token of each sorted row
  int32_t* row_of_pair;   // (pairs): sorted row of each pair; -1 for an invalid expert id
  int32_t* tile_expert;   // (max_tiles)
  int32_t* tile_begin;    // (max_tiles): first sorted row of the tile
  int32_t* tile_end;      // (max_tiles): end of the expert's rows
  int32_t* n_tiles;       // (1)
};

// The grouped path's shared expert (MoeExpertsParams::has_shared there): shared_inter / inter
// pieces of inter rows (gate, up) and inter columns (down), piece k a pseudo-expert
// n_experts + k that every token uses with weight 1. Its rows of h and y follow every routed
// pair's, piece-major in token order: row n_tokens * top_k + k * n_tokens + t.
__host__ __device__ inline int64_t shared_pieces(const MoeExpertsParams& p) {
  return p.has_shared ? p.shared_inter / p.inter : 0;
}
__device__ inline int64_t grouped_shared_row(const MoeExpertsParams& p, int64_t k, int64_t t) {
  return p.n_tokens * p.top_k + k * p.n_tokens + t;
}
// Expert e's gate and up for a grouped tile: a routed expert's table entry, or shared piece
// e - n_experts (rows k * inter on; FP8 scales of whole blocks, inter % block == 0).
template <DType D>
__device__ inline ExpertPointers grouped_gate_up_expert(const MoeExpertsParams& p, int e) {
  if (e < p.n_experts) return p.table[e];
  constexpr int E = ElemSize<D>::value;
  const int64_t first = int64_t(e - p.n_experts) * p.inter;  // the piece's first row
  ExpertPointers ep = p.shared;
  ep.gate = static_cast<const uint8_t*>(ep.gate) + first * p.hidden * E;
  ep.up = static_cast<const uint8_t*>(ep.up) + first * p.hidden * E;
  if (D == DType::F8_E4M3) {
    const int64_t kb = ceil_div(p.hidden, p.block);
    ep.gate_scale += first / p.block * kb;
    ep.up_scale += first / p.block * kb;
  }
  return ep;
}
// This thread's down rows for a grouped tile of expert e from output column w0: a routed
// expert's (inter columns per row), or shared piece e - n_experts's columns of the shared down
// weight (shared_inter per row).
template <DType D>
__device__ inline MmaRows grouped_down_rows(const MoeExpertsParams& p, int e, int64_t w0) {
  if (e < p.n_experts) {
    const ExpertPointers& ep = p.table[e];
    return weight_tile_rows<D>(static_cast<const uint8_t*>(ep.down), ep.down_scale, w0, p.hidden, p.inter, p.block);
  }
  constexpr int E = ElemSize<D>::value;
  const int64_t col = int64_t(e - p.n_experts) * p.inter;  // the piece's first column
  MmaRows rows = weight_tile_rows<D>(static_cast<const uint8_t*>(p.shared.down), p.shared.down_scale, w0, p.hidden,
                                     p.shared_inter, p.block);
  if (rows.a) rows.a += col * E;
  if (rows.b) rows.b += col * E;
  if (D == DType::F8_E4M3) {
    if (rows.sa) rows.sa += col / p.block;
    if (rows.sb) rows.sb += col / p.block;
  }
  return rows;
}
// moe_combine_kernel's columns d .. d + V - 1 of token t (V 4: 16-byte aligned rows, float4s):
// Σ_k weights[t, k] · y[row_of_pair[t, k]] in slot order, then the shared expert's pieces
// (has_shared), added to out with accumulate. The loads of kAhead slots are in flight together.
template <int V>
__device__ inline void moe_combine_one(const MoeExpertsParams& p, const ExpertRouting& r, const float* y, int64_t t,
                                       int64_t d) {
  static_assert(V == 1 || V == 4, "columns one or four at a time");
  constexpr int kAhead = 8;
  auto load = [&](int64_t row, float (&v)[V]) {
    if constexpr (V == 4) {
      const float4 f = __ldg(reinterpret_cast<const float4*>(y + row * p.hidden + d));
      v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
    } else {
      v[0] = __ldg(y + row * p.hidden + d);
    }
  };
  float acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.f;
  for (int k0 = 0; k0 < p.top_k; k0 += kAhead) {
    float w[kAhead], v[kAhead][V];
#pragma unroll
    for (int q = 0; q < kAhead; ++q) {
      const int64_t pair = t * p.top_k + k0 + q;
      const int row = k0 + q < p.top_k ? r.row_of_pair[pair] : -1;
      w[q] = 0.f;
#pragma unroll
      for (int i = 0; i < V; ++i) v[q][i] = 0.f;
      if (row >= 0) w[q] = p.weights[pair], load(row, v[q]);
    }
#pragma unroll
    for (int q = 0; q < kAhead; ++q)
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += w[q] * v[q][i];
  }
  const int64_t pieces = shared_pieces(p);  // the shared expert's (has_shared)
  for (int64_t k = 0; k < pieces; ++k) {
    float v[V];
    load(grouped_shared_row(p, k, t), v);
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] += v[i];
  }
  float* o = p.out + t * p.hidden + d;
#pragma unroll
  for (int i = 0; i < V; ++i) o[i] = p.accumulate ? o[i] + acc[i] : acc[i];
}

// A gate-and-up tile's rows for this thread: gate row n0 + g as tile row g and up row n0 + g as
// tile row g + 8 (none past inter), so that each C fragment holds a gate value beside its up value.
template <DType D>
__device__ inline MmaRows gate_up_tile_rows(const ExpertPointers& ep, int64_t n0, int64_t inter,
                                            const MoeExpertsParams& p) {
  constexpr int E = ElemSize<D>::value;
  const int g = (threadIdx.x % 32) / 4;
  MmaRows rows;
  if (n0 + g < inter) {
    const int64_t kb = ceil_div(p.hidden, p.block);
    rows.a = static_cast<const uint8_t*>(ep.gate) + (n0 + g) * p.hidden * E;
    rows.b = static_cast<const uint8_t*>(ep.up) + (n0 + g) * p.hidden * E;
    if (D == DType::F8_E4M3) {
      rows.sa = ep.gate_scale + (n0 + g) / p.block * kb;
      rows.sb = ep.up_scale + (n0 + g) / p.block * kb;
    }
  }
  return rows;
}

// The dense GEMV (matmul.cu's mma_gemv_kernel): output rows n0 .. n0+15 of batch entry b of p,
// all M rows of x; w is the batch entry's weight.
template <DType D, bool NORM>
__device__ inline void mma_dense_block(const MatmulParams& p, const uint8_t* w, int b, int64_t n0, int M, int chunk,
                                       bool vec_x, const MmaShared& sh) {
  const MmaRows rows = weight_tile_rows<D>(w, p.scale_inv, n0, p.N, p.K, p.block);
  const float* x = p.x + b * p.x_batch_stride;
  float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
  mma_rows_product<D, NORM>(
      acc, sh, [&](int) { return rows; }, [](int) { return -1; }, 1, [&](int m) { return x + m * p.ldx; }, M, p.K,
      p.block, chunk, p.norm, vec_x);
  mma_block_reduce<NORM>(acc, sh);
  float* out = p.out + b * p.out_batch_stride;
  const int i = threadIdx.x, r = i / kMmaMaxRows, m = i % kMmaMaxRows;
  if (i < 16 * kMmaMaxRows && m < M && n0 + r < p.N) {
    float v = sh.red[i];
    if constexpr (NORM) v *= norm_scale(sh.ss[m], p.K, p.eps);
    float* o = out + m * p.ldo + n0 + r;
    *o = p.accumulate ? *o + v : v;
  }
}

// The per-token experts' gate and up (moe.cu's mma_expert_gate_up_kernel): the block of 8-row
// unit `unit` (gate_up_unit<8>), its 16 rows the unit's 8 gate rows and 8 up rows, x the pair's
// token; h[pair][n0 + r] = silu(gate) * up.
template <DType D, bool NORM>
__device__ inline void mma_expert_gate_up_block(const MoeExpertsParams& p, float* __restrict__ h, GateUpUnit unit,
                                                int chunk, bool vec_x, const MmaShared& sh) {
  const HiddenRow hr = hidden_row(p, unit.pair);
  const int64_t n0 = unit.n0;
  float* hp = h + hr.offset;
  const int e = hr.shared ? 0 : p.experts ? p.experts[unit.pair] : 0;
  if (e < 0 || e >= p.n_experts) {  // not a valid id (moe_gate never makes one): contributes nothing
    if (threadIdx.x < 8 && n0 + threadIdx.x < hr.inter) hp[n0 + threadIdx.x] = 0.f;
    return;
  }
  const MmaRows rows = gate_up_tile_rows<D>(hr.shared ? p.shared : p.table[e], n0, hr.inter, p);
  const float* x = p.x + hr.t * p.hidden;
  float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
  mma_rows_product<D, NORM>(
      acc, sh, [&](int) { return rows; }, [](int) { return -1; }, 1, [&](int) { return x; }, 1, p.hidden, p.block,
      chunk, p.norm, vec_x);
  mma_block_reduce<NORM>(acc, sh);
  const int r = threadIdx.x;
  if (r < 8 && n0 + r < hr.inter) {
    const float sc = NORM ? norm_scale(sh.ss[0], p.hidden, p.eps) : 1.f;
    const float gv = sh.red[r * kMmaMaxRows] * sc, uv = sh.red[(r + 8) * kMmaMaxRows] * sc;
    hp[n0 + r] = gv / (1.f + expf(-gv)) * uv;
  }
}

// The per-token experts' down (moe.cu's mma_expert_down_kernel): rows n0 .. n0+15 of token t's
// output. The block's jobs are the token's slots, each the 16 down rows of its expert on its own
// h row (x row j for slot j), the shared expert split into pieces of inter columns; the slots'
// sums are weighted and added in slot order (deterministic).
template <DType D>
__device__ inline void mma_expert_down_block(const MoeExpertsParams& p, const float* __restrict__ h, int64_t t,
                                             int64_t n0, int chunk, const MmaShared& sh) {
  constexpr int E = ElemSize<D>::value;
  const int pieces = int(shared_pieces(p));
  const int jobs = p.top_k + pieces;
  const int g = (threadIdx.x % 32) / 4;
  const int64_t kb_routed = ceil_div(p.inter, p.block), kb_shared = ceil_div(p.shared_inter, p.block);
  auto rows_of = [&](int j) {
    MmaRows r;
    const bool shared = j >= p.top_k;
    const int e = shared ? 0 : p.experts ? p.experts[t * p.top_k + j] : 0;
    if (!shared && (e < 0 || e >= p.n_experts)) return r;  // an invalid id: zeros
    const ExpertPointers& ep = shared ? p.shared : p.table[e];
    const int64_t K = shared ? p.shared_inter : p.inter, kb = shared ? kb_shared : kb_routed;
    const int64_t col = shared ? (j - p.top_k) * p.inter : 0;  // the piece's first column
    const uint8_t* w = static_cast<const uint8_t*>(ep.down);
    if (n0 + g < p.hidden) {
      r.a = w + ((n0 + g) * K + col) * E;
      if (D == DType::F8_E4M3) r.sa = ep.down_scale + (n0 + g) / p.block * kb + col / p.block;
    }
    if (n0 + g + 8 < p.hidden) {
      r.b = w + ((n0 + g + 8) * K + col) * E;
      if (D == DType::F8_E4M3) r.sb = ep.down_scale + (n0 + g + 8) / p.block * kb + col / p.block;
    }
    return r;
  };
  auto xrow = [&](int j) {
    if (j < p.top_k) return h + hidden_row(p, t * p.top_k + j).offset;
    return h + hidden_row(p, p.n_tokens * p.top_k + t).offset + (j - p.top_k) * p.inter;
  };
  float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
  mma_rows_product<D, false>(acc, sh, rows_of, [](int j) { return j; }, jobs, xrow, jobs, p.inter, p.block, chunk,
                             nullptr, p.inter % 4 == 0);
  mma_block_reduce<false>(acc, sh);
  const int r = threadIdx.x;
  if (r < 16 && n0 + r < p.hidden) {
    float v = 0.f;
    for (int j = 0; j < jobs; ++j) {
      const float wt = j < p.top_k && p.weights ? p.weights[t * p.top_k + j] : 1.f;
      v += wt * sh.red[r * kMmaMaxRows + j];
    }
    float* o = p.out + t * p.hidden + n0 + r;
    *o = p.accumulate ? *o + v : v;
  }
}

// The grouped experts' gate and up over one tile of at most 8 rows of one expert (moe_grouped.cu's
// mma_gate_up_kernel), in warp tiles (mma_warp_tile_product): the block takes inter rows n0 ..
// n0 + 8 * kMmaWarps - 1, warp w the 8 from n0 + 8w as its 16 tile rows — those 8 gate rows, then
// the same 8 up rows — so that each thread's C fragment holds a gate value beside its up value.
template <DType D, bool kAhead = true>
__device__ inline void mma_grouped_gate_up_block(const MoeExpertsParams& p, const ExpertRouting& r, float* __restrict__ h,
                                                 int tile, int64_t n0, int chunk, bool vec_x, const MmaShared& sh) {
  const int64_t begin = r.tile_begin[tile];
  const int M = int(min(int64_t(kMmaMaxRows), r.tile_end[tile] - begin));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tig = lane % 4;
  const int64_t w0 = n0 + int64_t(warp) * 8;
  const MmaRows rows = gate_up_tile_rows<D>(grouped_gate_up_expert<D>(p, r.tile_expert[tile]), w0, p.inter, p);
  const int32_t* token = r.token_of_row + begin;
  float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
  mma_warp_tile_product<D, 1, false, kAhead>(acc, sh, rows, [&](int m) { return p.x + int64_t(token[m]) * p.hidden; }, M, 0,
                              p.hidden, p.block, chunk, vec_x);
  // acc: gate of row w0 + g in [0], [1] and its up in [2], [3], for x rows 2 tig and 2 tig + 1
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int m = 2 * tig + j;
    const float gv = acc[0][j], uv = acc[0][2 + j];
    if (m < M && w0 + g < p.inter) h[(begin + m) * p.inter + w0 + g] = gv / (1.f + expf(-gv)) * uv;
  }
}

// The grouped experts' down over one tile (moe_grouped.cu's mma_down_kernel), in warp tiles: the
// block takes output columns n0 .. n0 + 16 * kMmaWarps - 1, warp w the 16 from n0 + 16w.
template <DType D, bool kAhead = true>
__device__ inline void mma_grouped_down_block(const MoeExpertsParams& p, const ExpertRouting& r,
                                              const float* __restrict__ h, float* __restrict__ y, int tile, int64_t n0,
                                              int chunk, const MmaShared& sh) {
  const int64_t begin = r.tile_begin[tile];
  const int M = int(min(int64_t(kMmaMaxRows), r.tile_end[tile] - begin));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tig = lane % 4;
  const int64_t w0 = n0 + int64_t(warp) * 16;
  const MmaRows rows = grouped_down_rows<D>(p, r.tile_expert[tile], w0);
  float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
  mma_warp_tile_product<D, 1, false, kAhead>(acc, sh, rows, [&](int m) { return h + (begin + m) * p.inter; }, M, 0, p.inter,
                              p.block, chunk, p.inter % 4 == 0);
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int m = 2 * tig + j;
    if (m >= M) continue;
    float* out = y + (begin + m) * p.hidden;
    if (w0 + g < p.hidden) out[w0 + g] = acc[0][j];
    if (w0 + g + 8 < p.hidden) out[w0 + g + 8] = acc[0][2 + j];
  }
}

// The 3-to-128-row matmul (FP8: 2; matmul.cu's mma_skinny_kernel): weight rows in blocks of
// kSkinnyRows (warp w the 16 from 16w), all M <= 8 NT x rows, K in slices across blocks. With
// one slice a block writes out itself; else each block writes its partial sums (and the first row
// block, NORM, the rows' sums of squares over its slice) for skinny_reduce_kernel, which adds the
// slices up in slice order (deterministic). NORM: x's rows RMS-normalised (times p.norm) first —
// the norm factor scales a row's products, so the sums are of x·g and the factor comes from the
// summed squares at the end.
constexpr int kSkinnyRows = 16 * kMmaWarps;
struct SkinnySlices {
  int slices = 1;
  int64_t slice = 0;         // columns per slice (whole units)
  float* part = nullptr;     // (slices, batch, M, N): each slice's sums
  float* part_ss = nullptr;  // (slices, M): NORM, each slice's sums of squares of x's rows
};
// x for the skinny form: columns [k0, k0 + units * kMmaUnit) (zeros from k_end) of the 8 NT x
// rows (zeros from M) staged as mma_stage_x does, but warp w takes rows w, w + 8, ... whole, so
// no index is divided and NORM's squares of a row stay in one warp's registers (ss[j]: this
// lane's share of row w + 8j, summed over the warp by the caller). The NT loads of a unit are in
// flight together (x was just written by the kernel before: each is an L2 round trip).
template <DType D, int NT, bool NORM>
__device__ inline void skinny_stage_x(const MmaShared& sh, const MatmulParams& p, const float* x, int64_t k0,
                                      int units, int chunk_units, int64_t k_end, bool vec, float (&ss)[NT]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int M = int(p.M), stride = chunk_units * kMmaUnit + kMmaPad;
  for (int u = 0; u < units; ++u) {
    const int64_t k = k0 + int64_t(u) * kMmaUnit + lane * 4;
    const bool in = k < k_end;  // K % 16 == 0: four columns are all in or all out
    float v[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int m = warp + 8 * j;
      v[j][0] = v[j][1] = v[j][2] = v[j][3] = 0.f;
      if (in && m < M) {
        const float* src = x + m * p.ldx + k;
        if (vec) {
          const float4 f = __ldg(reinterpret_cast<const float4*>(src));
          v[j][0] = f.x, v[j][1] = f.y, v[j][2] = f.z, v[j][3] = f.w;
        } else {
#pragma unroll
          for (int i = 0; i < 4; ++i) v[j][i] = __ldg(src + i);
        }
      }
    }
    float gk[4] = {1.f, 1.f, 1.f, 1.f};
    if (NORM && in)
#pragma unroll
      for (int i = 0; i < 4; ++i) gk[i] = __ldg(p.norm + k + i);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int m = warp + 8 * j;
      if constexpr (NORM) {
#pragma unroll
        for (int i = 0; i < 4; ++i) ss[j] += v[j][i] * v[j][i], v[j][i] *= gk[i];
      }
      uint16_t hi[4], lo[4];
      if constexpr (MmaTraits<D>::kBf16) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const __nv_bfloat16 h = __float2bfloat16_rn(v[j][i]);
          const __nv_bfloat16 l = __float2bfloat16_rn(v[j][i] - __bfloat162float(h));
          hi[i] = *reinterpret_cast<const uint16_t*>(&h), lo[i] = *reinterpret_cast<const uint16_t*>(&l);
        }
      } else {
        // as mma_stage_x: the unit's largest |x| of the row scaled into [2^14, 2^15)
        const float amax =
            warp_max(fmaxf(fmaxf(fabsf(v[j][0]), fabsf(v[j][1])), fmaxf(fabsf(v[j][2]), fabsf(v[j][3]))));
        const int e = int((__float_as_uint(amax) >> 23) & 0xff) - 127;
        const int s = min(14 - e, 126);
        const float scale = __uint_as_float(uint32_t(127 + s) << 23);
        if (lane == 0) sh.xscale[m * chunk_units + u] = __uint_as_float(uint32_t(127 - s) << 23);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float y = v[j][i] * scale;
          const __half h = __float2half_rn(y);
          const __half l = __float2half_rn(y - __half2float(h));
          hi[i] = *reinterpret_cast<const uint16_t*>(&h), lo[i] = *reinterpret_cast<const uint16_t*>(&l);
        }
      }
      uint16_t* dst = sh.x + (m * 2) * stride + u * kMmaUnit + lane * 4;
      *reinterpret_cast<uint2*>(dst) = make_uint2(hi[0] | uint32_t(hi[1]) << 16, hi[2] | uint32_t(hi[3]) << 16);
      *reinterpret_cast<uint2*>(dst + stride) = make_uint2(lo[0] | uint32_t(lo[1]) << 16, lo[2] | uint32_t(lo[3]) << 16);
    }
  }
}

// One unit of this thread's two weight rows (pa, pb: the rows' bytes from this thread's first
// piece) at column kc: whole units without a bound check, the last partial one with.
template <DType D>
__device__ inline void skinny_load_unit(MmaUnitW<D>& w, const uint8_t* pa, const uint8_t* pb, int64_t kc,
                                        int64_t k_end) {
  using T = MmaTraits<D>;
  const int64_t off = kc * T::E;
  if (kc + kMmaUnit <= k_end) {
#pragma unroll
    for (int i = 0; i < T::kPieces; ++i) {
      w.a[i] = load16_stream(pa + off + i * 64);
      w.b[i] = load16_stream(pb + off + i * 64);
    }
  } else {
    const int64_t left = (k_end - kc) * T::E - (threadIdx.x % 4) * 16;  // this thread's bytes left
#pragma unroll
    for (int i = 0; i < T::kPieces; ++i) {
      const bool in = i * 64 < left;
      w.a[i] = in ? load16_stream(pa + off + i * 64) : make_uint4(0, 0, 0, 0);
      w.b[i] = in ? load16_stream(pb + off + i * 64) : make_uint4(0, 0, 0, 0);
    }
  }
}

// acc[j] += one unit's products against the staged x rows 8j .. 8j + 7 (xs: this thread's x row
// g and columns at unit 0 of the chunk; every x row is staged, zeros past M, so nothing is
// predicated). F16/FP8: the unit's sums scaled by the weight rows' block scales (wsa, wsb) and
// the x rows' staging scales (xsc: sh.xscale at the unit) in fp32.
template <DType D, int NT>
__device__ inline void skinny_unit(float (&acc)[NT][4], const MmaUnitW<D>& w, const uint16_t* xs, int stride,
                                   const float* xsc, int chunk_units, float wsa, float wsb) {
  using T = MmaTraits<D>;
  float part[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) part[j][0] = part[j][1] = part[j][2] = part[j][3] = 0.f;
#pragma unroll
  for (int i = 0; i < T::kPieces; ++i) {
    uint32_t a[T::V / 4][4];
    mma_a_frags<D>(a, w, i);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const uint16_t* xr = xs + 16 * j * stride + i * 4 * T::V;  // x row 8j + g: two parts per row
      uint4 xh[T::V / 8], xl[T::V / 8];
#pragma unroll
      for (int q = 0; q < T::V / 8; ++q) {
        xh[q] = *reinterpret_cast<const uint4*>(xr + 8 * q);
        xl[q] = *reinterpret_cast<const uint4*>(xr + stride + 8 * q);
      }
      mma_piece<D>(T::kBf16 ? acc[j] : part[j], a, xh, xl);
    }
  }
  if constexpr (!T::kBf16) {
    const int tig = threadIdx.x % 4;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int m0 = 8 * j + 2 * tig;
      mma_add_scaled(acc[j], part[j], wsa, wsb, xsc[m0 * chunk_units], xsc[(m0 + 1) * chunk_units]);
    }
  }
}

// The products of mma_skinny_block: acc, warp w's 16 rows of row block rb against the M x rows
// over slice `slice` of K, each warp streaming its rows one unit ahead of its MMAs; NORM, the
// rows' squares over the slice in sh.red[m] (ends synchronized). Rows past N read row N - 1 (their
// products are not written), so the loop has no bound checks but the last unit's.
template <DType D, int NT, bool NORM>
__device__ inline void mma_skinny_product(float (&acc)[NT][4], const MatmulParams& p, int b, int rb, int slice,
                                          int chunk, bool vec_x, const SkinnySlices& sl, const MmaShared& sh) {
  using T = MmaTraits<D>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tig = lane % 4;
  const int64_t w0 = int64_t(rb) * kSkinnyRows + int64_t(warp) * 16;
  const int64_t k_begin = int64_t(slice) * sl.slice, k_end = min(p.K, k_begin + sl.slice);
  const bool active = w0 < p.N;  // the whole warp alike
  const int64_t ra = min(w0 + g, p.N - 1), rbw = min(w0 + g + 8, p.N - 1);
  const uint8_t* w = static_cast<const uint8_t*>(p.w) + b * p.w_batch_stride * T::E;
  const uint8_t* pa = w + ra * p.K * T::E + tig * 16;
  const uint8_t* pb = w + rbw * p.K * T::E + tig * 16;
  const float *sa = nullptr, *sb = nullptr;
  int unit_per_scale = 1;
  if constexpr (D == DType::F8_E4M3) {
    const int64_t kb = ceil_div(p.K, p.block);
    sa = p.scale_inv + ra / p.block * kb, sb = p.scale_inv + rbw / p.block * kb;
    unit_per_scale = int(p.block / kMmaUnit);
  }
  const int chunk_units = chunk / kMmaUnit, stride = chunk + kMmaPad;
  const uint16_t* xs = sh.x + (g * 2) * stride + tig * T::V;
  const float* x = p.x + b * p.x_batch_stride;
  float ss[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    ss[j] = 0.f;
    acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  }
  for (int64_t k0 = k_begin; k0 < k_end; k0 += chunk) {
    const int units = int(min(int64_t(chunk_units), ceil_div(k_end - k0, kMmaUnit)));
    const int unit0 = int(k0 / kMmaUnit);  // k_begin and chunk are whole units
    MmaUnitW<D> cur;
    float wsa = 1.f, wsb = 1.f;
    if (active) {
      skinny_load_unit<D>(cur, pa, pb, k0, k_end);
      if constexpr (D == DType::F8_E4M3) wsa = __ldg(sa + unit0 / unit_per_scale), wsb = __ldg(sb + unit0 / unit_per_scale);
    }
    __syncthreads();  // the previous chunk's x is no longer read
    skinny_stage_x<D, NT, NORM>(sh, p, x, k0, units, chunk_units, k_end, vec_x, ss);
    __syncthreads();
    if (!active) continue;
    for (int u = 0; u < units; ++u) {
      MmaUnitW<D> nxt;
      float nsa = 1.f, nsb = 1.f;
      if (u + 1 < units) {
        skinny_load_unit<D>(nxt, pa, pb, k0 + int64_t(u + 1) * kMmaUnit, k_end);
        if constexpr (D == DType::F8_E4M3)
          nsa = __ldg(sa + (unit0 + u + 1) / unit_per_scale), nsb = __ldg(sb + (unit0 + u + 1) / unit_per_scale);
      }
      skinny_unit<D, NT>(acc, cur, xs + u * kMmaUnit, stride, sh.xscale + u, chunk_units, wsa, wsb);
      if (u + 1 < units) cur = nxt;  // (the last unit has no next one)
      wsa = nsa, wsb = nsb;
    }
  }
  if constexpr (NORM) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const float t = warp_sum(ss[j]);
      if (lane == 0 && warp + 8 * j < kMmaSsRows) sh.red[warp + 8 * j] = t;
    }
    __syncthreads();
  }
}

template <DType D, int NT, bool NORM>
__device__ inline void mma_skinny_block(const MatmulParams& p, int b, int rb, int slice, int chunk, bool vec_x,
                                        const SkinnySlices& sl, const MmaShared& sh) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tig = lane % 4;
  const int M = int(p.M);
  const int64_t w0 = int64_t(rb) * kSkinnyRows + int64_t(warp) * 16;
  float acc[NT][4];
  mma_skinny_product<D, NT, NORM>(acc, p, b, rb, slice, chunk, vec_x, sl, sh);
  float* const scale = sh.red;  // [kMmaSsRows]: the rows' squares over the slice, then norm factors
  if constexpr (NORM) {
    if (int(threadIdx.x) < M) {
      const float t = scale[threadIdx.x];
      if (sl.slices > 1 && rb == 0 && sl.part_ss) sl.part_ss[int64_t(slice) * M + threadIdx.x] = t;
      if (sl.slices == 1) scale[threadIdx.x] = norm_scale(t, p.K, p.eps);
    }
    __syncthreads();
  }
  const bool whole = sl.slices == 1;
  float* dst = whole ? p.out + b * p.out_batch_stride : sl.part + (int64_t(slice) * p.batch + b) * M * p.N;
  const int64_t ld = whole ? p.ldo : p.N;
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int m = 8 * j + 2 * tig + q;
      if (m >= M) continue;
      const float sc = NORM && whole ? scale[m] : 1.f;
      const bool add = whole && p.accumulate;
      float* o = dst + m * ld;
      if (w0 + g < p.N) o[w0 + g] = add ? o[w0 + g] + acc[j][q] * sc : acc[j][q] * sc;
      if (w0 + g + 8 < p.N) o[w0 + g + 8] = add ? o[w0 + g + 8] + acc[j][2 + q] * sc : acc[j][2 + q] * sc;
    }
}

// skinny_reduce_kernel's element i of p's out (batch entry, row, column), whose slices' sums lie
// at part[s * stride]: their sum in slice order, times the row's norm factor (NORM). The loads of
// kAhead slices are in flight together (each an L2 round trip). Index arithmetic in 32 bits
// (run_skinny checks that a launch's partial sums fit): 64-bit divisions are long instruction
// sequences, and this kernel's time is its instruction chain.
template <bool NORM>
__device__ inline void skinny_reduce_one(const MatmulParams& p, const SkinnySlices& sl, const float* part,
                                         uint32_t stride, uint32_t i) {
  constexpr int kAhead = 8;
  const uint32_t n = uint32_t(p.N), per = uint32_t(p.M) * n;
  const uint32_t b = i / per, r = i - b * per, m = r / n, c = r - m * n;
  float v = 0.f;
  for (int s0 = 0; s0 < sl.slices; s0 += kAhead) {
    float t[kAhead];
#pragma unroll
    for (int q = 0; q < kAhead; ++q) t[q] = s0 + q < sl.slices ? __ldcg(part + size_t(s0 + q) * stride) : 0.f;
#pragma unroll
    for (int q = 0; q < kAhead; ++q)
      if (s0 + q < sl.slices) v += t[q];
  }
  if constexpr (NORM) {
    float t = 0.f;
    for (int s = 0; s < sl.slices; ++s) t += sl.part_ss[uint32_t(s) * uint32_t(p.M) + m];
    v *= norm_scale(t, p.K, p.eps);
  }
  float& o = p.out[b * p.out_batch_stride + int64_t(m) * p.ldo + c];
  o = p.accumulate ? o + v : v;
}

}  // namespace fathom::cuda
