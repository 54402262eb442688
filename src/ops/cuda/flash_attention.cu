// Flash attention on the GPU (arguments and masking rules: src/ops/flash_attention.h; the CPU
// reference: src/ops/cpu/flash_attention.cpp; the ideas step by step: docs/flash-attention.md).
//
// Attention never materializes the (queries x keys) score matrix: a block keeps a tile of queries
// in on-chip memory and streams the keys and values past it, tile after tile, folding each tile's
// scores into a running row maximum m, a running denominator l and an unnormalized output O
// (online softmax: when m grows, l and O are rescaled by exp(m_old - m_new)); the output is O / l
// and the log-sum-exp m + log l is kept for the backward, which recomputes the scores instead of
// storing them (FlashAttention 1). The work is split over query tiles as well as heads and
// sequences, and the rescaling happens once per key tile, not per key (FlashAttention 2).
//
// Two Hopper kernels (sm_90a) do this with Hopper's own machinery (FlashAttention 3's units):
// - flash_fwd_wgmma_kernel, the serial form: a block of two or three warpgroups owns 128 or 192
//   queries (64 each) of one head; thread 0 issues TMA bulk tensor copies (cp.async.bulk.tensor)
//   of the query tile once and of each 128-key tile of K and V into a ring of shared-memory
//   stages, 128-byte swizzled, each copy completing on its stage's mbarrier; S = Q Kᵀ is a chain
//   of wgmma m64n128k16 with both operands in shared memory; the softmax runs on S in registers;
//   P is converted to bf16 in registers, where wgmma's A operand may live, and O += P V is a
//   chain of wgmma with V read transposed (N-major) from shared memory — no copy of P or V
//   anywhere; while one warpgroup computes its softmax the others' wgmmas keep the tensor cores
//   busy.
// - flash_fwd_ws_kernel, warp-specialized and pipelined (the default): a producer warpgroup that
//   only copies (setmaxnreg gives its registers to the consumers), and consumers that overlap
//   each tile's softmax with the previous tile's P V, optionally taking turns (ping-pong).
// Which one runs for which head dims: fwd_variants() (measured in bench/RESULTS.md).
// The SIMT kernel (flash_fwd_simt_kernel) is the fallback for GPUs without an sm_90a image.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/error.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/flash_attention.cuh"
#include "ops/cuda/hopper.cuh"

namespace fathom::cuda {
namespace {

// ---- the Hopper kernel

constexpr int kBlockN = 128;  // keys of a tile; a block's queries: 64 per warpgroup, kWGs of them

template <int kDqk, int kDv, int kWGs>
struct FlashShape {
  static constexpr int kBlockM = 64 * kWGs;
  static constexpr int kQBytes = kBlockM * kDqk * 2;
  static constexpr int kKBytes = kBlockN * kDqk * 2;
  static constexpr int kVBytes = kBlockN * kDv * 2;
  static constexpr int kFit = (227 * 1024 - 2048 - kQBytes) / (kKBytes + kVBytes);
  static constexpr int kStages = kFit > 4 ? 4 : kFit;
  static constexpr int kSmem = kQBytes + kStages * (kKBytes + kVBytes) + 1024 + 256;  // + alignment, barriers
  static_assert(8 * (2 + 4 * kStages) + 4 <= 256, "the barriers and the item fit their room");
  static_assert(kStages >= 2, "two stages of K and V must fit");
};

#ifdef FATHOM_SM90A
constexpr int kChunkBytes = 128 * 128;  // a 128-row box of one 64-column chunk: 16 KB

// The key tiles block m_block of a sequence reads: all of them, or under the causal mask those up
// to its last query's diagonal.
__device__ inline int key_tiles(const FlashArgs& a, const SeqSpan& s, int m_block, int kBlockM) {
  int n = (s.lk + kBlockN - 1) / kBlockN;
  if (a.causal) {
    const int last_key = min(m_block * kBlockM + kBlockM - 1, s.lq - 1) + s.lk - s.lq;
    n = last_key < 0 ? 0 : min(n, last_key / kBlockN + 1);
  }
  return n;
}

// S = Q Kᵀ for one key tile, 64 x 128 scores in 64 registers a thread: wgmma m64n128k16 from
// shared memory, 16 dims (32 bytes of the swizzled rows) a step, one 64-dim chunk after the other.
template <int kQChunks, int kQChunkBytes>
__device__ __forceinline__ void qk_product(float (&sc)[64], uint64_t dq0, uint64_t dk0) {
#pragma unroll
  for (int c = 0; c < kQChunks; ++c)
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk)
      wgmma_ss<128>(sc, dq0 + c * (kQChunkBytes >> 4) + 2 * kk, dk0 + c * (kChunkBytes >> 4) + 2 * kk,
                          (c | kk) != 0);
}

// P in bf16 as wgmma's A fragments: the m64nNk16 accumulator layout of 16 keys is the A layout of
// k16, so the registers convert in place, pairs (2x, 2x + 1) of each 8.
__device__ __forceinline__ void pack_p(uint32_t (&pa)[kBlockN / 16][4], const float (&p)[64]) {
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk)
#pragma unroll
    for (int x = 0; x < 4; ++x) pa[kk][x] = pack_bf16(p[8 * kk + 2 * x], p[8 * kk + 2 * x + 1]);
}

// O (+)= P V for one key tile, V's 16 keys a step (2 KB of the N-major tile). The fragments must
// have been written before the last wgmma fence.
template <int kDv>
__device__ __forceinline__ void pv_product(float (&o)[kDv / 2], const uint32_t (&pa)[kBlockN / 16][4], uint64_t dv0) {
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk) {
    wgmma_rs_tb<kDv>(o, pa[kk], dv0 + kk * (2048 >> 4), 1);
  }
}

// The online softmax of key tile j's scores (in place: scores in, p = exp(scale (s - m_new)) out):
// with kMask, keys past the sequence or, causally, past a row's diagonal score -inf first (by
// selects, not branches: the compiler waits for every running wgmma before a branch it cannot
// prove uniform, which would end the overlap); each row's new maximum over the quad of lanes that
// shares it; l rescaled and p summed per thread (the quad's sums are added at the end). corr:
// exp(scale (m_old - m_new)) per row, for O.
struct RowState {
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
};
// kN = 64: only the scores of the tile's first 64 keys (sc[0, 32)) are used.
template <bool kMask, int kN = kBlockN>
__device__ __forceinline__ void softmax_tile(float (&sc)[kBlockN / 2], RowState& st, float (&corr)[2], const FlashArgs& a,
                                             const SeqSpan& s, int j, int r0, int lane) {
  constexpr int kPer = kN / 2;
  if constexpr (kMask) {
    const int diag = s.lk - s.lq, k0 = j * kBlockN + 2 * (lane % 4);
    const int end[2] = {min(s.lk, a.causal ? r0 + diag + 1 : s.lk), min(s.lk, a.causal ? r0 + 8 + diag + 1 : s.lk)};
#pragma unroll
    for (int i = 0; i < kPer; ++i) sc[i] = k0 + 8 * (i / 4) + (i & 1) < end[(i >> 1) & 1] ? sc[i] : -INFINITY;
  }
  float mx[2] = {st.m[0], st.m[1]}, ms[2];
#pragma unroll
  for (int i = 0; i < kPer; ++i) mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], sc[i]);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFullMask, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFullMask, mx[r], 2));
    ms[r] = mx[r] == -INFINITY ? 0.f : mx[r] * a.scale_log2;  // a row with no key yet stays at zero
    corr[r] = fast_exp2(st.m[r] * a.scale_log2 - ms[r]);
    st.m[r] = mx[r];
    st.l[r] *= corr[r];
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int r = (i >> 1) & 1;
    sc[i] = fast_exp2(fmaf(sc[i], a.scale_log2, -ms[r]));
    st.l[r] += sc[i];
  }
}

// The key tiles (of n, from the last) that need the mask: past the sequence's end or, causally,
// reaching past the diagonal of the block's first query.
__device__ inline int masked_tiles(const FlashArgs& a, const SeqSpan& s, int m_block, int n, int kBlockM) {
  int masked = 0;
  for (int j = n - 1; j >= 0; --j, ++masked)
    if (!((j + 1) * kBlockN > s.lk || (a.causal && (j + 1) * kBlockN - 1 > m_block * kBlockM + s.lk - s.lq))) break;
  return masked;
}

template <int kDv>
__device__ __forceinline__ void rescale(float (&o)[kDv / 2], const float (&corr)[2]) {
#pragma unroll
  for (int i = 0; i < kDv / 8; ++i)
#pragma unroll
    for (int r = 0; r < 2; ++r) o[4 * i + 2 * r] *= corr[r], o[4 * i + 2 * r + 1] *= corr[r];
}

// The forward's shared memory: the query tile, the rings of K and V stages (128-byte swizzled:
// 1024-byte aligned), and their mbarriers — full: one arrival and the copies' bytes; empty: one
// arrival per consumer thread — which thread 0 initializes (the caller syncs the block after).
struct FwdSmem {
  uint32_t sq, sk, sv, q_full, k_full, v_full, k_empty, v_empty, q_empty, item;
};
template <class Shape>
__device__ inline FwdSmem fwd_smem(uint8_t* raw, int consumers) {
  constexpr int kStages = Shape::kStages;
  FwdSmem m;
  m.sq = (smem_u32(raw) + 1023u) & ~1023u;
  m.sk = m.sq + Shape::kQBytes, m.sv = m.sk + kStages * Shape::kKBytes;
  m.q_full = m.sv + kStages * Shape::kVBytes, m.k_full = m.q_full + 8, m.v_full = m.k_full + 8 * kStages;
  m.k_empty = m.v_full + 8 * kStages, m.v_empty = m.k_empty + 8 * kStages, m.q_empty = m.v_empty + 8 * kStages;
  m.item = m.q_empty + 8;  // the query block the Q tile in shared memory belongs to (-1: no more)
  if (threadIdx.x == 0) {
    mbar_init(m.q_full, 1);
    mbar_init(m.q_empty, uint32_t(consumers / 32));  // (flash_fwd_ws_kernel's: one arrival per consumer warp)
    for (int i = 0; i < kStages; ++i) {
      mbar_init(m.k_full + 8 * i, 1);
      mbar_init(m.v_full + 8 * i, 1);
      mbar_init(m.k_empty + 8 * i, uint32_t(consumers));
      mbar_init(m.v_empty + 8 * i, uint32_t(consumers));
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  return m;
}

// out = O / l in bf16 (a thread's rows r0 and r0 + 8), and the log-sum-exp scale · m + ln l.
template <int kDv>
__device__ __forceinline__ void store_output(const FlashArgs& a, const SeqSpan& s, int h, int r0, int lane,
                                             const float (&o)[kDv / 2], RowState& rs) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    rs.l[r] += __shfl_xor_sync(kFullMask, rs.l[r], 1);
    rs.l[r] += __shfl_xor_sync(kFullMask, rs.l[r], 2);
    const int row = r0 + 8 * r;
    if (row >= s.lq) continue;
    const float inv = rs.l[r] > 0.f ? 1.f / rs.l[r] : 0.f;
    uint16_t* out = a.out + (s.q0 + row) * a.o_ts + int64_t(h) * a.o_hs + 2 * (lane % 4);
#pragma unroll
    for (int i = 0; i < kDv / 8; ++i)
      *reinterpret_cast<uint32_t*>(out + 8 * i) = pack_bf16(o[4 * i + 2 * r] * inv, o[4 * i + 2 * r + 1] * inv);
    if (a.lse && lane % 4 == 0)
      a.lse[int64_t(h) * a.total_q + s.q0 + row] = rs.l[r] > 0.f ? rs.m[r] * a.scale + logf(rs.l[r]) : -INFINITY;
  }
}

#endif

// One tile's steps one after the other within a warpgroup — S = Q Kᵀ, the softmax, O += P V —
// while the block's other warpgroups, interleaved by the warp schedulers, keep the tensor cores
// busy: two or three warpgroups (128 or 192 queries).
template <int kDqk, int kDv, int kWGs>
__global__ void __launch_bounds__(128 * kWGs, 1)
    flash_fwd_wgmma_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                           const __grid_constant__ CUtensorMap map_v, const FlashArgs a) {
#ifdef FATHOM_SM90A
  using Shape = FlashShape<kDqk, kDv, kWGs>;
  constexpr int kStages = Shape::kStages, kQChunks = kDqk / kChunk;
  constexpr int kBlockM = Shape::kBlockM, kThreads = 128 * kWGs;
  pdl_wait();
  const int h = int(blockIdx.x), b = int(blockIdx.z);
  const int m_block = int(gridDim.y - 1 - blockIdx.y);  // the longest causal blocks start first
  const SeqSpan s = seq_span(a, b);
  if (m_block * kBlockM >= s.lq) return;
  const int n_tiles = key_tiles(a, s, m_block, kBlockM), kvh = h / a.group;
  extern __shared__ uint8_t smem_raw[];
  // every consumer thread arrives on the empty barriers (no divergent path near wgmmas)
  const FwdSmem m = fwd_smem<Shape>(smem_raw, kThreads);
  const uint32_t sq = m.sq, sk = m.sk, sv = m.sv, q_full = m.q_full, k_full = m.k_full, v_full = m.v_full;
  const uint32_t k_empty = m.k_empty, v_empty = m.v_empty;
  const int tid = int(threadIdx.x);
  __syncthreads();

  // Thread 0 produces: loop step `it` reads key tile n_tiles - 1 - it (the masked tiles first);
  // a stage is refilled once all consumer threads released it.
  auto key_row = [&](int it) { return int(s.k0 + int64_t(n_tiles - 1 - it) * kBlockN); };
  auto produce_k = [&](int it) {
    const int st = it % kStages;
    mbar_wait(k_empty + 8 * st, uint32_t(((it / kStages) & 1) ^ 1));  // the first round passes at once
    mbar_expect_tx(k_full + 8 * st, Shape::kKBytes);
    load_head_rows<kDqk, kBlockN>(sk + st * Shape::kKBytes, &map_k, kvh, key_row(it), k_full + 8 * st);
  };
  auto produce_v = [&](int it) {
    const int st = it % kStages;
    mbar_wait(v_empty + 8 * st, uint32_t(((it / kStages) & 1) ^ 1));
    mbar_expect_tx(v_full + 8 * st, Shape::kVBytes);
    load_head_rows<kDv, kBlockN>(sv + st * Shape::kVBytes, &map_v, kvh, key_row(it), v_full + 8 * st);
  };
  if (tid == 0) {
    mbar_expect_tx(q_full, Shape::kQBytes);
    load_head_rows<kDqk, kBlockM>(sq, &map_q, h, int(s.q0 + int64_t(m_block) * kBlockM), q_full);
    for (int it = 0; it < min(kStages, n_tiles); ++it) produce_k(it), produce_v(it);
  }

  // Warpgroup wg owns queries 64 wg .. of the block; this thread rows r0 and r0 + 8 of the
  // sequence, and in each 8-key group of a tile the keys 2 (lane % 4) + {0, 1}.
  const int wg = __shfl_sync(kFullMask, tid / 128, 0);
  const int warp = (tid % 128) / 32, lane = tid % 32;
  const int r0 = m_block * kBlockM + wg * 64 + warp * 16 + lane / 4;
  float o[kDv / 2];
#pragma unroll
  for (int i = 0; i < kDv / 2; ++i) o[i] = 0.f;
  RowState rs;
  float sc[64], corr[2];
  uint32_t pa[kBlockN / 16][4];
  const uint64_t dq0 = sw128_desc(sq + wg * 64 * 128);
  auto dk = [&](int it) { return sw128_desc(sk + (it % kStages) * Shape::kKBytes); };
  auto dv = [&](int it) { return sw128_desc_mn(sv + (it % kStages) * Shape::kVBytes, kChunkBytes); };
  auto phase = [&](int it) { return uint32_t((it / kStages) & 1); };
  auto release = [&](uint32_t empty, int it) { mbar_arrive(empty + 8 * (it % kStages)); };
  // (fence_regs: see hopper.cuh — accumulators read only after their wait, fragments and O
  // written before the fence)

  mbar_wait(q_full, 0);
  const int n_masked = masked_tiles(a, s, m_block, n_tiles, kBlockM);
  {
    auto step = [&](int it, auto masked) {
      mbar_wait(k_full + 8 * (it % kStages), phase(it));
      wgmma_fence();
      qk_product<kQChunks, kBlockM * 128>(sc, dq0, dk(it));
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(sc);
      release(k_empty, it);
      if (tid == 0 && it >= 1 && it - 1 + kStages < n_tiles) produce_k(it - 1 + kStages);
      softmax_tile<decltype(masked)::value>(sc, rs, corr, a, s, n_tiles - 1 - it, r0, lane);
      rescale<kDv>(o, corr);
      pack_p(pa, sc);
      mbar_wait(v_full + 8 * (it % kStages), phase(it));
      fence_regs(o), fence_regs(pa);
      wgmma_fence();
      pv_product<kDv>(o, pa, dv(it));
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(o);
      release(v_empty, it);
      if (tid == 0 && it >= 1 && it - 1 + kStages < n_tiles) produce_v(it - 1 + kStages);
    };
    int it = 0;
    for (; it < n_masked; ++it) step(it, std::true_type{});
    for (; it < n_tiles; ++it) step(it, std::false_type{});
  }

  store_output<kDv>(a, s, h, r0, lane, o, rs);
#else
  (void)map_q, (void)map_k, (void)map_v, (void)a;
  __trap();  // never launched: sm90a_available() is false without an sm_90a image
#endif
}

// FlashAttention 3's full form: warp specialization and the softmax overlapped with the tensor
// cores inside a warpgroup. A block of three warpgroups owns 128 queries: warpgroup 0 is the
// producer — it gives most of its registers back (setmaxnreg 24) and one thread issues the TMA
// copies of Q and of every K/V tile, waiting only on the ring's empty barriers, so no consumer ever
// waits for a copy to be issued; warpgroups 1 and 2 consume 64 queries each with 240 registers
// (setmaxnreg), enough for two score tiles' worth of state. Each consumer runs the key tiles
// software-pipelined:
//   issue S(j) = Q K(j)ᵀ; rescale O by tile j-1's correction; issue O += P(j-1) V(j-1);
//   wait for S(j) only; softmax of S(j) while P(j-1) V(j-1) still runs; wait for it; P(j) = bf16.
// O is rescaled one tile late — between the two issues, where no wgmma writes it — so the softmax
// touches only S(j)'s registers and the row state, and never has to wait for the P·V product.
// With kPingPong the two consumers also take turns issuing their products (named barriers): one
// warpgroup's softmax runs while the other's wgmmas hold the tensor cores. Under the causal mask a
// consumer skips the diagonal key tiles that mask all of its 64 queries (with 192 queries a block,
// a tenth of the tiles at 2,048 tokens).
template <int kDqk, int kDv, int kC, bool kPingPong, bool kPersistent>
__global__ void __launch_bounds__(128 * (kC + 1), 1)
    flash_fwd_ws_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                        const __grid_constant__ CUtensorMap map_v, const FlashArgs a) {
#ifdef FATHOM_SM90A
  using Shape = FlashShape<kDqk, kDv, kC>;
  constexpr int kStages = Shape::kStages, kQChunks = kDqk / kChunk, kBlockM = Shape::kBlockM;
  constexpr int kConsumers = 128 * kC;
  constexpr int kItemBar = 1 + kC;  // the named barrier of the item word (1 .. kC: the ping-pong turns)
  // registers: 168 x 384 = 24 x 128 + 240 x 256; 128 x 512 >= 24 x 128 + 160 x 384
  constexpr int kProducerRegs = 24, kConsumerRegs = kC == 2 ? 240 : 160;
  static_assert(setmaxnreg_fits(kProducerRegs, kConsumerRegs, kC), "setmaxnreg over the launch's registers");
  pdl_wait();
  extern __shared__ uint8_t smem_raw[];
  const FwdSmem m = fwd_smem<Shape>(smem_raw, kConsumers);
  const uint32_t sq = m.sq, sk = m.sk, sv = m.sv, q_full = m.q_full, k_full = m.k_full, v_full = m.v_full;
  const uint32_t k_empty = m.k_empty, v_empty = m.v_empty, q_empty = m.q_empty;
  const int tid = int(threadIdx.x);
  __syncthreads();
  const int wg = __shfl_sync(kFullMask, tid / 128, 0);
  // The block's work: query blocks, numbered sequence by sequence, in a sequence from the last
  // (the longest under the causal mask) to the first, head by head within — the grid's order. The
  // grid form has one, its block's; in the persistent form a block takes them as it frees up
  // (next_work_item), so that the blocks running at once share a sequence's keys in L2 as the
  // grid's do. The consumers learn which with the Q tile (m.item); a query block past its
  // sequence's end is skipped (n_tiles = -1).
  const int hm = a.n_heads * a.m_blocks;
  auto decode = [&](int i, int& h, int& m_block, SeqSpan& s, int& n_tiles) {
    const int b = i / hm, r = i % hm;
    m_block = a.m_blocks - 1 - r / a.n_heads, h = r % a.n_heads;
    s = seq_span(a, b);
    n_tiles = m_block * kBlockM >= s.lq ? -1 : key_tiles(a, s, m_block, kBlockM);
  };
  // The rings' position: g key tiles of earlier items passed through them; qn query tiles.
  int g = 0, qn = 0;
  auto stage = [&](int it) { return (g + it) % kStages; };
  auto phase = [&](int it) { return uint32_t(((g + it) / kStages) & 1); };
  if (wg == 0) {
    // The producer: loop step `it` brings key tile n_tiles - 1 - it (the masked tiles first). The
    // next item's query tile waits until every consumer warp has done its last Q Kᵀ product.
    setmaxnreg_dec<kProducerRegs>();
    if (tid < 32) {  // the producer warp: lane 0 copies; the warp takes part in the item barrier
      const int total = kPersistent ? hm * a.batch : 0;
      int i = kPersistent ? int(blockIdx.x) : int((blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x);
      // before the item word is written again, every consumer thread has read it (a named barrier,
      // which is also what compute-sanitizer's racecheck can see)
      auto item_free = [&] {
        __syncwarp();
        if (qn > 0) named_bar_sync(kItemBar, 32 + kConsumers);
      };
      for (;;) {
        int h, m_block, n_tiles;
        SeqSpan s;
        decode(i, h, m_block, s, n_tiles);
        if (n_tiles >= 0) {
          item_free();
          if (tid == 0) {
            const int kvh = h / a.group;
            mbar_wait(q_empty, uint32_t(qn & 1) ^ 1u);  // the first round passes at once
            st_shared_u32(m.item, uint32_t(i));         // (published by the arrival below)
            mbar_expect_tx(q_full, Shape::kQBytes);
            load_head_rows<kDqk, kBlockM>(sq, &map_q, h, int(s.q0 + int64_t(m_block) * kBlockM), q_full);
            for (int it = 0; it < n_tiles; ++it) {
              const int st = stage(it), row = int(s.k0 + int64_t(n_tiles - 1 - it) * kBlockN);
              mbar_wait(k_empty + 8 * st, phase(it) ^ 1);  // the first round passes at once
              mbar_expect_tx(k_full + 8 * st, Shape::kKBytes);
              load_head_rows<kDqk, kBlockN>(sk + st * Shape::kKBytes, &map_k, kvh, row, k_full + 8 * st);
              mbar_wait(v_empty + 8 * st, phase(it) ^ 1);
              mbar_expect_tx(v_full + 8 * st, Shape::kVBytes);
              load_head_rows<kDv, kBlockN>(sv + st * Shape::kVBytes, &map_v, kvh, row, v_full + 8 * st);
            }
          }
          g += n_tiles, ++qn;
        }
        if (!kPersistent) break;
        i = __shfl_sync(kFullMask, tid == 0 ? next_work_item(a.sched) : 0, 0);
        if (i >= total) break;
      }
      // no more: the consumers learn it with the next Q tile's arrival
      item_free();
      if (tid == 0) {
        mbar_wait(q_empty, uint32_t(qn & 1) ^ 1u);
        st_shared_u32(m.item, ~0u);
        mbar_arrive(q_full);
        if (kPersistent) work_items_done(a.sched);
      }
    }
  } else {
    setmaxnreg_inc<kConsumerRegs>();
    const int cw = wg - 1;  // this consumer's 64 queries of the block
    const int warp = (tid % 128) / 32, lane = tid % 32;
    const uint64_t dq0 = sw128_desc(sq + cw * 64 * 128);
    float o[kDv / 2];
    float sc[64], corr[2];
    uint32_t pa[kBlockN / 16][4];
    auto dk = [&](int it) { return sw128_desc(sk + stage(it) * Shape::kKBytes); };
    auto dv = [&](int it) { return sw128_desc_mn(sv + stage(it) * Shape::kVBytes, kChunkBytes); };
    auto full = [&](uint32_t bar, int it) { mbar_wait(bar + 8 * stage(it), phase(it)); };
    auto release = [&](uint32_t empty, int it) { mbar_arrive(empty + 8 * stage(it)); };
    auto release_q = [&] {  // (after the warp's last Q Kᵀ product has completed)
      __syncwarp();
      if (lane == 0) mbar_arrive(q_empty);
    };
    // ping-pong: consumer cw issues after bar 1 + cw and then lets the next one go (round
    // robin); the last consumer lets consumer 0 go first, and skips its last arrival so that the
    // barriers end balanced (256: the 128 threads waiting and the 128 arriving).
    auto my_turn = [&] {
      if constexpr (kPingPong) named_bar_sync(1 + cw, 256);
    };
    auto your_turn = [&](bool last) {
      if constexpr (kPingPong)
        if (!(last && cw == kC - 1)) named_bar_arrive(1 + (cw + 1) % kC, 256);
    };
    for (;;) {
      mbar_wait(q_full, uint32_t(qn & 1));
      const int i = int(ld_shared_u32(m.item));
      if (i < 0) break;
      named_bar_arrive(kItemBar, 32 + kConsumers);  // (read: the producer may write the next)
      int h, m_block, n_tiles;
      SeqSpan s;
      decode(i, h, m_block, s, n_tiles);
      const int r0 = m_block * kBlockM + cw * 64 + warp * 16 + lane / 4;
#pragma unroll
      for (int x = 0; x < kDv / 2; ++x) o[x] = 0.f;
      RowState rs;
      corr[0] = corr[1] = 1.f;
      const int n_masked = masked_tiles(a, s, m_block, n_tiles, kBlockM);
      // The leading tiles (the block's last keys) that mask out every one of this consumer's 64
      // queries: causally past its last query's diagonal, or all of them when its queries lie past
      // the sequence. It waits for and releases those stages (and takes its turns) without
      // computing — under the causal mask that is a tenth of the products at 192 queries a block.
      const int my_first = m_block * kBlockM + cw * 64;
      int skip = 0, last_key = s.lk - 1;  // the last key any of the consumer's queries sees
      if (my_first >= s.lq) {
        skip = n_tiles;
      } else if (a.causal) {
        last_key = min(last_key, min(my_first + 63, s.lq - 1) + s.lk - s.lq);
        skip = last_key < 0 ? n_tiles : max(0, n_tiles - 1 - last_key / kBlockN);
      }
      // The first tile it computes may mask all of its last 64 keys too (the diagonal, or the
      // sequence's end): then the softmax runs over the first 64 keys' scores only (half the
      // exponentials: at head dim 64 the SFU, not the tensor cores, bounds a tile). The n64 product
      // for that tile alone made ptxas serialize every wgmma of the kernel (C7511), so S stays n128.
      const bool half = skip < n_tiles && last_key < (n_tiles - 1 - skip) * kBlockN + 64;
      if (n_tiles > 0) {  // (none: causal queries before every key; O = 0, lse = -inf)
        if constexpr (kPingPong)
          if (cw == kC - 1) named_bar_arrive(1, 256);
        for (int it = 0; it < skip; ++it) {
          full(k_full, it);
          full(v_full, it);
          my_turn();
          your_turn(false);
          release(k_empty, it);
          release(v_empty, it);
        }
      }
      if (skip < n_tiles) {
        // the first tile: S(skip) and its softmax alone
        full(k_full, skip);
        my_turn();
        wgmma_fence();
        qk_product<kQChunks, kBlockM * 128>(sc, dq0, dk(skip));
        wgmma_commit();
        your_turn(false);
        wgmma_wait<0>();
        fence_regs(sc);
        release(k_empty, skip);
        if (half) {  // (a half tile is always a masked one)
          softmax_tile<true, kBlockN / 2>(sc, rs, corr, a, s, n_tiles - 1 - skip, r0, lane);
#pragma unroll
          for (int x = kBlockN / 4; x < kBlockN / 2; ++x) sc[x] = 0.f;  // the masked keys' P
        } else if (n_masked > skip) {
          softmax_tile<true>(sc, rs, corr, a, s, n_tiles - 1 - skip, r0, lane);
        } else {
          softmax_tile<false>(sc, rs, corr, a, s, n_tiles - 1 - skip, r0, lane);
        }
        pack_p(pa, sc);

        auto step = [&](int it, auto masked) {
          full(k_full, it);
          full(v_full, it - 1);
          my_turn();
          fence_regs(pa);
          wgmma_fence();
          qk_product<kQChunks, kBlockM * 128>(sc, dq0, dk(it));
          wgmma_commit();
          rescale<kDv>(o, corr);
          fence_regs(o);
          wgmma_fence();
          pv_product<kDv>(o, pa, dv(it - 1));
          wgmma_commit();
          your_turn(false);
          wgmma_wait<1>();
          fence_regs(sc);
          release(k_empty, it);
          softmax_tile<decltype(masked)::value>(sc, rs, corr, a, s, n_tiles - 1 - it, r0, lane);
          fence_regs(sc);
          wgmma_wait<0>();
          fence_regs(o);
          release(v_empty, it - 1);
          pack_p(pa, sc);
        };
        int it = skip + 1;
        for (; it < n_masked; ++it) step(it, std::true_type{});
        for (; it < n_tiles; ++it) step(it, std::false_type{});
        release_q();  // (the last step waited for its Q Kᵀ)

        // the last tile's P·V
        full(v_full, n_tiles - 1);
        my_turn();
        rescale<kDv>(o, corr);
        fence_regs(o), fence_regs(pa);
        wgmma_fence();
        pv_product<kDv>(o, pa, dv(n_tiles - 1));
        wgmma_commit();
        your_turn(true);
        wgmma_wait<0>();
        fence_regs(o);
        release(v_empty, n_tiles - 1);
      } else {
        release_q();
        if (n_tiles > 0) {  // the last P·V's turn, balancing the barriers
          my_turn();
          your_turn(true);
        }
      }
      store_output<kDv>(a, s, h, r0, lane, o, rs);
      g += n_tiles, ++qn;
    }
  }
#else
  (void)map_q, (void)map_k, (void)map_v, (void)a;
  __trap();
#endif
}

// ---- the fallback: one warp per (query, head), the keys one at a time with the online softmax;
// each lane holds dims lane + 32 i of q and of the output (kPer of them).
template <int kPer>
__global__ void __launch_bounds__(128) flash_fwd_simt_kernel(const FlashArgs a) {
  pdl_wait();
  const int h = int(blockIdx.y), b = int(blockIdx.z);
  const SeqSpan s = seq_span(a, b);
  const int row = int(blockIdx.x) * 4 + int(threadIdx.x / 32), lane = int(threadIdx.x % 32);
  if (row >= s.lq) return;
  const int kvh = h / a.group;
  const uint16_t* q = a.q + (s.q0 + row) * a.q_ts + int64_t(h) * a.q_hs;
  float qv[kPer], o[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    qv[i] = d < a.d_qk ? bf16_bits_to_f32(q[d]) : 0.f;
    o[i] = 0.f;
  }
  const int n = a.causal ? max(0, min(s.lk, row + s.lk - s.lq + 1)) : s.lk;
  float m = -INFINITY, l = 0.f;  // m in log2 units
  for (int j = 0; j < n; ++j) {
    const uint16_t* k = a.k + (s.k0 + j) * a.k_ts + int64_t(kvh) * a.k_hs;
    const uint16_t* v = a.v + (s.k0 + j) * a.v_ts + int64_t(kvh) * a.v_hs;
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (lane + 32 * i < a.d_qk) dot += qv[i] * bf16_bits_to_f32(k[lane + 32 * i]);
    const float sj = warp_sum(dot) * a.scale_log2, m_new = fmaxf(m, sj);
    const float corr = exp2f(m - m_new), p = exp2f(sj - m_new);
    l = l * corr + p;
    m = m_new;
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (lane + 32 * i < a.d_v) o[i] = o[i] * corr + p * bf16_bits_to_f32(v[lane + 32 * i]);
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
  uint16_t* out = a.out + (s.q0 + row) * a.o_ts + int64_t(h) * a.o_hs;
#pragma unroll
  for (int i = 0; i < kPer; ++i)
    if (lane + 32 * i < a.d_v) out[lane + 32 * i] = f32_to_bf16_bits(o[i] * inv);
  if (a.lse && lane == 0) a.lse[int64_t(h) * a.total_q + s.q0 + row] = l > 0.f ? m * 0.69314718f + logf(l) : -INFINITY;
}

// ---- host side

using WgmmaKernel = void (*)(const CUtensorMap, const CUtensorMap, const CUtensorMap, const FlashArgs);
// The forward kernels by head dims and schedule (FATHOM_FLASH_SCHEDULE picks one, for benchmarks):
//   serial2, serial3 — flash_fwd_wgmma_kernel, two or three warpgroups (128 / 192 queries);
//   ws, ws3 — flash_fwd_ws_kernel, a producer and two or three pipelined consumers;
//   pingpong, pingpong3 — the same with the consumers taking turns at the tensor cores;
//   a -p suffix: the same kernel persistent (a block per SM taking query block after query block).
// The default for each head dims is the fastest measured on the H200 (bench/RESULTS.md).
struct FwdVariant {
  int d_qk, d_v;
  const char* schedule;
  WgmmaKernel kernel;
  int smem, threads, block_m;
  bool is_default;
  bool persistent = false;  // a block per SM taking query block after query block (else one each)
  WgmmaKernel grid_kernel = nullptr;  // the persistent kernel's grid form (no counters to be had)
};
template <int kDqk, int kDv, int kWGs>
FwdVariant serial(const char* name, bool is_default) {
  return {kDqk, kDv, name, flash_fwd_wgmma_kernel<kDqk, kDv, kWGs>, FlashShape<kDqk, kDv, kWGs>::kSmem, 128 * kWGs,
          64 * kWGs, is_default};
}
template <int kDqk, int kDv, int kC, bool kPP, bool kPersistent = false>
FwdVariant ws(const char* name, bool is_default) {
  return {kDqk, kDv, name, flash_fwd_ws_kernel<kDqk, kDv, kC, kPP, kPersistent>, FlashShape<kDqk, kDv, kC>::kSmem,
          128 * (kC + 1), 64 * kC, is_default, kPersistent, flash_fwd_ws_kernel<kDqk, kDv, kC, kPP, false>};
}
const std::vector<FwdVariant>& fwd_variants() {
  static const std::vector<FwdVariant> v = {
      serial<64, 64, 2>("serial2", false),
      serial<64, 64, 3>("serial3", false),
      ws<64, 64, 2, false>("ws", false),
      ws<64, 64, 2, true>("pingpong", false),
      ws<64, 64, 3, false>("ws3", false),
      ws<64, 64, 3, true>("pingpong3", false),
      ws<64, 64, 3, true, true>("pingpong3-p", true),
      serial<128, 128, 2>("serial2", false),
      serial<128, 128, 3>("serial3", false),
      ws<128, 128, 2, false>("ws", false),
      ws<128, 128, 2, false, true>("ws-p", true),
      ws<128, 128, 2, true>("pingpong", false),
      serial<192, 128, 2>("serial2", false),
      ws<192, 128, 2, false>("ws", false),
      ws<192, 128, 2, false, true>("ws-p", true),
      ws<192, 128, 2, true>("pingpong", false),
  };
  return v;
}

std::once_flag g_flash_smem[kMaxDevices];
void allow_flash_smem() {
  once_per_device(g_flash_smem, [] {
    for (const FwdVariant& v : fwd_variants())
      for (const WgmmaKernel k : {v.kernel, v.grid_kernel})
        if (k)
          check(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, v.smem),
                "flash_attention (shared memory of the forward kernels)");
  });
}

}  // namespace

int* flash_sched_counters(cudaStream_t s) {
  static std::mutex mu;
  static std::map<std::pair<int, cudaStream_t>, int*> counters;
  int device = 0;
  check(cudaGetDevice(&device), "flash_attention (device)");
  std::lock_guard<std::mutex> lock(mu);
  int*& c = counters[{device, s}];
  if (!c) {
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    check(cudaStreamIsCapturing(s, &capturing), "flash_attention (capture status)");
    if (capturing != cudaStreamCaptureStatusNone) return nullptr;
    int* p = nullptr;
    check(cudaMalloc(&p, 2 * sizeof(int)), "flash_attention (the persistent kernel's counters)");
    check(cudaMemsetAsync(p, 0, 2 * sizeof(int), s), "flash_attention (the persistent kernel's counters)");
    c = p;
  }
  return c;
}

namespace {

// The kernel for p's head dims: the schedule FATHOM_FLASH_SCHEDULE names (FATHOM_FLASH_WARPGROUPS=2:
// serial2) where it exists for them, else the default; null for other head dims.
const FwdVariant* wgmma_variant(const FlashAttentionParams& p) {
  const char* e = std::getenv("FATHOM_FLASH_SCHEDULE");
  const char* w = std::getenv("FATHOM_FLASH_WARPGROUPS");
  const char* want = e ? e : w && !std::strcmp(w, "2") ? "serial2" : nullptr;
  const FwdVariant* found = nullptr;
  for (const FwdVariant& v : fwd_variants())
    if (v.d_qk == p.d_qk && v.d_v == p.d_v) {
      if (want && !std::strcmp(v.schedule, want)) return &v;
      if (v.is_default) found = &v;
    }
  return found;
}

}  // namespace

// The tensor map of a (tokens, heads, d) bf16 tensor read as box_rows x 64-column boxes of one
// head, 128-byte swizzled.
CUtensorMap flash_head_map(const uint16_t* ptr, int d, int heads, int64_t tokens, int64_t head_stride, int64_t token_stride,
                     uint32_t box_rows, const char* what) {
  CUtensorMap m{};
  const cuuint64_t dims[3] = {cuuint64_t(d), cuuint64_t(heads), cuuint64_t(tokens)};
  const cuuint64_t strides[2] = {cuuint64_t(head_stride) * 2, cuuint64_t(token_stride) * 2};
  const cuuint32_t box[3] = {uint32_t(kChunk), 1, box_rows};
  const cuuint32_t elem[3] = {1, 1, 1};
  const CUresult r = tensor_map_encoder()(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<uint16_t*>(ptr), dims,
                                          strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                          CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  FATHOM_CHECK(r == CUDA_SUCCESS, "flash_attention: the tensor map of ", what, " (", tokens, " x ", heads, " x ", d,
               ") was refused (CUresult ", int(r), ")");
  return m;
}

void flash_attention_setup() {
  if (sm90a_available()) allow_flash_smem();
}

// Why the wgmma kernel cannot take p (null when it can).
const char* flash_wgmma_refusal(const FlashAttentionParams& p) {
  if (!wgmma_variant(p)) return "head dims (qk, v) must be (64, 64), (128, 128) or (192, 128)";
  const bool aligned = aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && aligned16(p.out);
  const bool strides = p.q_token_stride % 8 == 0 && p.q_head_stride % 8 == 0 && p.k_token_stride % 8 == 0 &&
                       p.k_head_stride % 8 == 0 && p.v_token_stride % 8 == 0 && p.v_head_stride % 8 == 0 &&
                       p.out_token_stride % 2 == 0 && p.out_head_stride % 2 == 0;
  if (!aligned || !strides) return "q, k, v and out must be 16-byte aligned with strides of whole 16-byte units";
  if (p.total_k == 0) return "there are no keys";
  if (ceil_div(p.max_seqlen_q, 128) > 65535) return "max_seqlen_q exceeds the grid";
  if (!sm90a_available()) return "the device has no sm_90a kernels (an H100/H200 and an sm_90a build are needed)";
  return nullptr;
}

void flash_attention_forward(const FlashAttentionParams& p, Stream stream, FlashKernel kernel) {
  check_flash_attention(p, false, "flash_attention_forward");
  FATHOM_CHECK(p.batch <= 65535 && p.n_heads <= 65535, "flash_attention_forward: batch ", p.batch, " or heads ",
               p.n_heads, " exceed the grid (65535).");
  if (p.total_q == 0 || p.max_seqlen_q == 0) return;
  const char* refusal = kernel == FlashKernel::Simt ? "" : flash_wgmma_refusal(p);
  FATHOM_CHECK(kernel != FlashKernel::Wgmma || !refusal, "flash_attention_forward: the wgmma kernel was asked for but ",
               refusal, ".");
  FlashArgs a{};
  a.q = p.q, a.k = p.k, a.v = p.v, a.out = p.out, a.lse = p.lse, a.cu_q = p.cu_seqlens_q, a.cu_k = p.cu_seqlens_k;
  a.q_ts = p.q_token_stride, a.q_hs = p.q_head_stride, a.k_ts = p.k_token_stride, a.k_hs = p.k_head_stride;
  a.v_ts = p.v_token_stride, a.v_hs = p.v_head_stride, a.o_ts = p.out_token_stride, a.o_hs = p.out_head_stride;
  a.total_q = p.total_q, a.total_k = p.total_k, a.n_heads = p.n_heads, a.group = p.n_heads / p.n_kv_heads;
  a.d_qk = p.d_qk, a.d_v = p.d_v, a.scale = p.scale, a.scale_log2 = p.scale * 1.4426950408889634f;
  a.causal = p.causal ? 1 : 0;
  const cudaStream_t s = as_cuda(stream);
  if (!refusal) {
    allow_flash_smem();
    const FwdVariant& v = *wgmma_variant(p);
    a.m_blocks = int(ceil_div(p.max_seqlen_q, v.block_m)), a.batch = int(p.batch);
    const CUtensorMap mq =
        flash_head_map(p.q, p.d_qk, p.n_heads, p.total_q, p.q_head_stride, p.q_token_stride, uint32_t(v.block_m), "q");
    const CUtensorMap mk =
        flash_head_map(p.k, p.d_qk, p.n_kv_heads, p.total_k, p.k_head_stride, p.k_token_stride, kBlockN, "k");
    const CUtensorMap mv = flash_head_map(p.v, p.d_v, p.n_kv_heads, p.total_k, p.v_head_stride, p.v_token_stride, kBlockN, "v");
    const int64_t items = int64_t(a.m_blocks) * p.n_heads * p.batch;
    FATHOM_CHECK(items < (int64_t(1) << 31), "flash_attention_forward: ", items,
                 " query blocks (heads x blocks of the longest sequence x sequences) exceed 2^31.");
    a.sched = v.persistent ? flash_sched_counters(s) : nullptr;  // (null: the grid form runs)
    const bool persistent = a.sched != nullptr;
    const WgmmaKernel kernel_fn = v.persistent && !persistent ? v.grid_kernel : v.kernel;
    const dim3 grid = persistent ? dim3(unsigned(std::min<int64_t>(items, sm_count())))
                                 : dim3(unsigned(p.n_heads), unsigned(a.m_blocks), unsigned(p.batch));
    launch_kernel(kernel_fn, grid, dim3(unsigned(v.threads)), size_t(v.smem), s, mq, mk, mv, a);
    check_launch("flash_fwd_wgmma_kernel");
    return;
  }
  const dim3 grid(unsigned(ceil_div(p.max_seqlen_q, 4)), unsigned(p.n_heads), unsigned(p.batch));
  const int per = int(ceil_div(std::max(p.d_qk, p.d_v), 32));
  auto launch = [&](auto k) { launch_kernel(k, grid, dim3(128), 0, s, a); };
  if (per <= 2) launch(flash_fwd_simt_kernel<2>);
  else if (per <= 4) launch(flash_fwd_simt_kernel<4>);
  else launch(flash_fwd_simt_kernel<8>);
  check_launch("flash_fwd_simt_kernel");
}

}  // namespace fathom::cuda
