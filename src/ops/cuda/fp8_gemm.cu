// DeepSeek-V3's FP8 GEMM on the GPU: out (M, N) = A (M, K) · Bᵀ with A e4m3 in 1x128 tiles
// (quantize_1x128 below) and B e4m3 in 128x128 blocks, each 128-wide K tile's sum promoted to an
// fp32 accumulator in registers and scaled there. The CPU reference, and the recipe in words:
// src/ops/cpu/fp8_gemm.h; docs/fp8-gemm.md.
//
// The Hopper kernels (sm_90a), one (128 | 192 | 256) x 128 output tile at a time per block of
// two or three consumer warpgroups:
// - one thread issues the TMA copies (cp.async.bulk.tensor) of each 128-byte-wide K tile of A and
//   of B into a ring of shared-memory stages, 128-byte swizzled (the layout wgmma reads without
//   bank conflicts); each copy completes on the stage's "full" mbarrier. In the producer forms that
//   thread is in a producer warpgroup of its own, whose registers setmaxnreg gives to the
//   consumers (40 / 232: a 256-row tile's 192 accumulators fit), and two more of its warps copy
//   each K tile's scales into the stage; otherwise thread 0 issues the copies between its wgmmas.
//   Blocks may form clusters of 2 along N (and M) that share A (B) tiles by TMA multicast.
// - each warpgroup owns 64-row slices of the tile: per K tile it waits on the stage's full
//   barrier, issues four wgmma m64n128k32 (e4m3 x e4m3 -> f32) from shared memory per slice,
//   waits for them, and adds the slice's sums times sa[row, t] * sb[n / 128, t] into its fp32
//   accumulators — the promotion; after the last slice it releases the stage ("empty" barrier).
//   While one warpgroup promotes, the other's wgmmas keep the tensor cores busy.
// - the epilogue converts the accumulators and stores them straight from registers (or, in the
//   persistent kernel, through shared memory by TMA stores).
// fp8_gemm_wgmma_kernel (here) takes one tile per block (every layout);
// fp8_gemm_wgmma_persistent_kernel (fp8_gemm_persistent.cu, dense) keeps a cluster per SM pair
// on the GPU taking tile after tile, its copies running on into the next tile while the
// consumers store. Which one a product gets: fp8_gemm()
// below. What the two share: fp8_gemm_wgmma.cuh. The SIMT kernel and the 1x128 quantization:
// fp8_gemm_simt.cu; what every kernel shares about a tile's rows and its stores: fp8_gemm.cuh.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "core/error.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/fp8_gemm.cuh"
#include "ops/cuda/fp8_gemm_wgmma.cuh"
#include "ops/cuda/hopper.cuh"

namespace fathom::cuda {
namespace fp8_wgmma {

// ---- host side: the tensor maps

// The tensor map of a (rows, K) e4m3 matrix read as box_rows x 128-byte boxes, 128-byte swizzled.
CUtensorMap tile_map(const uint8_t* ptr, int64_t rows, int64_t K, uint32_t box_rows, const char* what) {
  CUtensorMap m{};
  const cuuint64_t dims[2] = {cuuint64_t(K), cuuint64_t(rows)};
  const cuuint64_t strides[1] = {cuuint64_t(K)};
  const cuuint32_t box[2] = {kTile, box_rows};
  const cuuint32_t elem[2] = {1, 1};
  const CUresult r = tensor_map_encoder()(&m, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<uint8_t*>(ptr), dims,
                                          strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                          CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  FATHOM_CHECK(r == CUDA_SUCCESS, "fp8_gemm: the tensor map of ", what, " (", rows, " x ", K,
               ") was refused (CUresult ", int(r), ")");
  return m;
}

// The tensor map of the bf16 output (M, N) with row stride ldo, stored by TMA as 64-column x
// box_rows boxes, 128-byte swizzled (stage_out_tile's layout).
CUtensorMap out_map(void* out, int64_t M, int64_t N, int64_t ldo, uint32_t box_rows) {
  CUtensorMap m{};
  const cuuint64_t dims[2] = {cuuint64_t(N), cuuint64_t(M)};
  const cuuint64_t strides[1] = {cuuint64_t(ldo) * 2};
  const cuuint32_t box[2] = {64, box_rows};
  const cuuint32_t elem[2] = {1, 1};
  const CUresult r = tensor_map_encoder()(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, out, dims, strides, box, elem,
                                          CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                          CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  FATHOM_CHECK(r == CUDA_SUCCESS, "fp8_gemm: the tensor map of the output (", M, " x ", N, ", row stride ", ldo,
               ") was refused (CUresult ", int(r), ")");
  return m;
}

}  // namespace fp8_wgmma

namespace {
using namespace fp8_wgmma;

// ---- the Hopper kernel: a block per output tile (every layout)

// Blocks come in clusters of kCN x kCM (tile columns x tile rows; 1 or 2 each). The blocks of a
// cluster row share their A tile, those of a cluster column their B tile: each block loads its
// 1/kCN part of A and 1/kCM part of B and the copy engine multicasts it into every block that
// shares it, so each byte leaves L2 once per cluster instead of once per block. A stage may be
// refilled only when every block of the cluster has consumed it: consumer warps arrive on the
// "empty" barrier of each block. Clusters take their tiles in bands of 8 cluster rows, so that
// the tiles in flight share A and B panels in L2 instead of sweeping all of B every wave.
// Each consumer warpgroup computes kWaves slices of 64 rows, one after the other per K tile.
// kProducer: a third warpgroup before the consumers issues every copy (one thread) and copies the
// scales (two warps), its registers given to the consumers by setmaxnreg (40 / 232), so that no
// consumer branches to produce between its wgmmas nor waits on a global load.
// kTwoAcc (with kProducer, one slice a warpgroup): two tensor-core accumulators, so that K tile
// kt + 1's wgmmas are issued before K tile kt's sums are promoted — the tensor cores work on
// while the warpgroup promotes (192 of its 240 registers hold accumulators).
template <int kCN, int kCM, int kWaves, int kWGs, bool kProducer = false, bool kTwoAcc = false>
__global__ void __launch_bounds__(128 * (kWGs + kProducer), 1)
    fp8_gemm_wgmma_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                          const Fp8GemmArgs p) {
#ifdef FATHOM_SM90A
  using Shape = WgmmaShape<kWaves, kWGs>;
  constexpr int kCluster = kCN * kCM, kStages = Shape::kStages, kStageBytes = Shape::kStageBytes;
  constexpr int kATileBytes = Shape::kRows * kTile;
  pdl_wait();
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;  // 128-byte swizzle: 1024-byte aligned tiles
  const uint32_t full = base + kStages * kStageBytes, empty = full + 8 * kStages;
  const uint32_t scales = empty + 8 * kStages;  // kProducer: each stage's scales (Shape::kScaleBytes)
  // this block's place in its cluster, and the cluster's tile by the banded raster
  const int x = int(blockIdx.x % kCN), y = int(blockIdx.y % kCM);
  int64_t m_tile, n_tile;
  {
    constexpr int64_t kBand = 8;
    const int64_t nt = gridDim.x / kCN, mt = gridDim.y / kCM;
    const int64_t id = int64_t(blockIdx.y / kCM) * nt + blockIdx.x / kCN;
    const int64_t first = id / (kBand * nt) * kBand, rows = lmin(mt - first, kBand), local = id % (kBand * nt);
    m_tile = (first + local % rows) * kCM + y;
    n_tile = (local / rows) * kCN + x;
  }
  const int64_t n0 = n_tile * kTile, m0 = m_tile * Shape::kRows;
  // (a cluster's blocks share m0 along a row and all of z: those that leave here leave together;
  // kCM > 1 and kWaves > 1 only for layouts other than the contiguous one)
  if (p.layout == int(Fp8Layout::Masked) && m0 >= p.count[blockIdx.z]) return;
  TileRows t = tile_rows(p, m0, int(blockIdx.z));
  if (Shape::kRows != kTile)
    t.rows = lmin(Shape::kRows, (p.layout == int(Fp8Layout::Masked) ? p.count[blockIdx.z] : p.M) - m0);
  static_assert(!kTwoAcc || (kProducer && kWaves == 1), "two accumulators: a producer warpgroup, one slice each");
  if (t.g < 0) return write_padding_tile(p, m0, n0, kTile, int(threadIdx.x), int(blockDim.x));
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      // the producer's arrive, plus the copies' bytes (and with a producer warpgroup, the arrives
      // of its two scale warps)
      mbar_init(full + 8 * s, kProducer ? 1 + kScaleWarps : 1);
      mbar_init(empty + 8 * s, 4 * kWGs * kCluster);  // one arrive per consumer warp of the cluster
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if (kCluster > 1) cluster_sync();  // the barriers of every block exist before anyone copies or arrives
  else __syncthreads();

  // Thread 0 also produces: it fills the ring ahead of the warpgroups with the copies of K tiles
  // (waiting until every block of the cluster has released the stage it refills).
  constexpr int kARows = Shape::kRows / kCN, kBRows = kTile / kCM;
  auto produce = [&](int64_t kt) {
    const int a_row = int(t.row0 + x * kARows);
    const int b_row = int(int64_t(t.g) * p.N + n0 + y * kBRows);
    uint16_t a_mask = 0, b_mask = 0;  // the blocks of this cluster row / column
    for (int i = 0; i < kCN; ++i) a_mask |= uint16_t(1u << (y * kCN + i));
    for (int j = 0; j < kCM; ++j) b_mask |= uint16_t(1u << (x + j * kCN));
    const int s = int(kt % kStages);
    mbar_wait(empty + 8 * s, uint32_t(((kt / kStages) & 1) ^ 1));  // the first round passes at once
    const uint32_t a_dst = base + s * kStageBytes + x * kARows * kTile;
    const uint32_t b_dst = base + s * kStageBytes + kATileBytes + y * kBRows * kTile;
    mbar_expect_tx(full + 8 * s, kStageBytes);  // all of A and B arrive, from this block and its peers
    if (kCN > 1) tma_load_2d_multicast(a_dst, &map_a, int(kt * kTile), a_row, full + 8 * s, a_mask);
    else tma_load_2d(a_dst, &map_a, int(kt * kTile), a_row, full + 8 * s);
    if (kCM > 1) tma_load_2d_multicast(b_dst, &map_b, int(kt * kTile), b_row, full + 8 * s, b_mask);
    else tma_load_2d(b_dst, &map_b, int(kt * kTile), b_row, full + 8 * s);
  };
  if (!kProducer && threadIdx.x == 0)
    for (int64_t kt = 0; kt < lmin(kStages, p.Kt); ++kt) produce(kt);
  // Values the same across a warp are made so visibly (__shfl_sync from lane 0), so that the
  // compiler keeps them, and the wgmma descriptors made from them, in uniform registers: the
  // loop between two batches of wgmmas is what keeps the tensor cores waiting.
  // c: the consumer warpgroup, rows 64 kWaves c .. of the tile.
  auto consume = [&](const int c) {
    const int tid = int(threadIdx.x % 128), warp = tid / 32, lane = tid % 32;
    int r[kWaves], off0[kWaves], off1[kWaves];
    const int Kt = int(p.Kt);
    slice_rows(c, warp, lane, t.rows, Kt, r, off0, off1);
    const float* sa = p.a_scale + t.row0 * p.Kt;
    // (a block past N, there to load its part for its cluster, reads the last block's scales)
    const float* sb = p.b_scale + (int64_t(t.g) * p.NB + lmin(n0 / kTile, p.NB - 1)) * p.Kt;
    // the descriptors' low words at stage 0 (the high word is the layout's constant)
    const uint64_t desc0 = sw128_desc(base);
    const uint32_t lo0 = __shfl_sync(kFullMask, uint32_t(desc0), 0);
    const uint64_t hi = desc0 & 0xFFFFFFFF00000000ull;
    // gives stage `st` back to the producers of the cluster (its wgmmas have completed)
    auto release = [&](int st) {
      __syncwarp();
      if (kCluster > 1) {
        if (lane < kCluster) mbar_arrive_cluster(empty + 8 * st, uint32_t(lane));  // lane r: block r's barrier
      } else if (lane == 0) {
        mbar_arrive(empty + 8 * st);
      }
    };
    // K tile kt's scales for this thread's rows and the B block: with a producer warpgroup from
    // stage st's copy (read before the stage is released), else from global memory
    auto tile_scales = [&](int kt, int st, float& b_s, float(&s0)[kWaves], float(&s1)[kWaves]) {
      if constexpr (kProducer) {
        const float* sc =
            reinterpret_cast<const float*>(smem_raw + (scales + st * Shape::kScaleBytes - smem_u32(smem_raw)));
        b_s = sc[Shape::kRows];
#pragma unroll
        for (int w = 0; w < kWaves; ++w) s0[w] = sc[r[w]], s1[w] = sc[r[w] + 8];
      } else {
        load_scales(sa, sb, off0, off1, kt, b_s, s0, s1);
      }
    };
    float acc[64], total[kWaves][64];
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      acc[i] = 0.f;
#pragma unroll
      for (int w = 0; w < kWaves; ++w) total[w][i] = 0.f;
    }
    int s = 0;
    uint32_t phase = 0;
    if constexpr (kTwoAcc) {
      // K tile kt's sums in acc (even kt) or acc2 (odd kt); each step issues kt + 1 before it
      // waits for kt (wgmma_wait<1>: all but the latest batch done), then promotes kt
      float acc2[64];
#pragma unroll
      for (int i = 0; i < 64; ++i) acc2[i] = 0.f;
      auto issue = [&](float(&a)[64], int kt) {
        const int st = kt % kStages;
        mbar_wait(full + 8 * st, uint32_t((kt / kStages) & 1));
        issue_slice<kATileBytes>(a, hi, lo0 + uint32_t(st) * (kStageBytes >> 4), c, true);
      };
      // after wgmma_wait: K tile kt's sums in a, promoted (its stage released first)
      auto finish = [&](const float(&a)[64], int kt) {
        float b_s, s0[1], s1[1];
        tile_scales(kt, kt % kStages, b_s, s0, s1);
        release(kt % kStages);
        promote(total[0], a, s0[0] * b_s, s1[0] * b_s);
      };
      // straight-line waits (a wait in a divergent path makes ptxas serialize the wgmmas)
      issue(acc, 0);
      int kt = 0;
      for (; kt + 2 < Kt; kt += 2) {
        issue(acc2, kt + 1);
        wgmma_wait<1>();
        finish(acc, kt);
        issue(acc, kt + 2);
        wgmma_wait<1>();
        finish(acc2, kt + 1);
      }
      if (kt + 1 < Kt) {
        issue(acc2, kt + 1);
        wgmma_wait<1>();
        finish(acc, kt);
        wgmma_wait<0>();
        finish(acc2, kt + 1);
      } else {
        wgmma_wait<0>();
        finish(acc, kt);
      }
      store_slices<false>(p, total, r, t.rows, t.row0, n0, t.g, lane);
    } else {
    for (int kt = 0; kt < Kt; ++kt) {
      // the scales first: their loads are in flight while the tile lands and multiplies
      float b_s, s0[kWaves], s1[kWaves];
      if constexpr (!kProducer) tile_scales(kt, s, b_s, s0, s1);  // (in flight while the tile lands)
      mbar_wait(full + 8 * s, phase);
      if constexpr (kProducer) tile_scales(kt, s, b_s, s0, s1);
      const uint32_t stage_lo = lo0 + uint32_t(s) * (kStageBytes >> 4);
#pragma unroll
      for (int w = 0; w < kWaves; ++w) {
        // (the contrast sums all of K in acc: fresh only at the first tile)
        issue_slice<kATileBytes>(acc, hi, stage_lo, kWaves * c + w, kWaves > 1 || p.promote || kt == 0);
        // while these run: the stage the last K tile used (released by now, as a rule), refilled
        if (!kProducer && w == kWaves - 1 && threadIdx.x == 0 && kt >= 1 && kt - 1 + kStages < Kt)
          produce(kt - 1 + kStages);
        __syncwarp();
        if (kWaves == 1 && !p.promote) {  // the contrast: one accumulator over all of K
          wgmma_wait<0>();
          release(s);
          continue;
        }
        wgmma_wait<0>();
        if (w == kWaves - 1) release(s);
        promote(total[w], acc, s0[w] * b_s, s1[w] * b_s);
      }
      if (++s == kStages) s = 0, phase ^= 1;
    }
    if (kWaves == 1 && !p.promote) {  // scaled at the end by the first tile's scales
      const float b_s = sb[0], u0 = sa[off0[0]] * b_s, u1 = sa[off1[0]] * b_s;
#pragma unroll
      for (int i = 0; i < 64; ++i) total[0][i] = acc[i] * ((i & 2) ? u1 : u0);
    }
    store_slices<false>(p, total, r, t.rows, t.row0, n0, t.g, lane);
    }
  };
  const int wg = __shfl_sync(kFullMask, int(threadIdx.x / 128), 0);
  if constexpr (kProducer) {
    // (3 consumers: 32 + 3 x 160 of 4 x 128; 2: 40 + 2 x 232 of 3 x 168)
    constexpr int kProducerRegs = kWGs == 3 ? 32 : 40, kConsumerRegs = kWGs == 3 ? 160 : 232;
    static_assert(setmaxnreg_fits(kProducerRegs, kConsumerRegs, kWGs), "setmaxnreg over the launch's registers");
    if (wg == 0) {
      setmaxnreg_dec<kProducerRegs>();
      const int warp = int(threadIdx.x / 32);
      if (threadIdx.x == 0) {
        for (int64_t kt = 0; kt < p.Kt; ++kt) produce(kt);
      } else if (warp >= 1 && warp <= kScaleWarps) {
        int st = 0, round = 0;
        copy_tile_scales<Shape, kStages>(p, scales, full, empty, warp - 1, int(threadIdx.x % 32), t.row0, t.rows,
                                         p.b_scale + (int64_t(t.g) * p.NB + lmin(n0 / kTile, p.NB - 1)) * p.Kt, st,
                                         round);
      }
    } else {
      setmaxnreg_inc<kConsumerRegs>();
      consume(wg - 1);
    }
  } else {
    consume(wg);
  }
  // no block leaves while a peer may still arrive on its barriers
  if (kCluster > 1) cluster_sync();
#else
  (void)map_a, (void)map_b, (void)p;
  __trap();  // never launched: fp8_gemm_wgmma_available() is false without an sm_90a image
#endif
}

// ---- host side

using GridKernel = void (*)(const CUtensorMap, const CUtensorMap, const Fp8GemmArgs);
const GridKernel kGridKernels[3][3] = {  // [rows 128, 192, 256][cluster 1x1, 2x1, 2x2]
    {fp8_gemm_wgmma_kernel<1, 1, 1, 2>, fp8_gemm_wgmma_kernel<2, 1, 1, 2>, fp8_gemm_wgmma_kernel<2, 2, 1, 2>},
    {fp8_gemm_wgmma_kernel<1, 1, 1, 3>, fp8_gemm_wgmma_kernel<2, 1, 1, 3>, fp8_gemm_wgmma_kernel<2, 2, 1, 3>},
    {fp8_gemm_wgmma_kernel<1, 1, 2, 2>, fp8_gemm_wgmma_kernel<2, 1, 2, 2>, fp8_gemm_wgmma_kernel<2, 2, 2, 2>}};
const GridKernel kProducerKernels[3][3] = {  // [rows 128, 192, 256][cluster 1x1, 2x1, 2x2]
    {fp8_gemm_wgmma_kernel<1, 1, 1, 2, true>, fp8_gemm_wgmma_kernel<2, 1, 1, 2, true>,
     fp8_gemm_wgmma_kernel<2, 2, 1, 2, true>},
    {fp8_gemm_wgmma_kernel<1, 1, 1, 3, true>, fp8_gemm_wgmma_kernel<2, 1, 1, 3, true>,
     fp8_gemm_wgmma_kernel<2, 2, 1, 3, true>},
    {fp8_gemm_wgmma_kernel<1, 1, 2, 2, true>, fp8_gemm_wgmma_kernel<2, 1, 2, 2, true>,
     fp8_gemm_wgmma_kernel<2, 2, 2, 2, true>}};
// 128-row tiles, a producer warpgroup and two accumulators a consumer (kTwoAcc)
const GridKernel kTwoAccKernels[3] = {fp8_gemm_wgmma_kernel<1, 1, 1, 2, true, true>,
                                      fp8_gemm_wgmma_kernel<2, 1, 1, 2, true, true>,
                                      fp8_gemm_wgmma_kernel<2, 2, 1, 2, true, true>};
// Every wgmma kernel may use its shared-memory ring, once per device.
std::once_flag g_wgmma_smem[kMaxDevices];
void allow_wgmma_smem() {
  once_per_device(g_wgmma_smem, [] {
    const int most = std::max({WgmmaShape<1, 2>::kSmem, WgmmaShape<1, 3>::kSmem, WgmmaShape<2, 2>::kSmem});
    for (const auto& by_rows : kGridKernels)
      for (const GridKernel k : by_rows)
        check(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, most),
              "fp8_gemm (shared memory of the wgmma kernel)");
    for (const auto& by_rows : kProducerKernels)
      for (const GridKernel k : by_rows)
        check(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, most),
                "fp8_gemm (shared memory of the wgmma kernel)");
    for (const GridKernel k : kTwoAccKernels)
      check(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, most),
            "fp8_gemm (shared memory of the wgmma kernel)");
    allow_persistent_smem();
  });
}

// The tile height for a product: the one with the least estimated time, waves of blocks over the
// SMs times a wave's time, from what each height reached on large products on the H200 (TFLOP/s:
// 256 rows ~900, 192 ~800, 128 ~750; bench/RESULTS.md). 192 wins where 256-row tiles would leave a
// last wave mostly empty (M 4096, N 2112). The contiguous layout takes 128 (its groups are padded
// to 128 rows), and so does the unpromoted contrast.
int fp8_tile_rows(const Fp8GemmParams& p) {
  if (p.layout == Fp8Layout::Contiguous || !p.promote) return 128;
  const int64_t sms = sm_count(), n_tiles = ceil_div(p.N, kTile) * (p.layout == Fp8Layout::Masked ? p.groups : 1);
  int best = 128;
  double best_time = 0;
  for (const auto& [rows, rate] : {std::pair<int, double>{128, 750}, {192, 800}, {256, 900}}) {
    const double waves = double(ceil_div(ceil_div(p.M, rows) * n_tiles, sms));
    const double time = waves * rows / rate;
    if (rows == 128 || time < best_time * 0.98) best = rows, best_time = time;
  }
  return best;
}

}  // namespace

bool fp8_gemm_wgmma_available() { return sm90a_available(); }

void fp8_gemm_setup() {
  if (fp8_gemm_wgmma_available()) allow_wgmma_smem();
}

void fp8_gemm(const Fp8GemmParams& p, Stream stream) {
  FATHOM_CHECK(p.out_dtype == DType::BF16 || p.out_dtype == DType::F32, "fp8_gemm: output dtype ",
               dtype_name(p.out_dtype), " is not supported; expected BF16 or F32.");
  FATHOM_CHECK(!p.accumulate || p.out_dtype == DType::F32, "fp8_gemm: accumulating needs an F32 output.");
  FATHOM_CHECK(p.M >= 0 && p.N >= 0 && p.K > 0 && p.groups >= 1, "fp8_gemm: invalid shape M ", p.M, " N ", p.N,
               " K ", p.K, " groups ", p.groups, ".");
  const int64_t ldo = p.ldo ? p.ldo : p.N;
  FATHOM_CHECK(ldo >= p.N, "fp8_gemm: output row stride ", ldo, " is below N = ", p.N, ".");
  FATHOM_CHECK(p.layout == Fp8Layout::Masked || p.layout == Fp8Layout::Contiguous || p.groups == 1,
               "fp8_gemm: a dense product has one weight, not ", p.groups, ".");
  FATHOM_CHECK(p.layout != Fp8Layout::Contiguous || p.expert,
               "fp8_gemm: the contiguous layout needs the rows' experts.");
  FATHOM_CHECK(p.layout != Fp8Layout::Masked || p.count, "fp8_gemm: the masked layout needs the groups' row counts.");
  const int64_t a_rows = p.layout == Fp8Layout::Masked ? p.groups * p.M : p.M;
  FATHOM_CHECK(ceil_div(p.N, kSimtTile) < (int64_t(1) << 31) && ceil_div(p.M, kSimtTile) <= 65535 && p.groups <= 65535 &&
                   a_rows < (int64_t(1) << 31) && int64_t(p.groups) * p.N < (int64_t(1) << 31),
               "fp8_gemm: M ", p.M, " N ", p.N, " groups ", p.groups, " exceed what one launch handles.");
  if (p.M == 0 || p.N == 0) return;
  FATHOM_ASSERT(p.out && p.a && p.a_scale && p.b && p.b_scale, "fp8_gemm with a null pointer");
  const Fp8GemmArgs args{p.out,
                         ldo,
                         p.out_dtype == DType::BF16,
                         p.accumulate,
                         p.promote,
                         int(p.layout),
                         p.a,
                         p.a_scale,
                         p.b,
                         p.b_scale,
                         p.M,
                         p.N,
                         p.K,
                         ceil_div(p.K, kTile),
                         ceil_div(p.N, kTile),
                         p.expert,
                         p.count};
  const unsigned gz = p.layout == Fp8Layout::Masked ? unsigned(p.groups) : 1u;
  const cudaStream_t s = as_cuda(stream);
  const bool wgmma_fits = p.K % 16 == 0 && aligned16(p.a) && aligned16(p.b) && fp8_gemm_wgmma_available();
  FATHOM_CHECK(p.kernel != Fp8GemmKernel::Wgmma || wgmma_fits, "fp8_gemm: the wgmma kernel was asked for, but ",
               fp8_gemm_wgmma_available() ? "K must be a multiple of 16 and A and B 16-byte aligned"
                                          : "this device or build has no sm_90a kernel image");
  if (p.kernel != Fp8GemmKernel::Simt && wgmma_fits) {
    // The form, by what measured fastest on the H200 (bench/RESULTS.md, 2026-12-02): tile rows by
    // fp8_tile_rows. Dense products: the persistent kernel with a producer warpgroup (the next
    // tile's copies land while a tile stores) and, for bf16 outputs, the epilogue by TMA stores
    // (the consumers go on to the next tile while the copy engine writes: K 512 439 -> 835
    // TFLOP/s, K 1536 780 -> 1021, 8192³ 998 -> 1028-1049). Without the TMA store (F32 or
    // accumulating outputs) 256-row tiles over K > 2048 run as a grid of tiles with a producer
    // warpgroup (8192³: 981 -> 998). 192- and 256-row tiles in clusters of 2 along N (A
    // multicast: a quarter fewer L2 reads). Other layouts: a block per tile, with a producer
    // warpgroup for 256 rows.
    // FATHOM_FP8_GEMM=ROWS,CLUSTER[,FORM] overrides it (benchmarks, tests): 128, 192 or 256 (2
    // warpgroups of one slice, 3 of one, 2 of two), then 1x1, 2x1 or 2x2, then the form.
    enum class Form { Grid, Producer, TwoAcc, Persistent };
    int rows = fp8_tile_rows(p), cn = 1, cm = 1;
    const bool dense = p.layout == Fp8Layout::Dense && p.promote;
    Form form = rows == 256 ? Form::Producer : Form::Grid;
    // the persistent kernel's epilogue by TMA stores where the output allows (bf16, not
    // accumulating, 16-byte rows); FATHOM_FP8_TMA_STORE=0 keeps the stores from registers (to
    // measure the difference)
    static const bool allow_tma_store = [] {
      const char* v = std::getenv("FATHOM_FP8_TMA_STORE");
      return !(v && std::strcmp(v, "0") == 0);
    }();
    const bool tma_store =
        allow_tma_store && p.out_dtype == DType::BF16 && !p.accumulate && ldo % 8 == 0 && aligned16(p.out);
    if (dense) {
      cn = rows > 128 && ceil_div(p.N, kTile) > 1 ? 2 : 1;
      form = rows == 256 && ceil_div(p.K, kTile) > 16 && !tma_store ? Form::Producer : Form::Persistent;
    }
    if (const char* v = std::getenv("FATHOM_FP8_GEMM"); v && *v) {
      std::string c = v, f;
      form = rows == 256 ? Form::Producer : Form::Grid;
      for (const char* suffix : {",grid", ",producer", ",twoacc", ",persistent"})
        if (c.size() > std::strlen(suffix) && c.compare(c.size() - std::strlen(suffix), std::strlen(suffix), suffix) == 0)
          f = suffix + 1, c.resize(c.size() - std::strlen(suffix));
      const std::string r = c.substr(0, c.find(',')), cl = c.find(',') == std::string::npos ? "" : c.substr(r.size() + 1);
      FATHOM_CHECK((r == "128" || r == "192" || r == "256") && (cl == "1x1" || cl == "2x1" || cl == "2x2"),
                   "FATHOM_FP8_GEMM is '", v, "'; expected ROWS,CLUSTER[,FORM]: 128, 192 or 256, then 1x1, 2x1 or 2x2, "
                   "then grid (a block per tile), producer (the same with a producer warpgroup), twoacc (that with two "
                   "accumulators, 128 rows) or persistent (dense: persistent with a producer warpgroup, 1x1 or 2x1).");
      rows = p.layout == Fp8Layout::Contiguous ? 128 : r == "192" ? 192 : r == "256" && p.promote ? 256 : 128;
      cn = cl[0] == '2' ? 2 : 1;
      cm = cl[2] == '2' && p.layout == Fp8Layout::Dense ? 2 : 1;
      form = f == "grid"                                            ? Form::Grid
             : f == "producer"                                      ? Form::Producer
             : f == "twoacc" && rows == 128 && p.promote            ? Form::TwoAcc
             : f == "persistent" && dense && cm == 1                ? Form::Persistent
             : f.empty() && rows == 256                             ? Form::Producer
                                                                    : Form::Grid;
    }
    const CUtensorMap map_a = tile_map(p.a, a_rows, p.K, uint32_t(rows / cn), "A");
    const CUtensorMap map_b = tile_map(p.b, int64_t(p.groups) * p.N, p.K, uint32_t(kTile / cm), "B");
    const int ri = rows == 128 ? 0 : rows == 192 ? 1 : 2;
    const int ci = cn == 1 ? 0 : cm == 1 ? 1 : 2;
    allow_wgmma_smem();
    if (form == Form::Persistent) {
      launch_persistent(args, map_a, map_b, rows, cn, tma_store, s);
      return;
    }
    const GridKernel kernel = form == Form::TwoAcc     ? kTwoAccKernels[ci]
                              : form == Form::Producer ? kProducerKernels[ri][ci]
                                                       : kGridKernels[ri][ci];
    const int smem = ri == 0 ? WgmmaShape<1, 2>::kSmem : ri == 1 ? WgmmaShape<1, 3>::kSmem : WgmmaShape<2, 2>::kSmem;
    const int threads = ri == 0 ? WgmmaShape<1, 2>::kThreads : ri == 1 ? WgmmaShape<1, 3>::kThreads
                                                                  : WgmmaShape<2, 2>::kThreads;
    const int64_t m_tiles = ceil_div(p.M, rows), n_tiles = ceil_div(p.N, kTile);
    cudaLaunchAttribute attr[2];
    // (+ the producer warpgroup)
    cudaLaunchConfig_t config = launch_config(threads + (form == Form::Grid ? 0 : 128), smem, cn, cm, s, attr);
    config.gridDim = dim3(unsigned(ceil_div(n_tiles, cn) * cn), unsigned(ceil_div(m_tiles, cm) * cm), gz);
    allow_pdl(config, attr);
    check(cudaLaunchKernelEx(&config, kernel, map_a, map_b, args), "fp8_gemm_wgmma_kernel (launch)");
    check_launch("fp8_gemm_wgmma_kernel");
    return;
  }
  launch_fp8_gemm_simt(args, gz, s);
}

}  // namespace fathom::cuda
