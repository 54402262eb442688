// The optimizer's passes on the GPU (Ops::adamw_step, Ops::sum_squares): the AdamW update where
// the weights, gradients and moments live, so that a training step moves no tensor to the host.
// The formula is AdamWStepParams' (ops.h), the same F32 expression as the CPU reference
// (src/ops/cpu/backward.cpp); the sum of squares accumulates in double with a fixed reduction
// order, so that a step is reproducible run to run.
#include <cuda_runtime.h>

#include "core/error.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/device_util.cuh"

namespace fathom::cuda {
namespace {

__global__ void adamw_step_kernel(float* __restrict__ w, float* __restrict__ m, float* __restrict__ v,
                                  const float* __restrict__ grad, int64_t n, AdamWStepParams p) {
  pdl_wait();
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
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

// Block b adds the squares of its grid-stride share of x to partials[b]: no atomics, and the
// tensors of one norm are added in stream order, so the sum is the same every run.
__global__ void sum_squares_kernel(double* __restrict__ partials, const float* __restrict__ x, int64_t n) {
  pdl_wait();
  __shared__ double s32[32];
  double ss = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const double e = x[i];
    ss += e * e;
  }
  ss = block_sum_f64(ss, s32);
  if (threadIdx.x == 0) partials[blockIdx.x] += ss;
}

__global__ void sum_partials_kernel(double* __restrict__ out, const double* __restrict__ partials, int count) {
  pdl_wait();
  __shared__ double s32[32];
  double ss = 0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) ss += partials[i];
  ss = block_sum_f64(ss, s32);
  if (threadIdx.x == 0) *out = ss;
}

constexpr int kThreads = 256;

}  // namespace

void adamw_step(float* w, float* m, float* v, const float* grad, int64_t n, const AdamWStepParams& p, Stream stream) {
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>(ceil_div(n, kThreads), 4096);
  launch_kernel(adamw_step_kernel, unsigned(blocks), kThreads, 0, as_cuda(stream), w, m, v, grad, n, p);
  check_launch("adamw_step");
}

void sum_squares_accumulate(double* partials, const float* x, int64_t n, Stream stream) {
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>(ceil_div(n, kThreads), kSumSquaresPartials);
  launch_kernel(sum_squares_kernel, unsigned(blocks), kThreads, 0, as_cuda(stream), partials, x, n);
  check_launch("sum_squares");
}

void sum_squares_finish(double* out, const double* partials, Stream stream) {
  launch_kernel(sum_partials_kernel, 1u, kThreads, 0, as_cuda(stream), out, partials, int(kSumSquaresPartials));
  check_launch("sum_squares (the partial sums)");
}

}  // namespace fathom::cuda
