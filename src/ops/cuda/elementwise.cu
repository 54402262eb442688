// Memory-bound CUDA kernels: embedding lookup, RMSNorm, SwiGLU's silu(gate) * up, residual add.
// Each mirrors the CPU op of the same name (src/ops/cpu/cpu_ops.cpp); tests/test_cuda_ops.cpp
// compares them on fresh random inputs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/error.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/cuda_ops.h"

namespace fathom::cuda {
namespace {

template <typename T> __device__ float to_f32(T v);
template <> __device__ float to_f32<float>(float v) { return v; }
template <> __device__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ float to_f32<__half>(__half v) { return __half2float(v); }

// grid (n_tokens), block 256: one row per block, strided over H.
template <typename T>
__global__ void embedding_kernel(float* __restrict__ out, const int32_t* __restrict__ ids, const T* __restrict__ table,
                                 int64_t H) {
  const int64_t t = blockIdx.x;
  const T* row = table + int64_t(ids[t]) * H;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) out[t * H + i] = to_f32(row[i]);
}

// grid (M), block 256: block-wide sum of squares (warp shuffles, then one value per warp).
__global__ void rmsnorm_kernel(float* __restrict__ out, const float* __restrict__ x, const float* __restrict__ w,
                               int64_t N, float eps) {
  const float* xr = x + blockIdx.x * N;
  float* o = out + blockIdx.x * N;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) ss += xr[i] * xr[i];
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  __shared__ float warp_sums[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = ss;
  __syncthreads();
  if (warp == 0) {
    ss = lane < int(blockDim.x / 32) ? warp_sums[lane] : 0.f;
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    if (lane == 0) warp_sums[0] = rsqrtf(ss / float(N) + eps);
  }
  __syncthreads();
  const float inv = warp_sums[0];
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) o[i] = xr[i] * inv * w[i];
}

__global__ void silu_mul_kernel(float* out, const float* gate, const float* __restrict__ up, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float g = gate[i];
    out[i] = g / (1.f + __expf(-g)) * up[i];
  }
}

__global__ void add_kernel(float* x, const float* __restrict__ y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] += y[i];
}

int grid_for(int64_t n, int block) {
  const int64_t g = (n + block - 1) / block;
  return int(g < 65535 * 8 ? (g > 0 ? g : 1) : 65535 * 8);
}

}  // namespace

void embedding(float* out, const int32_t* ids, int64_t n_tokens, const void* table, DType dtype, int64_t H) {
  if (n_tokens == 0) return;
  FATHOM_CHECK(n_tokens < (int64_t(1) << 31), "embedding: ", n_tokens, " tokens is too many for one launch");
  const dim3 grid{static_cast<unsigned>(n_tokens)}, block{256};
  switch (dtype) {
    case DType::F32: embedding_kernel<<<grid, block>>>(out, ids, static_cast<const float*>(table), H); break;
    case DType::BF16: embedding_kernel<<<grid, block>>>(out, ids, static_cast<const __nv_bfloat16*>(table), H); break;
    case DType::F16: embedding_kernel<<<grid, block>>>(out, ids, static_cast<const __half*>(table), H); break;
    default: throw Error(cat("embedding: table dtype ", dtype_name(dtype), " is not supported on CUDA"));
  }
  check_launch("embedding");
}

void rmsnorm(float* out, const float* x, const float* w, int64_t M, int64_t N, float eps) {
  if (M == 0) return;
  FATHOM_CHECK(M < (int64_t(1) << 31), "rmsnorm: ", M, " rows is too many for one launch");
  rmsnorm_kernel<<<unsigned(M), 256>>>(out, x, w, N, eps);
  check_launch("rmsnorm");
}

void silu_mul(float* out, const float* gate, const float* up, int64_t n) {
  if (n == 0) return;
  silu_mul_kernel<<<grid_for(n, 256), 256>>>(out, gate, up, n);
  check_launch("silu_mul");
}

void add(float* x, const float* y, int64_t n) {
  if (n == 0) return;
  add_kernel<<<grid_for(n, 256), 256>>>(x, y, n);
  check_launch("add");
}

}  // namespace fathom::cuda
