// What the FP8 GEMM's kernels share (fp8_gemm.cu: the Hopper kernels; fp8_gemm_simt.cu: the
// SIMT kernel and the 1x128 quantization): the kernel parameters, where a tile's rows live by
// layout, and how an output pair is stored.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/cuda_ops.h"

namespace fathom::cuda {

constexpr int kTile = 128;  // the K extent of a scale, and the output tile's edge
constexpr int kSimtTile = 64;  // the SIMT kernel's output tile edge

__host__ __device__ inline int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }

struct Fp8GemmArgs {
  void* out;
  int64_t ldo;
  bool out_bf16, accumulate, promote;
  int layout;  // Fp8Layout
  const uint8_t* a;
  const float* a_scale;
  const uint8_t* b;
  const float* b_scale;
  int64_t M, N, K, Kt, NB;  // NB: scale blocks along N per group
  const int32_t* expert;
  const int32_t* count;
};

// A tile's group and rows: A/out rows [row0, row0 + rows_valid) of the group `g` (-1: a padding
// tile of the contiguous layout) against B rows from g * N.
struct TileRows {
  int g;
  int64_t row0;       // first A / out row of the tile
  int64_t rows;       // rows of the tile that are real (<= 128)
};
__device__ inline TileRows tile_rows(const Fp8GemmArgs& p, int64_t m0, int z) {
  TileRows t{0, m0, lmin(kTile, p.M - m0)};
  if (p.layout == int(Fp8Layout::Masked)) {
    t.g = z;
    t.row0 = int64_t(z) * p.M + m0;
    t.rows = lmin(kTile, int64_t(p.count[z]) - m0);
  } else if (p.layout == int(Fp8Layout::Contiguous)) {
    t.g = p.expert[m0];
  }
  return t;
}

// The value written for out row r (absolute) of a tile of group g: the product, or for the
// contiguous layout 0 on a padding row and NaN on a row of another expert (a layout error).
__device__ inline float row_value(const Fp8GemmArgs& p, int g, int64_t r, float v) {
  if (p.layout != int(Fp8Layout::Contiguous)) return v;
  const int e = p.expert[r];
  return e == g ? v : e < 0 ? 0.0f : __int_as_float(0x7fc00000);
}

__device__ inline void store_pair(const Fp8GemmArgs& p, int64_t r, int64_t col, float v0, float v1) {
  if (col >= p.N) return;
  const bool two = col + 1 < p.N;
  if (p.out_bf16) {
    __nv_bfloat16* o = static_cast<__nv_bfloat16*>(p.out) + r * p.ldo + col;
    if (two && (reinterpret_cast<uintptr_t>(o) % 4 == 0)) {
      *reinterpret_cast<__nv_bfloat162*>(o) = __floats2bfloat162_rn(v0, v1);
    } else {
      o[0] = __float2bfloat16_rn(v0);
      if (two) o[1] = __float2bfloat16_rn(v1);
    }
  } else {
    float* o = static_cast<float*>(p.out) + r * p.ldo + col;
    if (p.accumulate) v0 += o[0];
    if (p.accumulate && two) v1 += o[1];
    if (two && (reinterpret_cast<uintptr_t>(o) % 8 == 0)) {
      *reinterpret_cast<float2*>(o) = make_float2(v0, v1);
    } else {
      o[0] = v0;
      if (two) o[1] = v1;
    }
  }
}

// A padding tile (edge `edge`) of the contiguous layout: zeros (NaN on rows that name an expert).
__device__ inline void write_padding_tile(const Fp8GemmArgs& p, int64_t m0, int64_t n0, int64_t edge, int tid, int threads) {
  const int64_t rows = lmin(edge, p.M - m0), cols = lmin(edge, p.N - n0);
  for (int64_t i = tid; i < rows * (cols + 1) / 2; i += threads) {
    const int64_t r = m0 + i / ((cols + 1) / 2), c = n0 + 2 * (i % ((cols + 1) / 2));
    store_pair(p, r, c, row_value(p, -1, r, 0.f), row_value(p, -1, r, 0.f));
  }
}

// The SIMT kernel over the whole product (fp8_gemm_simt.cu); gz: the masked layout's groups, else 1.
void launch_fp8_gemm_simt(const Fp8GemmArgs& args, unsigned gz, cudaStream_t stream);

}  // namespace fathom::cuda
