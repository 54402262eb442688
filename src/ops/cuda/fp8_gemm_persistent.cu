// The FP8 GEMM's persistent Hopper kernel (dense products): a cluster per SM pair stays on the
// GPU and walks its output tiles, its producer warpgroup's copies running on from one tile into
// the next while the consumers finish a tile, whose bf16 sums leave by TMA stores. What it shares with the block-per-tile kernel (the
// tile shapes, the promotion, the stores): fp8_gemm_wgmma.cuh; which products take it:
// fp8_gemm() in fp8_gemm.cu; the recipe: docs/fp8-gemm.md.
#include <cuda.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "core/error.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/fp8_gemm_wgmma.cuh"

namespace fathom::cuda::fp8_wgmma {
namespace {

// The dense layout's persistent form with a producer warpgroup: a grid of clusters of kCN blocks
// (1 or 2 along N, sharing their A tile by multicast), at most as many as fit on the GPU at once,
// each cluster taking every n-th output tile pair of the banded raster. The producer thread's
// copies and the scale warps' run on from one output tile to the next through the same ring of
// stages, so while the consumers store a tile the next one's first K tiles land: no tile starts
// with an empty pipeline, and no block is launched per tile.
template <int kCN, int kWaves, int kWGs>
__global__ void __launch_bounds__(128 * (kWGs + 1), 1)
    fp8_gemm_wgmma_persistent_kernel(const __grid_constant__ CUtensorMap map_a,
                                              const __grid_constant__ CUtensorMap map_b,
                                              const __grid_constant__ CUtensorMap map_out, const Fp8GemmArgs p,
                                              int64_t m_tiles, int64_t n_tiles, int tma_store) {
#ifdef FATHOM_SM90A
  using Shape = WgmmaShape<kWaves, kWGs>;
  constexpr int kStages = Shape::kPStages, kStageBytes = Shape::kStageBytes, kRows = Shape::kRows;
  constexpr int kATileBytes = kRows * kTile, kARows = kRows / kCN;
  pdl_wait();
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;  // 128-byte swizzle: 1024-byte aligned tiles
  // the stages, the output tile (1024-byte aligned: the store's swizzle), the barriers, the scales
  const uint32_t out = base + kStages * kStageBytes, full = out + Shape::kOutBytes, empty = full + 8 * kStages;
  const uint32_t scales = empty + 8 * kStages;
  const int x = int(blockIdx.x % kCN), Kt = int(p.Kt);
  // the cluster's tiles: cluster tile `id` is tile row m of kCN tile columns; a band of 8 tile
  // rows is swept column pair by column pair, so that the tiles in flight share panels in L2
  const int64_t cid = blockIdx.x / kCN, clusters = gridDim.x / kCN, pairs = ceil_div(n_tiles, int64_t(kCN));
  const int64_t total = m_tiles * pairs, mine = cid < total ? (total - cid + clusters - 1) / clusters : 0;
  auto tile_of = [&](int64_t j, int64_t& m0, int64_t& n0) {  // the cluster's j-th tile
    constexpr int64_t kBand = 8;
    const int64_t id = cid + j * clusters;
    const int64_t first = id / (kBand * pairs) * kBand, rows = lmin(m_tiles - first, kBand);
    const int64_t local = id % (kBand * pairs);
    m0 = (first + local % rows) * kRows;
    n0 = ((local / rows) * kCN + x) * kTile;
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full + 8 * s, 1 + kScaleWarps);  // the producer's arrive (+ bytes), the scale warps'
      mbar_init(empty + 8 * s, 4 * kWGs * kCN);  // one arrive per consumer warp of the cluster
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if (kCN > 1) cluster_sync();
  else __syncthreads();
  const int wg = __shfl_sync(kFullMask, int(threadIdx.x / 128), 0);
  // (3 consumers: 40 + 3 x 152 of 4 x 128: the producer loop spilled at 32)
  constexpr int kProducerRegs = 40, kConsumerRegs = kWGs == 3 ? 152 : 232;
  static_assert(setmaxnreg_fits(kProducerRegs, kConsumerRegs, kWGs), "setmaxnreg over the launch's registers");
  if (wg == 0) {
    setmaxnreg_dec<kProducerRegs>();
    const int warp = int(threadIdx.x / 32);
    if (threadIdx.x == 0) {
      int s = 0;
      uint32_t phase = 0;
      for (int64_t j = 0; j < mine; ++j) {
        int64_t m0, n0;
        tile_of(j, m0, n0);
        for (int kt = 0; kt < Kt; ++kt) {
          mbar_wait(empty + 8 * s, phase ^ 1u);  // the first round passes at once
          const uint32_t a_dst = base + s * kStageBytes + x * kARows * kTile;
          mbar_expect_tx(full + 8 * s, kStageBytes);  // all of A (this block's part and its peer's) and B
          if (kCN > 1)
            tma_load_2d_multicast(a_dst, &map_a, kt * kTile, int(m0 + x * kARows), full + 8 * s,
                                  uint16_t((1u << kCN) - 1));
          else
            tma_load_2d(a_dst, &map_a, kt * kTile, int(m0), full + 8 * s);
          tma_load_2d(base + s * kStageBytes + kATileBytes, &map_b, kt * kTile, int(n0), full + 8 * s);
          if (++s == kStages) s = 0, phase ^= 1u;
        }
      }
    } else if (warp >= 1 && warp <= kScaleWarps) {
      int st = 0, round = 0;
      for (int64_t j = 0; j < mine; ++j) {
        int64_t m0, n0;
        tile_of(j, m0, n0);
        copy_tile_scales<Shape, kStages>(p, scales, full, empty, warp - 1, int(threadIdx.x % 32), m0,
                                         lmin(kRows, p.M - m0), p.b_scale + lmin(n0 / kTile, p.NB - 1) * p.Kt, st,
                                         round);
      }
    }
  } else {
    setmaxnreg_inc<kConsumerRegs>();
    const int c = wg - 1, tid = int(threadIdx.x % 128), warp = tid / 32, lane = tid % 32;
    const uint64_t desc0 = sw128_desc(base);
    const uint32_t lo0 = __shfl_sync(kFullMask, uint32_t(desc0), 0);
    const uint64_t hi = desc0 & 0xFFFFFFFF00000000ull;
    int s = 0;
    uint32_t phase = 0;
    for (int64_t j = 0; j < mine; ++j) {
      int64_t m0, n0;
      tile_of(j, m0, n0);
      const int64_t rows = lmin(kRows, p.M - m0);
      int r[kWaves];  // (slice_rows' rows)
#pragma unroll
      for (int w = 0; w < kWaves; ++w) r[w] = 64 * (kWaves * c + w) + 16 * warp + lane / 4;
      float acc[64], total[kWaves][64];
#pragma unroll
      for (int w = 0; w < kWaves; ++w)
#pragma unroll
        for (int i = 0; i < 64; ++i) total[w][i] = 0.f;
      // one K tile from ring stage st (phase ph): its scales, each slice's wgmmas, the stage back
      // to the producers, the promotion
      auto k_tile = [&](int st, uint32_t ph) __attribute__((always_inline)) {
        mbar_wait(full + 8 * st, ph);
        const float* sc = reinterpret_cast<const float*>(smem_raw + (scales + st * Shape::kScaleBytes - smem_u32(smem_raw)));
        const float b_s = sc[kRows];
        float s0[kWaves], s1[kWaves];
#pragma unroll
        for (int w = 0; w < kWaves; ++w) s0[w] = sc[r[w]] * b_s, s1[w] = sc[r[w] + 8] * b_s;
        const uint32_t stage_lo = lo0 + uint32_t(st) * (kStageBytes >> 4);
#pragma unroll
        for (int w = 0; w < kWaves; ++w) {
          issue_slice<kATileBytes>(acc, hi, stage_lo, kWaves * c + w, true);
          wgmma_wait<0>();
          if (w == kWaves - 1) {  // the stage back to the producers of the cluster
            __syncwarp();
            if (kCN > 1) {
              if (lane < kCN) mbar_arrive_cluster(empty + 8 * st, uint32_t(lane));
            } else if (lane == 0) {
              mbar_arrive(empty + 8 * st);
            }
          }
          promote(total[w], acc, s0[w], s1[w]);
        }
      };
      // Two consumers (128- and 256-row tiles) walk the ring a round at a time, its stages
      // unrolled (their barriers, scales and descriptors at constant offsets): 1.3-3.8% faster
      // than a runtime stage index on the M 4096 and 8192³ shapes, up to 13% at M 128
      // (bench/RESULTS.md); the turns before the ring's first stage and after its last whole
      // round take the plain loop. (Three consumers, 192 rows: no faster so.)
      int kt = 0;
      if constexpr (kWGs == 2) {
        for (; kt < Kt && s != 0; ++kt) {
          k_tile(s, phase);
          if (++s == kStages) s = 0, phase ^= 1u;
        }
        for (; kt + kStages <= Kt; kt += kStages) {
#pragma unroll
          for (int st = 0; st < kStages; ++st) k_tile(st, phase);
          phase ^= 1u;
        }
      }
      for (; kt < Kt; ++kt) {
        k_tile(s, phase);
        if (++s == kStages) s = 0, phase ^= 1u;
      }
      if (tma_store) {
        // the epilogue through shared memory: once the last tile's store has read the output
        // tile, every consumer writes its sums there, and one thread stores the two boxes by
        // TMA — the consumers go on to the next tile's wgmmas while the copy engine writes
        if (threadIdx.x == 128) bulk_wait_read<0>();
        named_bar_sync(1, 128 * kWGs);
        stage_out_tile<kWaves, kRows>(out, total, r, lane);
        fence_proxy_async_smem();
        named_bar_sync(1, 128 * kWGs);
        if (threadIdx.x == 128) {
          tma_store_2d(&map_out, out, int(n0), int(m0));
          tma_store_2d(&map_out, out + kRows * 128, int(n0 + 64), int(m0));
          bulk_commit();
        }
      } else {
        store_slices<true>(p, total, r, rows, m0, n0, 0, lane);
      }
    }
    if (tma_store && threadIdx.x == 128) bulk_wait<0>();  // (the last stores finished before leaving)
  }
  if (kCN > 1) cluster_sync();  // no block leaves while a peer may still arrive on its barriers
#else
  (void)map_a, (void)map_b, (void)map_out, (void)p, (void)m_tiles, (void)n_tiles, (void)tma_store;
  __trap();  // never launched: fp8_gemm_wgmma_available() is false without an sm_90a image
#endif
}

using PersistentKernel = void (*)(const CUtensorMap, const CUtensorMap, const CUtensorMap, const Fp8GemmArgs, int64_t,
                                  int64_t, int);
const PersistentKernel kPersistentKernels[3][2] = {  // [rows 128, 192, 256][cluster 1x1, 2x1]
    {fp8_gemm_wgmma_persistent_kernel<1, 1, 2>, fp8_gemm_wgmma_persistent_kernel<2, 1, 2>},
    {fp8_gemm_wgmma_persistent_kernel<1, 1, 3>, fp8_gemm_wgmma_persistent_kernel<2, 1, 3>},
    {fp8_gemm_wgmma_persistent_kernel<1, 2, 2>, fp8_gemm_wgmma_persistent_kernel<2, 2, 2>}};

}  // namespace

void allow_persistent_smem() {
  const int most = std::max({WgmmaShape<1, 2>::kPSmem, WgmmaShape<1, 3>::kPSmem, WgmmaShape<2, 2>::kPSmem});
  for (const auto& by_rows : kPersistentKernels)
    for (const PersistentKernel k : by_rows)
      check(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, most),
            "fp8_gemm (shared memory of the persistent wgmma kernel)");
}

void launch_persistent(const Fp8GemmArgs& args, const CUtensorMap& map_a, const CUtensorMap& map_b, int rows, int cn,
                       bool tma_store, cudaStream_t s) {
  const int ri = rows == 128 ? 0 : rows == 192 ? 1 : 2;
  const int64_t m_tiles = ceil_div(args.M, rows), n_tiles = ceil_div(args.N, kTile);
  const int64_t tiles = m_tiles * ceil_div(n_tiles, int64_t(cn));  // cluster tiles
  FATHOM_CHECK(tiles < (int64_t(1) << 30), "fp8_gemm: M ", args.M, " N ", args.N, " make too many tiles for one launch.");
  const int smem = ri == 0 ? WgmmaShape<1, 2>::kPSmem : ri == 1 ? WgmmaShape<1, 3>::kPSmem : WgmmaShape<2, 2>::kPSmem;
  const int threads = ri == 0 ? WgmmaShape<1, 2>::kThreads : ri == 1 ? WgmmaShape<1, 3>::kThreads
                                                                : WgmmaShape<2, 2>::kThreads;
  const PersistentKernel kernel = kPersistentKernels[ri][cn - 1];
  cudaLaunchAttribute attr[2];
  cudaLaunchConfig_t config = launch_config(threads + 128, smem, cn, 1, s, attr);  // (+ the producer warpgroup)
  // as many clusters as are resident at once (asked once per kernel and device), at most one
  // per cluster tile
  static std::atomic<int> resident[kMaxDevices][3][2];
  int device = 0;
  check(cudaGetDevice(&device), "fp8_gemm (device)");
  std::atomic<int>& fit = resident[std::min(device, kMaxDevices - 1)][ri][cn - 1];
  if (fit.load() == 0) {
    int clusters = 0;
    config.gridDim = dim3(unsigned(sm_count() / cn * cn));
    check(cudaOccupancyMaxActiveClusters(&clusters, kernel, &config), "fp8_gemm (the clusters resident at once)");
    fit.store(std::max(clusters, 1));
  }
  config.gridDim = dim3(unsigned(std::min<int64_t>(fit.load(), tiles) * cn));
  allow_pdl(config, attr);
  const CUtensorMap map_out = tma_store ? out_map(args.out, args.M, args.N, args.ldo, uint32_t(rows)) : CUtensorMap{};
  check(cudaLaunchKernelEx(&config, kernel, map_a, map_b, map_out, args, m_tiles, n_tiles, int(tma_store)),
        "fp8_gemm_wgmma_persistent_kernel (launch)");
  check_launch("fp8_gemm_wgmma_persistent_kernel");
}

}  // namespace fathom::cuda::fp8_wgmma
