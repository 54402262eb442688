// The compute-bound core shared by the dense GEMM (matmul.cu, M > 8) and the grouped expert
// GEMMs (moe_grouped.cu): a thread block computes a BM x BN tile of x · Wᵀ for NW weights that
// share the x rows (NW = 2: gate and up of an expert).
//
// 256 threads; thread (ty, tx) = (tid / 16, tid % 16) owns rows ty*TM + [0, TM) and columns
// g*64 + tx*4 + [0, 4) for g < TN/4 of the tile (tile_row / tile_col), so a warp's reads of a
// weight row in shared memory are contiguous float4s (no bank conflicts). K advances in steps
// of kBK = 16: x (gathered through an optional row index) and W (dequantized to fp32 on the
// way, FP8 times its block scale) are staged k-major in shared memory, and the next step's
// global loads are issued before the current step is multiplied.
#pragma once
#include "ops/cuda/device_util.cuh"

namespace fathom::cuda {

constexpr int kTileThreads = 256;
constexpr int kBK = 16;

// The x rows of a tile: row r is x + row(m0 + r) * ldx with row(i) = index ? index[i] : i,
// for m0 + r < M (rows past M read as zeros).
struct TileRows {
  const float* x;
  int64_t ldx;
  const int32_t* index;
  int64_t m0, M;
  bool vec;  // x and ldx allow float4 loads
};
// One weight (N, K) in its dtype; F8: scale (ceil(N/block), ceil(K/block)).
struct TileWeight {
  const uint8_t* w;
  const float* scale;
};

template <int BM, int BN, int NW>
struct TileSmem {
  float xs[kBK][BM + 4];      // x tile, k-major
  float ws[NW][kBK][BN + 4];  // W tiles dequantized, k-major
};

__device__ inline int tile_row(int i, int TM) { return int(threadIdx.x / 16) * TM + i; }
__device__ inline int tile_col(int j) { return (j / 4) * 64 + int(threadIdx.x % 16) * 4 + j % 4; }

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

// acc[j][i][c] = sum_k x[row i] * W_j[col c] over the whole K, for weight rows [n0, n0 + BN) of
// N. vec_w: weight rows allow the 8-element vector loads (and, for F8, block % 8 == 0).
template <DType D, int BM, int BN, int NW>
__device__ inline void gemm_tile(float (&acc)[NW][BM / 16][BN / 16], TileSmem<BM, BN, NW>& sm, const TileRows& a,
                                 const TileWeight (&wt)[NW], int64_t n0, int64_t N, int64_t K, int block, bool vec_w) {
  constexpr int TM = BM / 16, TN = BN / 16;
  constexpr int E = ElemSize<D>::value;
  constexpr int XL = (BM * 4 + kTileThreads - 1) / kTileThreads;  // float4 pieces of the x tile per thread
  constexpr int WL = (BN * 2 + kTileThreads - 1) / kTileThreads;  // 8-element pieces of a W tile per thread
  static_assert(TM % 2 == 0 && TN % 4 == 0, "tile shape");
  const int tid = threadIdx.x;
  const int64_t scale_cols = D == DType::F8_E4M3 ? ceil_div(K, block) : 0;

  const float* xrow[XL];  // this thread's x rows (null past M)
#pragma unroll
  for (int j = 0; j < XL; ++j) {
    const int s = tid + j * kTileThreads;
    const int64_t i = a.m0 + s / 4;
    xrow[j] = s < BM * 4 && i < a.M ? a.x + (a.index ? int64_t(a.index[i]) : i) * a.ldx : nullptr;
  }

  float xr[XL][4], wr[NW][WL][8];  // the next step, in registers
  auto load = [&](int64_t k0) {
#pragma unroll
    for (int j = 0; j < XL; ++j) {
      const int64_t k = k0 + 4 * ((tid + j * kTileThreads) % 4);
      if (xrow[j] && a.vec && k + 4 <= K) {
        const float4 v = __ldg(reinterpret_cast<const float4*>(xrow[j] + k));
        xr[j][0] = v.x, xr[j][1] = v.y, xr[j][2] = v.z, xr[j][3] = v.w;
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) xr[j][i] = xrow[j] && k + i < K ? __ldg(xrow[j] + k + i) : 0.f;
      }
    }
#pragma unroll
    for (int q = 0; q < NW; ++q)
#pragma unroll
      for (int j = 0; j < WL; ++j) {
        const int s = tid + j * kTileThreads;
        const int64_t row = n0 + s / 2, k = k0 + 8 * (s % 2);
        const bool in = s < BN * 2 && row < N;
        const uint8_t* wrow = wt[q].w + row * K * E;
        const float* srow = D == DType::F8_E4M3 && in ? wt[q].scale + (row / block) * scale_cols : nullptr;
        if (in && vec_w && k + 8 <= K) {
          load8<D>(wrow + k * E, wr[q][j]);
          if constexpr (D == DType::F8_E4M3) {
            const float sc = __ldg(srow + int(k) / block);
#pragma unroll
            for (int i = 0; i < 8; ++i) wr[q][j][i] *= sc;
          }
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            float v = 0.f;
            if (in && k + i < K) {
              v = load_elem<D>(wrow, k + i);
              if constexpr (D == DType::F8_E4M3) v *= __ldg(srow + int(k + i) / block);
            }
            wr[q][j][i] = v;
          }
        }
      }
  };
  auto store = [&]() {
#pragma unroll
    for (int j = 0; j < XL; ++j) {
      const int s = tid + j * kTileThreads;
      if (s < BM * 4)
#pragma unroll
        for (int i = 0; i < 4; ++i) sm.xs[4 * (s % 4) + i][s / 4] = xr[j][i];
    }
#pragma unroll
    for (int q = 0; q < NW; ++q)
#pragma unroll
      for (int j = 0; j < WL; ++j) {
        const int s = tid + j * kTileThreads;
        if (s < BN * 2)
#pragma unroll
          for (int i = 0; i < 8; ++i) sm.ws[q][8 * (s % 2) + i][s / 2] = wr[q][j][i];
      }
  };

#pragma unroll
  for (int q = 0; q < NW; ++q)
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[q][i][j] = 0.f;

  const int ty = tid / 16, tx = tid % 16;
  load(0);
  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
    store();
    __syncthreads();
    if (k0 + kBK < K) load(k0 + kBK);  // in flight while this step is multiplied
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float av[TM];
#pragma unroll
      for (int i = 0; i < TM; i += 2) {
        const float2 v = *reinterpret_cast<const float2*>(&sm.xs[kk][ty * TM + i]);
        av[i] = v.x, av[i + 1] = v.y;
      }
#pragma unroll
      for (int q = 0; q < NW; ++q) {
        float bv[TN];
#pragma unroll
        for (int g = 0; g < TN / 4; ++g) {
          const float4 v = *reinterpret_cast<const float4*>(&sm.ws[q][kk][g * 64 + tx * 4]);
          bv[4 * g] = v.x, bv[4 * g + 1] = v.y, bv[4 * g + 2] = v.z, bv[4 * g + 3] = v.w;
        }
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[q][i][j] = fmaf(av[i], bv[j], acc[q][i][j]);
      }
    }
    __syncthreads();
  }
}

}  // namespace fathom::cuda
