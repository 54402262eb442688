// Flash attention's backward on the GPU (the arguments: src/ops/flash_attention.h; the CPU
// reference: cpu::flash_attention_backward; the ideas: docs/flash-attention.md). Nothing of the
// forward is kept but its output and log-sum-exp: the scores are recomputed tile by tile, and
// P = exp(scale·s - lse) needs no softmax pass (FlashAttention 1's recomputation). With
// D = rowsum(dout ∘ out) (flash_bwd_prep_kernel), dS = P ∘ (dP - D) where dP = dout Vᵀ, and
//   dV = Pᵀ dout,   dK = scale · dSᵀ Q,   dQ = scale · dS K.
// Two Hopper kernels split the work so that every gradient has one owner and no atomics are
// needed — the result is deterministic, run after run:
// - dK dV: a block owns 128 keys of one KV head (64 per consumer warpgroup) and sweeps the query
//   tiles of every query head that reads them: Sᵀ = K Qᵀ and dPᵀ = V doutᵀ (wgmma from shared
//   memory), Pᵀ and dSᵀ in registers, then dV += Pᵀ dout and dK += dSᵀ Q with Pᵀ and dSᵀ as
//   register A operands and dout, Q read N-major — the forward's P V trick twice.
// - dQ: a block owns 128 queries of one head (64 per consumer warpgroup) and sweeps the key tiles:
//   S = Q Kᵀ, dP = dout Vᵀ, dS, then dQ += dS K (K N-major).
// The two recompute S and dP each (7 products in all instead of 5), the price of no atomics; at
// head dims 128/128 the default is the one-pass kernel of flash_attention_backward_onepass.cu
// (dQ summed by atomics, 5 products) and these are the deterministic option.
// Each comes in two forms: flash_bwd_*_ws_kernel here (a producer warpgroup and two pipelined
// consumers: see the comment above them; the default) and flash_bwd_*_wgmma_kernel in
// flash_attention_backward_serial.cu (two warpgroups, thread 0 issuing the TMA copies between its
// products, each tile's steps in order). What they share: flash_attention_backward.cuh. SIMT
// kernels (one warp per row) are the fallback for other GPUs and shapes.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <type_traits>

#include "core/error.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/flash_attention.cuh"
#include "ops/cuda/flash_attention_backward.cuh"
#include "ops/cuda/hopper.cuh"

namespace fathom::cuda {
namespace {

// The warp-specialized kernels' registers a thread: a producer warpgroup's, and each of the two
// consumers' (24 + 2 x 240 of 3 x 168).
constexpr int kBwdProducerRegs = 24, kBwdConsumerRegs = 240;
static_assert(setmaxnreg_fits(kBwdProducerRegs, kBwdConsumerRegs, 2), "setmaxnreg over the launch's registers");

// One lane's part of the dot product of two bf16 rows of n (a multiple of 8, 16-byte aligned), 8
// lanes a row: elements 8 lane .. 8 lane + 7, then 64 on.
__device__ __forceinline__ float dot_bf16_x8(const uint16_t* x, const uint16_t* y, int n, int lane) {
  float acc = 0.f;
  for (int i = 8 * lane; i < n; i += 64) {
    const uint4 u = *reinterpret_cast<const uint4*>(x + i), v = *reinterpret_cast<const uint4*>(y + i);
    const uint32_t us[4] = {u.x, u.y, u.z, u.w}, vs[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j)
      acc += bf16_bits_to_f32(us[j] & 0xFFFFu) * bf16_bits_to_f32(vs[j] & 0xFFFFu) +
             bf16_bits_to_f32(us[j] >> 16) * bf16_bits_to_f32(vs[j] >> 16);
  }
  return acc;
}

// D[h, t] = Σ_d dout[t, h, d] · out[t, h, d] for each (query place, head) of a sequence: a warp
// each, or 8 lanes with 16-byte loads when rows are whole 16-byte units (kVec). With `stats` (the
// warp-specialized dK dV kernel's statistics rows, FlashArgs::stats) also query q's lse · log2 e
// and D there, and for the 64 places after the sequence's last query +inf and 0 — a query tile
// past the end then gives P = exp2(s - inf) = 0 with no test.
template <bool kVec>
__global__ void flash_bwd_prep_kernel(const FlashArgs a, float* stats) {
  pdl_wait();
  constexpr int kLanes = kVec ? 8 : 32;
  const int h = int(blockIdx.y), b = int(blockIdx.z), lane = int(threadIdx.x % kLanes);
  const SeqSpan s = seq_span(a, b);
  const int q = int(blockIdx.x) * int(blockDim.x / kLanes) + int(threadIdx.x / kLanes);
  const bool in = q < s.lq;  // (every lane reaches the shuffles)
  float acc = 0.f;
  if (in) {
    const int64_t t = s.q0 + q;
    const uint16_t* o = a.out + t * a.o_ts + int64_t(h) * a.o_hs;
    const uint16_t* d = a.dout + t * a.do_ts + int64_t(h) * a.do_hs;
    if constexpr (kVec) {
      acc = dot_bf16_x8(o, d, a.d_v, lane);
    } else {
      for (int i = lane; i < a.d_v; i += 32) acc += bf16_bits_to_f32(o[i]) * bf16_bits_to_f32(d[i]);
    }
  }
#pragma unroll
  for (int off = kLanes / 2; off > 0; off /= 2) acc += __shfl_xor_sync(kFullMask, acc, off);
  if (lane != 0) return;
  const int64_t src = int64_t(h) * a.total_q + s.q0 + q;
  if (in) const_cast<float*>(a.delta)[src] = acc;
  if (!stats || q >= s.lq + 64) return;
  const int64_t at = stats_start(s.q0, b) + q;
  stats[int64_t(h) * a.stats_stride + at] = in ? a.lse[src] * kLog2e : INFINITY;
  stats[(int64_t(a.n_heads) + h) * a.stats_stride + at] = in ? acc : 0.f;
}

// ---- the warp-specialized, pipelined forms (the default on Hopper; FATHOM_FLASH_BACKWARD=serial
// brings back the kernels above). A block of three warpgroups: warpgroup 0 produces — thread 0
// issues the TMA copies, for dK dV also each query tile's log-sum-exp (·log2 e; +inf past the
// sequence, so that those queries' P is 0 without a test) and D, by bulk copies from the rows
// flash_bwd_prep_kernel laid out — with its registers given to the two consumers (setmaxnreg
// 24 / 240). Each consumer runs the
// tiles as the forward does (FlashAttention 3's order): issue tile j's S and dP, issue tile j-1's
// gradient products, wait for S and dP only, compute P and dS of tile j while the tensor cores
// still multiply tile j-1, then wait for them and convert P and dS to bf16 fragments. No
// consumer ever waits on a branch of its own between a wgmma's issue and its wait.

template <int kD, int kDv, int kQT>
struct DkdvWsShape {
  static constexpr int kKBytes = kRows * kD * 2, kVBytes = kRows * kDv * 2;
  static constexpr int kQTBytes = kQT * kD * 2, kDoBytes = kQT * kDv * 2, kStatBytes = kQT * 8;
  static constexpr int kFit = (227 * 1024 - 2048 - kKBytes - kVBytes) / (kQTBytes + kDoBytes + kStatBytes);
  static constexpr int kStages = kFit > 4 ? 4 : kFit;
  static constexpr int kSmem = kKBytes + kVBytes + kStages * (kQTBytes + kDoBytes + kStatBytes) + 1024 + 256;
  static_assert(kStages >= 2, "two stages of Q and dout must fit");
};

template <int kD, int kDv, int kQT, bool kPipe>
__global__ void __launch_bounds__(384, 1)
    flash_bwd_dkdv_ws_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                             const __grid_constant__ CUtensorMap map_v, const __grid_constant__ CUtensorMap map_do,
                             const FlashArgs a) {
#ifdef FATHOM_SM90A
  using Shape = DkdvWsShape<kD, kDv, kQT>;
  constexpr int kStages = Shape::kStages;
  pdl_wait();
  const int kvh = int(blockIdx.x), kb = int(blockIdx.y), b = int(blockIdx.z);
  const SeqSpan s = seq_span(a, b);
  if (kb * kRows >= s.lk) return;
  const int diag = s.lk - s.lq;
  const QueryTiles tiles = dkdv_query_tiles<kQT>(a, s, kb);
  const int i0 = tiles.i0, per_head = tiles.per_head, n_it = tiles.n_it;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t sk = (smem_u32(smem_raw) + 1023u) & ~1023u, sv = sk + Shape::kKBytes;
  const uint32_t sq = sv + Shape::kVBytes, sdo = sq + kStages * Shape::kQTBytes;
  const uint32_t sstat = sdo + kStages * Shape::kDoBytes;  // per stage: lse·log2 e [kQT], D [kQT]
  const uint32_t kv_full = sstat + kStages * Shape::kStatBytes, full = kv_full + 8, empty = full + 8 * kStages;
  const float* stat = reinterpret_cast<const float*>(smem_raw + (sstat - smem_u32(smem_raw)));
  const int tid = int(threadIdx.x);
  init_key_block_barriers(kv_full, full, empty, kStages);
  const int wg = __shfl_sync(kFullMask, tid / 128, 0), lane = tid % 32;
  auto tile_of = [&](int it) { return (i0 + it % per_head) * kQT; };
  if (wg == 0) {
    setmaxnreg_dec<kBwdProducerRegs>();
    if (tid == 0) {
      load_key_block<kD, kDv>(sk, sv, &map_k, &map_v, kvh, int(s.k0 + int64_t(kb) * kRows), kv_full);
      load_query_tiles<kD, kDv, kQT, kStages>(a, s, b, &map_q, &map_do, kvh, i0, per_head, n_it, sq, sdo, sstat, full,
                                              empty);
    }
  } else {
    setmaxnreg_inc<kBwdConsumerRegs>();
    const int cw = wg - 1, warp = (tid % 128) / 32;
    const int key0 = kb * kRows + cw * 64 + warp * 16 + lane / 4;  // this thread's keys key0, key0 + 8
    float dk[kD / 2], dv[kDv / 2];
#pragma unroll
    for (int i = 0; i < kD / 2; ++i) dk[i] = 0.f;
#pragma unroll
    for (int i = 0; i < kDv / 2; ++i) dv[i] = 0.f;
    const uint64_t dk0 = sw128_desc(sk + cw * 64 * 128), dv0 = sw128_desc(sv + cw * 64 * 128);
    float sc[kQT / 2], dp[kQT / 2];
    uint32_t pf[kQT / 16][4], dsf[kQT / 16][4];
    auto full_wait = [&](int it) { mbar_wait(full + 8 * (it % kStages), uint32_t((it / kStages) & 1)); };
    auto sdp = [&](int it) {  // Sᵀ = K Qᵀ, dPᵀ = V doutᵀ
      const int st = it % kStages;
      // (the loop-invariant descriptors made opaque here: hoisted out of the loop, each k-step's
      // 64-bit descriptor would hold two registers for the whole loop)
      uint64_t ka = dk0, va = dv0;
      asm volatile("" : "+l"(ka), "+l"(va));
      wgmma_fence();
      ss_product<kQT, kD, kRows * 128, kQT * 128>(sc, ka, sw128_desc(sq + st * Shape::kQTBytes));
      ss_product<kQT, kDv, kRows * 128, kQT * 128>(dp, va, sw128_desc(sdo + st * Shape::kDoBytes));
      wgmma_commit();
    };
    auto grads = [&](int it) {  // dV += Pᵀ dout, dK += dSᵀ Q
      const int st = it % kStages;
      wgmma_fence();
      rs_product<kDv, kQT>(dv, pf, sw128_desc_mn(sdo + st * Shape::kDoBytes, kQT * 128));
      rs_product<kD, kQT>(dk, dsf, sw128_desc_mn(sq + st * Shape::kQTBytes, kQT * 128));
      wgmma_commit();
    };
    // Pᵀ and dSᵀ in place: this thread's columns are queries qt + 8 n + 2 (lane % 4) + {0, 1}; a key
    // is masked (causal) when key - q > diag, tested against a bound that is huge off the diagonal.
    auto pds = [&](int it) {
      const int qt = tile_of(it);
      const bool masked = a.causal && kb * kRows + kRows - 1 > qt + diag;
      p_and_ds<kQT, kPipe>(sc, dp, stat + (it % kStages) * 2 * kQT, a.scale_log2, masked ? qt + diag : 1 << 30, key0,
                           lane, true, true);
    };
    auto release = [&](int it) { mbar_arrive(empty + 8 * (it % kStages)); };
    // The leading query tiles of the first head that mask all of this consumer's 64 keys (below
    // its first key's diagonal; every tile when its keys lie past the sequence) add nothing: it
    // waits for and releases their stages without multiplying (the forward's skip, mirrored).
    // (Later heads of a GQA group compute theirs: their P is 0 there.)
    int first = 0;
    if (const int my_key = kb * kRows + cw * 64; my_key >= s.lk)
      first = n_it;
    else if (a.causal)
      while (first < per_head && my_key - (tile_of(first) + kQT - 1) > diag) ++first;
    for (int it = 0; it < first; ++it) full_wait(it), release(it);
    mbar_wait(kv_full, 0);
    if (n_it > first) {
      full_wait(first);
      sdp(first);
      wgmma_wait<0>();
      fence_regs(sc), fence_regs(dp);
      pds(first);
      pack_frags<kQT>(pf, sc);
      pack_frags<kQT>(dsf, dp);
      for (int it = first + 1; it < n_it; ++it) {
        full_wait(it);
        fence_regs(pf), fence_regs(dsf);
        if constexpr (!kPipe) {  // tile it-1's products first, then tile it's (fewer registers live)
          grads(it - 1);
          wgmma_wait<0>();
          fence_regs(dk), fence_regs(dv);
          release(it - 1);
          sdp(it);
          wgmma_wait<0>();
          fence_regs(sc), fence_regs(dp);
          pds(it);
          pack_frags<kQT>(pf, sc);
          pack_frags<kQT>(dsf, dp);
          continue;
        }
        sdp(it);
        grads(it - 1);
        wgmma_wait<1>();
        fence_regs(sc), fence_regs(dp);
        pds(it);
        fence_regs(sc), fence_regs(dp);
        wgmma_wait<0>();
        fence_regs(dk), fence_regs(dv);
        release(it - 1);
        pack_frags<kQT>(pf, sc);
        pack_frags<kQT>(dsf, dp);
      }
      fence_regs(pf), fence_regs(dsf);
      grads(n_it - 1);
      wgmma_wait<0>();
      fence_regs(dk), fence_regs(dv);
      release(n_it - 1);
    }
    store_key_grads<kD, kDv>(a, s, kvh, key0, lane, dk, dv);
  }
#else
  (void)map_q, (void)map_k, (void)map_v, (void)map_do, (void)a;
  __trap();
#endif
}

// kRegA: Q and dout of the warpgroup's 64 rows held as wgmma A fragments in registers (loaded
// once), so that S and dP read only K and V from shared memory (qk 64 and 128; at 192 they do not
// fit beside dQ).
template <int kD, int kDv, bool kRegA>
__global__ void __launch_bounds__(384, 1)
    flash_bwd_dq_ws_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                           const __grid_constant__ CUtensorMap map_v, const __grid_constant__ CUtensorMap map_do,
                           const FlashArgs a) {
#ifdef FATHOM_SM90A
  using Shape = DqShape<kD, kDv>;
  constexpr int kStages = Shape::kStages;
  pdl_wait();
  const int h = int(blockIdx.x), b = int(blockIdx.z), m_block = int(gridDim.y - 1 - blockIdx.y);
  const SeqSpan s = seq_span(a, b);
  if (m_block * kRows >= s.lq) return;
  const int diag = s.lk - s.lq, kvh = h / a.group, n_tiles = dq_key_tiles(a, s, m_block);
  extern __shared__ uint8_t smem_raw[];
  const DqSmem m = dq_smem<Shape>(smem_raw);
  const uint32_t sq = m.sq, sdo = m.sdo, sk = m.sk, sv = m.sv, q_full = m.q_full, full = m.full, empty = m.empty;
  const int tid = int(threadIdx.x);
  __syncthreads();
  const int wg = __shfl_sync(kFullMask, tid / 128, 0), lane = tid % 32;
  if (wg == 0) {
    setmaxnreg_dec<kBwdProducerRegs>();
    if (tid == 0) {
      const int row = int(s.q0 + int64_t(m_block) * kRows);
      mbar_expect_tx(q_full, Shape::kQBytes + Shape::kDoBytes);
      load_head_rows<kD, kRows>(sq, &map_q, h, row, q_full);
      load_head_rows<kDv, kRows>(sdo, &map_do, h, row, q_full);
      for (int it = 0; it < n_tiles; ++it) {
        const int st = it % kStages, key_row = int(s.k0 + int64_t(n_tiles - 1 - it) * kKeyTile);
        mbar_wait(empty + 8 * st, uint32_t(((it / kStages) & 1) ^ 1));
        mbar_expect_tx(full + 8 * st, Shape::kKBytes + Shape::kVBytes);
        load_head_rows<kD, kKeyTile>(sk + st * Shape::kKBytes, &map_k, kvh, key_row, full + 8 * st);
        load_head_rows<kDv, kKeyTile>(sv + st * Shape::kVBytes, &map_v, kvh, key_row, full + 8 * st);
      }
    }
  } else {
    setmaxnreg_inc<kBwdConsumerRegs>();
    const int cw = wg - 1, warp = (tid % 128) / 32;
    const int r0 = m_block * kRows + cw * 64 + warp * 16 + lane / 4;  // this thread's rows r0, r0 + 8
    float lse2[2], delta[2];
    query_row_stats(a, s, h, r0, lse2, delta);
    float dq[kD / 2];
#pragma unroll
    for (int i = 0; i < kD / 2; ++i) dq[i] = 0.f;
    const uint64_t dq0 = sw128_desc(sq + cw * 64 * 128), ddo0 = sw128_desc(sdo + cw * 64 * 128);
    float sc[kKeyTile / 2], dp[kKeyTile / 2];
    uint32_t dsf[kKeyTile / 16][4];
    auto full_wait = [&](int it) { mbar_wait(full + 8 * (it % kStages), uint32_t((it / kStages) & 1)); };
    uint32_t qf[kRegA ? kD / 16 : 1][4], dof[kRegA ? kDv / 16 : 1][4];
    auto sdp = [&](int it) {  // S = Q Kᵀ, dP = dout Vᵀ
      const int st = it % kStages;
      wgmma_fence();
      if constexpr (kRegA) {
        const uint64_t kd = sw128_desc(sk + st * Shape::kKBytes), vd = sw128_desc(sv + st * Shape::kVBytes);
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk)
          wgmma_rs_kb<kKeyTile>(sc, qf[kk], kd + (kk / 4) * ((kKeyTile * 128) >> 4) + 2 * (kk % 4), kk != 0);
#pragma unroll
        for (int kk = 0; kk < kDv / 16; ++kk)
          wgmma_rs_kb<kKeyTile>(dp, dof[kk], vd + (kk / 4) * ((kKeyTile * 128) >> 4) + 2 * (kk % 4), kk != 0);
      } else {
        ss_product<kKeyTile, kD, kRows * 128, kKeyTile * 128>(sc, dq0, sw128_desc(sk + st * Shape::kKBytes));
        ss_product<kKeyTile, kDv, kRows * 128, kKeyTile * 128>(dp, ddo0, sw128_desc(sv + st * Shape::kVBytes));
      }
      wgmma_commit();
    };
    auto grad = [&](int it) {  // dQ += dS K
      wgmma_fence();
      rs_product<kD, kKeyTile>(dq, dsf, sw128_desc_mn(sk + (it % kStages) * Shape::kKBytes, kKeyTile * 128));
      wgmma_commit();
    };
    // dS in place of dP: a key counts when it is in the sequence and, causally, not past the
    // row's diagonal (key - row <= diag; the bound is huge for a full tile).
    auto ds = [&](int it) {
      const int j = n_tiles - 1 - it, k0 = j * kKeyTile + 2 * (lane % 4);
      const bool full_tile = (j + 1) * kKeyTile <= s.lk &&
                             (!a.causal || (j + 1) * kKeyTile - 1 <= m_block * kRows + diag);
      const int end = full_tile ? 1 << 30 : s.lk, bound = full_tile || !a.causal ? 1 << 30 : diag;
#pragma unroll
      for (int x = 0; x < kKeyTile / 2; ++x) {
        const int r = (x >> 1) & 1, key = k0 + 8 * (x / 4) + (x & 1);
        const bool ok = key < end && key - (r0 + 8 * r) <= bound;
        const float p = fast_exp2(fmaf(sc[x], a.scale_log2, -lse2[r]));
        dp[x] = ok ? p * (dp[x] - delta[r]) : 0.f;
      }
    };
    auto release = [&](int it) { mbar_arrive(empty + 8 * (it % kStages)); };
    mbar_wait(q_full, 0);
    if constexpr (kRegA) {
      load_a_frags<kD>(qf, sq, kRows * 128, cw * 64 + warp * 16, lane);
      load_a_frags<kDv>(dof, sdo, kRows * 128, cw * 64 + warp * 16, lane);
    }
    // The leading key tiles (the last by position) that mask all of this consumer's 64 queries
    // — its upper neighbour's diagonal tile; every tile when its queries lie past the sequence:
    // waited for and released without multiplying (the forward's skip).
    int first = 0;
    if (const int my_row = m_block * kRows + cw * 64; my_row >= s.lq) {
      first = n_tiles;
    } else if (a.causal) {
      const int last_row = min(my_row + 63, s.lq - 1);
      while (first < n_tiles && (n_tiles - 1 - first) * kKeyTile - last_row > diag) ++first;
    }
    for (int it = 0; it < first; ++it) full_wait(it), release(it);
    if (n_tiles > first) {
      full_wait(first);
      sdp(first);
      wgmma_wait<0>();
      fence_regs(sc), fence_regs(dp);
      ds(first);
      pack_frags<kKeyTile>(dsf, dp);
      for (int it = first + 1; it < n_tiles; ++it) {
        full_wait(it);
        fence_regs(dsf);
        sdp(it);
        grad(it - 1);
        wgmma_wait<1>();
        fence_regs(sc), fence_regs(dp);
        ds(it);
        fence_regs(dp);
        wgmma_wait<0>();
        fence_regs(dq);
        release(it - 1);
        pack_frags<kKeyTile>(dsf, dp);
      }
      fence_regs(dsf);
      grad(n_tiles - 1);
      wgmma_wait<0>();
      fence_regs(dq);
      release(n_tiles - 1);
    }
    store_query_grads<kD>(a, s, h, r0, lane, dq);
  }
#else
  (void)map_q, (void)map_k, (void)map_v, (void)map_do, (void)a;
  __trap();
#endif
}

// ---- the fallback: one warp per row, lanes over the dims (kPer each)

template <int kPer>
__global__ void __launch_bounds__(128) flash_bwd_dq_simt_kernel(const FlashArgs a) {
  pdl_wait();
  const int h = int(blockIdx.y), b = int(blockIdx.z);
  const SeqSpan s = seq_span(a, b);
  const int row = int(blockIdx.x) * 4 + int(threadIdx.x / 32), lane = int(threadIdx.x % 32);
  if (row >= s.lq) return;
  const int kvh = h / a.group;
  const int64_t t = s.q0 + row, at = int64_t(h) * a.total_q + t;
  const uint16_t* q = a.q + t * a.q_ts + int64_t(h) * a.q_hs;
  const uint16_t* dout = a.dout + t * a.do_ts + int64_t(h) * a.do_hs;
  float qv[kPer], dov[kPer], acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    qv[i] = d < a.d_qk ? bf16_bits_to_f32(q[d]) : 0.f;
    dov[i] = d < a.d_v ? bf16_bits_to_f32(dout[d]) : 0.f;
    acc[i] = 0.f;
  }
  const float lse2 = a.lse[at] * kLog2e, delta = a.delta[at];
  const int n = a.causal ? max(0, min(s.lk, row + s.lk - s.lq + 1)) : s.lk;
  for (int j = 0; j < n; ++j) {
    const uint16_t* k = a.k + (s.k0 + j) * a.k_ts + int64_t(kvh) * a.k_hs;
    const uint16_t* v = a.v + (s.k0 + j) * a.v_ts + int64_t(kvh) * a.v_hs;
    float sd = 0.f, pd = 0.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int d = lane + 32 * i;
      if (d < a.d_qk) sd += qv[i] * bf16_bits_to_f32(k[d]);
      if (d < a.d_v) pd += dov[i] * bf16_bits_to_f32(v[d]);
    }
    const float p = exp2f(warp_sum(sd) * a.scale_log2 - lse2), ds = p * (warp_sum(pd) - delta);
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (lane + 32 * i < a.d_qk) acc[i] += ds * bf16_bits_to_f32(k[lane + 32 * i]);
  }
  float* g = a.dq + (t * a.n_heads + h) * int64_t(a.d_qk);
#pragma unroll
  for (int i = 0; i < kPer; ++i)
    if (lane + 32 * i < a.d_qk) g[lane + 32 * i] = acc[i] * a.scale;
}

template <int kPer>
__global__ void __launch_bounds__(128) flash_bwd_dkdv_simt_kernel(const FlashArgs a) {
  pdl_wait();
  const int kvh = int(blockIdx.y), b = int(blockIdx.z), n_kv = a.n_heads / a.group;
  const SeqSpan s = seq_span(a, b);
  const int key = int(blockIdx.x) * 4 + int(threadIdx.x / 32), lane = int(threadIdx.x % 32);
  if (key >= s.lk) return;
  const int64_t t = s.k0 + key;
  const uint16_t* k = a.k + t * a.k_ts + int64_t(kvh) * a.k_hs;
  const uint16_t* v = a.v + t * a.v_ts + int64_t(kvh) * a.v_hs;
  float kv[kPer], vv[kPer], gk[kPer], gv[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    kv[i] = d < a.d_qk ? bf16_bits_to_f32(k[d]) : 0.f;
    vv[i] = d < a.d_v ? bf16_bits_to_f32(v[d]) : 0.f;
    gk[i] = gv[i] = 0.f;
  }
  const int first = a.causal ? max(0, key - (s.lk - s.lq)) : 0;
  for (int h = kvh * a.group; h < (kvh + 1) * a.group; ++h)
    for (int i = first; i < s.lq; ++i) {
      const int64_t tq = s.q0 + i, at = int64_t(h) * a.total_q + tq;
      const uint16_t* q = a.q + tq * a.q_ts + int64_t(h) * a.q_hs;
      const uint16_t* dout = a.dout + tq * a.do_ts + int64_t(h) * a.do_hs;
      float sd = 0.f, pd = 0.f;
#pragma unroll
      for (int x = 0; x < kPer; ++x) {
        const int d = lane + 32 * x;
        if (d < a.d_qk) sd += kv[x] * bf16_bits_to_f32(q[d]);
        if (d < a.d_v) pd += vv[x] * bf16_bits_to_f32(dout[d]);
      }
      const float p = exp2f(warp_sum(sd) * a.scale_log2 - a.lse[at] * kLog2e), ds = p * (warp_sum(pd) - a.delta[at]);
#pragma unroll
      for (int x = 0; x < kPer; ++x) {
        const int d = lane + 32 * x;
        if (d < a.d_qk) gk[x] += ds * bf16_bits_to_f32(q[d]);
        if (d < a.d_v) gv[x] += p * bf16_bits_to_f32(dout[d]);
      }
    }
  const int64_t row = t * n_kv + kvh;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    if (d < a.d_qk) a.dk[row * a.d_qk + d] = gk[i] * a.scale;
    if (d < a.d_v) a.dv[row * a.d_v + d] = gv[i];
  }
}

// ---- host side

// By head dims: the warp-specialized kernels (384 threads; dK dV query tiles of qt_ws: 48 at
// qk 128, where 64 spills in the pipelined kernel) — the serial ones: flash_bwd_serial_kernels.
// Which run: FATHOM_FLASH_BACKWARD — serial: the 256-thread kernels; ws-serial: the warp-
// specialized dK dV kernel taking its tiles in order (no pipelining); ws-ss: the dQ kernel reading
// Q and dout from shared memory; ws (the deterministic default: the fastest on the H200 without
// atomics, bench/RESULTS.md): the warp-specialized, pipelined kernels with Q and dout in registers
// in the dQ kernel (qk <= 128); onepass (the default at qk = v = 128 unless
// FlashAttentionGrads::deterministic): flash_attention_backward_onepass.cu. (Both two-kernel
// blocks in one launch measured slower: RESULTS, 2026-12-02.)
struct BwdVariant {
  int d_qk, d_v, qt_ws, dq_smem, dkdv_ws_smem;
  BwdKernel dkdv_ws, dq_ws, dkdv_ws_serial, dq_ws_ss;
};
template <int kD, int kDv, int kQTWs>
constexpr BwdVariant bwd_variant_of() {
  return {kD,
          kDv,
          kQTWs,
          DqShape<kD, kDv>::kSmem,
          DkdvWsShape<kD, kDv, kQTWs>::kSmem,
          flash_bwd_dkdv_ws_kernel<kD, kDv, kQTWs, true>,
          flash_bwd_dq_ws_kernel<kD, kDv, (kD <= 128)>,
          flash_bwd_dkdv_ws_kernel<kD, kDv, kQTWs, false>,
          flash_bwd_dq_ws_kernel<kD, kDv, false>};
}
const BwdVariant kBwdVariants[] = {bwd_variant_of<64, 64, 64>(), bwd_variant_of<128, 128, 48>(),
                                   bwd_variant_of<192, 128, 32>()};
// Whether FATHOM_FLASH_BACKWARD names this form (a null name: whether it names none).
bool bwd_form(const char* name) {
  const char* e = std::getenv("FATHOM_FLASH_BACKWARD");
  return name ? e && !std::strcmp(e, name) : !e;
}

std::once_flag g_bwd_smem[kMaxDevices];
void allow_bwd_smem() {
  once_per_device(g_bwd_smem, [] {
    for (const BwdVariant& v : kBwdVariants) {
      const SerialBwdKernels serial = flash_bwd_serial_kernels(v.d_qk, v.d_v);
      check(cudaFuncSetAttribute(serial.dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, serial.dkdv_smem),
            "flash_attention_backward (shared memory of the dK dV kernel)");
      check(cudaFuncSetAttribute(serial.dq, cudaFuncAttributeMaxDynamicSharedMemorySize, serial.dq_smem),
            "flash_attention_backward (shared memory of the dQ kernel)");
      for (BwdKernel k : {v.dkdv_ws, v.dkdv_ws_serial})
        check(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, v.dkdv_ws_smem),
              "flash_attention_backward (shared memory of the dK dV kernel)");
      for (BwdKernel k : {v.dq_ws, v.dq_ws_ss})
        check(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, v.dq_smem),
              "flash_attention_backward (shared memory of the dQ kernel)");
    }
  });
}

}  // namespace

void flash_attention_backward(const FlashAttentionParams& p, const FlashAttentionGrads& g, Stream stream,
                              FlashKernel kernel) {
  check_flash_attention(p, false, "flash_attention_backward");
  FATHOM_CHECK(p.lse && g.dout && g.dq && g.dk && g.dv,
               "flash_attention_backward: the forward's lse, dout, dq, dk and dv must be given.");
  FATHOM_CHECK(g.dout_head_stride >= p.d_v && g.dout_token_stride >= g.dout_head_stride * (p.n_heads - 1) + p.d_v,
               "flash_attention_backward: dout strides (token ", g.dout_token_stride, ", head ", g.dout_head_stride,
               ") overlap its ", p.n_heads, " heads of ", p.d_v, ".");
  FATHOM_CHECK(p.batch <= 65535 && p.n_heads <= 65535, "flash_attention_backward: batch ", p.batch, " or heads ",
               p.n_heads, " exceed the grid (65535).");
  const cudaStream_t cs = as_cuda(stream);
  if (p.total_q == 0) {  // no query: the keys' gradients are zero (and there is no dq)
    const size_t keys = size_t(p.total_k * p.n_kv_heads);
    check(cudaMemsetAsync(g.dk, 0, keys * size_t(p.d_qk) * sizeof(float), cs), "flash_attention_backward (dk)");
    check(cudaMemsetAsync(g.dv, 0, keys * size_t(p.d_v) * sizeof(float), cs), "flash_attention_backward (dv)");
    return;
  }
  const char* refusal = kernel == FlashKernel::Simt ? "" : flash_wgmma_refusal(p);
  if (!refusal && !(aligned16(g.dout) && g.dout_token_stride % 8 == 0 && g.dout_head_stride % 8 == 0))
    refusal = "dout must be 16-byte aligned with strides of whole 16-byte units";
  if (!refusal && ceil_div(p.max_seqlen_k, kRows) > 65535) refusal = "max_seqlen_k exceeds the grid";
  FATHOM_CHECK(kernel != FlashKernel::Wgmma || !refusal,
               "flash_attention_backward: the wgmma kernels were asked for but ", refusal, ".");
  FlashArgs a{};
  a.q = p.q, a.k = p.k, a.v = p.v, a.out = p.out, a.lse = p.lse, a.cu_q = p.cu_seqlens_q, a.cu_k = p.cu_seqlens_k;
  a.q_ts = p.q_token_stride, a.q_hs = p.q_head_stride, a.k_ts = p.k_token_stride, a.k_hs = p.k_head_stride;
  a.v_ts = p.v_token_stride, a.v_hs = p.v_head_stride, a.o_ts = p.out_token_stride, a.o_hs = p.out_head_stride;
  a.total_q = p.total_q, a.total_k = p.total_k, a.n_heads = p.n_heads, a.group = p.n_heads / p.n_kv_heads;
  a.d_qk = p.d_qk, a.d_v = p.d_v, a.scale = p.scale, a.scale_log2 = p.scale * kLog2e, a.causal = p.causal ? 1 : 0;
  a.dout = g.dout, a.do_ts = g.dout_token_stride, a.do_hs = g.dout_head_stride;
  a.dq = g.dq, a.dk = g.dk, a.dv = g.dv;
  float* delta = nullptr;
  const int64_t rows = std::max<int64_t>(1, p.total_q * p.n_heads);
  // (+ the warp-specialized dK dV kernel's statistics rows: 2 n_heads rows of stats_stride)
  a.stats_stride = (stats_start(p.total_q, p.batch) + 64 + 3) & ~int64_t(3);
  const int64_t stats_floats = 2 * int64_t(p.n_heads) * a.stats_stride;
  // (the one-pass kernel unless determinism or another form is asked for)
  const bool onepass = !refusal && !g.deterministic && flash_bwd_onepass_fits(p.d_qk, p.d_v) &&
                       (bwd_form(nullptr) || bwd_form("onepass"));
  const int64_t acc_floats = onepass ? int64_t(p.n_heads) * a.stats_stride * p.d_qk : 0;  // (its dq accumulator)
  check(cudaMallocAsync(reinterpret_cast<void**>(&delta), size_t(rows + 4 + stats_floats + acc_floats) * sizeof(float),
                        cs),
        "flash_attention_backward (work space)");
  a.delta = delta;
  float* stats = delta + ((rows + 3) & ~int64_t(3));  // 16-byte aligned
  a.stats = stats;
  try {
    const bool vec = p.d_v % 8 == 0 && aligned16(p.out) && aligned16(g.dout) && p.out_token_stride % 8 == 0 &&
                     p.out_head_stride % 8 == 0 && g.dout_token_stride % 8 == 0 && g.dout_head_stride % 8 == 0;
    const bool want_stats = !refusal && !bwd_form("serial");  // (the warp-specialized dK dV kernel's)
    // (a block: 32 places of 8 lanes, or 8 of a warp; the 64 places past each sequence's end
    // only for the statistics rows)
    const int places = vec ? 32 : 8;
    launch_kernel(vec ? flash_bwd_prep_kernel<true> : flash_bwd_prep_kernel<false>,
                  dim3(unsigned(std::max<int64_t>(1, ceil_div(p.max_seqlen_q + (want_stats ? 64 : 0), places))), unsigned(p.n_heads),
                       unsigned(p.batch)),
                  dim3(256), 0, cs, a, want_stats ? stats : nullptr);
    check_launch("flash_bwd_prep_kernel");
    if (!refusal) {
      allow_bwd_smem();
      const BwdVariant* v = nullptr;
      for (const BwdVariant& x : kBwdVariants)
        if (x.d_qk == p.d_qk && x.d_v == p.d_v) v = &x;
      const CUtensorMap mk =
          flash_head_map(p.k, p.d_qk, p.n_kv_heads, p.total_k, p.k_head_stride, p.k_token_stride, kRows, "k");
      const CUtensorMap mv =
          flash_head_map(p.v, p.d_v, p.n_kv_heads, p.total_k, p.v_head_stride, p.v_token_stride, kRows, "v");
      if (onepass) {
        flash_bwd_onepass(a, mk, mv, p.batch, p.max_seqlen_q, p.max_seqlen_k, stats + stats_floats, cs);
      } else {
        // dK dV: Q and dout in tiles of qt rows; K and V whole blocks of 128
        const bool ws = !bwd_form("serial");
        const SerialBwdKernels serial = flash_bwd_serial_kernels(p.d_qk, p.d_v);
        const int qt = ws ? v->qt_ws : serial.qt;
        const CUtensorMap mq =
            flash_head_map(p.q, p.d_qk, p.n_heads, p.total_q, p.q_head_stride, p.q_token_stride, uint32_t(qt), "q");
        const CUtensorMap mdo = flash_head_map(g.dout, p.d_v, p.n_heads, p.total_q, g.dout_head_stride,
                                               g.dout_token_stride, uint32_t(qt), "dout");
        launch_kernel(ws ? (bwd_form("ws-serial") ? v->dkdv_ws_serial : v->dkdv_ws) : serial.dkdv,
                      dim3(unsigned(p.n_kv_heads), unsigned(ceil_div(p.max_seqlen_k, kRows)), unsigned(p.batch)),
                      dim3(ws ? 384 : 256), size_t(ws ? v->dkdv_ws_smem : serial.dkdv_smem), cs, mq, mk, mv, mdo, a);
        check_launch("flash_bwd_dkdv_wgmma_kernel");
        // dQ: Q and dout whole blocks of 128; K and V in tiles of 64
        const CUtensorMap mq2 =
            flash_head_map(p.q, p.d_qk, p.n_heads, p.total_q, p.q_head_stride, p.q_token_stride, kRows, "q");
        const CUtensorMap mdo2 = flash_head_map(g.dout, p.d_v, p.n_heads, p.total_q, g.dout_head_stride,
                                                g.dout_token_stride, kRows, "dout");
        const CUtensorMap mk2 =
            flash_head_map(p.k, p.d_qk, p.n_kv_heads, p.total_k, p.k_head_stride, p.k_token_stride, kKeyTile, "k");
        const CUtensorMap mv2 =
            flash_head_map(p.v, p.d_v, p.n_kv_heads, p.total_k, p.v_head_stride, p.v_token_stride, kKeyTile, "v");
        launch_kernel(ws ? (bwd_form("ws-ss") ? v->dq_ws_ss : v->dq_ws) : serial.dq,
                      dim3(unsigned(p.n_heads), unsigned(ceil_div(p.max_seqlen_q, kRows)), unsigned(p.batch)),
                      dim3(ws ? 384 : 256), size_t(ws ? v->dq_smem : serial.dq_smem), cs, mq2, mk2, mv2, mdo2, a);
        check_launch("flash_bwd_dq_wgmma_kernel");
      }
    } else {
      const int per = int(ceil_div(std::max(p.d_qk, p.d_v), 32));
      auto launch = [&](auto dq_kernel, auto dkdv_kernel) {
        if (p.max_seqlen_q > 0)
          launch_kernel(dq_kernel, dim3(unsigned(ceil_div(p.max_seqlen_q, 4)), unsigned(p.n_heads), unsigned(p.batch)),
                        dim3(128), 0, cs, a);
        if (p.max_seqlen_k > 0)
          launch_kernel(dkdv_kernel,
                        dim3(unsigned(ceil_div(p.max_seqlen_k, 4)), unsigned(p.n_kv_heads), unsigned(p.batch)),
                        dim3(128), 0, cs, a);
      };
      if (per <= 2) launch(flash_bwd_dq_simt_kernel<2>, flash_bwd_dkdv_simt_kernel<2>);
      else if (per <= 4) launch(flash_bwd_dq_simt_kernel<4>, flash_bwd_dkdv_simt_kernel<4>);
      else launch(flash_bwd_dq_simt_kernel<8>, flash_bwd_dkdv_simt_kernel<8>);
      check_launch("flash_bwd_simt_kernels");
    }
  } catch (...) {
    cudaFreeAsync(delta, cs);
    throw;
  }
  check(cudaFreeAsync(delta, cs), "flash_attention_backward (work space)");
}

}  // namespace fathom::cuda
