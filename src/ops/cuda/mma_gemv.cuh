// Weight streaming on the tensor cores: a block computes 16 weight rows against up to 8 rows of
// x (tokens) with mma.sync m16n8k16, reading each weight byte once. The memory-bound kernels of
// decode (the dense GEMVs, the experts of a few tokens) spend their instructions on turning
// weight bytes into products; here a warp's 16 x 16 x 8 product is one instruction, and an FP8
// pair becomes an f16 pair in one conversion (cvt.rn.f16x2.e4m3x2), so the weights stream at
// the memory's pace in every dtype (gemv.cuh's SIMT loop stays for F32 and odd shapes).
//
// The layout trick: a thread loads 16 contiguous bytes of weight row g and of row g + 8 (g = lane
// / 4) at column offset tig * 16 bytes (tig = lane % 4) and uses them, as loaded, as the A
// fragment of consecutive k-steps. The MMA's k index is only a summation index, so any
// permutation of k applied to both A and B gives the same sum: the x values each thread feeds
// into B (token g's row) are taken at the same memory columns as its weight bytes. No shuffle of
// weights, in registers or at load time.
//
// x: the fp32 rows are staged in shared memory as two 16-bit parts, x = hi + lo, so that the
// products keep ~16 (bf16) or ~22 (f16) bits of x and match the fp32 CPU reference to ~1e-5.
// BF16 weights take bf16 parts; F16 and FP8 weights (FP8 codes are exact in f16) take f16 parts
// of x scaled by a power of two per (token, 128 columns), which keeps them far from f16's range
// limits; the 128-column partial sums are then scaled back (and FP8's block scale applied) in
// fp32, DeepSeek-V3's promotion of partial sums at 128-column granularity.
//
// The block: kMmaThreads (8 warps) on one 16-row tile, the warps splitting K in 128-column units;
// x staged a chunk of columns at a time. A block may run several jobs (weights) whose rows
// share the tile, each on one x row (the expert slots of a token: moe.cu) or all of them.
#pragma once
#ifndef FATHOM_KERNEL_EMU  // scripts/kernel-emu/mma_gemv_emu.cpp runs this file on the CPU
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ops/cuda/device_util.cuh"
#endif

namespace fathom::cuda {

constexpr int kMmaThreads = 256;
constexpr int kMmaWarps = kMmaThreads / 32;
constexpr int kMmaUnit = 128;         // columns per warp step (and per scaling of x)
constexpr int kMmaMaxRows = 8;        // rows of x: the MMA's n
constexpr int kMmaSsRows = 32;        // x rows whose sums of squares the staging keeps (NORM)
constexpr int kMmaSmemBytes = 40960;  // x staging (dynamic shared memory, under the 48 KB default)
// Columns each staged row of x is padded by: a fragment load's rows g and g + 1 (each with its
// two parts) then start 64 bytes apart modulo 128, so the eight lanes of a 128-bit load phase
// (rows g, g + 1; tig 0-3) hit 32 different banks with 16-bit weights, where a pad of 8 put the
// two rows 32 bytes apart and every load took twice its wavefronts (ncu, the skinny matmuls:
// 4 bank conflicts a load). Rows stay 16-byte aligned.
constexpr int kMmaPad = 16;

// Whether the tensor-core path takes a weight of dtype d with K columns (16-byte aligned rows of
// whole 16-byte pieces; FP8 scale blocks whole 128-column units).
inline bool mma_gemv_fits(DType d, int64_t K, int64_t block) {
  if (d != DType::BF16 && d != DType::F16 && d != DType::F8_E4M3) return false;
  if (K % 16 != 0 || K <= 0) return false;
  return d != DType::F8_E4M3 || (block > 0 && block % kMmaUnit == 0);
}
// Whether the kernels at a site take the tensor-core path where it fits (set_gemv_kind in
// cuda_ops.h; FATHOM_GEMV=auto|simt|mma at start).
enum class MmaSite { Dense, TokenExperts, GroupedExperts, Skinny };
bool mma_gemv_on(MmaSite site);
// Dynamic shared memory of a launch: the two 16-bit parts of M rows of chunk columns (each row
// padded by kMmaPad columns) and one scale per row and unit.
inline size_t mma_smem_bytes(int chunk, int M) {
  return size_t(M) * (2 * (chunk + kMmaPad) * 2 + chunk / kMmaUnit * 4);
}
// Columns of x staged at once for M rows (a multiple of kMmaUnit; 0 when not even one unit fits)
// in at most `bytes` of shared memory: mma_smem_bytes(chunk, M) <= bytes.
inline int mma_chunk(int64_t K, int M, int64_t bytes = kMmaSmemBytes) {
  const int64_t per_row = bytes / M - 4 * kMmaPad;  // what the units of a row may take
  const int64_t fit = per_row > 0 ? per_row / (4 * kMmaUnit + 4) * kMmaUnit : 0;
  const int64_t k = ceil_div(K, kMmaUnit) * kMmaUnit;
  return int(k < fit ? k : fit);
}

#ifndef FATHOM_KERNEL_EMU  // the emulator brings its own (warp-collective) versions
__device__ inline void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                 uint32_t b1, bool bf16) {
  if (bf16)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Two FP8 e4m3 codes (low byte first) -> an f16 pair, exactly.
__device__ inline uint32_t e4m3x2_to_f16x2(uint32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  uint32_t r;
  const uint16_t h = uint16_t(v);
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(h));
  return r;
#else
  const float2 f = fp8x2_to_float2(uint16_t(v));
  const __half2 h = __floats2half2_rn(f.x, f.y);
  return *reinterpret_cast<const uint32_t*>(&h);
#endif
}
#endif

// One thread's rows of a job: row g and row g + 8 of the tile (bytes; null past the weight's
// end: zeros) and, for FP8, their rows of scale_inv.
struct MmaRows {
  const uint8_t* a = nullptr;
  const uint8_t* b = nullptr;
  const float* sa = nullptr;
  const float* sb = nullptr;
};

// The block's shared state: the staged x parts and scales (dynamic), the warps' sums of squares
// (NORM) and the reduction space.
struct MmaShared {
  uint16_t* x;       // [row][part][chunk + kMmaPad]
  float* xscale;     // [row][chunk / kMmaUnit]: 2^-s of the row's unit (F16/FP8)
  float* ss;         // [kMmaWarps][kMmaSsRows]
  float* red;        // [kMmaWarps][16][kMmaMaxRows]
};

template <DType D>
struct MmaTraits {
  static constexpr int E = ElemSize<D>::value;
  static constexpr int V = 16 / E;                     // elements per 16-byte piece
  static constexpr int kPieces = kMmaUnit / (4 * V);   // pieces per row and unit per thread
  static constexpr bool kBf16 = D == DType::BF16;      // bf16 MMAs; else f16 with scaled x
};

// Stages columns [k0, k0 + chunk) of M x rows (xrow(m): row m's first element, fp32) as 16-bit
// hi/lo parts. NORM: x times g (the RMSNorm weight), and each warp adds its rows' squares to
// sh.ss (the caller scales the results by the norm factor afterwards). Columns past K are zeros.
template <DType D, bool NORM, class XRow>
__device__ inline void mma_stage_x(const MmaShared& sh, XRow xrow, int M, int64_t k0, int chunk, int64_t K,
                                   const float* __restrict__ g, bool vec) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int units = chunk / kMmaUnit, stride = chunk + kMmaPad, items = M * units;
  // A warp's items kAhead at a time, their loads all issued before any is used: x was just
  // written by the kernel before, so each load is an L2 round trip, and a chain of them per
  // warp was most of a small matmul's time.
  constexpr int kAhead = 4;
  for (int base = warp; base < items; base += kMmaWarps * kAhead) {
    float va[kAhead][4];
#pragma unroll
    for (int a = 0; a < kAhead; ++a) {
      const int item = base + a * kMmaWarps;
      const int m = item / units, u = item % units;
      const int64_t k = k0 + int64_t(u) * kMmaUnit + lane * 4;
      va[a][0] = va[a][1] = va[a][2] = va[a][3] = 0.f;
      if (item < items && k < K) {  // K % 16 == 0: four columns are all in or all out
        const float* src = xrow(m) + k;
        if (vec) {
          const float4 f = __ldg(reinterpret_cast<const float4*>(src));
          va[a][0] = f.x, va[a][1] = f.y, va[a][2] = f.z, va[a][3] = f.w;
        } else {
#pragma unroll
          for (int i = 0; i < 4; ++i) va[a][i] = __ldg(src + i);
        }
      }
    }
#pragma unroll
    for (int a = 0; a < kAhead; ++a) {
      const int item = base + a * kMmaWarps;
      if (item >= items) break;  // the same for the whole warp
      const int m = item / units, u = item % units;
      const int64_t k = k0 + int64_t(u) * kMmaUnit + lane * 4;
      float* v = va[a];
      float sq = 0.f;
      if constexpr (NORM) {
        if (k < K) {
#pragma unroll
          for (int i = 0; i < 4; ++i) sq += v[i] * v[i], v[i] *= __ldg(g + k + i);
        }
        sq = warp_sum(sq);  // every lane, in or out of K: the shuffles need the whole warp
        if (lane == 0) sh.ss[warp * kMmaSsRows + m] += sq;
      }
      uint16_t hi[4], lo[4];
      if constexpr (MmaTraits<D>::kBf16) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const __nv_bfloat16 h = __float2bfloat16_rn(v[i]);
          const __nv_bfloat16 l = __float2bfloat16_rn(v[i] - __bfloat162float(h));
          hi[i] = *reinterpret_cast<const uint16_t*>(&h), lo[i] = *reinterpret_cast<const uint16_t*>(&l);
        }
      } else {
        // scale by 2^s so that the unit's largest |x| lies in [2^14, 2^15): f16 keeps 11 + 11 bits
        // of every value that is not ~2^-25 below it
        const float amax = warp_max(fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3]))));
        const int e = int((__float_as_uint(amax) >> 23) & 0xff) - 127;
        const int s = min(14 - e, 126);
        const float scale = __uint_as_float(uint32_t(127 + s) << 23);
        if (lane == 0) sh.xscale[m * units + u] = __uint_as_float(uint32_t(127 - s) << 23);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float y = v[i] * scale;
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

// One unit's weights for this thread: kPieces 16-byte pieces of row g (a) and of row g + 8 (b).
template <DType D>
struct MmaUnitW {
  uint4 a[MmaTraits<D>::kPieces], b[MmaTraits<D>::kPieces];
};

// Piece i of a unit at column kc (absolute) for this thread: column kc + i * 4V + tig * V.
template <DType D>
__device__ inline void mma_load_unit(MmaUnitW<D>& w, const MmaRows& r, int64_t kc, int64_t K) {
  using T = MmaTraits<D>;
  const int tig = threadIdx.x % 4;
#pragma unroll
  for (int i = 0; i < T::kPieces; ++i) {
    const int64_t k = kc + i * 4 * T::V + tig * T::V;
    const bool in = k < K;
    w.a[i] = in && r.a ? load16_stream(r.a + k * T::E) : make_uint4(0, 0, 0, 0);
    w.b[i] = in && r.b ? load16_stream(r.b + k * T::E) : make_uint4(0, 0, 0, 0);
  }
}

// This thread's B values for piece i of unit u: x row `row` at the piece's columns, V values of
// each 16-bit part (zeros when the thread does not feed a row).
template <DType D>
__device__ inline void mma_load_x(uint4 (&xh)[MmaTraits<D>::V / 8], uint4 (&xl)[MmaTraits<D>::V / 8],
                                  const MmaShared& sh, int row, bool feeds, int u, int i, int chunk) {
  using T = MmaTraits<D>;
  const int tig = threadIdx.x % 4, stride = chunk + kMmaPad;
  const uint16_t* xs = sh.x + (row * 2) * stride + u * kMmaUnit + i * 4 * T::V + tig * T::V;
#pragma unroll
  for (int q = 0; q < T::V / 8; ++q) {
    xh[q] = feeds ? *reinterpret_cast<const uint4*>(xs + 8 * q) : make_uint4(0, 0, 0, 0);
    xl[q] = feeds ? *reinterpret_cast<const uint4*>(xs + stride + 8 * q) : make_uint4(0, 0, 0, 0);
  }
}

// Piece i of a unit's weights as the A fragments of its V / 4 k-steps (FP8: each code pair
// converted to an f16 pair once, then used for every x tile).
template <DType D>
__device__ inline void mma_a_frags(uint32_t (&a)[MmaTraits<D>::V / 4][4], const MmaUnitW<D>& w, int i) {
  const uint32_t* wa = &w.a[i].x;
  const uint32_t* wb = &w.b[i].x;
#pragma unroll
  for (int s = 0; s < MmaTraits<D>::V / 4; ++s) {
    if constexpr (D == DType::F8_E4M3) {
      a[s][0] = e4m3x2_to_f16x2(wa[s]), a[s][1] = e4m3x2_to_f16x2(wb[s]);
      a[s][2] = e4m3x2_to_f16x2(wa[s] >> 16), a[s][3] = e4m3x2_to_f16x2(wb[s] >> 16);
    } else {
      a[s][0] = wa[2 * s], a[s][1] = wb[2 * s], a[s][2] = wa[2 * s + 1], a[s][3] = wb[2 * s + 1];
    }
  }
}

// c += one piece's products: its A fragments against x's hi and lo parts (xh, xl: this thread's
// B values of the piece's columns).
template <DType D>
__device__ inline void mma_piece(float (&c)[4], const uint32_t (&a)[MmaTraits<D>::V / 4][4],
                                 const uint4 (&xh)[MmaTraits<D>::V / 8], const uint4 (&xl)[MmaTraits<D>::V / 8]) {
  using T = MmaTraits<D>;
  const uint32_t* h = &xh[0].x;
  const uint32_t* l = &xl[0].x;
#pragma unroll
  for (int s = 0; s < T::V / 4; ++s) {
    mma_16816(c, a[s][0], a[s][1], a[s][2], a[s][3], h[2 * s], h[2 * s + 1], T::kBf16);
    mma_16816(c, a[s][0], a[s][1], a[s][2], a[s][3], l[2 * s], l[2 * s + 1], T::kBf16);
  }
}

// F16/FP8: acc += a unit's sums (part) scaled in fp32 by the weight rows' block scales (wsa: row
// g, wsb: row g + 8) and the x rows' staging scales (x0, x1: x rows 2 tig and 2 tig + 1 of the
// tile) — the promotion of partial sums at 128-column granularity.
__device__ inline void mma_add_scaled(float (&acc)[4], const float (&part)[4], float wsa, float wsb, float x0,
                                      float x1) {
  acc[0] += part[0] * (wsa * x0);
  acc[1] += part[1] * (wsa * x1);
  acc[2] += part[2] * (wsb * x0);
  acc[3] += part[3] * (wsb * x1);
}

// acc[j] (this thread's C fragment of x tile j: rows g, g + 8 by x rows 8j + 2 tig, 8j + 2 tig + 1)
// += the unit's products, each A fragment converted once and used for every x tile. col: the
// one x row this job multiplies (NT 1: a K-split block's column jobs), or -1 for all M. u: the
// unit within the staged chunk; wsa/wsb: FP8 block scales of rows g and g + 8 (1 otherwise).
template <DType D, int NT>
__device__ inline void mma_unit_nt(float (&acc)[NT][4], const MmaUnitW<D>& w, const MmaShared& sh, int M, int col,
                                   int u, int chunk, float wsa, float wsb) {
  using T = MmaTraits<D>;
  const int lane = threadIdx.x % 32, g = lane / 4, tig = lane % 4;
  float part[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) part[j][0] = part[j][1] = part[j][2] = part[j][3] = 0.f;
#pragma unroll
  for (int i = 0; i < T::kPieces; ++i) {
    uint32_t a[T::V / 4][4];
    mma_a_frags<D>(a, w, i);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int row = 8 * j + g;
      const bool feeds = col < 0 ? row < M : row == col;  // this thread supplies x row `row`
      uint4 xh[T::V / 8], xl[T::V / 8];
      mma_load_x<D>(xh, xl, sh, row, feeds, u, i, chunk);
      mma_piece<D>(T::kBf16 ? acc[j] : part[j], a, xh, xl);
    }
  }
  if constexpr (!T::kBf16) {
    const int units = chunk / kMmaUnit;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int m0 = 8 * j + 2 * tig, m1 = m0 + 1;
      const bool on0 = col < 0 ? m0 < M : m0 == col, on1 = col < 0 ? m1 < M : m1 == col;
      mma_add_scaled(acc[j], part[j], wsa, wsb, on0 ? sh.xscale[m0 * units + u] : 0.f,
                     on1 ? sh.xscale[m1 * units + u] : 0.f);
    }
  }
}

// The FP8 block scales of this thread's two rows at column kc (0 for a row past the weight's end;
// 1 for other dtypes).
template <DType D>
__device__ inline void mma_row_scales(const MmaRows& r, int64_t kc, int64_t block, float& wsa, float& wsb) {
  wsa = wsb = 1.f;
  if constexpr (D == DType::F8_E4M3) {
    wsa = r.sa ? __ldg(r.sa + kc / block) : 0.f;
    wsb = r.sb ? __ldg(r.sb + kc / block) : 0.f;
  }
}

// The block's product over all of K: jobs(j) gives job j's rows for this thread (n_jobs jobs;
// job_col(j) its x row or -1), xrow(m) the x rows. acc: this thread's C fragment, summed over
// the warp's units (the caller reduces the block with mma_block_reduce). The first unit's
// weights are requested before x is staged, so the two latencies overlap.
template <DType D, bool NORM, class Jobs, class JobCol, class XRow>
__device__ inline void mma_rows_product(float (&acc)[1][4], const MmaShared& sh, Jobs jobs, JobCol job_col, int n_jobs,
                                        XRow xrow, int M, int64_t K, int64_t block, int chunk,
                                        const float* __restrict__ g, bool vec_x) {
  const int warp = threadIdx.x / 32;
  if (NORM && threadIdx.x < kMmaWarps * kMmaSsRows) sh.ss[threadIdx.x] = 0.f;
  const int64_t k_units = ceil_div(K, kMmaUnit);
  const int chunk_units = chunk / kMmaUnit;
  for (int64_t k0 = 0; k0 < K; k0 += chunk) {
    const int units = int(min(int64_t(chunk_units), k_units - k0 / kMmaUnit));
    const int total = n_jobs * units;  // this chunk's (job, unit) items
    int item = warp;
    MmaUnitW<D> cur;
    MmaRows rows;
    if (item < total) {
      rows = jobs(item / units);
      mma_load_unit<D>(cur, rows, k0 + int64_t(item % units) * kMmaUnit, K);
    }
    __syncthreads();  // the previous chunk's x is no longer read
    mma_stage_x<D, NORM>(sh, xrow, M, k0, chunk, K, g, vec_x);
    __syncthreads();
    while (item < total) {
      const int next = item + kMmaWarps;
      MmaUnitW<D> nxt;
      MmaRows nrows;
      if (next < total) {
        nrows = jobs(next / units);
        mma_load_unit<D>(nxt, nrows, k0 + int64_t(next % units) * kMmaUnit, K);
      }
      float wsa, wsb;
      const int u = item % units;
      mma_row_scales<D>(rows, k0 + int64_t(u) * kMmaUnit, block, wsa, wsb);
      mma_unit_nt<D, 1>(acc, cur, sh, M, job_col(item / units), u, chunk, wsa, wsb);
      cur = nxt;
      rows = nrows;
      item = next;
    }
  }
}

// The warp-tile form of the product: each warp computes its own 16-row tile (rows: this thread's
// rows of it) against all M <= 8 NT x rows over columns [k_begin, k_end) (k_begin a multiple of
// kMmaUnit), the block's x rows staged once for all of its warps, and no sum across warps —
// acc[j] is the warp's result for x rows 8j .. 8j + 7. Where mma_rows_product splits K over the
// warps and so pays a staging of x and a block reduction for every 16 rows, a block here carries
// kMmaWarps tiles for one staging: the form for weights streamed by many blocks (the grouped
// experts of batched decode, whose K-split blocks kept DRAM at ~43% of its bandwidth on the
// H200) and for the 3-to-128-row matmuls (FP8: 2) (split over K across blocks instead). Each warp keeps
// the next unit's weights (and FP8 scales) in flight while it multiplies the current one. A warp
// whose rows are all past the weight's end skips the products but not the barriers.
// kAhead = false: one unit at a time (fewer registers, for more blocks a SM).
template <DType D, int NT, bool NORM = false, bool kAhead = true, class XRow>
__device__ inline void mma_warp_tile_product(float (&acc)[NT][4], const MmaShared& sh, const MmaRows& rows, XRow xrow,
                                             int M, int64_t k_begin, int64_t k_end, int64_t block, int chunk,
                                             bool vec_x, const float* __restrict__ g = nullptr) {
  // NORM (M <= kMmaSsRows): x times g staged, and each warp's share of the rows' sums of squares
  // over [k_begin, k_end) in sh.ss (the caller adds the warps' shares after a barrier)
  if (NORM)
    for (int i = threadIdx.x; i < kMmaWarps * kMmaSsRows; i += kMmaThreads) sh.ss[i] = 0.f;
  // the MMAs are warp-wide: a warp with any row in the weight runs them all (lanes past its end
  // hold zeros)
  const bool active = __any_sync(0xffffffffu, rows.a != nullptr || rows.b != nullptr);
  const int chunk_units = chunk / kMmaUnit;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += chunk) {
    const int units = int(min(int64_t(chunk_units), ceil_div(k_end - k0, kMmaUnit)));
    MmaUnitW<D> cur;
    float wsa = 1.f, wsb = 1.f;
    if (active) {
      mma_load_unit<D>(cur, rows, k0, k_end);
      mma_row_scales<D>(rows, k0, block, wsa, wsb);
    }
    __syncthreads();  // the previous chunk's x is no longer read
    mma_stage_x<D, NORM>(sh, xrow, M, k0, chunk, k_end, g, vec_x);
    __syncthreads();
    if (!active) continue;
    for (int u = 0; u < units; ++u) {
      if constexpr (kAhead) {
        MmaUnitW<D> nxt;
        float nsa = 1.f, nsb = 1.f;
        if (u + 1 < units) {
          const int64_t kc = k0 + int64_t(u + 1) * kMmaUnit;
          mma_load_unit<D>(nxt, rows, kc, k_end);
          mma_row_scales<D>(rows, kc, block, nsa, nsb);
        }
        mma_unit_nt<D, NT>(acc, cur, sh, M, -1, u, chunk, wsa, wsb);
        if (u + 1 < units) cur = nxt;  // (the last unit has no next one)
        wsa = nsa, wsb = nsb;
      } else {
        if (u > 0) {
          const int64_t kc = k0 + int64_t(u) * kMmaUnit;
          mma_load_unit<D>(cur, rows, kc, k_end);
          mma_row_scales<D>(rows, kc, block, wsa, wsb);
        }
        mma_unit_nt<D, NT>(acc, cur, sh, M, -1, u, chunk, wsa, wsb);
      }
    }
  }
}

// Sums the warps' fragments: afterwards sh.red[r * kMmaMaxRows + m] (r < 16, m < 8) holds the
// block's result for tile row r and x row m, and (NORM) sh.ss[m] the sum of squares of x row m.
// Ends synchronized.
template <bool NORM>
__device__ inline void mma_block_reduce(const float (&acc)[1][4], const MmaShared& sh) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tig = lane % 4;
  float* mine = sh.red + warp * 16 * kMmaMaxRows;
  __syncthreads();
  mine[g * kMmaMaxRows + 2 * tig] = acc[0][0];
  mine[g * kMmaMaxRows + 2 * tig + 1] = acc[0][1];
  mine[(g + 8) * kMmaMaxRows + 2 * tig] = acc[0][2];
  mine[(g + 8) * kMmaMaxRows + 2 * tig + 1] = acc[0][3];
  __syncthreads();
  float v = 0.f, s = 0.f;
  if (threadIdx.x < 16 * kMmaMaxRows) {
    for (int w = 0; w < kMmaWarps; ++w) v += sh.red[w * 16 * kMmaMaxRows + threadIdx.x];
  }
  if (NORM && threadIdx.x < kMmaMaxRows) {
    for (int w = 0; w < kMmaWarps; ++w) s += sh.ss[w * kMmaSsRows + threadIdx.x];
  }
  __syncthreads();
  if (threadIdx.x < 16 * kMmaMaxRows) sh.red[threadIdx.x] = v;
  if (NORM && threadIdx.x < kMmaMaxRows) sh.ss[threadIdx.x] = s;
  __syncthreads();
}

// The shared state of a kernel over its dynamic shared memory (the x staging) and static arrays.
#define FATHOM_MMA_SHARED(name, chunk, M)                                                      \
  extern __shared__ __align__(16) uint8_t fathom_mma_dyn[];                                    \
  __shared__ float fathom_mma_ss[kMmaWarps * kMmaSsRows];                                      \
  __shared__ float fathom_mma_red[kMmaWarps * 16 * kMmaMaxRows];                               \
  const MmaShared name{reinterpret_cast<uint16_t*>(fathom_mma_dyn),                            \
                       reinterpret_cast<float*>(fathom_mma_dyn + size_t(M) * 2 * ((chunk) + kMmaPad) * 2), \
                       fathom_mma_ss, fathom_mma_red}

}  // namespace fathom::cuda
