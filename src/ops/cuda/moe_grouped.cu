// The routed experts for larger batches: the (token, slot) pairs are sorted by expert on the
// device and each expert runs once over its rows, so an expert's weights are read once per tile
// instead of once per pair (moe.cu's gather path): as tiled GEMMs (gemm_tile.cuh) over 64-row
// tiles when experts see many rows each (prefill), as GEMVs over 8-row tiles (gemv.cuh) when
// they see a few (batched decode). Still no host synchronization: the number of tiles stays on
// the device and the grids are launched for the most tiles there can be, surplus blocks
// returning at once.
//
//   1. moe_route_kernel (one block): counts per expert, offsets, each pair's sorted position,
//      the token of every sorted row, and the tile list (expert, first row, end row).
//   2. grouped_gate_up_kernel: h[row] = silu(x[token] · Wgᵀ) * (x[token] · Wuᵀ), gate and up
//      tiles computed side by side from the same x tile.
//   3. grouped_down_kernel: y[row] = h[row] · Wdᵀ.
//   4. moe_combine_kernel: out[t] = Σ_k weights[t, k] · y[pos(t, k)], slots in order.
// A row's result depends only on its own x row and the weights, never on where the sort put it
// (the atomics only assign positions), so results are deterministic.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>

#include "core/error.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/gemm_tile.cuh"
#include "ops/cuda/gemv.cuh"
#include "ops/cuda/mma_kernels.cuh"
#include "ops/cuda/moe_grouped.cuh"

namespace fathom::cuda {
namespace {

using Routing = ExpertRouting;

constexpr int kBM = 64, kBN = 64;  // expert GEMM tiles
constexpr int kMaxExperts = 1024;
// Below this many rows per expert on average (decode batches) a 64-row GEMM tile would be mostly
// padding: tiles of kSmallRows rows run as GEMVs over those rows instead (gemv.cuh), each
// expert's weights still read once per tile.
constexpr int64_t kTiledMinRowsPerExpert = 16;
constexpr int kSmallRows = 8;      // rows (tokens) per tile of the GEMV-style kernels
constexpr int kSmallR = 2;         // weight rows per block
constexpr int kSmallThreads = 128;

// grid (1), block 1024. Tiles of at most tile_rows rows of one expert; with p.has_shared (the
// tensor-core small tiles only) then the shared expert's pieces, each over all tokens
// (grouped_shared_row in mma_kernels.cuh).
__global__ void moe_route_kernel(MoeExpertsParams p, Routing r, int tile_rows) {
  pdl_wait();
  __shared__ int count[kMaxExperts], offset[kMaxExperts + 1], tile_offset[kMaxExperts + 1], cursor[kMaxExperts];
  const int64_t pairs = p.n_tokens * p.top_k;
  for (int e = threadIdx.x; e < p.n_experts; e += blockDim.x) count[e] = 0, cursor[e] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < pairs; i += blockDim.x) {
    const int e = p.experts[i];
    if (e >= 0 && e < p.n_experts) atomicAdd(&count[e], 1);
  }
  __syncthreads();
  {  // rows and tiles before each expert: exclusive sums over the experts, a scan across the block
    // (blockDim 1024 >= kMaxExperts: thread e holds expert e)
    __shared__ int warp_rows[32], warp_tiles[32];
    const int e = threadIdx.x, lane = e % 32, warp = e / 32;
    const int c = e < p.n_experts ? count[e] : 0;
    int rows = c, tiles = (c + tile_rows - 1) / tile_rows;  // inclusive sums within the warp
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int a = __shfl_up_sync(kFullMask, rows, off), b = __shfl_up_sync(kFullMask, tiles, off);
      if (lane >= off) rows += a, tiles += b;
    }
    if (lane == 31) warp_rows[warp] = rows, warp_tiles[warp] = tiles;
    __syncthreads();
    if (warp == 0) {  // the warps' totals, scanned the same way
      int wr = lane < int(blockDim.x / 32) ? warp_rows[lane] : 0, wt = lane < int(blockDim.x / 32) ? warp_tiles[lane] : 0;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int a = __shfl_up_sync(kFullMask, wr, off), b = __shfl_up_sync(kFullMask, wt, off);
        if (lane >= off) wr += a, wt += b;
      }
      warp_rows[lane] = wr, warp_tiles[lane] = wt;
    }
    __syncthreads();
    if (warp > 0) rows += warp_rows[warp - 1], tiles += warp_tiles[warp - 1];
    if (e < p.n_experts) {
      offset[e] = rows - c, tile_offset[e] = tiles - (c + tile_rows - 1) / tile_rows;
      if (e == p.n_experts - 1) {
        offset[p.n_experts] = rows, tile_offset[p.n_experts] = tiles;
        *r.n_tiles = tiles + int(shared_pieces(p) * ((p.n_tokens + tile_rows - 1) / tile_rows));
      }
    }
  }
  __syncthreads();
  if (p.has_shared) {
    const int per = int((p.n_tokens + tile_rows - 1) / tile_rows), first = tile_offset[p.n_experts];
    const int64_t pieces = shared_pieces(p);
    for (int64_t i = threadIdx.x; i < pieces * per; i += blockDim.x) {
      const int64_t k = i / per, b = i % per;
      r.tile_expert[first + i] = p.n_experts + int(k);
      r.tile_begin[first + i] = int32_t(grouped_shared_row(p, k, b * tile_rows));
      r.tile_end[first + i] = int32_t(grouped_shared_row(p, k, p.n_tokens));
    }
    for (int64_t i = threadIdx.x; i < pieces * p.n_tokens; i += blockDim.x)
      r.token_of_row[grouped_shared_row(p, 0, 0) + i] = int32_t(i % p.n_tokens);
  }
  for (int e = threadIdx.x; e < p.n_experts; e += blockDim.x)
    for (int t = tile_offset[e]; t < tile_offset[e + 1]; ++t) {
      r.tile_expert[t] = e;
      r.tile_begin[t] = offset[e] + (t - tile_offset[e]) * tile_rows;
      r.tile_end[t] = offset[e + 1];
    }
  for (int64_t i = threadIdx.x; i < pairs; i += blockDim.x) {
    const int e = p.experts[i];
    int row = -1;
    if (e >= 0 && e < p.n_experts) {
      row = offset[e] + atomicAdd(&cursor[e], 1);
      r.token_of_row[row] = int32_t(i / p.top_k);
    }
    r.row_of_pair[i] = row;
  }
}

// grid (ceil(inter / kBN), max_tiles), block kTileThreads. h (pairs, inter) in sorted order.
template <DType D>
__global__ void __launch_bounds__(kTileThreads)
    grouped_gate_up_kernel(MoeExpertsParams p, Routing r, float* __restrict__ h, bool vec_x, bool vec_w) {
  pdl_wait();
  constexpr int TM = kBM / 16, TN = kBN / 16;
  __shared__ __align__(16) TileSmem<kBM, kBN, 2> sm;
  const int tile = blockIdx.y;
  if (tile >= *r.n_tiles) return;
  const int e = r.tile_expert[tile];
  const int64_t begin = r.tile_begin[tile], end = r.tile_end[tile], n0 = int64_t(blockIdx.x) * kBN;
  const ExpertPointers ep = p.table[e];
  const TileRows rows{p.x, p.hidden, r.token_of_row, begin, end, vec_x};
  const TileWeight w[2] = {{static_cast<const uint8_t*>(ep.gate), ep.gate_scale},
                           {static_cast<const uint8_t*>(ep.up), ep.up_scale}};
  float acc[2][TM][TN];
  gemm_tile<D, kBM, kBN, 2>(acc, sm, rows, w, n0, p.inter, p.hidden, int(p.block), vec_w);
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t m = begin + tile_row(i, TM);
    if (m >= end) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t n = n0 + tile_col(j);
      const float g = acc[0][i][j], u = acc[1][i][j];
      if (n < p.inter) h[m * p.inter + n] = g / (1.f + expf(-g)) * u;
    }
  }
}

// grid (ceil(hidden / kBN), max_tiles), block kTileThreads. y (pairs, hidden) in sorted order.
template <DType D>
__global__ void __launch_bounds__(kTileThreads)
    grouped_down_kernel(MoeExpertsParams p, Routing r, const float* __restrict__ h, float* __restrict__ y, bool vec_h,
                        bool vec_w) {
  pdl_wait();
  constexpr int TM = kBM / 16, TN = kBN / 16;
  __shared__ __align__(16) TileSmem<kBM, kBN, 1> sm;
  const int tile = blockIdx.y;
  if (tile >= *r.n_tiles) return;
  const int e = r.tile_expert[tile];
  const int64_t begin = r.tile_begin[tile], end = r.tile_end[tile], n0 = int64_t(blockIdx.x) * kBN;
  const ExpertPointers ep = p.table[e];
  const TileRows rows{h, p.inter, nullptr, begin, end, vec_h};
  const TileWeight w[1] = {{static_cast<const uint8_t*>(ep.down), ep.down_scale}};
  float acc[1][TM][TN];
  gemm_tile<D, kBM, kBN, 1>(acc, sm, rows, w, n0, p.hidden, p.inter, int(p.block), vec_w);
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t m = begin + tile_row(i, TM);
    if (m >= end) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t n = n0 + tile_col(j);
      if (n < p.hidden) y[m * p.hidden + n] = acc[0][i][j];
    }
  }
}

// grid (ceil(inter / kSmallR), max_tiles), block kSmallThreads: the GEMV form of
// grouped_gate_up_kernel for tiles of at most kSmallRows rows.
template <DType D>
__global__ void __launch_bounds__(kSmallThreads)
    small_gate_up_kernel(MoeExpertsParams p, Routing r, float* __restrict__ h, bool vec) {
  pdl_wait();
  __shared__ float scratch[kSmallThreads / 32 * 2 * kSmallR * kSmallRows];
  __shared__ float result[2 * kSmallR * kSmallRows];
  const int tile = blockIdx.y;
  if (tile >= *r.n_tiles) return;
  const ExpertPointers ep = p.table[r.tile_expert[tile]];
  const int64_t begin = r.tile_begin[tile], n0 = int64_t(blockIdx.x) * kSmallR;
  const int M = int(min(int64_t(kSmallRows), r.tile_end[tile] - begin));
  GemvRow rows[2 * kSmallR];
  gate_up_rows<D, kSmallR>(rows, ep, n0, p.inter, p.hidden, p.block);
  float acc[2 * kSmallR][kSmallRows];
#pragma unroll
  for (int i = 0; i < 2 * kSmallR; ++i)
#pragma unroll
    for (int m = 0; m < kSmallRows; ++m) acc[i][m] = 0.f;
  gemv_accumulate<D, kSmallRows, 2 * kSmallR>(acc, rows, GemvX{p.x, p.hidden, r.token_of_row + begin}, M, p.hidden,
                                               p.block, vec, 1.f);
  gemv_block_reduce<kSmallRows, 2 * kSmallR>(acc, scratch, result);
  for (int i = threadIdx.x; i < kSmallR * kSmallRows; i += blockDim.x) {
    const int n = i / kSmallRows, m = i % kSmallRows;
    if (m >= M || n0 + n >= p.inter) continue;
    const float g = result[n * kSmallRows + m], u = result[(kSmallR + n) * kSmallRows + m];
    h[(begin + m) * p.inter + n0 + n] = g / (1.f + expf(-g)) * u;
  }
}

// grid (ceil(hidden / kSmallR), max_tiles), block kSmallThreads: the GEMV form of
// grouped_down_kernel.
template <DType D>
__global__ void __launch_bounds__(kSmallThreads)
    small_down_kernel(MoeExpertsParams p, Routing r, const float* __restrict__ h, float* __restrict__ y, bool vec) {
  pdl_wait();
  __shared__ float scratch[kSmallThreads / 32 * kSmallR * kSmallRows];
  __shared__ float result[kSmallR * kSmallRows];
  const int tile = blockIdx.y;
  if (tile >= *r.n_tiles) return;
  const ExpertPointers ep = p.table[r.tile_expert[tile]];
  const int64_t begin = r.tile_begin[tile], n0 = int64_t(blockIdx.x) * kSmallR;
  const int M = int(min(int64_t(kSmallRows), r.tile_end[tile] - begin));
  GemvRow rows[kSmallR];
#pragma unroll
  for (int i = 0; i < kSmallR; ++i) rows[i] = gemv_row<D>(ep.down, ep.down_scale, min(n0 + i, p.hidden - 1), p.inter, p.block);
  float acc[kSmallR][kSmallRows];
#pragma unroll
  for (int i = 0; i < kSmallR; ++i)
#pragma unroll
    for (int m = 0; m < kSmallRows; ++m) acc[i][m] = 0.f;
  gemv_accumulate<D, kSmallRows, kSmallR>(acc, rows, GemvX{h + begin * p.inter, p.inter}, M, p.inter, p.block, vec, 1.f);
  gemv_block_reduce<kSmallRows, kSmallR>(acc, scratch, result);
  for (int i = threadIdx.x; i < kSmallR * kSmallRows; i += blockDim.x) {
    const int n = i / kSmallRows, m = i % kSmallRows;
    if (m < M && n0 + n < p.hidden) y[(begin + m) * p.hidden + n0 + n] = result[n * kSmallRows + m];
  }
}

// The tensor-core forms of the two small kernels (bodies in mma_kernels.cuh, warp tiles), taken
// when the weights fit it: a block takes 8 warps' tiles of one expert tile's rows, x staged once
// (up to kMmaTileSmem bytes of it). grid (ceil(inter / 64), max_tiles).
constexpr int kMmaTileSmem = 96 * 1024;
// Two forms (GroupedForm in cuda_ops.h): kBlocks, the blocks a SM the registers are budgeted
// for; kAhead, each warp keeps its next unit's weights in flight. The default, three blocks a SM
// with one unit a warp (77-80 registers) and x staged in chunks of 1,024 columns, streams the
// weights at 85-89% of the copy bandwidth on the H200 where two blocks with two units a warp
// (121 registers) reached ~80%: the read pattern needs more warps, not more bytes a warp
// (bench_cuda_sync --streams, bench/RESULTS.md).
constexpr int64_t kThreeBlockSmem = 36 * 1024;  // mma_chunk's budget: 1,024 columns of 8 rows
template <DType D, int kBlocks, bool kAhead>
__global__ void __launch_bounds__(kMmaThreads, kBlocks)
    mma_gate_up_kernel(MoeExpertsParams p, Routing r, float* __restrict__ h, int chunk, bool vec_x) {
  pdl_wait();
  const int tile = blockIdx.y;
  if (tile >= *r.n_tiles) return;
  FATHOM_MMA_SHARED(sh, chunk, kMmaMaxRows);
  mma_grouped_gate_up_block<D, kAhead>(p, r, h, tile, int64_t(blockIdx.x) * 8 * kMmaWarps, chunk, vec_x, sh);
}

// grid (ceil(hidden / 128), max_tiles).
template <DType D, int kBlocks, bool kAhead>
__global__ void __launch_bounds__(kMmaThreads, kBlocks) mma_down_kernel(MoeExpertsParams p, Routing r,
                                                                        const float* __restrict__ h,
                                                                        float* __restrict__ y, int chunk) {
  pdl_wait();
  const int tile = blockIdx.y;
  if (tile >= *r.n_tiles) return;
  FATHOM_MMA_SHARED(sh, chunk, kMmaMaxRows);
  mma_grouped_down_block<D, kAhead>(p, r, h, y, tile, int64_t(blockIdx.x) * 16 * kMmaWarps, chunk, sh);
}

// Lets the two kernels stage up to kMmaTileSmem bytes of x (above the 48 KB default), once per
// device.
template <DType D>
void allow_mma_tile_smem() {
  static std::once_flag done[kMaxDevices];
  allow_dynamic_smem(done, kMmaTileSmem, "moe_experts (cudaFuncSetAttribute)", mma_gate_up_kernel<D, 2, true>,
                     mma_down_kernel<D, 2, true>, mma_gate_up_kernel<D, 3, false>, mma_down_kernel<D, 3, false>);
}

std::atomic<int> g_grouped_form{int(GroupedForm::Auto)};

// The form the grouped kernels run in: set_grouped_form's, else FATHOM_GROUPED_FORM=ahead|3x1
// (read once), else ThreeBlocks.
GroupedForm grouped_form() {
  const auto set = GroupedForm(g_grouped_form.load(std::memory_order_relaxed));
  if (set != GroupedForm::Auto) return set;
  static const GroupedForm from_env = [] {
    const char* v = std::getenv("FATHOM_GROUPED_FORM");
    if (!v || !*v) return GroupedForm::ThreeBlocks;
    FATHOM_CHECK(std::string(v) == "ahead" || std::string(v) == "3x1", "FATHOM_GROUPED_FORM is '", v,
                 "'; expected ahead or 3x1.");
    return std::string(v) == "ahead" ? GroupedForm::Ahead : GroupedForm::ThreeBlocks;
  }();
  return from_env;
}

// grid (T, ceil(hidden / (V * 256))), block 256: out[t] (+)= Σ_k weights[t, k] · y[row_of_pair[t,
// k]] (+ the shared expert's rows) — moe_combine_one, V columns per thread (4: float4 rows).
template <int V>
__global__ void moe_combine_kernel(MoeExpertsParams p, Routing r, const float* __restrict__ y) {
  pdl_wait();
  const int64_t d = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  if (d < p.hidden) moe_combine_one<V>(p, r, y, blockIdx.x, d);
}

void launch_combine(const MoeExpertsParams& p, const Routing& r, const float* y, cudaStream_t s) {
  if (p.hidden % 4 == 0 && aligned16(p.out) && aligned16(y))
    launch_kernel(moe_combine_kernel<4>, dim3(unsigned(p.n_tokens), unsigned(ceil_div(p.hidden, 4 * 256))), 256, 0, s,
                  p, r, y);
  else
    launch_kernel(moe_combine_kernel<1>, dim3(unsigned(p.n_tokens), unsigned(ceil_div(p.hidden, 256))), 256, 0, s, p,
                  r, y);
  check_launch("moe_experts (moe_combine_kernel)");
}

template <DType D>
void run_mma_small(const MoeExpertsParams& p, const Routing& r, float* h, float* y, int64_t max_tiles, bool vec_x,
                   cudaStream_t s) {
  allow_mma_tile_smem<D>();
  const bool three = grouped_form() == GroupedForm::ThreeBlocks;
  // three blocks a SM: x staged in chunks of at most 1,024 columns (33 KB with 8 rows)
  const int64_t budget = three ? kThreeBlockSmem : kMmaTileSmem;
  const int c_up = mma_chunk(p.hidden, kMmaMaxRows, budget), c_down = mma_chunk(p.inter, kMmaMaxRows, budget);
  const auto gate_up = three ? mma_gate_up_kernel<D, 3, false> : mma_gate_up_kernel<D, 2, true>;
  const auto down = three ? mma_down_kernel<D, 3, false> : mma_down_kernel<D, 2, true>;
  launch_kernel(gate_up, dim3(unsigned(ceil_div(p.inter, 8 * kMmaWarps)), unsigned(max_tiles)),
                kMmaThreads, mma_smem_bytes(c_up, kMmaMaxRows), s, p, r, h, c_up, vec_x);
  check_launch("moe_experts (mma_gate_up_kernel)");
  launch_kernel(down, dim3(unsigned(ceil_div(p.hidden, 16 * kMmaWarps)), unsigned(max_tiles)), kMmaThreads,
                mma_smem_bytes(c_down, kMmaMaxRows), s, p, r, h, y, c_down);
  check_launch("moe_experts (mma_down_kernel)");
  launch_combine(p, r, y, s);
}

// The most tiles a launch can see: every expert's partial tile besides the full ones, and the
// shared expert's pieces over all tokens.
int64_t grouped_max_tiles(const MoeExpertsParams& p, int tile_rows) {
  const int64_t pairs = p.n_tokens * p.top_k;
  return ceil_div(pairs, tile_rows) + std::min<int64_t>(p.n_experts, pairs) +
         shared_pieces(p) * ceil_div(p.n_tokens, tile_rows);
}

// Whether the tensor-core small tiles take p (decode batches: a few rows per expert).
template <DType D>
bool takes_mma_small(const MoeExpertsParams& p) {
  if constexpr (D == DType::F32) {
    return false;
  } else {
    return moe_small_tiles(p.n_tokens, p.top_k, p.n_experts) && p.aligned16 && mma_gemv_fits(D, p.hidden, p.block) && mma_gemv_fits(D, p.inter, p.block) &&
           mma_gemv_on(MmaSite::GroupedExperts);
  }
}

template <DType D>
void run_grouped(const MoeExpertsParams& p, cudaStream_t s) {
  constexpr int E = ElemSize<D>::value;
  const int64_t pairs = p.n_tokens * p.top_k;
  const bool small = moe_small_tiles(p.n_tokens, p.top_k, p.n_experts);
  FATHOM_ASSERT(!p.has_shared || moe_grouped_joins_shared(p), "moe_experts_grouped: a shared expert outside the small tiles");
  const int tile_rows = small ? kSmallRows : kBM;
  const int64_t max_tiles = grouped_max_tiles(p, tile_rows);
  FATHOM_CHECK(max_tiles <= 65535, "moe_experts: ", p.n_tokens, " tokens x ", p.top_k,
               " experts is too many for one grouped launch.");
  const int64_t rows = pairs + shared_pieces(p) * p.n_tokens;  // rows of h and y
  StreamScratch index(size_t(rows + pairs + 3 * max_tiles + 1) * sizeof(int32_t), s, "moe_experts");
  Routing r;
  r.token_of_row = index.as<int32_t>();
  r.row_of_pair = r.token_of_row + rows;
  r.tile_expert = r.row_of_pair + pairs;
  r.tile_begin = r.tile_expert + max_tiles;
  r.tile_end = r.tile_begin + max_tiles;
  r.n_tiles = r.tile_end + max_tiles;
  StreamScratch h(size_t(rows * p.inter) * sizeof(float), s, "moe_experts");
  StreamScratch y(size_t(rows * p.hidden) * sizeof(float), s, "moe_experts");

  const bool fp8_ok = D != DType::F8_E4M3 || p.block % 8 == 0;
  const bool vec_x = aligned16(p.x) && p.hidden % 4 == 0, vec_h = p.inter % 4 == 0;
  const bool vec_up = p.aligned16 && p.hidden * E % 16 == 0 && fp8_ok;
  const bool vec_down = p.aligned16 && p.inter * E % 16 == 0 && fp8_ok;

  launch_kernel(moe_route_kernel, 1, 1024, 0, s, p, r, tile_rows);
  check_launch("moe_experts (moe_route_kernel)");
  if constexpr (D != DType::F32) {
    if (takes_mma_small<D>(p)) return run_mma_small<D>(p, r, h.as<float>(), y.as<float>(), max_tiles, vec_x, s);
  }
  if (small) {
    const bool fp8_gemv = D != DType::F8_E4M3 || p.block % 16 == 0;
    const bool vec_x16 = p.aligned16 && p.hidden * E % 16 == 0 && aligned16(p.x) && p.hidden % 4 == 0 && fp8_gemv;
    const bool vec_h16 = p.aligned16 && p.inter * E % 16 == 0 && p.inter % 4 == 0 && fp8_gemv;
    launch_kernel(small_gate_up_kernel<D>, dim3(unsigned(ceil_div(p.inter, kSmallR)), unsigned(max_tiles)),
                  kSmallThreads, 0, s, p, r, h.as<float>(), vec_x16);
    check_launch("moe_experts (small_gate_up_kernel)");
    launch_kernel(small_down_kernel<D>, dim3(unsigned(ceil_div(p.hidden, kSmallR)), unsigned(max_tiles)), kSmallThreads,
                  0, s, p, r, h.as<float>(), y.as<float>(), vec_h16);
    check_launch("moe_experts (small_down_kernel)");
    return launch_combine(p, r, y.as<float>(), s);
  }
  launch_kernel(grouped_gate_up_kernel<D>, dim3(unsigned(ceil_div(p.inter, kBN)), unsigned(max_tiles)), kTileThreads, 0, s, 
      p, r, h.as<float>(), vec_x, vec_up);
  check_launch("moe_experts (grouped_gate_up_kernel)");
  launch_kernel(grouped_down_kernel<D>, dim3(unsigned(ceil_div(p.hidden, kBN)), unsigned(max_tiles)), kTileThreads, 0, s, 
      p, r, h.as<float>(), y.as<float>(), vec_h, vec_down);
  check_launch("moe_experts (grouped_down_kernel)");
  launch_combine(p, r, y.as<float>(), s);
}

}  // namespace

void set_grouped_form(GroupedForm f) { g_grouped_form.store(int(f), std::memory_order_relaxed); }

bool moe_small_tiles(int64_t n_tokens, int top_k, int n_experts) {
  return n_tokens * top_k < kTiledMinRowsPerExpert * n_experts;
}

bool moe_grouped_on_tensor_cores(const MoeExpertsParams& p) {
  switch (p.dtype) {
    case DType::BF16: return takes_mma_small<DType::BF16>(p);
    case DType::F16: return takes_mma_small<DType::F16>(p);
    case DType::F8_E4M3: return takes_mma_small<DType::F8_E4M3>(p);
    default: return false;
  }
}

bool moe_grouped_joins_shared(const MoeExpertsParams& p) {
  if (!p.has_shared || !moe_grouped_on_tensor_cores(p) || p.shared_inter % p.inter != 0) return false;
  if (p.dtype == DType::F8_E4M3 && p.inter % p.block != 0) return false;
  return grouped_max_tiles(p, kSmallRows) <= 65535;
}

void moe_experts_grouped(const MoeExpertsParams& p, cudaStream_t s) {
  FATHOM_CHECK(p.n_experts <= kMaxExperts, "moe_experts: ", p.n_experts, " experts; the grouped path handles up to ",
               kMaxExperts, ".");
  switch (p.dtype) {
    case DType::F32: return run_grouped<DType::F32>(p, s);
    case DType::BF16: return run_grouped<DType::BF16>(p, s);
    case DType::F16: return run_grouped<DType::F16>(p, s);
    default: return run_grouped<DType::F8_E4M3>(p, s);
  }
}

}  // namespace fathom::cuda
