// The bodies of the small per-row ops as device functions, so that a kernel of another family
// can run them in its own launch: their kernels in elementwise.cu are one call each, and the
// decode GEMV (matmul.cu) runs the q_pe RoPE and the latent-cache append in spare blocks of the
// W_UK launch (GemvSide), one kernel boundary less for each.
#pragma once
#include "ops/cuda/device_util.cuh"
#include "ops/ops.h"

namespace fathom::cuda {

// 1 / sqrt(mean + eps) of a row whose squares this block's threads summed into ss (each its
// share); every thread gets the result. Ends synchronized.
__device__ inline float block_rms_inverse(float ss, int64_t n, float eps) {
  ss = warp_sum(ss);
  __shared__ float warp_sums[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = ss;
  __syncthreads();
  if (warp == 0) {
    ss = warp_sum(lane < int(blockDim.x / 32) ? warp_sums[lane] : 0.f);
    if (lane == 0) warp_sums[0] = rsqrtf(ss / float(n) + eps);
  }
  __syncthreads();
  return warp_sums[0];
}

// RoPE of (token, head) row `row` (row = t * n_heads + h), its rope_dim / 2 pairs dealt to
// `parts` threads of which this is `part`; in place, or into p.out when it is set.
__device__ inline void rope_row(const RopeParams& p, int64_t row, int part, int parts) {
  const int64_t t = row / p.n_heads;
  const int h = int(row % p.n_heads);
  const int half = p.rope_dim / 2;
  float* v = p.x + t * p.token_stride + h * p.head_stride + p.offset;
  float* o = p.out ? p.out + t * p.out_token_stride + h * p.out_head_stride + p.out_offset : v;
  const float* c = p.cos + t * half;
  const float* s = p.sin + t * half;
  for (int i = part; i < half; i += parts) {
    // interleaved: the pair (2i, 2i+1) rotates by angle i; halves: (i, i + half)
    const int a = p.interleaved ? 2 * i : i, b = p.interleaved ? 2 * i + 1 : i + half;
    const float x0 = v[a], x1 = v[b], si = p.inverse ? -s[i] : s[i];
    o[a] = x0 * c[i] - x1 * si;
    o[b] = x1 * c[i] + x0 * si;
  }
}

// Every (row, pair) of p dealt over `threads` threads of which this is `thread` (rows of a few
// pairs each: one block serves all heads of a decode token).
__device__ inline void rope_all(const RopeParams& p, int64_t thread, int64_t threads) {
  const int half = p.rope_dim / 2;
  const int64_t items = p.n_tokens * p.n_heads * half;
  for (int64_t i = thread; i < items; i += threads) rope_row(p, i / half, int(i % half), half);
}

// One latent-cache row by the whole block: the rotated k_pe pairs first (no reduction needed),
// then the block-wide sum of squares of c_kv and the normalised latent; every value is stored
// once, converted to the cache dtype.
template <bool kBf16>
__device__ inline void mla_append_row(const MlaAppendParams& p, int64_t t) {
  const int64_t R = p.kv_lora_rank;
  const int half = p.rope_dim / 2;
  const float* in = p.kv + t * p.kv_token_stride;
  const int64_t row = p.out_token_index ? int64_t(p.out_token_index[t]) : p.pos0 + t;
  const int64_t o = row * (R + p.rope_dim);
  auto store = [&](int64_t i, float v) {
    if constexpr (kBf16)
      static_cast<uint16_t*>(p.out)[o + i] = f32_to_bf16_bits(v);
    else
      static_cast<float*>(p.out)[o + i] = v;
  };
  const float* c = p.cos + t * half;
  const float* s = p.sin + t * half;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const int a = p.interleaved ? 2 * i : i, b = p.interleaved ? 2 * i + 1 : i + half;
    const float x0 = in[R + a], x1 = in[R + b];
    store(R + a, x0 * c[i] - x1 * s[i]);
    store(R + b, x1 * c[i] + x0 * s[i]);
  }
  float ss = 0.f;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < R; i += blockDim.x) ss += in[i] * in[i];
  const float inv = block_rms_inverse(ss, R, p.eps);
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < R; i += blockDim.x) store(i, in[i] * inv * p.norm_weight[i]);
}

}  // namespace fathom::cuda
