// Flash attention's backward on Hopper in its serial form (the ideas and the default, warp-
// specialized form: flash_attention_backward.cu): blocks of two warpgroups, thread 0 issuing the TMA
// copies between its own products, each tile's steps in order. Kept as the step the warp-
// specialized kernels are measured against (FATHOM_FLASH_BACKWARD=serial; docs/flash-attention.md).
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>

#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/flash_attention.cuh"
#include "ops/cuda/flash_attention_backward.cuh"
#include "ops/cuda/hopper.cuh"

namespace fathom::cuda {
namespace {

// dK, dV of 128 keys (blockIdx.y) of KV head blockIdx.x in sequence blockIdx.z; query tiles of kQT.
template <int kD, int kDv, int kQT>
__global__ void __launch_bounds__(256, 1)
    flash_bwd_dkdv_wgmma_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                                const __grid_constant__ CUtensorMap map_v, const __grid_constant__ CUtensorMap map_do,
                                const FlashArgs a) {
#ifdef FATHOM_SM90A
  using Shape = DkdvShape<kD, kDv, kQT>;
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
  const uint32_t kv_full = sdo + kStages * Shape::kDoBytes, full = kv_full + 8, empty = full + 8 * kStages;
  const int tid = int(threadIdx.x);
  init_key_block_barriers(kv_full, full, empty, kStages);
  auto produce = [&](int it) {
    const int st = it % kStages, h = kvh * a.group + it / per_head, row = int(s.q0 + int64_t(i0 + it % per_head) * kQT);
    mbar_wait(empty + 8 * st, uint32_t(((it / kStages) & 1) ^ 1));
    mbar_expect_tx(full + 8 * st, Shape::kQTBytes + Shape::kDoBytes);
    load_head_rows<kD, kQT>(sq + st * Shape::kQTBytes, &map_q, h, row, full + 8 * st);
    load_head_rows<kDv, kQT>(sdo + st * Shape::kDoBytes, &map_do, h, row, full + 8 * st);
  };
  if (tid == 0) {
    load_key_block<kD, kDv>(sk, sv, &map_k, &map_v, kvh, int(s.k0 + int64_t(kb) * kRows), kv_full);
    for (int it = 0; it < min(kStages, n_it); ++it) produce(it);
  }
  const int wg = __shfl_sync(kFullMask, tid / 128, 0), warp = (tid % 128) / 32, lane = tid % 32;
  const int key0 = kb * kRows + wg * 64 + warp * 16 + lane / 4;  // this thread's keys key0, key0 + 8
  float dk[kD / 2], dv[kDv / 2];
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) dk[i] = 0.f;
#pragma unroll
  for (int i = 0; i < kDv / 2; ++i) dv[i] = 0.f;
  const uint64_t dk0 = sw128_desc(sk + wg * 64 * 128), dv0 = sw128_desc(sv + wg * 64 * 128);
  mbar_wait(kv_full, 0);
  for (int it = 0; it < n_it; ++it) {
    const int st = it % kStages, h = kvh * a.group + it / per_head, qt = (i0 + it % per_head) * kQT;
    mbar_wait(full + 8 * st, uint32_t((it / kStages) & 1));
    const uint32_t q_st = sq + st * Shape::kQTBytes, do_st = sdo + st * Shape::kDoBytes;
    float sc[kQT / 2], dp[kQT / 2];
    wgmma_fence();
    ss_product<kQT, kD, kRows * 128, kQT * 128>(sc, dk0, sw128_desc(q_st));    // Sᵀ = K Qᵀ
    ss_product<kQT, kDv, kRows * 128, kQT * 128>(dp, dv0, sw128_desc(do_st));  // dPᵀ = V doutᵀ
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(sc), fence_regs(dp);
    // Pᵀ and dSᵀ: this thread's columns are queries qt + 8 n + 2 (lane % 4) + {0, 1}
#pragma unroll
    for (int n = 0; n < kQT / 8; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int q = qt + 8 * n + 2 * (lane % 4) + e;
        const bool in = q < s.lq;
        const int64_t at = int64_t(h) * a.total_q + s.q0 + (in ? q : 0);
        const float lse2 = in ? a.lse[at] * kLog2e : 0.f, delta = in ? a.delta[at] : 0.f;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int key = key0 + 8 * r, x = 4 * n + 2 * r + e;
          const bool ok = in && key < s.lk && (!a.causal || key <= q + diag);
          const float p = ok ? fast_exp2(fmaf(sc[x], a.scale_log2, -lse2)) : 0.f;
          sc[x] = p;
          dp[x] = p * (dp[x] - delta);
        }
      }
    uint32_t pf[kQT / 16][4], dsf[kQT / 16][4];
    pack_frags<kQT>(pf, sc);
    pack_frags<kQT>(dsf, dp);
    fence_regs(dk), fence_regs(dv), fence_regs(pf), fence_regs(dsf);
    wgmma_fence();
    rs_product<kDv, kQT>(dv, pf, sw128_desc_mn(do_st, kQT * 128));  // dV += Pᵀ dout
    rs_product<kD, kQT>(dk, dsf, sw128_desc_mn(q_st, kQT * 128));   // dK += dSᵀ Q
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(dk), fence_regs(dv);
    mbar_arrive(empty + 8 * st);
    if (tid == 0 && it - 1 + kStages < n_it && it >= 1) produce(it - 1 + kStages);
  }
  store_key_grads<kD, kDv>(a, s, kvh, key0, lane, dk, dv);
#else
  (void)map_q, (void)map_k, (void)map_v, (void)map_do, (void)a;
  __trap();
#endif
}

// dQ of 128 queries (blockIdx.y, longest first) of head blockIdx.x in sequence blockIdx.z.
template <int kD, int kDv>
__global__ void __launch_bounds__(256, 1)
    flash_bwd_dq_wgmma_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
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
  auto produce = [&](int it) {
    const int st = it % kStages, row = int(s.k0 + int64_t(n_tiles - 1 - it) * kKeyTile);
    mbar_wait(empty + 8 * st, uint32_t(((it / kStages) & 1) ^ 1));
    mbar_expect_tx(full + 8 * st, Shape::kKBytes + Shape::kVBytes);
    load_head_rows<kD, kKeyTile>(sk + st * Shape::kKBytes, &map_k, kvh, row, full + 8 * st);
    load_head_rows<kDv, kKeyTile>(sv + st * Shape::kVBytes, &map_v, kvh, row, full + 8 * st);
  };
  if (tid == 0) {
    const int row = int(s.q0 + int64_t(m_block) * kRows);
    mbar_expect_tx(q_full, Shape::kQBytes + Shape::kDoBytes);
    load_head_rows<kD, kRows>(sq, &map_q, h, row, q_full);
    load_head_rows<kDv, kRows>(sdo, &map_do, h, row, q_full);
    for (int it = 0; it < min(kStages, n_tiles); ++it) produce(it);
  }
  const int wg = __shfl_sync(kFullMask, tid / 128, 0), warp = (tid % 128) / 32, lane = tid % 32;
  const int r0 = m_block * kRows + wg * 64 + warp * 16 + lane / 4;  // this thread's rows r0, r0 + 8
  float lse2[2], delta[2];
  query_row_stats(a, s, h, r0, lse2, delta);
  float dq[kD / 2];
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) dq[i] = 0.f;
  const uint64_t dq0 = sw128_desc(sq + wg * 64 * 128), ddo0 = sw128_desc(sdo + wg * 64 * 128);
  mbar_wait(q_full, 0);
  for (int it = 0; it < n_tiles; ++it) {
    const int st = it % kStages, j = n_tiles - 1 - it;
    mbar_wait(full + 8 * st, uint32_t((it / kStages) & 1));
    const uint32_t k_st = sk + st * Shape::kKBytes, v_st = sv + st * Shape::kVBytes;
    float sc[kKeyTile / 2], dp[kKeyTile / 2];
    wgmma_fence();
    ss_product<kKeyTile, kD, kRows * 128, kKeyTile * 128>(sc, dq0, sw128_desc(k_st));     // S = Q Kᵀ
    ss_product<kKeyTile, kDv, kRows * 128, kKeyTile * 128>(dp, ddo0, sw128_desc(v_st));  // dP = dout Vᵀ
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(sc), fence_regs(dp);
#pragma unroll
    for (int x = 0; x < kKeyTile / 2; ++x) {
      const int r = (x >> 1) & 1, key = j * kKeyTile + 8 * (x / 4) + 2 * (lane % 4) + (x & 1), row = r0 + 8 * r;
      const bool ok = key < s.lk && (!a.causal || key <= row + diag);
      const float p = ok ? fast_exp2(fmaf(sc[x], a.scale_log2, -lse2[r])) : 0.f;
      dp[x] = p * (dp[x] - delta[r]);
    }
    uint32_t dsf[kKeyTile / 16][4];
    pack_frags<kKeyTile>(dsf, dp);
    fence_regs(dq), fence_regs(dsf);
    wgmma_fence();
    rs_product<kD, kKeyTile>(dq, dsf, sw128_desc_mn(k_st, kKeyTile * 128));  // dQ += dS K
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(dq);
    mbar_arrive(empty + 8 * st);
    if (tid == 0 && it >= 1 && it - 1 + kStages < n_tiles) produce(it - 1 + kStages);
  }
  store_query_grads<kD>(a, s, h, r0, lane, dq);
#else
  (void)map_q, (void)map_k, (void)map_v, (void)map_do, (void)a;
  __trap();
#endif
}

template <int kD, int kDv, int kQT>
SerialBwdKernels serial_kernels() {
  SerialBwdKernels k;
  k.dkdv = flash_bwd_dkdv_wgmma_kernel<kD, kDv, kQT>, k.dq = flash_bwd_dq_wgmma_kernel<kD, kDv>;
  k.dkdv_smem = DkdvShape<kD, kDv, kQT>::kSmem, k.dq_smem = DqShape<kD, kDv>::kSmem, k.qt = kQT;
  return k;
}

}  // namespace

SerialBwdKernels flash_bwd_serial_kernels(int d_qk, int d_v) {
  if (d_qk == 64 && d_v == 64) return serial_kernels<64, 64, 64>();
  if (d_qk == 128 && d_v == 128) return serial_kernels<128, 128, 64>();
  if (d_qk == 192 && d_v == 128) return serial_kernels<192, 128, 32>();
  return {};
}

}  // namespace fathom::cuda
