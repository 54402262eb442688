// Dense matmul out (M, N) = x (M, K) · Wᵀ with W in its stored dtype (F32, BF16, F16, F8_E4M3
// with block scales), fp32 accumulation; the CUDA counterpart of src/ops/cpu/matmul.cpp.
//
// Two regimes, chosen by M:
// - M <= 8 (decode, small batches): memory bound. gemv_kernel streams every weight byte once
//   with 16-byte loads (gemv.cuh), R = 4 weight rows per 128-thread block (1 when N is too
//   small to fill the GPU with 4-row blocks), all M rows of x reused from L1 for each converted
//   weight vector.
// - M > 8 (prefill): gemm_kernel, a tiled SIMT GEMM: BM x BN output tiles (32x64, 64x64 or
//   128x128 by M), 256 threads each owning a (BM/16) x (BN/16) register tile, K in steps of 16
//   staged through shared memory (k-major, so the inner loop reads float4 columns of both
//   operands). W is dequantized to fp32 while its tile is loaded; the next tile's global loads
//   are issued before the current tile is multiplied.
// A batch dimension (gridDim.y / gridDim.z) with strides serves matmul_per_head.
#include "core/error.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/gemv.cuh"

namespace fathom::cuda {
namespace {

constexpr int kGemvThreads = 128;
constexpr int kGemmThreads = 256;
constexpr int kBK = 16;  // the K step of the tiled GEMM

// ---- GEMV (M <= 8)

// grid (ceil(N / R), batch), block kGemvThreads.
template <DType D, int MP, int R>
__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(MatmulParams p, bool vec) {
  __shared__ float scratch[kGemvThreads / 32 * R * MP];
  __shared__ float result[R * MP];
  constexpr int E = ElemSize<D>::value;
  const int b = blockIdx.y;
  const int64_t n0 = int64_t(blockIdx.x) * R;
  const uint8_t* w = static_cast<const uint8_t*>(p.w) + b * p.w_batch_stride * E;
  const int64_t scale_cols = ceil_div(p.K, p.block);
  GemvRow rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t n = min(n0 + r, p.N - 1);  // past the end: a duplicate whose result is dropped
    rows[r].w = w + n * p.K * E;
    rows[r].scale = D == DType::F8_E4M3 ? p.scale_inv + (n / p.block) * scale_cols : nullptr;
  }
  float acc[R][MP];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MP; ++m) acc[r][m] = 0.f;
  gemv_accumulate<D, MP, R>(acc, rows, p.x + b * p.x_batch_stride, p.ldx, int(p.M), p.K, p.block, vec, 1.f);
  gemv_block_reduce<MP, R>(acc, scratch, result);
  float* out = p.out + b * p.out_batch_stride;
  for (int i = threadIdx.x; i < R * MP; i += blockDim.x) {
    const int r = i / MP, m = i % MP;
    if (m < p.M && n0 + r < p.N) out[m * p.ldo + n0 + r] = result[i];
  }
}

// ---- tiled GEMM (M > 8)

// 8 consecutive weight elements as floats (unscaled); the vector form needs 16-byte aligned
// rows (F8: 8-byte).
template <DType D>
__device__ inline void load8(const uint8_t* p, float* out) {
  if constexpr (D == DType::F32) {
    convert16<D>(__ldg(reinterpret_cast<const uint4*>(p)), out);
    convert16<D>(__ldg(reinterpret_cast<const uint4*>(p) + 1), out + 4);
  } else if constexpr (D == DType::F8_E4M3) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    const uint32_t w[2] = {v.x, v.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float2 a = fp8x2_to_float2(uint16_t(w[i] & 0xffffu));
      const float2 c = fp8x2_to_float2(uint16_t(w[i] >> 16));
      out[4 * i] = a.x;
      out[4 * i + 1] = a.y;
      out[4 * i + 2] = c.x;
      out[4 * i + 3] = c.y;
    }
  } else {
    convert16<D>(__ldg(reinterpret_cast<const uint4*>(p)), out);
  }
}

// grid (ceil(N / BN), ceil(M / BM), batch), block kGemmThreads.
template <DType D, int BM, int BN>
__global__ void __launch_bounds__(kGemmThreads) gemm_kernel(MatmulParams p, bool vec_x, bool vec_w) {
  constexpr int TM = BM / 16, TN = BN / 16;  // register tile of a thread
  constexpr int E = ElemSize<D>::value;
  constexpr int XL = (BM * 4 + kGemmThreads - 1) / kGemmThreads;  // float4 pieces of the x tile per thread
  constexpr int WL = (BN * 2 + kGemmThreads - 1) / kGemmThreads;  // 8-element pieces of the W tile per thread
  static_assert(TM % 2 == 0 && TN % 4 == 0, "tile shape");
  __shared__ __align__(16) float xs[kBK][BM + 4];  // x tile, k-major
  __shared__ __align__(16) float ws[kBK][BN + 4];  // W tile dequantized, k-major

  const int tid = threadIdx.x, b = blockIdx.z;
  const int64_t m0 = int64_t(blockIdx.y) * BM, n0 = int64_t(blockIdx.x) * BN;
  const float* x = p.x + b * p.x_batch_stride;
  const uint8_t* w = static_cast<const uint8_t*>(p.w) + b * p.w_batch_stride * E;
  const int64_t scale_cols = D == DType::F8_E4M3 ? ceil_div(p.K, p.block) : 0;
  const int block = int(p.block);

  float xr[XL][4], wr[WL][8];  // the next tile, in registers
  auto load_tile = [&](int64_t k0) {
#pragma unroll
    for (int j = 0; j < XL; ++j) {
      const int s = tid + j * kGemmThreads, r = s / 4, c = s % 4;
      const int64_t row = m0 + r, k = k0 + 4 * c;
      if (s < BM * 4 && row < p.M && vec_x && k + 4 <= p.K) {
        const float4 v = __ldg(reinterpret_cast<const float4*>(x + row * p.ldx + k));
        xr[j][0] = v.x, xr[j][1] = v.y, xr[j][2] = v.z, xr[j][3] = v.w;
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i)
          xr[j][i] = s < BM * 4 && row < p.M && k + i < p.K ? __ldg(x + row * p.ldx + k + i) : 0.f;
      }
    }
#pragma unroll
    for (int j = 0; j < WL; ++j) {
      const int s = tid + j * kGemmThreads, n = s / 2, h = s % 2;
      const int64_t row = n0 + n, k = k0 + 8 * h;
      const uint8_t* wrow = w + row * p.K * E;
      if (s < BN * 2 && row < p.N && vec_w && k + 8 <= p.K) {
        load8<D>(wrow + k * E, wr[j]);
        if constexpr (D == DType::F8_E4M3) {
          const float sc = __ldg(p.scale_inv + (row / block) * scale_cols + int(k) / block);
#pragma unroll
          for (int i = 0; i < 8; ++i) wr[j][i] *= sc;
        }
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          float v = 0.f;
          if (s < BN * 2 && row < p.N && k + i < p.K) {
            v = load_elem<D>(wrow, k + i);
            if constexpr (D == DType::F8_E4M3)
              v *= __ldg(p.scale_inv + (row / block) * scale_cols + int(k + i) / block);
          }
          wr[j][i] = v;
        }
      }
    }
  };
  auto store_tile = [&]() {
#pragma unroll
    for (int j = 0; j < XL; ++j) {
      const int s = tid + j * kGemmThreads;
      if (s < BM * 4)
#pragma unroll
        for (int i = 0; i < 4; ++i) xs[4 * (s % 4) + i][s / 4] = xr[j][i];
    }
#pragma unroll
    for (int j = 0; j < WL; ++j) {
      const int s = tid + j * kGemmThreads;
      if (s < BN * 2)
#pragma unroll
        for (int i = 0; i < 8; ++i) ws[8 * (s % 2) + i][s / 2] = wr[j][i];
    }
  };

  const int ty = tid / 16, tx = tid % 16;
  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;

  load_tile(0);
  for (int64_t k0 = 0; k0 < p.K; k0 += kBK) {
    store_tile();
    __syncthreads();
    if (k0 + kBK < p.K) load_tile(k0 + kBK);  // in flight while this tile is multiplied
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float a[TM], bv[TN];
#pragma unroll
      for (int i = 0; i < TM; i += 2) {
        const float2 v = *reinterpret_cast<const float2*>(&xs[kk][ty * TM + i]);
        a[i] = v.x, a[i + 1] = v.y;
      }
      // columns g*64 + tx*4 + [0, 4): a warp reads contiguous float4s, free of bank conflicts
#pragma unroll
      for (int g = 0; g < TN / 4; ++g) {
        const float4 v = *reinterpret_cast<const float4*>(&ws[kk][g * 64 + tx * 4]);
        bv[4 * g] = v.x, bv[4 * g + 1] = v.y, bv[4 * g + 2] = v.z, bv[4 * g + 3] = v.w;
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }

  float* out = p.out + b * p.out_batch_stride;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t m = m0 + ty * TM + i;
    if (m >= p.M) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t n = n0 + (j / 4) * 64 + tx * 4 + j % 4;
      if (n < p.N) out[m * p.ldo + n] = acc[i][j];
    }
  }
}

// out rows of zeros (K == 0). grid (M, batch).
__global__ void zero_rows_kernel(MatmulParams p) {
  float* out = p.out + blockIdx.y * p.out_batch_stride + blockIdx.x * p.ldo;
  for (int64_t n = threadIdx.x; n < p.N; n += blockDim.x) out[n] = 0.f;
}

template <DType D, int MP>
void launch_gemv(const MatmulParams& p, cudaStream_t s) {
  constexpr int E = ElemSize<D>::value;
  const bool vec = aligned16(p.w) && p.K * E % 16 == 0 && p.w_batch_stride * E % 16 == 0 && aligned16(p.x) &&
                   p.ldx % 4 == 0 && p.x_batch_stride % 4 == 0 && (D != DType::F8_E4M3 || p.block % 16 == 0);
  // Four rows per block while that still gives every SM several blocks; else one.
  if (ceil_div(p.N, 4) * p.batch >= 8 * sm_count()) {
    gemv_kernel<D, MP, 4><<<dim3(unsigned(ceil_div(p.N, 4)), unsigned(p.batch)), kGemvThreads, 0, s>>>(p, vec);
  } else {
    gemv_kernel<D, MP, 1><<<dim3(unsigned(p.N), unsigned(p.batch)), kGemvThreads, 0, s>>>(p, vec);
  }
  check_launch("matmul (gemv_kernel)");
}

template <DType D, int BM, int BN>
void launch_gemm(const MatmulParams& p, cudaStream_t s) {
  constexpr int E = ElemSize<D>::value;
  const bool vec_x = aligned16(p.x) && p.ldx % 4 == 0 && p.x_batch_stride % 4 == 0;
  const bool vec_w = aligned16(p.w) && p.K * E % 16 == 0 && p.w_batch_stride * E % 16 == 0 &&
                     (D != DType::F8_E4M3 || p.block % 8 == 0);
  const int64_t m_tiles = ceil_div(p.M, BM);
  FATHOM_CHECK(m_tiles <= 65535, "matmul: M = ", p.M, " rows is too many for one launch");
  gemm_kernel<D, BM, BN><<<dim3(unsigned(ceil_div(p.N, BN)), unsigned(m_tiles), unsigned(p.batch)), kGemmThreads, 0,
                           s>>>(p, vec_x, vec_w);
  check_launch("matmul (gemm_kernel)");
}

template <DType D>
void run(const MatmulParams& p, cudaStream_t s) {
  if (p.M <= 1) return launch_gemv<D, 1>(p, s);
  if (p.M <= 2) return launch_gemv<D, 2>(p, s);
  if (p.M <= 4) return launch_gemv<D, 4>(p, s);
  if (p.M <= 8) return launch_gemv<D, 8>(p, s);
  if (p.M <= 32) return launch_gemm<D, 32, 64>(p, s);
  if (p.M <= 64) return launch_gemm<D, 64, 64>(p, s);
  launch_gemm<D, 128, 128>(p, s);
}

}  // namespace

void matmul(const MatmulParams& p, Stream stream) {
  const DType d = p.w_dtype;
  FATHOM_CHECK(d == DType::F32 || d == DType::BF16 || d == DType::F16 || d == DType::F8_E4M3,
               "matmul: weight dtype ", dtype_name(d), " is not supported on CUDA; expected F32, BF16, F16 or F8_E4M3.");
  FATHOM_CHECK(p.M >= 0 && p.N >= 0 && p.K >= 0 && p.batch >= 1, "matmul: invalid shape M ", p.M, " N ", p.N, " K ",
               p.K, " batch ", p.batch, ".");
  FATHOM_CHECK(p.K < (int64_t(1) << 31) && p.N < (int64_t(1) << 31) && p.batch <= 65535, "matmul: N ", p.N, " K ",
               p.K, " batch ", p.batch, " exceed what one launch handles.");
  if (d == DType::F8_E4M3)
    FATHOM_CHECK(p.scale_inv && p.block > 0 && p.batch == 1,
                 "matmul: an F8_E4M3 weight needs scale_inv and a positive block (and no batch).");
  if (p.M == 0 || p.N == 0) return;
  FATHOM_ASSERT(p.out && p.x && p.w, "matmul with a null pointer");
  const cudaStream_t s = as_cuda(stream);
  if (p.K == 0) {
    FATHOM_CHECK(p.M <= 65535, "matmul: M = ", p.M, " rows is too many for one launch");
    zero_rows_kernel<<<dim3(unsigned(p.M), unsigned(p.batch)), 256, 0, s>>>(p);
    return check_launch("matmul (zero_rows_kernel)");
  }
  switch (d) {
    case DType::F32: return run<DType::F32>(p, s);
    case DType::BF16: return run<DType::BF16>(p, s);
    case DType::F16: return run<DType::F16>(p, s);
    default: return run<DType::F8_E4M3>(p, s);
  }
}

}  // namespace fathom::cuda
