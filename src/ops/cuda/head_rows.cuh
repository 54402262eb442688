// Copies between the model's per-head rows (F32 or bf16 at any token and head strides, possibly
// through a paged cache's block table) and the contiguous bf16 (rows, heads, width) arrays the
// flash attention kernels take — shared by the model's prefill (attention_flash.cu) and
// training's attention (attention_train_flash.cu).
#pragma once
#include <cstdint>

#include "ops/cuda/device_util.cuh"

namespace fathom::cuda {

// Element i of a (rows, heads, width) array, row-major: its row, head and column.
struct RowHeadCol {
  int64_t r;
  int h, k;
};
__device__ __forceinline__ RowHeadCol row_head_col(int64_t i, int heads, int width) {
  return {i / (int64_t(heads) * width), int(i / width % heads), int(i % width)};
}

// dst (rows, heads, dp) bf16, contiguous: the first d dims of each (row, head) of src (F32 or bf16
// bits; token stride ts, head stride hs; row r at src row block_table[r / bs] · bs + r % bs when a
// block table is given) in bf16, zeros in dims d .. dp - 1.
template <typename T>
__global__ void rows_to_bf16_kernel(uint16_t* __restrict__ dst, const T* __restrict__ src, int64_t ts, int64_t hs,
                                    const int32_t* __restrict__ block_table, int bs, int64_t rows, int heads, int d,
                                    int dp) {
  pdl_wait();
  const int64_t n = rows * heads * dp;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const auto [r, h, k] = row_head_col(i, heads, dp);
    if (k >= d) {
      dst[i] = 0;
      continue;
    }
    const int64_t sr = block_table ? int64_t(block_table[r / bs]) * bs + r % bs : r;
    const T x = src[sr * ts + int64_t(h) * hs + k];
    if constexpr (sizeof(T) == 2) dst[i] = x;
    else dst[i] = f32_to_bf16_bits(x);
  }
}

// dst (F32, token stride ts, head stride hs): the first d dims of each (row, head) of src (rows,
// heads, dp), bf16 bits or F32.
template <typename T>
__global__ void rows_to_f32_kernel(float* __restrict__ dst, int64_t ts, int64_t hs, const T* __restrict__ src,
                                   int64_t rows, int heads, int d, int dp) {
  pdl_wait();
  const int64_t n = rows * heads * d;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const auto [r, h, k] = row_head_col(i, heads, d);
    const T x = src[(r * heads + h) * dp + k];
    if constexpr (sizeof(T) == 2) dst[r * ts + int64_t(h) * hs + k] = bf16_bits_to_f32(x);
    else dst[r * ts + int64_t(h) * hs + k] = x;
  }
}

}  // namespace fathom::cuda
