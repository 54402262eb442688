// What the FP8 GEMM's Hopper kernels share (fp8_gemm.cu: a block per output tile, the
// launcher; fp8_gemm_persistent.cu: the persistent kernel and its launcher): the tile
// shapes and their shared-memory rings, the promotion, a slice's wgmma batch, the stores (from
// registers, or into the TMA store's shared-memory image), the scale warps' copies, and the host
// side's tensor maps and launch configuration. The recipe and the kernels in words: fp8_gemm.cu's
// head, docs/fp8-gemm.md.
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/fp8_gemm.cuh"
#include "ops/cuda/hopper.cuh"
#include "ops/cuda/wgmma_e4m3.cuh"

namespace fathom::cuda::fp8_wgmma {

// A block of kWGs warpgroups computes a (64 kWGs kWaves) x 128 tile, each warpgroup kWaves slices
// of 64 rows one after the other per K tile. Taller tiles bring fewer bytes into shared memory
// per multiply-add (256 rows: A 32 KB + B 16 KB a K tile for twice a 128-row tile's work); a third
// warpgroup gives the tensor cores a third stream of wgmmas instead.
constexpr int kTileBytes = kTile * kTile;  // a 128 x 128 tile of e4m3: 16 KB
// With a producer warpgroup, two of its idle warps copy each K tile's scales into the stage (the
// consumers' own scattered loads of them were the kernel's largest stall: ncu, bench/RESULTS.md).
inline constexpr int kScaleWarps = 2;
template <int kWaves, int kWGs>
struct WgmmaShape {
  static constexpr int kThreads = 128 * kWGs;
  static constexpr int kRows = 64 * kWGs * kWaves;                           // the tile's rows
  static constexpr int kStageBytes = kRows * kTile + kTileBytes;            // A and B
  // with a producer warpgroup, each stage's scales too: the tile rows' A scales, then B's
  static constexpr int kScaleBytes = (kRows + 4) * 4;
  static constexpr int kPerStage = kStageBytes + kScaleBytes + 16;  // + the stage's two barriers
  static constexpr int kStages = (227 * 1024 - 2048) / kPerStage > 6 ? 6 : (227 * 1024 - 2048) / kPerStage;
  static constexpr int kSmem = kStages * kPerStage + 1024;  // + alignment slack
  // the persistent kernel: also a bf16 output tile for its TMA-store epilogue, fewer stages
  static constexpr int kOutBytes = kRows * kTile * 2;
  static constexpr int kPStages = (227 * 1024 - 2048 - kOutBytes) / kPerStage > 6
                                      ? 6
                                      : (227 * 1024 - 2048 - kOutBytes) / kPerStage;
  static constexpr int kPSmem = kPStages * kPerStage + kOutBytes + 1024;
};
// A producer warpgroup beside two consumers leaves 168 registers a thread at the kernel's entry,
// not the ~240 a 256-row tile's 128 fp32 accumulators and 64 tensor-core ones need: setmaxnreg
// moves them (kProducer below). Without it, thread 0 issues the copies between its wgmmas.

#ifdef FATHOM_SM90A
// The promotion: the tile's sums, scaled by their rows' sa * sb, into the fp32 accumulators.
__device__ inline void promote(float (&total)[64], const float (&acc)[64], float s0, float s1) {
#pragma unroll
  for (int i = 0; i < 64; ++i) total[i] += acc[i] * ((i & 2) ? s1 : s0);
}

// Warpgroup c's slice w: this thread's accumulator rows r[w] and r[w] + 8 of the tile, and the
// offsets of their scales among the tile's (rows at or past `rows` read row 0's: their sums are
// never stored).
template <int kWaves>
__device__ __forceinline__ void slice_rows(int c, int warp, int lane, int64_t rows, int Kt, int (&r)[kWaves],
                                           int (&off0)[kWaves], int (&off1)[kWaves]) {
#pragma unroll
  for (int w = 0; w < kWaves; ++w) {
    r[w] = 64 * (kWaves * c + w) + 16 * warp + lane / 4;
    off0[w] = r[w] < rows ? r[w] * Kt : 0;
    off1[w] = r[w] + 8 < rows ? (r[w] + 8) * Kt : 0;
  }
}

// K tile kt's scales for this thread's rows (sa + off: each row's scales) and the B block.
template <int kWaves>
__device__ __forceinline__ void load_scales(const float* sa, const float* sb, const int (&off0)[kWaves],
                                            const int (&off1)[kWaves], int kt, float& b_s, float (&s0)[kWaves],
                                            float (&s1)[kWaves]) {
  b_s = __ldg(sb + kt);
#pragma unroll
  for (int w = 0; w < kWaves; ++w) {
    s0[w] = __ldg(sa + off0[w] + kt);
    s1[w] = __ldg(sa + off1[w] + kt);
  }
}

// One slice's wgmmas of a stage: A rows 64 slice .. of the stage's A tile against its B tile (both
// given by the stage's descriptor low word; hi: the layout's high word), into acc (overwritten
// first when fresh). 32 bytes of K a step: +2 in the descriptor's 16-byte units.
template <int kATileBytes>
__device__ __forceinline__ void issue_slice(float (&acc)[64], uint64_t hi, uint32_t stage_lo, int slice, bool fresh) {
  const uint64_t da = hi | (stage_lo + uint32_t(slice * (kTileBytes / 2)) / 16);
  const uint64_t db = hi | (stage_lo + (kATileBytes >> 4));
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
  for (int k = 0; k < kTile / 32; ++k) wgmma_m64n128k32(acc, da + 2 * k, db + 2 * k, fresh && k == 0 ? 0 : 1);
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

// The tile's fp32 sums to out: slice w's rows r[w] and r[w] + 8 (of the tile's first `rows`,
// from row0) and columns n0 + 8j + 2(lane % 4) + {0, 1} — the m64n128 accumulator layout, register
// 4j + 2h + {0, 1} holding row r + 8h.
// kDense: the dense layout for certain (no rows to check against their expert).
template <bool kDense, int kWaves>
__device__ __forceinline__ void store_slices(const Fp8GemmArgs& p, const float (&total)[kWaves][64],
                                             const int (&r)[kWaves], int64_t rows, int64_t row0, int64_t n0, int g,
                                             int lane) {
  auto value = [&](int64_t row, float v) { return kDense ? v : row_value(p, g, row, v); };
#pragma unroll
  for (int w = 0; w < kWaves; ++w)
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int64_t col = n0 + 8 * j + 2 * (lane % 4), ra = row0 + r[w], rb = ra + 8;
      if (r[w] < rows) store_pair(p, ra, col, value(ra, total[w][4 * j]), value(ra, total[w][4 * j + 1]));
      if (r[w] + 8 < rows) store_pair(p, rb, col, value(rb, total[w][4 * j + 2]), value(rb, total[w][4 * j + 3]));
    }
}
// The tile's sums as bf16 into the shared-memory image of the output tile that the TMA store
// reads: two boxes of 64 columns (out, out + kRows·128 bytes), rows of 128 bytes whose 16-byte
// chunk c sits at c ^ (row % 8) (the 128-byte swizzle; a warp's 32 four-byte writes then fall
// in 32 different banks). Rows past the product's end are written too: the store clips them.
template <int kWaves, int kRows>
__device__ __forceinline__ void stage_out_tile(uint32_t out, const float (&total)[kWaves][64], const int (&r)[kWaves],
                                               int lane) {
#pragma unroll
  for (int w = 0; w < kWaves; ++w)
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const uint32_t box = out + uint32_t(j / 8) * (kRows * 128), within = 4u * uint32_t(lane % 4);
      const uint32_t ra = uint32_t(r[w]), rb = ra + 8;  // (the same row % 8)
      const uint32_t chunk = (uint32_t(j % 8) ^ (ra % 8)) << 4;
      const __nv_bfloat162 va = __floats2bfloat162_rn(total[w][4 * j], total[w][4 * j + 1]);
      const __nv_bfloat162 vb = __floats2bfloat162_rn(total[w][4 * j + 2], total[w][4 * j + 3]);
      st_shared_u32(box + ra * 128 + chunk + within, *reinterpret_cast<const uint32_t*>(&va));
      st_shared_u32(box + rb * 128 + chunk + within, *reinterpret_cast<const uint32_t*>(&vb));
    }
}

// A scale warp of the producer warpgroup (h: 0 or 1) copies one output tile's scales into the
// ring, K tile after K tile: rows h·kRows/2 .. of the tile's A scales (0 past the tile's `rows`:
// their sums are never stored), warp 0 also the B block's (b_scales: that block's row, else null).
// Each copy waits for its stage to be free and its arrival on the stage's full barrier publishes
// it. (st, round): the ring position, carried from tile to tile.
template <class Shape, int kStages>
__device__ __forceinline__ void copy_tile_scales(const Fp8GemmArgs& p, uint32_t scales, uint32_t full, uint32_t empty,
                                                 int h, int lane, int64_t row0, int64_t rows, const float* b_scales,
                                                 int& st, int& round) {
  constexpr int kPerWarp = Shape::kRows / kScaleWarps;
  const int Kt = int(p.Kt), row = h * kPerWarp + lane, valid = int(lmin(kPerWarp / 32, (rows - row + 31) / 32));
  const float* src = p.a_scale + (row0 + row) * p.Kt;  // row's scales, then row + 32's, ...
  const float* sb = h == 0 && lane == 0 ? b_scales : nullptr;
  for (int kt = 0; kt < Kt; ++kt) {
    mbar_wait(empty + 8 * st, uint32_t(round & 1) ^ 1u);
    const uint32_t dst = scales + st * Shape::kScaleBytes + uint32_t(row) * 4;
#pragma unroll
    for (int j = 0; j < kPerWarp / 32; ++j)
      st_shared_f32(dst + 128 * j, j < valid ? __ldg(src + int64_t(32 * j) * Kt + kt) : 0.f);
    if (sb) st_shared_f32(scales + st * Shape::kScaleBytes + Shape::kRows * 4, __ldg(sb + kt));
    __syncwarp();
    if (lane == 0) mbar_arrive(full + 8 * st);
    if (++st == kStages) st = 0, ++round;
  }
}
#endif

// ---- host side

// The tensor map of a (rows, K) e4m3 matrix read as box_rows x 128-byte boxes, 128-byte swizzled.
CUtensorMap tile_map(const uint8_t* ptr, int64_t rows, int64_t K, uint32_t box_rows, const char* what);
// The tensor map of the bf16 output (M, N) with row stride ldo, stored by TMA as 64-column x
// box_rows boxes, 128-byte swizzled (stage_out_tile's layout).
CUtensorMap out_map(void* out, int64_t M, int64_t N, int64_t ldo, uint32_t box_rows);

// The launch of a wgmma kernel: `threads` a block, `smem` bytes of dynamic shared memory, clusters
// of cn x cm blocks (attr: the attributes' storage, the cluster shape in attr[0]).
inline cudaLaunchConfig_t launch_config(int threads, int smem, int cn, int cm, cudaStream_t s,
                                        cudaLaunchAttribute (&attr)[2]) {
  cudaLaunchConfig_t config{};
  config.blockDim = dim3(unsigned(threads));
  config.dynamicSmemBytes = size_t(smem);
  config.stream = s;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(cn);
  attr[0].val.clusterDim.y = unsigned(cm);
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return config;
}
// ... and programmatic dependent launch (attr[1]) where it is on.
inline void allow_pdl(cudaLaunchConfig_t& config, cudaLaunchAttribute (&attr)[2]) {
  if (!pdl_enabled()) return;
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  config.numAttrs = 2;
}

// fp8_gemm_persistent.cu: the persistent kernels' shared-memory limits (once per device, from
// fp8_gemm_setup), and a dense product of rows-row tiles in clusters of cn (1 or 2) by them; the
// epilogue by TMA stores when tma_store (a bf16, not accumulating, 16-byte aligned output).
void allow_persistent_smem();
void launch_persistent(const Fp8GemmArgs& args, const CUtensorMap& map_a, const CUtensorMap& map_b, int rows, int cn,
                       bool tma_store, cudaStream_t s);

}  // namespace fathom::cuda::fp8_wgmma
