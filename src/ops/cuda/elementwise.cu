// Memory-bound CUDA kernels: embedding lookup, random fill, RMSNorm, SwiGLU's silu(gate) * up,
// residual add, strided copies (F32 -> F32/BF16), rotary embeddings and their tables, the fused
// absorbed-MLA cache append, argmax. Each mirrors the CPU op of the same
// name (src/ops/cpu/cpu_ops.cpp); tests/test_cuda_ops.cpp compares them on fresh random inputs.
#include <algorithm>

#include "core/error.h"
#include "core/random_fill.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/small_ops.cuh"

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
  pdl_wait();
  const int64_t t = blockIdx.x;
  const T* row = table + int64_t(ids[t]) * H;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) out[t * H + i] = to_f32(row[i]);
}

// grid (M), block 256: block-wide sum of squares (warp shuffles, then one value per warp).
// x (M, N) += y first when y is given (the residual add fused into the norm); then
// out = x / rms(x) * w. One block per row.
__global__ void rmsnorm_kernel(float* out, float* x, const float* __restrict__ y, const float* __restrict__ w, int64_t N,
                               float eps) {
  pdl_wait();
  float* xr = x + blockIdx.x * N;
  float* o = out + blockIdx.x * N;
  float ss = 0.f;
  if (y) {
    const float* yr = y + blockIdx.x * N;
#pragma unroll 4
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
      const float v = xr[i] + yr[i];
      xr[i] = v;  // read back below by this same thread
      ss += v * v;
    }
  } else {
#pragma unroll 4
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) ss += xr[i] * xr[i];
  }
  const float inv = block_rms_inverse(ss, N, eps);
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) o[i] = xr[i] * inv * w[i];
}

// Threads for one row of N: enough that each handles a few elements (latency, not bandwidth,
// bounds a decode step's norms).
unsigned norm_threads(int64_t N) { return N >= 4096 ? 1024u : N >= 1024 ? 512u : 256u; }

__global__ void silu_mul_kernel(float* out, const float* gate, const float* __restrict__ up, int64_t n) {
  pdl_wait();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float g = gate[i];
    out[i] = g / (1.f + expf(-g)) * up[i];
  }
}

__global__ void add_kernel(float* x, const float* __restrict__ y, int64_t n) {
  pdl_wait();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] += y[i];
}

// add_kernel 16 bytes a thread: x and y 16-byte aligned, n4 float4s.
__global__ void add4_kernel(float4* x, const float4* __restrict__ y, int64_t n4) {
  pdl_wait();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4; i += int64_t(gridDim.x) * blockDim.x) {
    float4 a = x[i];
    const float4 b = y[i];
    a.x += b.x, a.y += b.y, a.z += b.z, a.w += b.w;
    x[i] = a;
  }
}

// F32 copy_kernel over all rows at once, 4 columns a thread (grid-stride): cols, the strides and
// both pointers in whole 16-byte units. Training's large strided copies (its K and V assembly)
// were one 64-thread block per (token, head) row before, and ran at a third of the bandwidth.
__global__ void copy4_kernel(CopyParams p) {
  pdl_wait();
  const int c4 = p.cols / 4;
  const int64_t n = p.n_tokens * p.n_heads * c4;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / c4;
    const int c = int(i % c4) * 4;
    const int64_t t = r / p.n_heads;
    const int h = int(r % p.n_heads);
    const int64_t ot = p.out_token_index ? int64_t(p.out_token_index[t]) : t;
    *reinterpret_cast<float4*>(static_cast<float*>(p.out) + ot * p.out_token_stride + h * p.out_head_stride + c) =
        *reinterpret_cast<const float4*>(p.in + t * p.in_token_stride + h * p.in_head_stride + c);
  }
}

// grid (n_tokens * n_heads rows), threads over the columns of a row.
template <bool kBf16>
__global__ void copy_kernel(CopyParams p) {
  pdl_wait();
  const int64_t t = blockIdx.x / p.n_heads;
  const int h = int(blockIdx.x % p.n_heads);
  const float* in = p.in + t * p.in_token_stride + h * p.in_head_stride;
  const int64_t ot = p.out_token_index ? int64_t(p.out_token_index[t]) : t;
  const int64_t o = ot * p.out_token_stride + h * p.out_head_stride;
  for (int c = threadIdx.x; c < p.cols; c += blockDim.x) {
    if constexpr (kBf16)
      static_cast<uint16_t*>(p.out)[o + c] = f32_to_bf16_bits(in[c]);
    else
      static_cast<float*>(p.out)[o + c] = in[c];
  }
}

// grid (n_tokens * n_heads), threads over the rope_dim / 2 rotated pairs; in place, or into
// p.out when it is set.
__global__ void rope_kernel(RopeParams p) {
  pdl_wait();
  rope_row(p, blockIdx.x, threadIdx.x, blockDim.x);
}

// grid (n_tokens), block norm_threads(kv_lora_rank): one cache row per block (mla_append_row).
template <bool kBf16>
__global__ void mla_cache_append_kernel(MlaAppendParams p) {
  pdl_wait();
  mla_append_row<kBf16>(p, blockIdx.x);
}

// Grid-stride over (t, i): the angles in double, like the CPU.
__global__ void rope_tables_kernel(float* __restrict__ cos_out, float* __restrict__ sin_out,
                                   const int32_t* __restrict__ positions, const double* __restrict__ inv_freq,
                                   int64_t T, int64_t half, float attention_factor) {
  pdl_wait();
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < T * half; j += int64_t(gridDim.x) * blockDim.x) {
    const double angle = double(positions[j / half]) * inv_freq[j % half];
    cos_out[j] = float(cos(angle) * attention_factor);
    sin_out[j] = float(sin(angle) * attention_factor);
  }
}

// grid (B), block 1024: the running best of each thread, then a shuffle and shared-memory
// reduction; a larger value wins, an equal one only with a lower index.
__global__ void argmax_kernel(int32_t* __restrict__ ids, const float* __restrict__ logits, int64_t V) {
  pdl_wait();
  const float* l = logits + blockIdx.x * V;
  float best = -INFINITY;
  int64_t at = V;  // past the end: loses to any element
  // four independent loads in flight per thread, then compared in index order
  const int64_t step = blockDim.x;
  for (int64_t i0 = threadIdx.x; i0 < V; i0 += 4 * step) {
    float v[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) v[b] = i0 + b * step < V ? __ldg(l + i0 + b * step) : -INFINITY;
#pragma unroll
    for (int b = 0; b < 4; ++b)
      if (i0 + b * step < V && (v[b] > best || at == V)) best = v[b], at = i0 + b * step;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float v = __shfl_xor_sync(kFullMask, best, off);
    const int64_t i = __shfl_xor_sync(kFullMask, at, off);
    if (v > best || (v == best && i < at)) best = v, at = i;
  }
  __shared__ float warp_best[32];
  __shared__ int64_t warp_at[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_best[warp] = best, warp_at[warp] = at;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < int(blockDim.x / 32); ++w)
      if (warp_best[w] > best || (warp_best[w] == best && warp_at[w] < at)) best = warp_best[w], at = warp_at[w];
    ids[blockIdx.x] = int32_t(at);
  }
}

// Grid-stride over the elements: core's random_uniform, scaled, rounded like from_f32.
__global__ void fill_random_kernel(void* out, DType dtype, int64_t n, uint64_t seed, float scale) {
  pdl_wait();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float v = scale * random_uniform(seed, uint64_t(i));
    switch (dtype) {
      case DType::F32: static_cast<float*>(out)[i] = v; break;
      case DType::BF16: static_cast<uint16_t*>(out)[i] = f32_to_bf16_bits(v); break;
      case DType::F16: static_cast<uint16_t*>(out)[i] = f32_to_f16_bits(v); break;
      default: static_cast<uint8_t*>(out)[i] = f32_to_fp8_bits(v); break;
    }
  }
}

unsigned threads_for(int64_t n, int max_threads) {
  return unsigned(std::min<int64_t>(max_threads, std::max<int64_t>(32, (n + 31) / 32 * 32)));
}

constexpr int64_t kMaxRows = (int64_t(1) << 31) - 1;  // gridDim.x

}  // namespace

void embedding(float* out, const int32_t* ids, int64_t n_tokens, const void* table, DType dtype, int64_t H,
               Stream stream) {
  FATHOM_CHECK(dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F16, "embedding: table dtype ",
               dtype_name(dtype), " is not supported on CUDA; expected F32, BF16 or F16.");
  if (n_tokens == 0 || H == 0) return;
  FATHOM_CHECK(n_tokens <= kMaxRows, "embedding: ", n_tokens, " tokens is too many for one launch.");
  const cudaStream_t s = as_cuda(stream);
  const dim3 grid{unsigned(n_tokens)}, block{256};
  switch (dtype) {
    case DType::F32: launch_kernel(embedding_kernel<float>, grid, block, 0, s, out, ids, static_cast<const float*>(table), H); break;
    case DType::BF16:
      launch_kernel(embedding_kernel<__nv_bfloat16>, grid, block, 0, s, out, ids, static_cast<const __nv_bfloat16*>(table), H);
      break;
    default: launch_kernel(embedding_kernel<__half>, grid, block, 0, s, out, ids, static_cast<const __half*>(table), H); break;
  }
  check_launch("embedding");
}

void fill_random(void* out, DType dtype, int64_t n, uint64_t seed, float scale, Stream stream) {
  FATHOM_CHECK(dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F16 || dtype == DType::F8_E4M3,
               "fill_random: dtype ", dtype_name(dtype), " is not supported; expected F32, BF16, F16 or F8_E4M3.");
  if (n == 0) return;
  launch_kernel(fill_random_kernel, grid_blocks(n, 256, kGridStrideBlocks), 256, 0, as_cuda(stream), out, dtype, n, seed, scale);
  check_launch("fill_random");
}

void rmsnorm(float* out, const float* x, const float* w, int64_t M, int64_t N, float eps, Stream stream) {
  if (M == 0) return;
  FATHOM_CHECK(M <= kMaxRows, "rmsnorm: ", M, " rows is too many for one launch.");
  // x is only read without a residual; out may alias it
  launch_kernel(rmsnorm_kernel, unsigned(M), norm_threads(N), 0, as_cuda(stream), out, const_cast<float*>(x),
                static_cast<const float*>(nullptr), w, N, eps);
  check_launch("rmsnorm");
}

void add_rmsnorm(float* x, const float* y, float* out, const float* w, int64_t M, int64_t N, float eps, Stream stream) {
  if (M == 0) return;
  FATHOM_CHECK(M <= kMaxRows, "add_rmsnorm: ", M, " rows is too many for one launch.");
  launch_kernel(rmsnorm_kernel, unsigned(M), norm_threads(N), 0, as_cuda(stream), out, x, y, w, N, eps);
  check_launch("add_rmsnorm");
}

void silu_mul(float* out, const float* gate, const float* up, int64_t n, Stream stream) {
  if (n == 0) return;
  launch_kernel(silu_mul_kernel, grid_blocks(n, 256, kGridStrideBlocks), 256, 0, as_cuda(stream), out, gate, up, n);
  check_launch("silu_mul");
}

void add(float* x, const float* y, int64_t n, Stream stream) {
  if (n == 0) return;
  if (n % 4 == 0 && aligned16(x) && aligned16(y))
    launch_kernel(add4_kernel, grid_blocks(n / 4, 256, kGridStrideBlocks), 256, 0, as_cuda(stream), reinterpret_cast<float4*>(x),
                  reinterpret_cast<const float4*>(y), n / 4);
  else
    launch_kernel(add_kernel, grid_blocks(n, 256, kGridStrideBlocks), 256, 0, as_cuda(stream), x, y, n);
  check_launch("add");
}

void copy(const CopyParams& p, Stream stream) {
  FATHOM_CHECK(p.out_dtype == DType::F32 || p.out_dtype == DType::BF16, "copy: output dtype ",
               dtype_name(p.out_dtype), " is not supported; expected F32 or BF16.");
  FATHOM_CHECK(p.n_tokens >= 0 && p.n_heads >= 0 && p.cols >= 0, "copy: negative extent (", p.n_tokens, " tokens, ",
               p.n_heads, " heads, ", p.cols, " columns).");
  const int64_t rows = p.n_tokens * p.n_heads;
  if (rows == 0 || p.cols == 0) return;
  FATHOM_CHECK(rows <= kMaxRows, "copy: ", rows, " rows is too many for one launch.");
  FATHOM_ASSERT(p.out && p.in, "copy with a null pointer");
  const unsigned threads = threads_for(p.cols, 256);
  const bool vec4 = p.out_dtype == DType::F32 && p.cols % 4 == 0 && aligned16(p.out) && aligned16(p.in) &&
                    p.out_token_stride % 4 == 0 && p.out_head_stride % 4 == 0 && p.in_token_stride % 4 == 0 &&
                    p.in_head_stride % 4 == 0;
  if (vec4)
    launch_kernel(copy4_kernel, grid_blocks(rows * p.cols / 4, 256, kGridStrideBlocks), 256, 0, as_cuda(stream), p);
  else if (p.out_dtype == DType::BF16)
    launch_kernel(copy_kernel<true>, unsigned(rows), threads, 0, as_cuda(stream), p);
  else
    launch_kernel(copy_kernel<false>, unsigned(rows), threads, 0, as_cuda(stream), p);
  check_launch("copy");
}

void rope_tables(float* cos, float* sin, const int32_t* positions, const double* inv_freq, int64_t T, int64_t half,
                 float attention_factor, Stream stream) {
  if (T == 0 || half == 0) return;
  FATHOM_ASSERT(cos && sin && positions && inv_freq, "rope_tables with a null pointer");
  launch_kernel(rope_tables_kernel, grid_blocks(T * half, 256, kGridStrideBlocks), 256, 0, as_cuda(stream), cos, sin, positions, inv_freq, T, half,
                                                                           attention_factor);
  check_launch("rope_tables");
}

void argmax(int32_t* ids, const float* logits, int64_t B, int64_t V, Stream stream) {
  if (B == 0) return;
  FATHOM_CHECK(V > 0, "argmax: rows of ", V, " logits have no largest element.");
  FATHOM_CHECK(B <= kMaxRows, "argmax: ", B, " rows is too many for one launch.");
  launch_kernel(argmax_kernel, unsigned(B), 1024, 0, as_cuda(stream), ids, logits, V);
  check_launch("argmax");
}

bool rope_checked(const RopeParams& p) {
  FATHOM_CHECK(p.rope_dim >= 0 && p.rope_dim % 2 == 0, "rope: rope_dim ", p.rope_dim, " must be even.");
  const int64_t rows = p.n_tokens * p.n_heads;
  if (rows == 0 || p.rope_dim == 0) return false;
  FATHOM_CHECK(rows <= kMaxRows, "rope: ", rows, " (token, head) rows is too many for one launch.");
  FATHOM_ASSERT(p.x && p.cos && p.sin, "rope with a null pointer");
  return true;
}

void rope(const RopeParams& p, Stream stream) {
  if (!rope_checked(p)) return;
  launch_kernel(rope_kernel, unsigned(p.n_tokens * p.n_heads), threads_for(p.rope_dim / 2, 128), 0, as_cuda(stream), p);
  check_launch("rope");
}

bool mla_append_checked(const MlaAppendParams& p) {
  FATHOM_CHECK(p.out_dtype == DType::F32 || p.out_dtype == DType::BF16, "mla_cache_append: cache dtype ",
               dtype_name(p.out_dtype), " is not supported; expected F32 or BF16.");
  FATHOM_CHECK(p.rope_dim >= 0 && p.rope_dim % 2 == 0, "mla_cache_append: rope_dim ", p.rope_dim, " must be even.");
  FATHOM_CHECK(p.kv_lora_rank > 0 && p.n_tokens >= 0, "mla_cache_append: kv_lora_rank ", p.kv_lora_rank, " and ",
               p.n_tokens, " tokens; expected a positive rank and no negative count.");
  if (p.n_tokens == 0) return false;
  FATHOM_CHECK(p.n_tokens <= kMaxRows, "mla_cache_append: ", p.n_tokens, " tokens is too many for one launch.");
  FATHOM_ASSERT(p.out && p.kv && p.norm_weight && (p.rope_dim == 0 || (p.cos && p.sin)),
                "mla_cache_append with a null pointer");
  return true;
}

void mla_cache_append(const MlaAppendParams& p, Stream stream) {
  if (!mla_append_checked(p)) return;
  const unsigned threads = norm_threads(p.kv_lora_rank);
  if (p.out_dtype == DType::BF16)
    launch_kernel(mla_cache_append_kernel<true>, unsigned(p.n_tokens), threads, 0, as_cuda(stream), p);
  else
    launch_kernel(mla_cache_append_kernel<false>, unsigned(p.n_tokens), threads, 0, as_cuda(stream), p);
  check_launch("mla_cache_append");
}

}  // namespace fathom::cuda
