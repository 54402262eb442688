// What the flash attention backward's Hopper kernels share (flash_attention_backward.cu: the
// warp-specialized kernels and the host side; flash_attention_backward_serial.cu: the serial
// kernels): block shapes, the wgmma product chains, the gradient stores, the tile ranges.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "ops/cuda/flash_attention.cuh"
#include "ops/cuda/hopper.cuh"

namespace fathom::cuda {

constexpr float kLog2e = 1.4426950408889634f;

constexpr int kRows = 128;   // a block's keys (dK dV) or queries (dQ): two warpgroups of 64
constexpr int kKeyTile = 64;  // keys of a tile in the dQ kernel

template <int kD, int kDv, int kQT>
struct DkdvShape {
  static constexpr int kKBytes = kRows * kD * 2, kVBytes = kRows * kDv * 2;
  static constexpr int kQTBytes = kQT * kD * 2, kDoBytes = kQT * kDv * 2;
  static constexpr int kFit = (227 * 1024 - 2048 - kKBytes - kVBytes) / (kQTBytes + kDoBytes);
  static constexpr int kStages = kFit > 4 ? 4 : kFit;
  static constexpr int kSmem = kKBytes + kVBytes + kStages * (kQTBytes + kDoBytes) + 1024 + 256;
  static_assert(kStages >= 2, "two stages of Q and dout must fit");
};
template <int kD, int kDv>
struct DqShape {
  static constexpr int kQBytes = kRows * kD * 2, kDoBytes = kRows * kDv * 2;
  static constexpr int kKBytes = kKeyTile * kD * 2, kVBytes = kKeyTile * kDv * 2;
  static constexpr int kFit = (227 * 1024 - 2048 - kQBytes - kDoBytes) / (kKBytes + kVBytes);
  static constexpr int kStages = kFit > 4 ? 4 : kFit;
  static constexpr int kSmem = kQBytes + kDoBytes + kStages * (kKBytes + kVBytes) + 1024 + 256;
  static_assert(kStages >= 2, "two stages of K and V must fit");
};

#ifdef FATHOM_SM90A
// P (or dS) in bf16 as wgmma A fragments, 16 columns a k-step (see the forward's pack_p).
template <int kN>
__device__ __forceinline__ void pack_frags(uint32_t (&f)[kN / 16][4], const float (&x)[kN / 2]) {
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk)
#pragma unroll
    for (int j = 0; j < 4; ++j) f[kk][j] = pack_bf16(x[8 * kk + 2 * j], x[8 * kk + 2 * j + 1]);
}
// acc (64 x kN) (+)= A (64 x kK, shared memory, K-major, 64-column chunks kAChunk bytes apart) ·
// B (kN x kK, K-major, chunks kBChunk bytes apart)ᵀ
template <int kN, int kK, int kAChunk, int kBChunk>
__device__ __forceinline__ void ss_product(float (&acc)[kN / 2], uint64_t da, uint64_t db) {
#pragma unroll
  for (int c = 0; c < kK / kChunk; ++c)
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk)
      wgmma_ss<kN>(acc, da + c * (kAChunk >> 4) + 2 * kk, db + c * (kBChunk >> 4) + 2 * kk, (c | kk) != 0);
}
// acc (64 x kN) += F (64 x kK, fragments) · B (kK x kN, shared memory, N-major: 16 rows 2 KB)
template <int kN, int kK>
__device__ __forceinline__ void rs_product(float (&acc)[kN / 2], const uint32_t (&f)[kK / 16][4], uint64_t db) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) wgmma_rs_tb<kN>(acc, f[kk], db + kk * (2048 >> 4), 1);
}
// The keys' gradients of a thread (rows key0 and key0 + 8): dK with the scale of the scores.
template <int kD, int kDv>
__device__ __forceinline__ void store_key_grads(const FlashArgs& a, const SeqSpan& s, int kvh, int key0, int lane,
                                                const float (&dk)[kD / 2], const float (&dv)[kDv / 2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key0 + 8 * r;
    if (key >= s.lk) continue;
    const int64_t row = (s.k0 + key) * int64_t(a.n_heads / a.group) + kvh;
    float* gk = a.dk + row * kD + 2 * (lane % 4);
    float* gv = a.dv + row * kDv + 2 * (lane % 4);
#pragma unroll
    for (int i = 0; i < kD / 8; ++i)
      *reinterpret_cast<float2*>(gk + 8 * i) = make_float2(dk[4 * i + 2 * r] * a.scale, dk[4 * i + 2 * r + 1] * a.scale);
#pragma unroll
    for (int i = 0; i < kDv / 8; ++i) *reinterpret_cast<float2*>(gv + 8 * i) = make_float2(dv[4 * i + 2 * r], dv[4 * i + 2 * r + 1]);
  }
}
// The dK dV kernels' barriers, made by thread 0 before the block meets: kv_full (the key block's K
// and V landed) and each of the `stages` stages' full (the producer's arrive and the copies'
// bytes) and empty (the two consumer warpgroups' 256 threads).
__device__ __forceinline__ void init_key_block_barriers(uint32_t kv_full, uint32_t full, uint32_t empty, int stages) {
  if (threadIdx.x == 0) {
    mbar_init(kv_full, 1);
    for (int i = 0; i < stages; ++i) mbar_init(full + 8 * i, 1), mbar_init(empty + 8 * i, 256);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
}
// The dK dV kernels' key block (128 keys of KV head kvh from the sequence's row key_row): K and V
// into sk and sv by TMA, on kv_full.
template <int kD, int kDv>
__device__ __forceinline__ void load_key_block(uint32_t sk, uint32_t sv, const CUtensorMap* map_k,
                                               const CUtensorMap* map_v, int kvh, int key_row, uint32_t kv_full) {
  mbar_expect_tx(kv_full, uint32_t(kRows * (kD + kDv) * 2));
  load_head_rows<kD, kRows>(sk, map_k, kvh, key_row, kv_full);
  load_head_rows<kDv, kRows>(sv, map_v, kvh, key_row, kv_full);
}
// The dK dV kernels' producer (thread 0 of the producer warpgroup), after K and V: query tile it
// (head kvh · group + it / per_head, rows (i0 + it % per_head) · kQT of the sequence) into stage
// it % kStages once the consumers gave it back — Q and dout by TMA, the tile's lse·log2 e and D
// rows (flash_bwd_prep_kernel's statistics) by bulk copies, all on the stage's full barrier.
template <int kD, int kDv, int kQT, int kStages>
__device__ __forceinline__ void load_query_tiles(const FlashArgs& a, const SeqSpan& s, int b, const CUtensorMap* map_q,
                                                 const CUtensorMap* map_do, int kvh, int i0, int per_head, int n_it,
                                                 uint32_t sq, uint32_t sdo, uint32_t sstat, uint32_t full,
                                                 uint32_t empty) {
  constexpr uint32_t kQTBytes = kQT * kD * 2, kDoBytes = kQT * kDv * 2, kStatBytes = kQT * 8;
  const int64_t stats0 = stats_start(s.q0, b);
  for (int it = 0; it < n_it; ++it) {
    const int st = it % kStages, h = kvh * a.group + it / per_head, qt = (i0 + it % per_head) * kQT;
    const int row = int(s.q0 + qt);
    mbar_wait(empty + 8 * st, uint32_t(((it / kStages) & 1) ^ 1));
    mbar_expect_tx(full + 8 * st, kQTBytes + kDoBytes + kStatBytes);
    load_head_rows<kD, kQT>(sq + st * kQTBytes, map_q, h, row, full + 8 * st);
    load_head_rows<kDv, kQT>(sdo + st * kDoBytes, map_do, h, row, full + 8 * st);
    const float* lse2 = a.stats + int64_t(h) * a.stats_stride + stats0 + qt;
    const uint32_t dst = sstat + st * kStatBytes;
    bulk_load(dst, lse2, kQT * 4, full + 8 * st);
    bulk_load(dst + kQT * 4, lse2 + int64_t(a.n_heads) * a.stats_stride, kQT * 4, full + 8 * st);
  }
}
// Pᵀ = exp2(scale·log2 e · Sᵀ − lse·log2 e) and dSᵀ = Pᵀ ∘ (dPᵀ − D) in place of Sᵀ and dPᵀ, for
// a thread's keys key0 and key0 + 8 (their columns: queries 8 n + 2 (lane % 4) + {0, 1} of the
// tile, whose lse·log2 e and D rows start at stat): a key counts when key − query <= bound (huge
// off the causal diagonal; the tile's first query folded in) and its key_in flag is set.
// kPipe: the statistics' loads kept in place (the caller's wgmmas are still running).
template <int kQT, bool kPipe>
__device__ __forceinline__ void p_and_ds(float (&sc)[kQT / 2], float (&dp)[kQT / 2], const float* stat,
                                         float scale_log2, int bound, int key0, int lane, bool key_in0,
                                         bool key_in1) {
  const float* lse2 = stat + 2 * (lane % 4);
#pragma unroll
  for (int n = 0; n < kQT / 8; ++n) {
    const float2 l2 = *reinterpret_cast<const float2*>(lse2 + 8 * n);
    const float2 dl = *reinterpret_cast<const float2*>(lse2 + kQT + 8 * n);
#pragma unroll
    for (int e = 0; e < 2; ++e)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int x = 4 * n + 2 * r + e;
        const float p = fast_exp2(fmaf(sc[x], scale_log2, -(e ? l2.y : l2.x)));
        const bool ok = (r ? key_in1 : key_in0) && key0 + 8 * r - (8 * n + 2 * (lane % 4) + e) <= bound;
        sc[x] = ok ? p : 0.f;
        dp[x] = sc[x] * (dp[x] - (e ? dl.y : dl.x));
      }
    if constexpr (kPipe) asm volatile("" ::: "memory");  // (the next loads no earlier: registers)
  }
}
// The dQ kernels' per-row statistics of a thread's rows r0 and r0 + 8: the forward's
// log-sum-exp times log2 e and D = rowsum(dout ∘ out) (zeros past the sequence).
__device__ __forceinline__ void query_row_stats(const FlashArgs& a, const SeqSpan& s, int h, int r0, float (&lse2)[2],
                                                float (&delta)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool in = r0 + 8 * r < s.lq;
    const int64_t at = int64_t(h) * a.total_q + s.q0 + (in ? r0 + 8 * r : 0);
    lse2[r] = in ? a.lse[at] * kLog2e : 0.f;
    delta[r] = in ? a.delta[at] : 0.f;
  }
}
// The queries' gradient of a thread (rows r0 and r0 + 8), with the scale of the scores.
template <int kD>
__device__ __forceinline__ void store_query_grads(const FlashArgs& a, const SeqSpan& s, int h, int r0, int lane,
                                                  const float (&dq)[kD / 2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = r0 + 8 * r;
    if (row >= s.lq) continue;
    float* g = a.dq + ((s.q0 + row) * a.n_heads + h) * int64_t(kD) + 2 * (lane % 4);
#pragma unroll
    for (int i = 0; i < kD / 8; ++i)
      *reinterpret_cast<float2*>(g + 8 * i) = make_float2(dq[4 * i + 2 * r] * a.scale, dq[4 * i + 2 * r + 1] * a.scale);
  }
}
#endif

#ifdef FATHOM_SM90A
// The dQ kernels' shared memory: Q and dout of the block's 128 queries, the ring of K and V
// stages (128-byte swizzled: 1024-byte aligned), and the mbarriers — q_full and full: one arrival
// and the copies' bytes; empty: one arrival per consumer thread (256) — which thread 0
// initializes (the caller syncs the block after).
struct DqSmem {
  uint32_t sq, sdo, sk, sv, q_full, full, empty;
};
template <class Shape>
__device__ inline DqSmem dq_smem(uint8_t* raw) {
  constexpr int kStages = Shape::kStages;
  DqSmem m;
  m.sq = (smem_u32(raw) + 1023u) & ~1023u, m.sdo = m.sq + Shape::kQBytes;
  m.sk = m.sdo + Shape::kDoBytes, m.sv = m.sk + kStages * Shape::kKBytes;
  m.q_full = m.sv + kStages * Shape::kVBytes, m.full = m.q_full + 8, m.empty = m.full + 8 * kStages;
  if (threadIdx.x == 0) {
    mbar_init(m.q_full, 1);
    for (int i = 0; i < kStages; ++i) mbar_init(m.full + 8 * i, 1), mbar_init(m.empty + 8 * i, 256);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  return m;
}
#endif

// The query tiles (of kQT) a dK dV block of 128 keys (block kb) sweeps for each query head: from
// the first that sees the block's first key (causal) to the sequence's last; n_it over the group.
struct QueryTiles {
  int i0, per_head, n_it;
};
template <int kQT>
__device__ inline QueryTiles dkdv_query_tiles(const FlashArgs& a, const SeqSpan& s, int kb) {
  const int diag = s.lk - s.lq, n_qt = (s.lq + kQT - 1) / kQT;
  const int first_q = a.causal ? max(0, kb * kRows - diag) : 0;
  const int i0 = first_q >= s.lq ? n_qt : first_q / kQT, per_head = n_qt - i0;
  return {i0, per_head, a.group * per_head};
}
// The key tiles (of kKeyTile) a dQ block of 128 queries (block m_block) sweeps: all, or causally
// those up to its last query's diagonal.
__device__ inline int dq_key_tiles(const FlashArgs& a, const SeqSpan& s, int m_block) {
  int n = (s.lk + kKeyTile - 1) / kKeyTile;
  if (a.causal) {
    const int last_key = min(m_block * kRows + kRows - 1, s.lq - 1) + s.lk - s.lq;
    n = last_key < 0 ? 0 : min(n, last_key / kKeyTile + 1);
  }
  return n;
}

// The serial kernels (flash_attention_backward_serial.cu) for head dims (d_qk, d_v) and query tiles
// of qt in the dK dV kernel — (64, 64, 64), (128, 128, 64), (192, 128, 32) — null otherwise; their
// dynamic shared memory, once raised, in *_smem.
using BwdKernel = void (*)(const CUtensorMap, const CUtensorMap, const CUtensorMap, const CUtensorMap, const FlashArgs);
struct SerialBwdKernels {
  BwdKernel dkdv = nullptr, dq = nullptr;
  int dkdv_smem = 0, dq_smem = 0, qt = 0;
};
SerialBwdKernels flash_bwd_serial_kernels(int d_qk, int d_v);

// The one-pass backward (flash_attention_backward_onepass.cu): whether it takes these head dims, and
// its launches — the accumulator zeroed, the pass over the key blocks (K and V by map_k / map_v in
// boxes of 128 rows; Q and dout from a's pointers and strides), dq from the accumulator (a.n_heads x
// a.stats_stride x 128 floats).
bool flash_bwd_onepass_fits(int d_qk, int d_v);
void flash_bwd_onepass(const FlashArgs& a, const CUtensorMap& map_k, const CUtensorMap& map_v, int batch,
                       int max_seqlen_q, int max_seqlen_k, float* acc, cudaStream_t cs);

}  // namespace fathom::cuda
