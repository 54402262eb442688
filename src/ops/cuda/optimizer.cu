// The optimizer's passes on the GPU (Ops::adamw_step, Ops::sum_squares): the AdamW update where
// the weights, gradients and moments live, so that a training step moves no tensor to the host.
// The formula is AdamWStepParams' (ops.h), the same F32 expression as the CPU reference
// (src/ops/cpu/backward.cpp); the sum of squares accumulates in double with a fixed reduction
// order, so that a step is reproducible run to run. A model's ~1,200 tensors are updated (and
// their squares summed) in one launch each, not one per tensor: on the H200 the per-tensor
// launches had been ~12 ms of a 150 ms training step (bench/RESULTS.md, bench_train).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "core/error.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/device_util.cuh"

namespace fathom::cuda {
namespace {

// Element i's update (AdamWStepParams' formula).
__device__ __forceinline__ void adamw_update(float* __restrict__ w, float* __restrict__ m, float* __restrict__ v,
                                             const float* __restrict__ grad, int64_t i, const AdamWStepParams& p) {
  const float g = grad[i] * p.grad_scale;
  float wi = w[i] * p.decay;
  float mi = m[i];
  mi += (1 - p.beta1) * (g - mi);
  const float vi = p.beta2 * v[i] + (1 - p.beta2) * g * g;
  wi -= p.step_size * mi / (sqrtf(vi) / p.bc2_sqrt + p.eps);
  w[i] = wi;
  m[i] = mi;
  v[i] = vi;
}

__global__ void adamw_step_kernel(float* __restrict__ w, float* __restrict__ m, float* __restrict__ v,
                                  const float* __restrict__ grad, int64_t n, AdamWStepParams p) {
  pdl_wait();
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) adamw_update(w, m, v, grad, i, p);
}

// Many tensors cut into chunks of kChunk elements, chunk c (of all tensors', in order) the
// tensors' first[t] + ...: the tensor whose range holds c, by binary search over first.
constexpr int64_t kChunk = 4096;
__device__ __forceinline__ int find_slab(const int64_t* __restrict__ first, int count, int64_t c) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (first[mid] <= c) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// grid (the chunks of every tensor), a block one chunk.
__global__ void adamw_steps_kernel(const AdamWSlab* __restrict__ slabs, const int64_t* __restrict__ first,
                                   int count) {
  pdl_wait();
  const int t = find_slab(first, count, blockIdx.x);
  const AdamWSlab s = slabs[t];
  const int64_t begin = (int64_t(blockIdx.x) - first[t]) * kChunk, end = min(s.n, begin + kChunk);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) adamw_update(s.w, s.m, s.v, s.g, i, s.p);
}

__device__ double block_sum_f64(double x, double* shared32) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared32[warp] = x;
  __syncthreads();
  x = 0;
  if (warp == 0) {
    x = lane < int(blockDim.x >> 5) ? shared32[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  }
  return x;  // the block's sum, in thread 0
}

// The blocks of sum_squares_many's first launch, each one partial sum.
constexpr int kSumSquaresPartials = 512;
// kSumSquaresPartials blocks walk the chunks of all the tensors (block b: chunks b, b + blocks,
// ...) and write their sums to partials[b]: a fixed order, no atomics.
__global__ void sum_squares_many_kernel(double* __restrict__ partials, const float* const* __restrict__ xs,
                                        const int64_t* __restrict__ sizes, const int64_t* __restrict__ first, int count,
                                        int64_t chunks) {
  pdl_wait();
  __shared__ double s32[32];
  double ss = 0;
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const int t = find_slab(first, count, c);
    const float* x = xs[t];
    const int64_t begin = (c - first[t]) * kChunk, end = min(sizes[t], begin + kChunk);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const double e = x[i];
      ss += e * e;
    }
  }
  ss = block_sum_f64(ss, s32);
  if (threadIdx.x == 0) partials[blockIdx.x] = ss;
}

__global__ void sum_partials_kernel(double* __restrict__ out, const double* __restrict__ partials, int count) {
  pdl_wait();
  __shared__ double s32[32];
  double ss = 0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) ss += partials[i];
  ss = block_sum_f64(ss, s32);
  if (threadIdx.x == 0) *out = ss;
}

// grid (the chunks of every region), a block one chunk of kZeroChunk bytes: 16-byte stores where
// the chunk's addresses are aligned, single bytes at its unaligned ends.
constexpr int64_t kZeroChunk = 64 * 1024;
__global__ void zero_many_kernel(uint8_t* const* __restrict__ ptrs, const int64_t* __restrict__ sizes,
                                 const int64_t* __restrict__ first, int count) {
  pdl_wait();
  const int t = find_slab(first, count, blockIdx.x);
  uint8_t* const base = ptrs[t];
  const int64_t begin = (int64_t(blockIdx.x) - first[t]) * kZeroChunk, end = min(sizes[t], begin + kZeroChunk);
  const uintptr_t b = reinterpret_cast<uintptr_t>(base + begin), e = reinterpret_cast<uintptr_t>(base + end);
  const uintptr_t a0 = min(e, (b + 15) & ~uintptr_t(15)), a1 = max(a0, e & ~uintptr_t(15));
  for (uintptr_t p = b + threadIdx.x; p < a0; p += blockDim.x) *reinterpret_cast<uint8_t*>(p) = 0;
  for (uintptr_t p = a1 + threadIdx.x; p < e; p += blockDim.x) *reinterpret_cast<uint8_t*>(p) = 0;
  uint4* w = reinterpret_cast<uint4*>(a0);
  const int64_t words = int64_t(a1 - a0) / 16;
  for (int64_t i = threadIdx.x; i < words; i += blockDim.x) w[i] = make_uint4(0, 0, 0, 0);
}

constexpr int kThreads = 256;

}  // namespace

void zero_many(const std::vector<std::pair<void*, size_t>>& regions, Stream stream) {
  std::vector<void*> ptrs;
  std::vector<int64_t> sizes, first;
  int64_t chunks = 0;
  for (const auto& [p, n] : regions) {
    if (n == 0) continue;
    FATHOM_ASSERT(p, "zero_many with a null pointer");
    ptrs.push_back(p);
    sizes.push_back(int64_t(n));
    first.push_back(chunks);
    chunks += ceil_div(int64_t(n), kZeroChunk);
  }
  if (ptrs.empty()) return;
  FATHOM_CHECK(chunks < (int64_t(1) << 31) && ptrs.size() < (size_t(1) << 30), "zero_many: ", chunks,
               " chunks are too many for one launch.");
  const cudaStream_t s = as_cuda(stream);
  const size_t k = ptrs.size();
  std::vector<uint8_t> table(k * (sizeof(void*) + 2 * sizeof(int64_t)));
  std::memcpy(table.data(), ptrs.data(), k * sizeof(void*));
  std::memcpy(table.data() + k * sizeof(void*), sizes.data(), k * sizeof(int64_t));
  std::memcpy(table.data() + k * (sizeof(void*) + sizeof(int64_t)), first.data(), k * sizeof(int64_t));
  StreamScratch d(table.size(), s, "zero_many (the regions)");
  check(cudaMemcpyAsync(d.as<uint8_t>(), table.data(), table.size(), cudaMemcpyHostToDevice, s), "zero_many (upload)");
  launch_kernel(zero_many_kernel, unsigned(chunks), kThreads, 0, s, reinterpret_cast<uint8_t* const*>(d.as<uint8_t>()),
                reinterpret_cast<const int64_t*>(d.as<uint8_t>() + k * sizeof(void*)),
                reinterpret_cast<const int64_t*>(d.as<uint8_t>() + k * (sizeof(void*) + sizeof(int64_t))), int(k));
  check_launch("zero_many");
}

void adamw_step(float* w, float* m, float* v, const float* grad, int64_t n, const AdamWStepParams& p, Stream stream) {
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>(ceil_div(n, kThreads), 4096);
  launch_kernel(adamw_step_kernel, unsigned(blocks), kThreads, 0, as_cuda(stream), w, m, v, grad, n, p);
  check_launch("adamw_step");
}

void adamw_steps(const std::vector<AdamWSlab>& slabs, Stream stream) {
  std::vector<AdamWSlab> live;
  std::vector<int64_t> first;
  int64_t chunks = 0;
  for (const AdamWSlab& s : slabs) {
    if (s.n == 0) continue;
    FATHOM_ASSERT(s.w && s.m && s.v && s.g, "adamw_steps with a null pointer");
    live.push_back(s);
    first.push_back(chunks);
    chunks += ceil_div(s.n, kChunk);
  }
  if (live.empty()) return;
  FATHOM_CHECK(chunks < (int64_t(1) << 31) && live.size() < (size_t(1) << 30), "adamw_steps: ", chunks,
               " chunks of ", kChunk, " elements are too many for one launch.");
  const cudaStream_t s = as_cuda(stream);
  const size_t b_slabs = live.size() * sizeof(AdamWSlab), b_first = first.size() * sizeof(int64_t);
  StreamScratch d(b_slabs + b_first, s, "adamw_steps (the tensors)");
  check(cudaMemcpyAsync(d.as<uint8_t>(), live.data(), b_slabs, cudaMemcpyHostToDevice, s), "adamw_steps (upload)");
  check(cudaMemcpyAsync(d.as<uint8_t>() + b_slabs, first.data(), b_first, cudaMemcpyHostToDevice, s),
        "adamw_steps (upload)");
  launch_kernel(adamw_steps_kernel, unsigned(chunks), kThreads, 0, s, d.as<const AdamWSlab>(),
                reinterpret_cast<const int64_t*>(d.as<uint8_t>() + b_slabs), int(live.size()));
  check_launch("adamw_steps");
}

void sum_squares_many(double* out, const std::vector<std::pair<const float*, int64_t>>& xs, Stream stream) {
  const cudaStream_t s = as_cuda(stream);
  std::vector<const float*> ptrs;
  std::vector<int64_t> sizes, first;
  int64_t chunks = 0;
  for (const auto& [x, n] : xs) {
    if (n == 0) continue;
    FATHOM_ASSERT(x, "sum_squares with a null pointer");
    ptrs.push_back(x);
    sizes.push_back(n);
    first.push_back(chunks);
    chunks += ceil_div(n, kChunk);
  }
  if (ptrs.empty()) {
    check(cudaMemsetAsync(out, 0, sizeof(double), s), "sum_squares (zero)");
    return;
  }
  const size_t k = ptrs.size();
  StreamScratch d(kSumSquaresPartials * sizeof(double) + k * (sizeof(void*) + 2 * sizeof(int64_t)), s,
                  "sum_squares (the tensors)");
  double* partials = d.as<double>();
  uint8_t* table = d.as<uint8_t>() + kSumSquaresPartials * sizeof(double);
  check(cudaMemcpyAsync(table, ptrs.data(), k * sizeof(void*), cudaMemcpyHostToDevice, s), "sum_squares (upload)");
  check(cudaMemcpyAsync(table + k * sizeof(void*), sizes.data(), k * sizeof(int64_t), cudaMemcpyHostToDevice, s),
        "sum_squares (upload)");
  check(cudaMemcpyAsync(table + k * (sizeof(void*) + sizeof(int64_t)), first.data(), k * sizeof(int64_t),
                        cudaMemcpyHostToDevice, s),
        "sum_squares (upload)");
  const int blocks = int(std::min<int64_t>(chunks, kSumSquaresPartials));
  launch_kernel(sum_squares_many_kernel, unsigned(blocks), kThreads, 0, s, partials,
                reinterpret_cast<const float* const*>(table), reinterpret_cast<const int64_t*>(table + k * sizeof(void*)),
                reinterpret_cast<const int64_t*>(table + k * (sizeof(void*) + sizeof(int64_t))), int(k), chunks);
  check_launch("sum_squares");
  launch_kernel(sum_partials_kernel, 1u, kThreads, 0, s, out, static_cast<const double*>(partials), blocks);
  check_launch("sum_squares (the partial sums)");
}

}  // namespace fathom::cuda
