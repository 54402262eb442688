// The flash attention backward in one pass (head dims qk = v = 128; the two-kernel form and the
// rest: flash_attention_backward.cu). FlashAttention 2/3's layout: a block owns 128 keys of a KV
// head (64 per consumer warpgroup) and sweeps the query tiles (of 64) that read them, as the dK dV
// kernel does — Sᵀ = K Qᵀ, dPᵀ = V doutᵀ, Pᵀ and dSᵀ in registers, dV += Pᵀ dout, dK += dSᵀ Q —
// and adds the tile's share of dQ = dS K on the way: each consumer writes its 64 keys' half of
// dS (query-major, by stmatrix .trans) into shared memory, the two meet at a named barrier, and
// each multiplies the whole tile's dS (64 queries x 128 keys) by its half of K's dims, adding the
// 64 x 64 result into an fp32 accumulator in global memory with vector reductions in L2
// (red.global.add.v4.f32). 5 products instead of the two-kernel form's 7, at the price of those
// reductions: their order varies, so the sums' last bits do too (the two-kernel form stays the
// deterministic option).
//
// The accumulator is laid out in the order the consumers hold their sums (each warp's
// reductions are 512 contiguous bytes): a query tile's 64 x 128 floats at its statistics row
// (stats_start: 64 rows of room after every sequence), warpgroup c's dims 64c.. at c·4096, then
// register quad k of thread t at k·512 + 4t. flash_bwd_dq_post_kernel puts dq in its place (times
// the scale). The accumulator is zeroed before the pass.
#include <cuda_bf16.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>

#include "core/error.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/flash_attention.cuh"
#include "ops/cuda/flash_attention_backward.cuh"
#include "ops/cuda/hopper.cuh"

namespace fathom::cuda {
namespace {

constexpr int kOpD = 128, kOpQT = 64;  // head dims; queries of a tile
constexpr int kOpProducerRegs = 24, kOpConsumerRegs = 240;
static_assert(setmaxnreg_fits(kOpProducerRegs, kOpConsumerRegs, 2), "setmaxnreg over the launch's registers");

struct OnePassShape {
  static constexpr int kKBytes = kRows * kOpD * 2, kVBytes = kRows * kOpD * 2;  // the block's keys: 32 KB each
  static constexpr int kQTBytes = kOpQT * kOpD * 2, kDoBytes = kOpQT * kOpD * 2;  // a tile: 16 KB each
  static constexpr int kStatBytes = kOpQT * 8;                                    // lse·log2 e and D
  static constexpr int kDsBytes = kOpQT * kRows * 2;  // a tile's dS: two 64-key chunks of [64 queries][128 B]
  static constexpr int kDsBufs = 2;  // (a consumer writes tile it + 2's once both passed tile it + 1's barrier)
  static constexpr int kStages = 3;
  static constexpr int kSmem =
      kKBytes + kVBytes + kStages * (kQTBytes + kDoBytes + kStatBytes) + kDsBufs * kDsBytes + 1024 + 256;
};
static_assert(OnePassShape::kSmem <= 227 * 1024, "the one-pass backward's shared memory");

#ifdef FATHOM_SM90A
// wgmma m64n64k16, A (64 x 16) K-major and B (16 x 64) N-major, both in shared memory.
__device__ inline void wgmma_ss_tb64(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "
      "%23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}
// Four 8 x 8 bf16 matrices (a wgmma A fragment's four registers) stored transposed: lane l gives
// the address of row l % 8 of matrix l / 8 as stored (a column of the fragment's matrix).
__device__ inline void stmatrix_x4_trans(uint32_t addr, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r[0]),
               "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}
// Adds four floats to 16-byte aligned global memory, in L2 (no value comes back).
__device__ inline void red_add_v4(float* p, float a, float b, float c, float d) {
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(d)
               : "memory");
}
#endif

__global__ void __launch_bounds__(384, 1)
    flash_bwd_onepass_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                             const __grid_constant__ CUtensorMap map_v, const __grid_constant__ CUtensorMap map_do,
                             const FlashArgs a, float* dq_acc, int heads_at_once) {
#ifdef FATHOM_SM90A
  using Shape = OnePassShape;
  constexpr int kStages = Shape::kStages, kQT = kOpQT, kD = kOpD;
  pdl_wait();
  // The blocks of a sequence in groups of heads_at_once KV heads, a group's key blocks from the
  // first (the longest sweep) and its heads within: the blocks on the GPU at once then share
  // those heads' Q, dout and dq accumulator in L2 (grid order alone — every head at once — left
  // the accumulator of a 16,384-token sequence, 134 MB, to HBM: bench/RESULTS.md).
  const int n_kb = int(gridDim.x) / (a.n_heads / a.group), per_group = heads_at_once * n_kb;
  const int lin = int(blockIdx.x), hg = lin / per_group, rem = lin - hg * per_group;
  const int kb = rem / heads_at_once, kvh = hg * heads_at_once + rem % heads_at_once, b = int(blockIdx.z);
  const SeqSpan s = seq_span(a, b);
  if (kb * kRows >= s.lk) return;
  const int diag = s.lk - s.lq;
  const QueryTiles tiles = dkdv_query_tiles<kQT>(a, s, kb);
  const int i0 = tiles.i0, per_head = tiles.per_head, n_it = tiles.n_it;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t sk = (smem_u32(smem_raw) + 1023u) & ~1023u, sv = sk + Shape::kKBytes;
  const uint32_t sq = sv + Shape::kVBytes, sdo = sq + kStages * Shape::kQTBytes;
  const uint32_t sds = sdo + kStages * Shape::kDoBytes;    // buffers of a tile's dS
  const uint32_t sstat = sds + Shape::kDsBufs * Shape::kDsBytes;  // per stage: lse·log2 e [kQT], D [kQT]
  const uint32_t kv_full = sstat + kStages * Shape::kStatBytes, full = kv_full + 8, empty = full + 8 * kStages;
  const float* stat = reinterpret_cast<const float*>(smem_raw + (sstat - smem_u32(smem_raw)));
  const int tid = int(threadIdx.x);
  init_key_block_barriers(kv_full, full, empty, kStages);
  const int wg = __shfl_sync(kFullMask, tid / 128, 0), lane = tid % 32;
  auto head_of = [&](int it) { return kvh * a.group + it / per_head; };
  auto tile_of = [&](int it) { return (i0 + it % per_head) * kQT; };
  const int64_t stats0 = stats_start(s.q0, b);
  if (wg == 0) {
    setmaxnreg_dec<kOpProducerRegs>();
    if (tid == 0) {
      load_key_block<kD, kD>(sk, sv, &map_k, &map_v, kvh, int(s.k0 + int64_t(kb) * kRows), kv_full);
      load_query_tiles<kD, kD, kQT, kStages>(a, s, b, &map_q, &map_do, kvh, i0, per_head, n_it, sq, sdo, sstat, full,
                                             empty);
    }
  } else {
    setmaxnreg_inc<kOpConsumerRegs>();
    const int cw = wg - 1, ct = tid % 128, warp = ct / 32;
    const int key0 = kb * kRows + cw * 64 + warp * 16 + lane / 4;  // this thread's keys key0, key0 + 8
    const bool key_in[2] = {key0 < s.lk, key0 + 8 < s.lk};
    float dk[kD / 2], dv[kD / 2];
#pragma unroll
    for (int i = 0; i < kD / 2; ++i) dk[i] = 0.f, dv[i] = 0.f;
    const uint64_t dk0 = sw128_desc(sk + cw * 64 * 128), dv0 = sw128_desc(sv + cw * 64 * 128);
    float sc[kQT / 2], dp[kQT / 2], dq[32];
    uint32_t pf[kQT / 16][4], dsf[kQT / 16][4];
    auto sdp = [&](int st) {  // Sᵀ = K Qᵀ, dPᵀ = V doutᵀ (this consumer's 64 keys)
      uint64_t ka = dk0, va = dv0;
      asm volatile("" : "+l"(ka), "+l"(va));
      wgmma_fence();
      ss_product<kQT, kD, kRows * 128, kQT * 128>(sc, ka, sw128_desc(sq + st * Shape::kQTBytes));
      ss_product<kQT, kD, kRows * 128, kQT * 128>(dp, va, sw128_desc(sdo + st * Shape::kDoBytes));
      wgmma_commit();
    };
    // Pᵀ and dSᵀ in place, keys past the sequence masked too (their dS would reach dQ)
    auto pds = [&](int st, int qt) {
      const bool masked = a.causal && kb * kRows + kRows - 1 > qt + diag;
      p_and_ds<kQT, false>(sc, dp, stat + st * 2 * kQT, a.scale_log2, masked ? qt + diag : 1 << 30, key0, lane,
                           key_in[0], key_in[1]);
    };
    // dS (queries x keys) into buffer `buf`, chunk cw: matrix j of k-step kk holds keys
    // 16 warp + 8 (j % 2) .. and queries 16 kk + 8 (j / 2) ..; stored transposed, a query row of 8
    // keys is one 16-byte unit of the 128-byte swizzled row
    auto store_ds = [&](int buf) {
      const int j = lane / 8, i = lane % 8, unit = 2 * warp + (j % 2);
#pragma unroll
      for (int kk = 0; kk < kQT / 16; ++kk) {
        const int q = 16 * kk + 8 * (j / 2) + i;
        stmatrix_x4_trans(sds + buf * Shape::kDsBytes + cw * (kQT * 128) + q * 128 + ((unit ^ i) << 4), dsf[kk]);
      }
    };
    auto grads = [&](int st) {  // dV += Pᵀ dout, dK += dSᵀ Q
      wgmma_fence();
      rs_product<kD, kQT>(dv, pf, sw128_desc_mn(sdo + st * Shape::kDoBytes, kQT * 128));
      rs_product<kD, kQT>(dk, dsf, sw128_desc_mn(sq + st * Shape::kQTBytes, kQT * 128));
      wgmma_commit();
    };
    // dQ[:, 64 cw ..] = dS (64 x 128 keys, K-major, buffer buf) · K[:, 64 cw ..] (N-major: box cw of K)
    auto dq_product = [&](int buf) {
      const uint64_t da = sw128_desc(sds + buf * Shape::kDsBytes);
      const uint64_t db = sw128_desc_mn(sk + cw * (kRows * 128), kRows * 128);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kRows / 16; ++kk)
        wgmma_ss_tb64(dq, da + (kk / 4) * ((kQT * 128) >> 4) + 2 * (kk % 4), db + kk * (2048 >> 4), kk != 0);
      wgmma_commit();
    };
    auto add_dq = [&](int it) {  // this thread's 32 sums into the accumulator (see the top of the file)
      float* acc = dq_acc + (int64_t(head_of(it)) * a.stats_stride + stats0 + tile_of(it)) * kD + cw * 4096 + ct * 4;
#pragma unroll
      for (int k = 0; k < 8; ++k) red_add_v4(acc + k * 512, dq[4 * k], dq[4 * k + 1], dq[4 * k + 2], dq[4 * k + 3]);
    };
    mbar_wait(kv_full, 0);
    for (int it = 0; it < n_it; ++it) {
      const int st = it % kStages;
      mbar_wait(full + 8 * st, uint32_t((it / kStages) & 1));
      sdp(st);
      wgmma_wait<0>();
      fence_regs(sc), fence_regs(dp);
      pds(st, tile_of(it));
      pack_frags<kQT>(pf, sc);
      pack_frags<kQT>(dsf, dp);
      // both consumers' halves of tile it's dS, then its dQ: the consumers meet every tile
      store_ds(it % Shape::kDsBufs);
      grads(st);
      fence_proxy_async_smem();  // (the stores visible to the tensor cores' reads)
      named_bar_sync(1, 256);
      dq_product(it % Shape::kDsBufs);
      wgmma_wait<0>();
      fence_regs(dk), fence_regs(dv), fence_regs(dq);
      mbar_arrive(empty + 8 * st);
      add_dq(it);
    }
    store_key_grads<kD, kD>(a, s, kvh, key0, lane, dk, dv);
  }
#else
  (void)map_q, (void)map_k, (void)map_v, (void)map_do, (void)a, (void)dq_acc, (void)heads_at_once;
  __trap();
#endif
}

// dq[t, h, :] = scale · the accumulator's sums for query t of head h, from the consumers' order
// (see the top of the file): a block of 4 queries, a thread per pair of dims.
__global__ void __launch_bounds__(256) flash_bwd_dq_post_kernel(const FlashArgs a, const float* acc) {
  pdl_wait();
  const int h = int(blockIdx.y), b = int(blockIdx.z);
  const SeqSpan s = seq_span(a, b);
  const int row = int(blockIdx.x) * 4 + int(threadIdx.x / 64), d = 2 * int(threadIdx.x % 64);
  if (row >= s.lq) return;
  const int r = row % kOpQT, c = d / 64, dl = d % 64, rr = r % 16;
  const int t = 32 * (r / 16) + 4 * (rr % 8) + (dl % 8) / 2;  // the consumer thread that held it
  const int slot = c * 4096 + (dl / 8) * 512 + t * 4 + 2 * (rr / 8);
  const float2 v = *reinterpret_cast<const float2*>(
      acc + (int64_t(h) * a.stats_stride + stats_start(s.q0, b) + (row - r)) * kOpD + slot);
  *reinterpret_cast<float2*>(a.dq + ((s.q0 + row) * a.n_heads + h) * int64_t(kOpD) + d) =
      make_float2(v.x * a.scale, v.y * a.scale);
}

}  // namespace

bool flash_bwd_onepass_fits(int d_qk, int d_v) { return d_qk == kOpD && d_v == kOpD; }

void flash_bwd_onepass(const FlashArgs& a, const CUtensorMap& map_k, const CUtensorMap& map_v, int batch,
                       int max_seqlen_q, int max_seqlen_k, float* acc, cudaStream_t cs) {
  static std::once_flag smem[kMaxDevices];
  once_per_device(smem, [] {
    check(cudaFuncSetAttribute(flash_bwd_onepass_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               OnePassShape::kSmem),
          "flash_attention_backward (shared memory of the one-pass kernel)");
  });
  check(cudaMemsetAsync(acc, 0, size_t(a.n_heads) * size_t(a.stats_stride) * kOpD * sizeof(float), cs),
        "flash_attention_backward (the dq accumulator)");
  const CUtensorMap mq =
      flash_head_map(a.q, kOpD, a.n_heads, a.total_q, a.q_hs, a.q_ts, uint32_t(kOpQT), "q");
  const CUtensorMap mdo =
      flash_head_map(a.dout, kOpD, a.n_heads, a.total_q, a.do_hs, a.do_ts, uint32_t(kOpQT), "dout");
  // (two KV heads at a time: 16 MB of Q and dout and 16 MB of accumulator at 16,384 tokens, in L2's 50)
  const int n_kv_heads = a.n_heads / a.group;
  int heads_at_once = n_kv_heads % 2 == 0 ? 2 : 1;
  if (const char* e = std::getenv("FATHOM_FLASH_ONEPASS_HEADS")) {
    const int h = std::atoi(e);
    if (h >= 1 && n_kv_heads % h == 0) heads_at_once = h;
  }
  const int64_t blocks = int64_t(n_kv_heads) * ceil_div(max_seqlen_k, kRows);
  FATHOM_CHECK(blocks < (int64_t(1) << 31), "flash_attention_backward: ", blocks, " key blocks exceed the grid.");
  launch_kernel(flash_bwd_onepass_kernel, dim3(unsigned(blocks), 1, unsigned(batch)), dim3(384),
                size_t(OnePassShape::kSmem), cs, mq, map_k, map_v, mdo, a, acc, heads_at_once);
  check_launch("flash_bwd_onepass_kernel");
  if (max_seqlen_q > 0) {
    launch_kernel(flash_bwd_dq_post_kernel,
                  dim3(unsigned(ceil_div(max_seqlen_q, 4)), unsigned(a.n_heads), unsigned(batch)), dim3(256), 0, cs,
                  a, static_cast<const float*>(acc));
    check_launch("flash_bwd_dq_post_kernel");
  }
}

}  // namespace fathom::cuda
