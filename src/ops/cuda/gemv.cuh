// The memory-bound core shared by the dense GEMV (matmul.cu, M <= 8) and the routed experts
// (moe.cu): a thread block computes R weight rows against up to MP rows of x.
//
// The threads of the block split K in 16-byte pieces of the weight (8 BF16/F16, 16 FP8, 4 F32
// elements): each piece of each of the R rows is loaded once, converted in registers (FP8 scaled
// by its block's scale_inv) and multiplied with the matching x values of every x row, which come
// through L1 as float4 loads. R rows per block give R independent 16-byte loads in flight per
// thread per step and reuse each x vector R times. The per-thread partial sums are reduced over
// the block at the end (gemv_block_reduce).
//
// The vector path needs 16-byte aligned weight rows and x rows (and, for FP8, a block edge
// that is a multiple of 16); otherwise, and for the K % kVec tail, a scalar loop does the work.
#pragma once
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/device_util.cuh"

namespace fathom::cuda {

// One weight row: its bytes and, for FP8, its row of scale_inv (ceil(K/block) floats).
struct GemvRow {
  const uint8_t* w;
  const float* scale;
};

// Row n of an (N, K) weight of dtype D at w, with its scales (FP8: (ceil(N/block), ceil(K/block))).
template <DType D>
__device__ inline GemvRow gemv_row(const void* w, const float* scale_inv, int64_t n, int64_t K, int64_t block) {
  return {static_cast<const uint8_t*>(w) + n * K * ElemSize<D>::value,
          D == DType::F8_E4M3 ? scale_inv + (n / block) * ceil_div(K, block) : nullptr};
}

// An expert's gate rows n0 .. n0+R-1 (rows[0..R)) and up rows (rows[R..2R)); rows past `inter`
// repeat its last row (their results are dropped).
template <DType D, int R>
__device__ inline void gate_up_rows(GemvRow (&rows)[2 * R], const ExpertPointers& ep, int64_t n0, int64_t inter,
                                    int64_t hidden, int64_t block) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t n = min(n0 + r, inter - 1);
    rows[r] = gemv_row<D>(ep.gate, ep.gate_scale, n, hidden, block);
    rows[R + r] = gemv_row<D>(ep.up, ep.up_scale, n, hidden, block);
  }
}

// The rows of x a GEMV multiplies: row m starts at base + (index ? index[m] : m) * ldx (index:
// the gathered tokens of one expert in the grouped MoE path).
struct GemvX {
  const float* base;
  int64_t ldx;
  const int32_t* index = nullptr;
};

// Columns 4c .. 4c+3 of x row xr's piece at k; NORM: their squares added to *ss, and times g.
template <bool NORM>
__device__ inline float4 gemv_x4(const float* xr, int64_t k, int c, const float* __restrict__ g, float* ss) {
  float4 xc = __ldg(reinterpret_cast<const float4*>(xr + k) + c);
  if constexpr (NORM) {
    const float4 gc = __ldg(reinterpret_cast<const float4*>(g + k) + c);
    *ss += xc.x * xc.x + xc.y * xc.y + xc.z * xc.z + xc.w * xc.w;
    xc.x *= gc.x, xc.y *= gc.y, xc.z *= gc.z, xc.w *= gc.w;
  }
  return xc;
}

// acc[r][m] += mult * (this thread's share of) sum_k W_r[k] * x_m[k], for m < M <= MP.
// All R 16-byte loads of a step are issued before any is used; each row's 16-element partial
// dot product is scaled once (mult, and for FP8 the block's scale_inv), not every element.
// K is split over `parts` threads, this one being `part` (by default the whole block).
// NORM (an RMSNorm of x folded in, see InputNorm): x_m[k] is taken times g[k], and sumsq[m]
// gathers x_m[k]² over this thread's k — over the block, the whole row's sum of squares, so
// the caller scales the finished dot products by 1 / rms(x_m) (norm_scale) without a second
// pass over x.
template <DType D, int MP, int R, bool NORM = false>
__device__ inline void gemv_accumulate(float (&acc)[R][MP], const GemvRow (&rows)[R], const GemvX& xs, int M,
                                       int64_t K, int64_t block, bool vec, float mult, int part = threadIdx.x,
                                       int parts = blockDim.x, const float* __restrict__ g = nullptr,
                                       float* sumsq = nullptr) {
  constexpr int V = kVec<D>;
  constexpr int E = ElemSize<D>::value;
  const float* xrow[MP];
#pragma unroll
  for (int m = 0; m < MP; ++m) xrow[m] = xs.base + (m < M ? (xs.index ? int64_t(xs.index[m]) : m) * xs.ldx : 0);
  const int64_t k_vec_end = vec ? K / V * V : 0;
  const int64_t step = int64_t(parts) * V;
#pragma unroll 2
  for (int64_t k = int64_t(part) * V; k < k_vec_end; k += step) {
    uint4 raw[R];
#pragma unroll
    for (int r = 0; r < R; ++r) raw[r] = load16_stream(rows[r].w + k * E);
    float s[R];
    const int kb = D == DType::F8_E4M3 ? int(k) / int(block) : 0;  // K < 2^31 (checked by the launchers)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      s[r] = mult;
      if constexpr (D == DType::F8_E4M3) s[r] *= __ldg(rows[r].scale + kb) * 0x1p60f;  // see fp8x16_scaled_down
    }
    // One x row of FP8 weights (batch-1 decode): each 4 codes decoded where they are used, so that
    // the R rows' 16 floats each never live in registers at once (128 of them at R 8: the expert
    // gate/up kernel ran 4 blocks per SM instead of 9 for bf16). With more x rows a decoded
    // weight serves each of them, so they are decoded once, up front.
    if constexpr (D == DType::F8_E4M3 && MP == 1) {
      float dot[R];
#pragma unroll
      for (int r = 0; r < R; ++r) dot[r] = 0.f;
#pragma unroll
      for (int c = 0; c < V / 4; ++c) {
        const float4 xc = gemv_x4<NORM>(xrow[0], k, c, g, sumsq);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t word = c == 0 ? raw[r].x : c == 1 ? raw[r].y : c == 2 ? raw[r].z : raw[r].w;
          float w4[4];
          fp8x4_scaled_down(word, w4);
          dot[r] += w4[0] * xc.x + w4[1] * xc.y + w4[2] * xc.z + w4[3] * xc.w;
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r][0] += s[r] * (dot[r] * 0x1p60f);
    } else {
      float w[R][V];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if constexpr (D == DType::F8_E4M3) fp8x16_scaled_down(raw[r], w[r]);
        else convert16<D>(raw[r], w[r]);
      }
#pragma unroll
      for (int m = 0; m < MP; ++m) {
        if (m >= M) break;
        float dot[R];
#pragma unroll
        for (int r = 0; r < R; ++r) dot[r] = 0.f;
#pragma unroll
        for (int c = 0; c < V / 4; ++c) {
          const float4 xc = gemv_x4<NORM>(xrow[m], k, c, g, NORM ? sumsq + m : nullptr);
#pragma unroll
          for (int r = 0; r < R; ++r)
            dot[r] += w[r][4 * c] * xc.x + w[r][4 * c + 1] * xc.y + w[r][4 * c + 2] * xc.z + w[r][4 * c + 3] * xc.w;
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if constexpr (D == DType::F8_E4M3) dot[r] *= 0x1p60f;
          acc[r][m] += s[r] * dot[r];
        }
      }
    }
  }
  for (int64_t k = k_vec_end + part; k < K; k += parts) {
    float w[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      w[r] = load_elem<D>(rows[r].w, k) * mult;
      if constexpr (D == DType::F8_E4M3) w[r] *= __ldg(rows[r].scale + int(k) / int(block));
    }
#pragma unroll
    for (int m = 0; m < MP; ++m) {
      if (m >= M) break;
      float xk = __ldg(xrow[m] + k);
      if constexpr (NORM) {
        sumsq[m] += xk * xk;
        xk *= __ldg(g + k);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r][m] += w[r] * xk;
    }
  }
}

// Sums acc over the block; afterwards result[r * MP + m] (shared memory, R*MP floats) holds the
// totals. `scratch` is shared memory of (blockDim.x / 32) * R * MP floats. Ends synchronized.
template <int MP, int R>
__device__ inline void gemv_block_reduce(float (&acc)[R][MP], float* scratch, float* result) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MP; ++m) {
      const float v = warp_sum(acc[r][m]);
      if (lane == 0) scratch[warp * R * MP + r * MP + m] = v;
    }
  __syncthreads();
  for (int i = threadIdx.x; i < R * MP; i += blockDim.x) {
    float s = 0.f;
    for (int w = 0; w < warps; ++w) s += scratch[w * R * MP + i];
    result[i] = s;
  }
  __syncthreads();
}

// The RMSNorm factor of a row whose squares sum (over all K) to sumsq: 1 / sqrt(mean + eps),
// the factor rmsnorm_kernel applies.
__device__ inline float norm_scale(float sumsq, int64_t K, float eps) { return rsqrtf(sumsq / float(K) + eps); }

}  // namespace fathom::cuda
