// Dense matmul out (M, N) = x (M, K) · Wᵀ with W in its stored dtype (F32, BF16, F16, F8_E4M3
// with block scales), fp32 accumulation; the CUDA counterpart of src/ops/cpu/matmul.cpp.
//
// The regimes, chosen by M (and the weight dtype):
// - M below skinny_min_rows (1-2 rows of 16-bit weights, 1 of FP8), or M <= 8 where the
//   tensor cores do not take the weight (F32, odd K, FATHOM_GEMV=simt) (decode, small batches):
//   memory bound. gemv_kernel streams every weight byte once
//   with 16-byte loads (gemv.cuh), R = 4 weight rows per 128-thread block (fewer when N is too
//   small to fill the GPU with 4-row blocks: launch_gemv_norm), all M rows of x reused from L1
//   for each converted weight vector.
// - M >= 64 with F32 weights (training, fp32 prefill): cuBLAS (run_sgemm), true F32, or bf16
//   tensor cores when training asked for them (gemm_f32 in cublas_util.cuh).
// - skinny_min_rows <= M <= 128 (batched decode): 16-bit and FP8 weights on the tensor cores in warp tiles
//   (run_skinny; mma_skinny_block), the weight read once per 32 rows; where that does not fit
//   (or FATHOM_GEMV=simt), up to 64 rows, BF16 weights in one cuBLAS GEMM over x split into
//   bf16 hi/lo parts (run_bf16_split) and other dtypes the GEMV over 8-row chunks, the weight
//   from L2 after the first.
// - FP8 weights over more than 128 rows when the backend was asked (set_fp8_activations): x
//   quantized 1x128 and the FP8 x FP8 GEMM (fp8_gemm.cu; run_fp8_activations).
// - larger M (prefill): gemm_kernel, a tiled SIMT GEMM (gemm_tile.cuh): BM x BN output tiles
//   (32x64, 64x64 or 128x128 by M), 256 threads each owning a (BM/16) x (BN/16) register tile,
//   W dequantized to fp32 while its tiles are staged in shared memory.
// A batch dimension (gridDim.y / gridDim.z) with strides serves matmul_per_head.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <type_traits>

#include "core/error.h"
#include "ops/cuda/cublas_util.cuh"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/gemm_tile.cuh"
#include "ops/cuda/gemv.cuh"
#include "ops/cuda/mma_kernels.cuh"
#include "ops/cuda/small_ops.cuh"

namespace fathom::cuda {
namespace {

constexpr int kGemvThreads = 128;
constexpr int64_t kGemvChunkRows = 64;  // GEMVs of 8-row chunks up to this many rows (run())

// ---- GEMV (M <= 8)

// Up to kMaxJobs GEMVs of one dtype and the same M in one launch (matmul_batch: the q_a and
// kv_a projections of MLA read the same x): block b belongs to the first job whose block_end
// exceeds b. A lone job may have a batch (gridDim.y).
constexpr int kMaxJobs = 4;
// GemvSide's ops by value: rope_blocks blocks for the RoPE, then one block per appended token.
struct SideJobs {
  int rope_blocks = 0, append_blocks = 0;
  bool append_bf16 = false;
  RopeParams rope;
  MlaAppendParams append;
};
struct GemvJobs {
  MatmulParams job[kMaxJobs];
  int64_t block_end[kMaxJobs];
  bool vec[kMaxJobs];
  int n = 0;
  SideJobs side;
};

// Block b of the side ops (after the GEMV blocks, in the first batch row only).
__device__ inline void run_side(const SideJobs& s, int64_t b) {
  pdl_wait();
  if (b < s.rope_blocks) return rope_all(s.rope, b * blockDim.x + threadIdx.x, int64_t(s.rope_blocks) * blockDim.x);
  b -= s.rope_blocks;
  if (s.append_bf16)
    mla_append_row<true>(s.append, b);
  else
    mla_append_row<false>(s.append, b);
}

// A GEMV block's job, batch entry, first row and the entry's weight; j = -1 for a side op's block
// (which this call has run). The block's R rows are contiguous and no earlier kernel writes them:
// thread 0 asks L2 for them before the caller's programmatic-launch wait.
struct GemvBlock {
  int j, b;
  int64_t n0;
  const uint8_t* w;
};
template <DType D, int R>
__device__ inline GemvBlock gemv_block(const GemvJobs& jobs) {
  constexpr int E = ElemSize<D>::value;
  if (int64_t(blockIdx.x) >= jobs.block_end[jobs.n - 1]) {  // a side op's block
    if (blockIdx.y == 0) run_side(jobs.side, int64_t(blockIdx.x) - jobs.block_end[jobs.n - 1]);
    return {-1, 0, 0, nullptr};
  }
  int j = 0;
  while (j + 1 < jobs.n && int64_t(blockIdx.x) >= jobs.block_end[j]) ++j;
  const MatmulParams& p = jobs.job[j];
  const int b = blockIdx.y;
  const int64_t n0 = (int64_t(blockIdx.x) - (j ? jobs.block_end[j - 1] : 0)) * R;
  const uint8_t* w = static_cast<const uint8_t*>(p.w) + b * p.w_batch_stride * E;
  if (threadIdx.x == 0) prefetch_l2(w + n0 * p.K * E, uint64_t(min(int64_t(R), p.N - n0) * p.K * E));
  return {j, b, n0, w};
}

// grid (Σ ceil(N / R) + side blocks, batch), block kGemvThreads.
template <DType D, int MP, int R, bool NORM>
__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(const __grid_constant__ GemvJobs jobs) {
  const GemvBlock blk = gemv_block<D, R>(jobs);
  if (blk.j < 0) return;
  const int j = blk.j, b = blk.b;
  const int64_t n0 = blk.n0;
  const MatmulParams& p = jobs.job[j];
  const uint8_t* w = blk.w;
  pdl_wait();
  __shared__ float scratch[kGemvThreads / 32 * R * MP];
  __shared__ float result[R * MP];
  GemvRow rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t n = min(n0 + r, p.N - 1);  // past the end: a duplicate whose result is dropped
    rows[r] = gemv_row<D>(w, p.scale_inv, n, p.K, p.block);
  }
  float acc[R][MP];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MP; ++m) acc[r][m] = 0.f;
  float ss[1][MP];  // NORM: this thread's share of each x row's sum of squares
#pragma unroll
  for (int m = 0; m < MP; ++m) ss[0][m] = 0.f;
  gemv_accumulate<D, MP, R, NORM>(acc, rows, GemvX{p.x + b * p.x_batch_stride, p.ldx}, int(p.M), p.K, p.block,
                                  jobs.vec[j], 1.f, threadIdx.x, blockDim.x, p.norm, ss[0]);
  gemv_block_reduce<MP, R>(acc, scratch, result);
  __shared__ float ss_total[MP];
  if constexpr (NORM) gemv_block_reduce<MP, 1>(ss, scratch, ss_total);
  float* out = p.out + b * p.out_batch_stride;
  for (int i = threadIdx.x; i < R * MP; i += blockDim.x) {
    const int r = i / MP, m = i % MP;
    if (m >= p.M || n0 + r >= p.N) continue;
    float v = result[i];
    if constexpr (NORM) v *= norm_scale(ss_total[m], p.K, p.eps);
    float* o = out + m * p.ldo + n0 + r;
    *o = p.accumulate ? *o + v : v;
  }
}

// The GEMV on the tensor cores (mma_gemv.cuh): 16 weight rows per block of kMmaThreads, all M
// rows of x staged once per block. grid (Σ ceil(N / 16) + side blocks, batch); dynamic shared
// memory mma_smem_bytes(chunk, M).
template <DType D, bool NORM>
__global__ void __launch_bounds__(kMmaThreads) mma_gemv_kernel(const __grid_constant__ GemvJobs jobs, int chunk,
                                                               int M) {
  const GemvBlock blk = gemv_block<D, 16>(jobs);
  if (blk.j < 0) return;
  pdl_wait();
  FATHOM_MMA_SHARED(sh, chunk, M);
  mma_dense_block<D, NORM>(jobs.job[blk.j], blk.w, blk.b, blk.n0, M, chunk, jobs.vec[blk.j], sh);
}

// ---- tiled GEMM (M > 8)

// grid (ceil(N / BN), ceil(M / BM), batch), block kTileThreads.
template <DType D, int BM, int BN>
__global__ void __launch_bounds__(kTileThreads) gemm_kernel(MatmulParams p, bool vec_x, bool vec_w) {
  pdl_wait();
  constexpr int TM = BM / 16, TN = BN / 16;
  __shared__ __align__(16) TileSmem<BM, BN, 1> sm;
  const int b = blockIdx.z;
  const int64_t m0 = int64_t(blockIdx.y) * BM, n0 = int64_t(blockIdx.x) * BN;
  const TileRows rows{p.x + b * p.x_batch_stride, p.ldx, nullptr, m0, p.M, vec_x};
  const TileWeight w[1] = {{static_cast<const uint8_t*>(p.w) + b * p.w_batch_stride * ElemSize<D>::value,
                            p.scale_inv}};
  float acc[1][TM][TN];
  gemm_tile<D, BM, BN, 1>(acc, sm, rows, w, n0, p.N, p.K, int(p.block), vec_w);
  float* out = p.out + b * p.out_batch_stride;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t m = m0 + tile_row(i, TM);
    if (m >= p.M) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t n = n0 + tile_col(j);
      if (n < p.N) out[m * p.ldo + n] = p.accumulate ? out[m * p.ldo + n] + acc[0][i][j] : acc[0][i][j];
    }
  }
}

// out rows of zeros (K == 0). grid (M, batch).
__global__ void zero_rows_kernel(MatmulParams p) {
  pdl_wait();
  float* out = p.out + blockIdx.y * p.out_batch_stride + blockIdx.x * p.ldo;
  for (int64_t n = threadIdx.x; n < p.N; n += blockDim.x) out[n] = 0.f;
}

template <DType D, int R>
GemvJobs gemv_jobs(const MatmulParams* ps, int n) {
  constexpr int E = ElemSize<D>::value;
  GemvJobs jobs;
  jobs.n = n;
  int64_t blocks = 0;
  for (int i = 0; i < n; ++i) {
    const MatmulParams& p = ps[i];
    jobs.job[i] = p;
    jobs.vec[i] = aligned16(p.w) && p.K * E % 16 == 0 && p.w_batch_stride * E % 16 == 0 && aligned16(p.x) &&
                  p.ldx % 4 == 0 && p.x_batch_stride % 4 == 0 && (D != DType::F8_E4M3 || p.block % 16 == 0) &&
                  aligned16(p.norm);
    blocks += ceil_div(p.N, R);
    jobs.block_end[i] = blocks;
  }
  FATHOM_CHECK(blocks < (int64_t(1) << 31), "matmul: ", blocks, " row blocks is too many for one launch");
  return jobs;
}

// jobs of one dtype, the same M (<= MP) and, with several, no batch.
// The side ops of a launch (their parameters checked by the caller).
SideJobs side_jobs(const GemvSide& side) {
  SideJobs sj;
  if (side.rope) {
    sj.rope = *side.rope;
    const int64_t items = sj.rope.n_tokens * sj.rope.n_heads * (sj.rope.rope_dim / 2);
    sj.rope_blocks = int(std::min<int64_t>(ceil_div(items, kGemvThreads * 4), 1024));  // a few pairs per thread
  }
  if (side.append) {
    sj.append = *side.append;
    sj.append_blocks = int(sj.append.n_tokens);
    sj.append_bf16 = sj.append.out_dtype == DType::BF16;
  }
  return sj;
}

// Whether matmuls (M <= 8) take the tensor-core GEMV: 16-bit or FP8 weights of whole, aligned
// 16-byte pieces, and K of at least a unit per warp for 16-bit weights (the per-head W_UK, K 128,
// would leave seven of a block's eight warps idle; the SIMT GEMV streams 16-bit weights well,
// while its FP8 decode is bound by instructions, so FP8 takes the tensor cores at any K).
template <DType D>
bool mma_gemv_takes(const MatmulParams* ps, int n) {
  if (!mma_gemv_on(MmaSite::Dense)) return false;
  constexpr int E = ElemSize<D>::value;
  for (int i = 0; i < n; ++i)
    if (!mma_gemv_fits(D, ps[i].K, ps[i].block) || !aligned16(ps[i].w) || ps[i].w_batch_stride * E % 16 != 0 ||
        (D != DType::F8_E4M3 && ps[i].K < kMmaWarps * kMmaUnit))
      return false;
  return true;
}

template <DType D, bool NORM>
void launch_mma_gemv(const MatmulParams* ps, int n, cudaStream_t s, const SideJobs& side) {
  GemvJobs jobs = gemv_jobs<D, 16>(ps, n);
  jobs.side = side;
  int64_t K = 0;
  for (int i = 0; i < n; ++i) K = std::max(K, ps[i].K);
  const int M = int(ps[0].M), chunk = mma_chunk(K, M);
  const int64_t side_blocks = int64_t(side.rope_blocks) + side.append_blocks;
  launch_kernel(mma_gemv_kernel<D, NORM>, dim3(unsigned(jobs.block_end[n - 1] + side_blocks), unsigned(ps[0].batch)),
                kMmaThreads, mma_smem_bytes(chunk, M), s, jobs, chunk, M);
  check_launch("matmul (mma_gemv_kernel)");
}

template <DType D, int MP, bool NORM>
void launch_gemv_norm(const MatmulParams* ps, int n, cudaStream_t s, const SideJobs& side) {
  if constexpr (D != DType::F32) {
    if (mma_gemv_takes<D>(ps, n)) return launch_mma_gemv<D, NORM>(ps, n, s, side);
  }
  int64_t rows = 0;
  for (int i = 0; i < n; ++i) rows += ps[i].N * ps[i].batch;
  const int64_t side_blocks = int64_t(side.rope_blocks) + side.append_blocks;
  // Rows per block (R): four while that still gives every SM eight blocks; below that, one — or,
  // for one x row (batch-1 decode), two of 16-bit weights and always four of FP8, whose rows are
  // half the bytes: measured on an H200 (v3-4.9b batch-1 decode, bench/RESULTS.md), R = 1 / 2 /
  // 4 for the 1,344- to 3,072-row projections gave bf16 1,007–1,019 / 1,047–1,048 / 1,026–1,041
  // tokens/s and FP8 993–996 / 1,028–1,032 / 1,092–1,095. FATHOM_GEMV_ROWS=1|2|4 forces one.
  static const int forced = [] {
    const char* e = std::getenv("FATHOM_GEMV_ROWS");
    const int r = e ? std::atoi(e) : 0;
    return r == 1 || r == 2 || r == 4 ? r : 0;
  }();
  const bool many = ceil_div(rows, 4) >= 8 * sm_count();
  int R = many ? 4 : 1;
  if (MP == 1 && D == DType::F8_E4M3) R = 4;
  else if (MP == 1 && (D == DType::BF16 || D == DType::F16) && !many) R = 2;
  if (forced) R = forced;
  auto launch = [&](auto rows) {
    constexpr int kR = decltype(rows)::value;
    GemvJobs jobs = gemv_jobs<D, kR>(ps, n);
    jobs.side = side;
    launch_kernel(gemv_kernel<D, MP, kR, NORM>,
                  dim3(unsigned(jobs.block_end[n - 1] + side_blocks), unsigned(ps[0].batch)), kGemvThreads, 0, s, jobs);
  };
  if (R == 4) launch(std::integral_constant<int, 4>{});
  else if (R == 2) launch(std::integral_constant<int, 2>{});
  else launch(std::integral_constant<int, 1>{});
  check_launch("matmul (gemv_kernel)");
}

// The jobs of one launch all normalise their input or none does (matmul_batch groups them so).
template <DType D, int MP>
void launch_gemv(const MatmulParams* ps, int n, cudaStream_t s, const SideJobs& side) {
  if (ps[0].norm) return launch_gemv_norm<D, MP, true>(ps, n, s, side);
  launch_gemv_norm<D, MP, false>(ps, n, s, side);
}

template <DType D, int BM, int BN>
void launch_gemm(const MatmulParams& p, cudaStream_t s) {
  constexpr int E = ElemSize<D>::value;
  const bool vec_x = aligned16(p.x) && p.ldx % 4 == 0 && p.x_batch_stride % 4 == 0;
  const bool vec_w = aligned16(p.w) && p.K * E % 16 == 0 && p.w_batch_stride * E % 16 == 0 &&
                     (D != DType::F8_E4M3 || p.block % 8 == 0);
  const int64_t m_tiles = ceil_div(p.M, BM);
  FATHOM_CHECK(m_tiles <= 65535, "matmul: M = ", p.M, " rows is too many for one launch");
  launch_kernel(gemm_kernel<D, BM, BN>, dim3(unsigned(ceil_div(p.N, BN)), unsigned(m_tiles), unsigned(p.batch)), kTileThreads, 0, s, p, vec_x, vec_w);
  check_launch("matmul (gemm_kernel)");
}

template <DType D>
void run_gemv(const MatmulParams* ps, int n, cudaStream_t s, const SideJobs& side = {}) {
  const int64_t M = ps[0].M;
  if (M <= 1) return launch_gemv<D, 1>(ps, n, s, side);
  if (M <= 2) return launch_gemv<D, 2>(ps, n, s, side);
  if (M <= 4) return launch_gemv<D, 4>(ps, n, s, side);
  launch_gemv<D, 8>(ps, n, s, side);
}

// F32 weights and many rows (training's forward passes, fp32 prefill): cuBLAS (gemm_f32), true F32
// products as the SIMT GEMM's but at the library's rate. Row-major out (M, N) = x (M, K) · Wᵀ is,
// column-major, outᵀ (N, M) = W_cm(K, N)ᵀ · x_cmᵀ(K, M), every leading dimension as stored.
constexpr int64_t kCublasMinRows = 64;
void run_sgemm(const MatmulParams& p, cudaStream_t s) {
  gemm_f32(CUBLAS_OP_T, CUBLAS_OP_N, p.N, p.M, p.K, 1.0f, static_cast<const float*>(p.w), p.K, p.w_batch_stride, p.x,
           p.ldx, p.x_batch_stride, p.accumulate ? 1.0f : 0.0f, p.out, p.ldo, p.out_batch_stride, p.batch, s,
           "matmul (cuBLAS GEMM)");
}

template <DType D>
void run_gemm(const MatmulParams& p, cudaStream_t s) {
  if constexpr (D == DType::F32) {
    if (p.M >= kCublasMinRows && p.M < (int64_t(1) << 31) && p.ldx < (int64_t(1) << 31) && p.ldo < (int64_t(1) << 31))
      return run_sgemm(p, s);
  }
  if (p.M <= 32) return launch_gemm<D, 32, 64>(p, s);
  if (p.M <= 64) return launch_gemm<D, 64, 64>(p, s);
  launch_gemm<D, 128, 128>(p, s);
}

// ---- BF16 weights, 9 to 64 rows (batched decode): one cuBLAS GEMM on the tensor cores over x
// split into bf16 parts, x = hi + lo (the remainder to ~2^-16 of x): the 2M rows [hi; lo] of
// each batch entry against W in one product (W read once), then out (+)= C[hi rows] + C[lo rows].
// The products are those of the fp32 x to ~1e-5, as the CPU reference computes them.
__global__ void split_rows_kernel(__nv_bfloat16* __restrict__ x2, const float* __restrict__ x, int64_t M, int64_t K,
                                  int64_t ldx, int64_t x_batch_stride) {
  pdl_wait();
  const int64_t b = blockIdx.y, n = M * K;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / K, k = i % K;
    const float v = x[b * x_batch_stride + m * ldx + k];
    const __nv_bfloat16 hi = __float2bfloat16_rn(v);
    x2[b * 2 * n + i] = hi;
    x2[b * 2 * n + n + i] = __float2bfloat16_rn(v - __bfloat162float(hi));
  }
}

__global__ void combine_halves_kernel(float* __restrict__ out, const float* __restrict__ c2, int64_t M, int64_t N,
                                      int64_t ldo, int64_t out_batch_stride, bool accumulate) {
  pdl_wait();
  const int64_t b = blockIdx.y, n = M * N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / N, j = i % N;
    const float v = c2[b * 2 * n + i] + c2[b * 2 * n + n + i];
    float& o = out[b * out_batch_stride + m * ldo + j];
    o = accumulate ? o + v : v;
  }
}

void run_bf16_split(const MatmulParams& p, cudaStream_t s) {
  const int64_t n_x = p.M * p.K, n_c = p.M * p.N;
  StreamScratch x2(size_t(2 * n_x * p.batch) * sizeof(__nv_bfloat16), s, "matmul (bf16 split of x)");
  StreamScratch c2(size_t(2 * n_c * p.batch) * sizeof(float), s, "matmul (bf16 split products)");
  const unsigned threads = 256;
  launch_kernel(split_rows_kernel, dim3(unsigned(std::min<int64_t>(ceil_div(n_x, threads), 1024)), unsigned(p.batch)),
                threads, 0, s, x2.as<__nv_bfloat16>(), p.x, p.M, p.K, p.ldx, p.x_batch_stride);
  check_launch("matmul (split_rows_kernel)");
  // row-major C2 (2M, N) = X2 (2M, K) · Wᵀ is, column-major, C2ᵀ (N, 2M) = W_cm(K, N)ᵀ · X2_cm(K, 2M)
  gemm_bf16(CUBLAS_OP_T, CUBLAS_OP_N, p.N, 2 * p.M, p.K, 1.0f, p.w, p.K, p.w_batch_stride, x2.as<__nv_bfloat16>(), p.K,
            2 * n_x, 0.0f, c2.as<float>(), p.N, 2 * n_c, p.batch, s, "matmul (cuBLAS bf16 GEMM)");
  launch_kernel(combine_halves_kernel, dim3(unsigned(std::min<int64_t>(ceil_div(n_c, threads), 1024)), unsigned(p.batch)),
                threads, 0, s, p.out, c2.as<float>(), p.M, p.N, p.ldo, p.out_batch_stride, p.accumulate);
  check_launch("matmul (combine_halves_kernel)");
}

// ---- skinny_min_rows to 128 rows on the tensor cores in warp tiles (mma_skinny_block): a block takes
// kSkinnyRows weight rows and up to 32 x rows over a slice of K; the slices (enough that the
// blocks about fill the GPU once) write partial sums that skinny_reduce_kernel adds up in slice order
// (deterministic). The weight is read once per 32 rows (up to kSkinnyMaxRows), in or out of a
// graph, for BF16, F16 and FP8 weights; an input norm is applied inside (its factor at the end).
// Up to kMaxSkinnyJobs weights that read the same x (MLA's q_a and kv_a) share the two launches:
// the blocks of the jobs one after the other along x, one slicing of K for all.
// (Adding the slices up in the last block of each row block instead, to save the second launch,
// measured 3.5x slower on the H200: that one block's serial L2 reads became the kernel's tail;
// in a thread-block cluster of the row block's slices through distributed shared memory, 14.9
// to 16.2 us per matmul against 10.1 + 4.3 for the two launches: bench/RESULTS.md, 2026-11-30.)
constexpr int kSkinnyMaxM = 32;         // x rows per launch
// Rows the skinny path takes, in launches of kSkinnyMaxM (a decode step of up to 128 requests):
// reading the weight four times at 128 rows still beats the SIMT tiled GEMM by far (the serving
// engine's 128-request steps took 33 ms there, against 4.7 ms for 32 requests).
constexpr int64_t kSkinnyMaxRows = 4 * kSkinnyMaxM;
constexpr int kSkinnySmem = 96 * 1024;  // x staging
constexpr int kMaxSkinnyJobs = 2;

struct SkinnyJobs {
  MatmulParams job[kMaxSkinnyJobs];
  int64_t block_end[kMaxSkinnyJobs];  // job j's row blocks end (exclusive) at block_end[j]
  int64_t out_end[kMaxSkinnyJobs];    // job j's M * N partial sums per slice end at out_end[j]
  int n = 0;
  SideJobs side;  // side ops in blocks after the row blocks (slice 0, batch entry 0 only)
};

// Block x's job and its row block there.
__device__ inline int skinny_job(const SkinnyJobs& jobs, int64_t& rb) {
  int j = 0;
  while (j + 1 < jobs.n && int64_t(blockIdx.x) >= jobs.block_end[j]) ++j;
  rb = int64_t(blockIdx.x) - (j ? jobs.block_end[j - 1] : 0);
  return j;
}

// The block's weights — row block rb's rows over slice blockIdx.y of K, batch entry blockIdx.z —
// into L2, one row segment per thread, before the kernel waits for the one before it (no kernel
// writes weights): their memory latency passes while that one finishes.
template <DType D>
__device__ inline void skinny_prefetch(const MatmulParams& p, int64_t rb, const SkinnySlices& sl) {
  constexpr int E = ElemSize<D>::value;
  const int64_t n = rb * kSkinnyRows + threadIdx.x;
  const int64_t k0 = int64_t(blockIdx.y) * sl.slice, k1 = min(p.K, k0 + sl.slice);
  if (int(threadIdx.x) < kSkinnyRows && n < p.N && k1 > k0)
    prefetch_l2(static_cast<const uint8_t*>(p.w) + (int64_t(blockIdx.z) * p.w_batch_stride + n * p.K + k0) * E,
                uint64_t(k1 - k0) * E);
}

// grid (Σ row blocks, slices, batch), block kMmaThreads. sl.part: job j's sums from
// slice * out_end[n-1] + (j ? out_end[j-1] : 0), (batch, M, N) each.
template <DType D, int NT, bool NORM>
__global__ void __launch_bounds__(kMmaThreads, 2)
    mma_skinny_kernel(const __grid_constant__ SkinnyJobs jobs, SkinnySlices sl, int chunk, bool vec_x) {
  if (int64_t(blockIdx.x) >= jobs.block_end[jobs.n - 1]) {  // a side op's block
    if (blockIdx.y == 0 && blockIdx.z == 0) run_side(jobs.side, int64_t(blockIdx.x) - jobs.block_end[jobs.n - 1]);
    return;
  }
  int64_t rb = 0;
  const int j = skinny_job(jobs, rb);
  const MatmulParams& p = jobs.job[j];
  skinny_prefetch<D>(p, rb, sl);
  pdl_wait();
  FATHOM_MMA_SHARED(sh, chunk, 8 * NT);  // every x row of the NT tiles staged, zeros past M
  SkinnySlices mine = sl;
  if (sl.slices > 1) {
    mine.part = sl.part + int64_t(blockIdx.y) * jobs.out_end[jobs.n - 1] * p.batch +
                (j ? jobs.out_end[j - 1] : 0) * p.batch - int64_t(blockIdx.y) * p.batch * p.M * p.N;
    if (j > 0) mine.part_ss = nullptr;  // the jobs share x: job 0 keeps the squares
  }
  mma_skinny_block<D, NT, NORM>(p, int(blockIdx.z), int(rb), int(blockIdx.y), chunk, vec_x, mine, sh);
}

// Element i of every job's output (the jobs one after the other): the slices' sums in slice
// order, times the row's norm factor (NORM), as mma_skinny_block writes them with one slice.
template <bool NORM>
__global__ void skinny_reduce_kernel(const __grid_constant__ SkinnyJobs jobs, SkinnySlices sl) {
  pdl_wait();
  const uint32_t end0 = uint32_t(jobs.out_end[0] * jobs.job[0].batch);
  const uint32_t total = uint32_t(jobs.out_end[jobs.n - 1] * jobs.job[0].batch);
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    static_assert(kMaxSkinnyJobs == 2, "skinny_reduce_kernel picks one of two jobs");
    // the job by constant indices: a parameter indexed by a run-time value is read through the
    // constant cache one miss at a time
    if (i < end0) skinny_reduce_one<NORM>(jobs.job[0], sl, sl.part + i, total, i);
    else skinny_reduce_one<NORM>(jobs.job[1], sl, sl.part + i, total, i - end0);
  }
}

template <DType D, int NT>
void launch_skinny(const SkinnyJobs& jobs, const SkinnySlices& sl, dim3 grid, size_t smem, int chunk, bool vec_x,
                   cudaStream_t s) {
  if (jobs.job[0].norm)
    launch_kernel(mma_skinny_kernel<D, NT, true>, grid, kMmaThreads, smem, s, jobs, sl, chunk, vec_x);
  else
    launch_kernel(mma_skinny_kernel<D, NT, false>, grid, kMmaThreads, smem, s, jobs, sl, chunk, vec_x);
}

template <DType D>
void allow_skinny_smem() {
  static std::once_flag done[kMaxDevices];
  allow_dynamic_smem(done, kSkinnySmem, "matmul (cudaFuncSetAttribute)", mma_skinny_kernel<D, 1, false>,
                     mma_skinny_kernel<D, 2, false>, mma_skinny_kernel<D, 3, false>, mma_skinny_kernel<D, 4, false>,
                     mma_skinny_kernel<D, 1, true>, mma_skinny_kernel<D, 2, true>, mma_skinny_kernel<D, 3, true>,
                     mma_skinny_kernel<D, 4, true>);
}

// The fewest rows the skinny matmul takes, by weight dtype: below them the SIMT GEMV (gemv.cuh),
// whose fixed cost is lower, wins. Measured on the H200 (bench_cuda_decode, v3-4.9b, every dense
// matmul of the decode step one way or the other): 16-bit weights 1,362-1,373 against
// 1,398-1,404 tok/s at 2 rows, 1,799-1,821 against 1,726-1,734 at 3; FP8, whose SIMT GEMV is bound
// by decoding its codes, 1,477-1,491 against 1,386-1,388 at 2 and 941 against 1,007 at 1.
inline int64_t skinny_min_rows(DType w) { return w == DType::F8_E4M3 ? 2 : 3; }

// Whether the tensor-core matmul in warp tiles takes p (from skinny_min_rows to 128 rows).
bool skinny_takes(const MatmulParams& p) {
  if (p.M < skinny_min_rows(p.w_dtype) || p.M > kSkinnyMaxRows || !mma_gemv_on(MmaSite::Skinny)) return false;
  if (!mma_gemv_fits(p.w_dtype, p.K, p.block)) return false;
  const int64_t E = int64_t(dtype_size(p.w_dtype));
  return aligned16(p.w) && p.w_batch_stride * E % 16 == 0;
}

// Whether skinny job q can share job p's launches: the same x rows (and norm), dtype and K.
bool skinny_joins(const MatmulParams& p, const MatmulParams& q) {
  return skinny_takes(q) && q.x == p.x && q.ldx == p.ldx && q.M == p.M && q.K == p.K && q.w_dtype == p.w_dtype &&
         q.norm == p.norm && q.eps == p.eps && q.batch == 1 && p.batch == 1 && q.block == p.block;
}

// ps[0..n): skinny jobs (skinny_joins ps[0] for n > 1); the side ops ride in the first launch.
template <DType D>
void run_skinny(const MatmulParams* ps_in, int n, cudaStream_t s, const SideJobs& side = {}) {
  allow_skinny_smem<D>();
  FATHOM_ASSERT(n >= 1 && n <= kMaxSkinnyJobs, "run_skinny: ", n, " jobs");
  const MatmulParams& p0 = ps_in[0];
  for (int64_t r = 0; r < p0.M; r += kSkinnyMaxM) {
    SkinnyJobs jobs;
    jobs.n = n;
    if (r == 0) jobs.side = side;
    int64_t row_blocks = 0, outs = 0;
    for (int j = 0; j < n; ++j) {
      MatmulParams& p = jobs.job[j];
      p = ps_in[j];
      p.M = std::min<int64_t>(kSkinnyMaxM, ps_in[j].M - r);
      p.x = ps_in[j].x + r * ps_in[j].ldx;
      p.out = ps_in[j].out + r * ps_in[j].ldo;
      row_blocks += ceil_div(p.N, kSkinnyRows);
      jobs.block_end[j] = row_blocks;
      outs += p.M * p.N;
      jobs.out_end[j] = outs;
    }
    const MatmulParams& p = jobs.job[0];
    SkinnySlices sl;
    const int64_t k_units = ceil_div(p.K, kMmaUnit);
    // slices for about one block per SM (H200, the 32-request step: against two, +9 us in the
    // matmuls and -33 us in the slice sums, which read half as many partial sums)
    const int64_t want = std::clamp<int64_t>(ceil_div(int64_t(sm_count()), row_blocks * p.batch), 1, k_units);
    const int64_t slice_units = ceil_div(k_units, want);
    sl.slices = int(ceil_div(k_units, slice_units));
    sl.slice = slice_units * kMmaUnit;
    const int staged = 8 * int(ceil_div(p.M, 8));  // x rows staged: whole tiles of 8
    const int chunk = mma_chunk(std::min(sl.slice, k_units * kMmaUnit), staged, kSkinnySmem);
    FATHOM_ASSERT(chunk > 0, "run_skinny: no room to stage ", staged, " x rows");
    FATHOM_ASSERT(outs * p.batch * 2 < (int64_t(1) << 32), "run_skinny: ", outs * p.batch, " outputs");
    const bool vec_x = aligned16(p.x) && p.ldx % 4 == 0 && p.x_batch_stride % 4 == 0;
    std::optional<StreamScratch> part;
    if (sl.slices > 1) {
      const size_t sums = size_t(sl.slices) * size_t(p.batch * outs), squares = size_t(sl.slices * p.M);
      part.emplace((sums + squares) * sizeof(float), s, "matmul (skinny partial sums)");
      sl.part = part->as<float>();
      sl.part_ss = sl.part + sums;
    }
    const int64_t side_blocks = int64_t(jobs.side.rope_blocks) + jobs.side.append_blocks;
    const dim3 grid(unsigned(row_blocks + side_blocks), unsigned(sl.slices), unsigned(p.batch));
    const size_t smem = mma_smem_bytes(chunk, staged);
    switch (ceil_div(p.M, 8)) {
      case 1: launch_skinny<D, 1>(jobs, sl, grid, smem, chunk, vec_x, s); break;
      case 2: launch_skinny<D, 2>(jobs, sl, grid, smem, chunk, vec_x, s); break;
      case 3: launch_skinny<D, 3>(jobs, sl, grid, smem, chunk, vec_x, s); break;
      default: launch_skinny<D, 4>(jobs, sl, grid, smem, chunk, vec_x, s);
    }
    check_launch("matmul (mma_skinny_kernel)");
    if (sl.slices > 1) {
      const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(outs * p.batch, 256), 1024));
      if (p.norm) launch_kernel(skinny_reduce_kernel<true>, blocks, 256, 0, s, jobs, sl);
      else launch_kernel(skinny_reduce_kernel<false>, blocks, 256, 0, s, jobs, sl);
      check_launch("matmul (skinny_reduce_kernel)");
    }
  }
}

// Whether s is recording a CUDA graph: the decode graph keeps its 9-to-64-row BF16 matmuls in
// GEMVs rather than put library calls (and their work space) inside the graph.
bool capturing(cudaStream_t s) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  check(cudaStreamIsCapturing(s, &st), "cudaStreamIsCapturing");
  return st != cudaStreamCaptureStatusNone;
}

// Whether p runs as a GEMV (one launch, or 8-row chunks), which applies an input norm itself.
bool gemv_path(const MatmulParams& p, cudaStream_t s) {
  if (skinny_takes(p)) return false;
  if (p.M <= 8) return true;
  if (p.M > kGemvChunkRows || (p.w_dtype == DType::BF16 && !capturing(s))) return false;
  return !(p.w_dtype == DType::F32 && p.M >= kCublasMinRows);
}

// The matmul, with the side ops in its launch when it is a GEMV (and true), else false. Up to
// kGemvChunkRows rows (batched decode: one row per sequence) it is still a GEMV, run over chunks
// of 8 rows one after the other: the first chunk streams the weight from memory, the next ones
// mostly find it in L2, where the tiled GEMM at these M kept too few blocks busy to approach the
// bandwidth (a 32-row step of the 4.9B model spent 12.7 of its 30 ms in it).
template <DType D>
bool run(const MatmulParams& p, cudaStream_t s, const SideJobs& side) {
  if (p.M <= 8 && !skinny_takes(p)) {  // (never F32 weights: mma_gemv_fits)
    run_gemv<D>(&p, 1, s, side);
    return true;
  }
  if constexpr (D != DType::F32) {
    if (skinny_takes(p)) {
      run_skinny<D>(&p, 1, s, side);
      return true;
    }
  }
  if (D == DType::BF16 && p.M <= kGemvChunkRows && !capturing(s)) {
    run_bf16_split(p, s);
    return false;
  }
  if (gemv_path(p, s)) {
    for (int64_t r = 0; r < p.M; r += 8) {
      MatmulParams c = p;
      c.M = std::min<int64_t>(8, p.M - r);
      c.x = p.x + r * p.ldx;
      c.out = p.out + r * p.ldo;
      run_gemv<D>(&c, 1, s, r == 0 ? side : SideJobs{});
    }
    return true;
  }
  run_gemm<D>(p, s);
  return false;
}

// Prefill with FP8 weights, when asked (MatmulParams::fp8_activations): x quantized 1x128 into a
// stream-ordered work space, then the FP8 x FP8 product promoted every 128 of K (fp8_gemm.cu).
bool fp8_activations_take(const MatmulParams& p) {
  return p.fp8_activations && p.w_dtype == DType::F8_E4M3 && p.block == 128 && p.batch == 1 &&
         p.M > kFp8ActivationRows && p.ldx == p.K && !p.norm;
}
void run_fp8_activations(const MatmulParams& p, cudaStream_t s) {
  const int64_t Kt = ceil_div(p.K, 128);
  StreamScratch q(size_t(p.M * p.K), s, "matmul (FP8 activations)");
  StreamScratch scales(size_t(p.M * Kt) * sizeof(float), s, "matmul (FP8 activation scales)");
  quantize_1x128(q.as<uint8_t>(), scales.as<float>(), p.x, p.M, p.K, s);
  Fp8GemmParams g;
  g.out = p.out;
  g.out_dtype = DType::F32;
  g.ldo = p.ldo;
  g.accumulate = p.accumulate;
  g.a = q.as<uint8_t>();
  g.a_scale = scales.as<float>();
  g.b = static_cast<const uint8_t*>(p.w);
  g.b_scale = p.scale_inv;
  g.M = p.M;
  g.N = p.N;
  g.K = p.K;
  fp8_gemm(g, s);
}

// The checks every matmul passes; false when there is nothing to compute.
bool check_params(const MatmulParams& p) {
  const DType d = p.w_dtype;
  FATHOM_CHECK(d == DType::F32 || d == DType::BF16 || d == DType::F16 || d == DType::F8_E4M3,
               "matmul: weight dtype ", dtype_name(d), " is not supported on CUDA; expected F32, BF16, F16 or F8_E4M3.");
  FATHOM_CHECK(p.M >= 0 && p.N >= 0 && p.K >= 0 && p.batch >= 1, "matmul: invalid shape M ", p.M, " N ", p.N, " K ",
               p.K, " batch ", p.batch, ".");
  FATHOM_CHECK(p.K < (int64_t(1) << 31) && p.N < (int64_t(1) << 31) && p.batch <= 65535, "matmul: N ", p.N, " K ",
               p.K, " batch ", p.batch, " exceed what one launch handles.");
  FATHOM_ASSERT(!p.norm || p.batch == 1, "matmul: an input norm with a batch of weights");
  if (d == DType::F8_E4M3)
    FATHOM_CHECK(p.scale_inv && p.block > 0 && p.batch == 1,
                 "matmul: an F8_E4M3 weight needs scale_inv and a positive block (and no batch).");
  if (p.M == 0 || p.N == 0) return false;
  FATHOM_ASSERT(p.out && p.x && p.w, "matmul with a null pointer");
  return true;
}

}  // namespace

void matmul(const MatmulParams& p_in, Stream stream, const GemvSide& side_in) {
  GemvSide side = side_in;  // the side ops' checks first: a bad one is an error before any launch
  if (side.rope && !rope_checked(*side.rope)) side.rope = nullptr;
  if (side.append && !mla_append_checked(*side.append)) side.append = nullptr;
  const bool has_side = side.rope || side.append;
  // the side ops after the matmul, as their own kernels, when the matmul cannot carry them
  auto side_apart = [&] {
    if (side.rope) rope(*side.rope, stream);
    if (side.append) mla_cache_append(*side.append, stream);
  };
  if (!check_params(p_in)) return side_apart();
  const cudaStream_t s = as_cuda(stream);
  MatmulParams p = p_in;
  // The tiled GEMM has no norm prologue: there the rows are normalised into a work space first
  // (prefill, where one more pass over the activations is small beside the GEMM).
  std::optional<StreamScratch> normed;
  if (p.norm && !gemv_path(p, s) && !skinny_takes(p) && p.K > 0) {
    normed.emplace(size_t(p.M * p.K) * sizeof(float), s, "matmul (input norm)");
    FATHOM_ASSERT(p.ldx == p.K, "matmul: an input norm over strided rows");
    rmsnorm(normed->as<float>(), p.x, p.norm, p.M, p.K, p.eps, stream);
    p.x = normed->as<float>();
    p.ldx = p.K;
    p.norm = nullptr;
  }
  if (p.K == 0) {
    if (!p.accumulate) {  // else out += 0
      FATHOM_CHECK(p.M <= 65535, "matmul: M = ", p.M, " rows is too many for one launch");
      launch_kernel(zero_rows_kernel, dim3(unsigned(p.M), unsigned(p.batch)), 256, 0, s, p);
      check_launch("matmul (zero_rows_kernel)");
    }
    return side_apart();
  }
  if (fp8_activations_take(p)) {
    run_fp8_activations(p, s);
    return side_apart();
  }
  const SideJobs sj = has_side ? side_jobs(side) : SideJobs{};
  bool carried = false;
  switch (p.w_dtype) {
    case DType::F32: carried = run<DType::F32>(p, s, sj); break;
    case DType::BF16: carried = run<DType::BF16>(p, s, sj); break;
    case DType::F16: carried = run<DType::F16>(p, s, sj); break;
    default: carried = run<DType::F8_E4M3>(p, s, sj); break;
  }
  if (!carried) side_apart();
}

void matmul_batch(const MatmulParams* ps, int n, Stream stream) {
  const cudaStream_t s = as_cuda(stream);
  int i = 0;
  while (i < n) {
    // two 9-to-128-row matmuls of the same x (MLA's q_a and kv_a) share the skinny launches
    if (i + 1 < n && check_params(ps[i]) && check_params(ps[i + 1]) && skinny_takes(ps[i]) &&
        skinny_joins(ps[i], ps[i + 1])) {
      switch (ps[i].w_dtype) {
        case DType::BF16: run_skinny<DType::BF16>(ps + i, 2, s); break;
        case DType::F16: run_skinny<DType::F16>(ps + i, 2, s); break;
        default: run_skinny<DType::F8_E4M3>(ps + i, 2, s); break;
      }
      i += 2;
      continue;
    }
    // a run of GEMVs that can share a launch: one dtype, the same M <= 8, K > 0, no batch
    auto joins = [&](const MatmulParams& p) {
      return p.M >= 1 && p.M <= 8 && p.N > 0 && p.K > 0 && p.batch == 1 && p.M == ps[i].M && p.w_dtype == ps[i].w_dtype &&
             (p.norm != nullptr) == (ps[i].norm != nullptr) && !skinny_takes(p);
    };
    int j = i;
    if (check_params(ps[i]) && joins(ps[i])) {
      j = i + 1;
      while (j < n && j - i < kMaxJobs && check_params(ps[j]) && joins(ps[j])) ++j;
    }
    if (j - i >= 2) {
      switch (ps[i].w_dtype) {
        case DType::F32: run_gemv<DType::F32>(ps + i, j - i, s); break;
        case DType::BF16: run_gemv<DType::BF16>(ps + i, j - i, s); break;
        case DType::F16: run_gemv<DType::F16>(ps + i, j - i, s); break;
        default: run_gemv<DType::F8_E4M3>(ps + i, j - i, s); break;
      }
      i = j;
    } else {
      matmul(ps[i], stream);
      ++i;
    }
  }
}

}  // namespace fathom::cuda
