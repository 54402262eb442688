// The backward passes of training on the GPU (Ops::*_backward, ops.h), each the counterpart of the
// CPU reference in src/ops/cpu/backward.cpp, whose header states the math; tests/test_cuda_backward.cpp
// compares them on fresh random inputs. F32 throughout.
//
// These are the correct first versions: the linear layer's two products go to cuBLAS (SGEMM, no
// TF32), the rest are plain kernels. Attention's backward is in attention_backward.cu. No kernel
// here adds with atomics: every sum runs in a fixed order, so a training run repeats bit for bit.


#include <algorithm>

#include "core/error.h"
#include "ops/cuda/cublas_util.cuh"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/device_util.cuh"

namespace fathom::cuda {
namespace {

// grid (ceil(V / kEmbeddingRows)), block 256: the block owns kEmbeddingRows rows of the table and
// finds, a chunk of 256 ids at a time, the tokens whose id is one of them — in token order (a
// ballot per warp, the warps' counts added in warp order) — then adds their output-gradient rows
// to their ids' rows in that order. Every row of dtable thus sums its tokens in the same order on
// every run (the CPU's order too), with no atomics: GPU training is bit-reproducible.
constexpr int kEmbeddingRows = 64;
__global__ void __launch_bounds__(256) embedding_backward_kernel(float* __restrict__ dtable, const float* __restrict__ dout,
                                                                 const int32_t* __restrict__ ids, int64_t T, int64_t H,
                                                                 int64_t V) {
  pdl_wait();
  __shared__ int32_t found[256];
  __shared__ int warp_found[8];
  const int64_t v0 = int64_t(blockIdx.x) * kEmbeddingRows, v1 = min(V, v0 + kEmbeddingRows);
  const int lane = int(threadIdx.x % 32), warp = int(threadIdx.x / 32);
  for (int64_t c0 = 0; c0 < T; c0 += 256) {
    const int64_t t = c0 + threadIdx.x;
    const int32_t id = t < T ? ids[t] : -1;
    const bool mine = id >= v0 && id < v1;  // ids outside the table are nobody's (the caller checked them)
    const unsigned ballot = __ballot_sync(kFullMask, mine);
    if (lane == 0) warp_found[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
#pragma unroll
    for (int w = 0; w < 8; ++w) before += w < warp ? warp_found[w] : 0, total += warp_found[w];
    if (mine) found[before + __popc(ballot & ((1u << lane) - 1u))] = int32_t(threadIdx.x);
    __syncthreads();
    for (int k = 0; k < total; ++k) {
      const int64_t tk = c0 + found[k];
      float* row = dtable + int64_t(ids[tk]) * H;
      const float* g = dout + tk * H;
      for (int64_t i = threadIdx.x; i < H; i += 256) row[i] += g[i];
    }
    __syncthreads();  // found and warp_found are refilled
  }
}

// Sum over the block; every thread gets it. Ends synchronized.
__device__ float block_sum(float v, float* shared32) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // shared32 may still be read from a previous call
  if (lane == 0) shared32[warp] = v;
  __syncthreads();
  v = lane < int(blockDim.x / 32) ? shared32[lane] : 0.f;
  v = warp_sum(v);
  return v;
}
__device__ float block_max(float v, float* shared32) {
  v = warp_max(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) shared32[warp] = v;
  __syncthreads();
  v = lane < int(blockDim.x / 32) ? shared32[lane] : -INFINITY;
  v = warp_max(v);
  return v;
}

// grid (M), block 256: row m's dx, and its 1/rms into r[m] for the weight's gradient.
__global__ void rmsnorm_backward_dx_kernel(float* __restrict__ dx, float* __restrict__ r_out,
                                           const float* __restrict__ dout, const float* __restrict__ x,
                                           const float* __restrict__ w, int64_t N, float eps) {
  pdl_wait();
  __shared__ float s32[32];
  const float* xr = x + blockIdx.x * N;
  const float* gr = dout + blockIdx.x * N;
  float ss = 0.f, dot = 0.f;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    ss += xr[i] * xr[i];
    dot += gr[i] * w[i] * xr[i];
  }
  ss = block_sum(ss, s32);
  dot = block_sum(dot, s32);
  const float r = rsqrtf(ss / float(N) + eps);
  const float c = r * r * r / float(N) * dot;
  float* o = dx + blockIdx.x * N;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) o[i] = r * gr[i] * w[i] - xr[i] * c;
  if (threadIdx.x == 0) r_out[blockIdx.x] = r;
}

// grid (ceil(N / 256), ceil(M / kNormRows)), block 256: column n's Σ_m dout·x·r over the block's
// kNormRows rows, into partials[blockIdx.y · N + n]; rmsnorm_backward_dw_sum_kernel then adds each
// column's partial sums in row-block order (no atomics: the same sum on every run).
constexpr int kNormRows = 64;
__global__ void rmsnorm_backward_dw_kernel(float* __restrict__ partials, const float* __restrict__ r,
                                           const float* __restrict__ dout, const float* __restrict__ x, int64_t M,
                                           int64_t N) {
  pdl_wait();
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const int64_t m0 = int64_t(blockIdx.y) * kNormRows, m1 = min(M, m0 + kNormRows);
  float s = 0.f;
  for (int64_t m = m0; m < m1; ++m) s += dout[m * N + n] * x[m * N + n] * r[m];
  partials[int64_t(blockIdx.y) * N + n] = s;
}
__global__ void rmsnorm_backward_dw_sum_kernel(float* __restrict__ dweight, const float* __restrict__ partials,
                                               int64_t blocks, int64_t N) {
  pdl_wait();
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  float s = 0.f;
  for (int64_t b = 0; b < blocks; ++b) s += partials[b * N + n];
  dweight[n] += s;
}

__global__ void silu_mul_backward_kernel(float* __restrict__ dgate, float* __restrict__ dup,
                                         const float* __restrict__ dout, const float* __restrict__ gate,
                                         const float* __restrict__ up, int64_t n) {
  pdl_wait();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float g = gate[i], u = up[i], d = dout[i];
    const float sg = 1.0f / (1.0f + expf(-g));
    dgate[i] = d * u * sg * (1.0f + g * (1.0f - sg));
    dup[i] = d * g * sg;
  }
}

// grid (T), block 256: the row's log-sum-exp, its loss and its gradient (in place when dlogits is
// logits: every thread reads its own elements before writing them, and the target logit is read
// before the block's first write).
__global__ void cross_entropy_backward_kernel(float* __restrict__ losses, float* dlogits, const float* logits,
                                              const int32_t* __restrict__ targets, int64_t V, float dloss) {
  pdl_wait();
  __shared__ float s32[32];
  const int64_t t = blockIdx.x;
  const float* l = logits + t * V;
  float* d = dlogits + t * V;
  const int32_t target = targets[t];
  if (target < 0 || target >= V) {  // padding (the launcher rejected targets >= V)
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) d[v] = 0.f;
    if (threadIdx.x == 0) losses[t] = 0.f;
    return;
  }
  float mx = -INFINITY;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) mx = fmaxf(mx, l[v]);
  mx = block_max(mx, s32);
  float sum = 0.f;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) sum += expf(l[v] - mx);
  sum = block_sum(sum, s32);
  const float lse = mx + logf(sum);
  const float target_logit = l[target];
  __syncthreads();  // every thread has the target logit before any writes
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) d[v] = expf(l[v] - lse) * dloss;
  __syncthreads();
  if (threadIdx.x == 0) {
    d[target] = expm1f(target_logit - lse) * dloss;  // p − 1 without cancellation
    losses[t] = lse - target_logit;
  }
}

// One thread per token: the scores of all experts (softmax needs them all), then the chain rule
// through the chosen experts' weights (see the CPU reference for the formulas).
constexpr int kMaxExperts = 512, kMaxTopK = 16;
__global__ void moe_gate_backward_kernel(float* __restrict__ dlogits, const float* __restrict__ dweights,
                                         const float* __restrict__ logits, const int32_t* __restrict__ experts,
                                         int64_t T, MoeGateParams p) {
  pdl_wait();
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const int E = p.n_experts, K = p.top_k;
  const float* l = logits + t * E;
  float* dl = dlogits + t * E;
  const bool sigmoid = p.scoring == ScoringFunc::Sigmoid;
  float mx = -INFINITY, sum = 0.f;
  if (!sigmoid) {
    for (int e = 0; e < E; ++e) mx = fmaxf(mx, l[e]);
    for (int e = 0; e < E; ++e) sum += expf(l[e] - mx);
  }
  auto score = [&](int e) { return sigmoid ? 1.0f / (1.0f + expf(-l[e])) : expf(l[e] - mx) / sum; };
  const int32_t* ids = experts + t * K;
  const float* dw = dweights + t * K;
  float raw_sum = 0.f, dot = 0.f;
  for (int k = 0; k < K; ++k) {
    const float s = score(ids[k]);
    raw_sum += s;
    dot += dw[k] * s;
  }
  const float rsf = p.routed_scaling_factor, denom = raw_sum + 1e-20f;
  // dscore of expert e: the sum over the slots that chose it (a slot list, no E-sized array)
  auto dscore = [&](int e) {
    float d = 0.f;
    for (int k = 0; k < K; ++k)
      if (ids[k] == e) d += p.norm_topk_prob ? rsf * (dw[k] / denom - dot / (denom * denom)) : rsf * dw[k];
    return d;
  };
  if (sigmoid) {
    for (int e = 0; e < E; ++e) dl[e] = 0.f;
    for (int k = 0; k < K; ++k) {
      const int e = ids[k];
      bool first = true;  // an expert listed twice gets its summed dscore once
      for (int j = 0; j < k; ++j) first &= ids[j] != e;
      if (!first) continue;
      const float s = score(e);
      dl[e] = dscore(e) * s * (1.0f - s);
    }
  } else {
    float sd = 0.f;  // Σ_e s_e dscore_e: only chosen experts have a dscore
    for (int k = 0; k < K; ++k) {
      bool first = true;
      for (int j = 0; j < k; ++j) first &= ids[j] != ids[k];
      if (first) sd += score(ids[k]) * dscore(ids[k]);
    }
    for (int e = 0; e < E; ++e) dl[e] = -score(e) * sd;
    for (int k = 0; k < K; ++k) {
      const int e = ids[k];
      bool first = true;
      for (int j = 0; j < k; ++j) first &= ids[j] != e;
      if (first) dl[e] += score(e) * dscore(e);
    }
  }
}

__global__ void mul_rows_kernel(float* __restrict__ x, const float* __restrict__ s, int64_t N) {
  pdl_wait();
  const float f = s[blockIdx.x];
  float* r = x + int64_t(blockIdx.x) * N;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) r[i] *= f;
}
// The same over rows of a multiple of 4 floats, 16 bytes a thread (x 16-byte aligned).
__global__ void mul_rows4_kernel(float4* __restrict__ x, const float* __restrict__ s, int64_t n4, int64_t N4) {
  pdl_wait();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n4; i += int64_t(gridDim.x) * blockDim.x) {
    const float f = s[i / N4];
    float4 v = x[i];
    v.x *= f, v.y *= f, v.z *= f, v.w *= f;
    x[i] = v;
  }
}
// grid-stride: out[t, c] = Σ_h in[t·its + h·ihs + c] over h in order (Ops::sum_heads).
__global__ void sum_heads_kernel(float* __restrict__ out, int64_t ots, const float* __restrict__ in, int64_t its,
                                 int64_t ihs, int64_t n, int heads, int cols) {
  pdl_wait();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n * cols; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / cols;
    const int c = int(i % cols);
    const float* src = in + t * its + c;
    float acc = 0.f;
    for (int h = 0; h < heads; ++h) acc += src[int64_t(h) * ihs];
    out[t * ots + c] = acc;
  }
}
__global__ void row_dot_kernel(float* __restrict__ out, const float* __restrict__ a, const float* __restrict__ b,
                               int64_t N) {
  pdl_wait();
  __shared__ float s32[32];
  const float* ar = a + int64_t(blockIdx.x) * N;
  const float* br = b + int64_t(blockIdx.x) * N;
  float d = 0.f;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) d += ar[i] * br[i];
  d = block_sum(d, s32);
  if (threadIdx.x == 0) out[blockIdx.x] = d;
}

// grid (T), block 256: out[t] (+)= Σ_k in[pos[t, k]] over the k with 0 <= pos < P, in order of k.
__global__ void gather_sum_rows_kernel(float* __restrict__ out, const float* __restrict__ in,
                                       const int32_t* __restrict__ pos, int64_t N, int K, int64_t P, bool accumulate) {
  pdl_wait();
  const int64_t t = blockIdx.x;
  const int32_t* pt = pos + t * K;
  float* o = out + t * N;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    float acc = accumulate ? o[j] : 0.f;
    for (int k = 0; k < K; ++k) {
      const int32_t r = pt[k];
      if (r >= 0 && r < P) acc += in[int64_t(r) * N + j];
    }
    o[j] = acc;
  }
}

}  // namespace

void gather_sum_rows(float* out, const float* in, const int32_t* pos, int64_t T, int64_t N, int K, int64_t P,
                     bool accumulate, Stream stream) {
  if (T == 0 || N == 0) return;
  FATHOM_CHECK(T < (int64_t(1) << 31), "gather_sum_rows: ", T, " rows is too many for one launch.");
  const unsigned threads = unsigned(std::min<int64_t>(256, (N + 31) / 32 * 32));
  launch_kernel(gather_sum_rows_kernel, unsigned(T), threads, 0, as_cuda(stream), out, in, pos, N, K, P, accumulate);
  check_launch("gather_sum_rows");
}

void embedding_backward(float* dtable, const float* dout, const int32_t* ids, int64_t T, int64_t H, int64_t V,
                        Stream stream) {
  if (T == 0 || H == 0) return;
  FATHOM_ASSERT(dtable && dout && ids, "embedding_backward with a null pointer");
  launch_kernel(embedding_backward_kernel, grid_blocks(V, kEmbeddingRows), 256, 0, as_cuda(stream), dtable, dout, ids, T,
                H, V);
  check_launch("embedding_backward");
}

void rmsnorm_backward(float* dx, float* dweight, const float* dout, const float* x, const float* w, int64_t M,
                      int64_t N, float eps, Stream stream) {
  if (M == 0 || N == 0) return;
  FATHOM_ASSERT(dx && dweight && dout && x && w, "rmsnorm_backward with a null pointer");
  const int64_t row_blocks = (M + kNormRows - 1) / kNormRows;  // the weight gradient's partial sums
  FATHOM_CHECK(row_blocks <= 65535, "rmsnorm_backward: ", M, " rows is too many for one launch.");
  StreamScratch r(size_t(M) * sizeof(float), as_cuda(stream), "rmsnorm_backward");
  launch_kernel(rmsnorm_backward_dx_kernel, unsigned(M), 256, 0, as_cuda(stream), dx, r.as<float>(), dout, x, w, N,
                eps);
  check_launch("rmsnorm_backward (dx)");
  StreamScratch partials(size_t(row_blocks) * size_t(N) * sizeof(float), as_cuda(stream), "rmsnorm_backward");
  launch_kernel(rmsnorm_backward_dw_kernel, dim3(grid_blocks(N, 256), unsigned(row_blocks)), 256, 0, as_cuda(stream),
                partials.as<float>(), static_cast<const float*>(r.as<float>()), dout, x, M, N);
  check_launch("rmsnorm_backward (dweight, partial sums)");
  launch_kernel(rmsnorm_backward_dw_sum_kernel, grid_blocks(N, 256), 256, 0, as_cuda(stream), dweight,
                static_cast<const float*>(partials.as<float>()), row_blocks, N);
  check_launch("rmsnorm_backward (dweight)");
}

void silu_mul_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, int64_t n,
                       Stream stream) {
  if (n == 0) return;
  FATHOM_ASSERT(dgate && dup && dout && gate && up, "silu_mul_backward with a null pointer");
  launch_kernel(silu_mul_backward_kernel, grid_blocks(n, 256, kGridStrideBlocks), 256, 0, as_cuda(stream), dgate, dup,
                dout, gate, up, n);
  check_launch("silu_mul_backward");
}

void cross_entropy_backward(float* losses, float* dlogits, const float* logits, const int32_t* targets, int64_t T,
                            int64_t V, float dloss, Stream stream) {
  if (T == 0) return;
  FATHOM_ASSERT(losses && dlogits && logits && targets && V > 0, "cross_entropy_backward with a null pointer");
  FATHOM_CHECK(T < (int64_t(1) << 31), "cross_entropy_backward: ", T, " rows is too many for one launch.");
  launch_kernel(cross_entropy_backward_kernel, unsigned(T), 256, 0, as_cuda(stream), losses, dlogits, logits, targets, V,
                dloss);
  check_launch("cross_entropy_backward");
}

void moe_gate_backward(float* dlogits, const float* dweights, const float* logits, const int32_t* experts, int64_t T,
                       const MoeGateParams& p, Stream stream) {
  if (T == 0) return;
  FATHOM_CHECK(p.n_experts > 0 && p.n_experts <= kMaxExperts && p.top_k > 0 && p.top_k <= kMaxTopK,
               "moe_gate_backward: ", p.n_experts, " experts, top ", p.top_k, " (the CUDA op takes up to ", kMaxExperts,
               " experts and top ", kMaxTopK, ").");
  launch_kernel(moe_gate_backward_kernel, grid_blocks(T, 128), 128, 0, as_cuda(stream), dlogits, dweights, logits,
                experts, T, p);
  check_launch("moe_gate_backward");
}

void mul_rows(float* x, const float* s, int64_t M, int64_t N, Stream stream) {
  if (M == 0 || N == 0) return;
  FATHOM_CHECK(M < (int64_t(1) << 31), "mul_rows: ", M, " rows is too many for one launch.");
  if (N % 4 == 0 && aligned16(x)) {
    const int64_t n4 = M * N / 4;
    launch_kernel(mul_rows4_kernel, grid_blocks(n4, 256), 256, 0, as_cuda(stream), reinterpret_cast<float4*>(x), s, n4, N / 4);
  } else {
    launch_kernel(mul_rows_kernel, unsigned(M), 256, 0, as_cuda(stream), x, s, N);
  }
  check_launch("mul_rows");
}
void sum_heads(float* out, int64_t out_ts, const float* in, int64_t in_ts, int64_t in_hs, int64_t n, int heads,
               int cols, Stream stream) {
  if (n == 0 || cols == 0) return;
  launch_kernel(sum_heads_kernel, grid_blocks(n * cols, 256), 256, 0, as_cuda(stream), out, out_ts, in, in_ts, in_hs, n, heads, cols);
  check_launch("sum_heads");
}
void row_dot(float* out, const float* a, const float* b, int64_t M, int64_t N, Stream stream) {
  if (M == 0) return;
  FATHOM_CHECK(M < (int64_t(1) << 31), "row_dot: ", M, " rows is too many for one launch.");
  launch_kernel(row_dot_kernel, unsigned(M), 256, 0, as_cuda(stream), out, a, b, N);
  check_launch("row_dot");
}

void matmul_stacked(float* out, const float* x, const float* w, int64_t M, int64_t N, int64_t K, int64_t groups,
                    Stream stream) {
  if (M == 0 || N == 0 || K == 0 || groups == 0) return;
  // out_g (M, N) = x_g (M, K) · W_gᵀ   <=>   out_gᵀ (N, M) = W_g_cm(K, N)ᵀ · x_gᵀ (K, M), per group g
  gemm_f32(CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, 1.0f, w, K, N * K, x, K, M * K, 0.0f, out, N, M * N, groups,
           as_cuda(stream), "matmul_stacked");
}

void matmul_backward(float* dx, float* dw, const float* dout, const float* x, const float* w, int64_t M, int64_t N,
                     int64_t K, Stream stream, int64_t groups) {
  if (M == 0 || N == 0 || K == 0 || groups == 0) return;
  const cudaStream_t s = as_cuda(stream);
  // Row-major A (r × c) is column-major Aᵀ (c × r) with leading dimension c; group g's operands lie
  // g · (its rows × cols) further on.
  if (dx)  // dx (M, K) = dout (M, N) · W (N, K)   <=>   dxᵀ (K, M) = Wᵀ (K, N) · doutᵀ (N, M)
    gemm_f32(CUBLAS_OP_N, CUBLAS_OP_N, K, M, N, 1.0f, w, K, N * K, dout, N, M * N, 0.0f, dx, K, M * K, groups, s,
             "matmul_backward (dx)");
  // dw (N, K) += doutᵀ (N, M) · x (M, K)   <=>   dwᵀ (K, N) += xᵀ (K, M) · dout (M, N)
  gemm_f32(CUBLAS_OP_N, CUBLAS_OP_T, K, N, M, 1.0f, x, K, M * K, dout, N, M * N, 1.0f, dw, K, N * K, groups, s,
           "matmul_backward (dw)");
}

}  // namespace fathom::cuda
