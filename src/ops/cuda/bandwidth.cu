#include <cuda_profiler_api.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "core/error.h"
#include "ops/cuda/bandwidth.h"
#include "ops/cuda/timing.cuh"

namespace fathom::cuda {

namespace {
void ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(cat("GPU limit measurement: ", what, ": ", cudaGetErrorString(e)));
}
}  // namespace

double copy_bandwidth(size_t bytes, int reps) {
  void *a = nullptr, *b = nullptr;
  ok(cudaMalloc(&a, bytes), "cudaMalloc");
  ok(cudaMalloc(&b, bytes), "cudaMalloc");
  ok(cudaMemset(a, 1, bytes), "cudaMemset");
  const float ms = best_event_ms(reps, nullptr, [&] { ok(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice), "cudaMemcpy"); });
  cudaFree(a);
  cudaFree(b);
  return 2.0 * double(bytes) / (double(ms) * 1e-3);
}

double bf16_gemm_flops(int n, int reps) {
  // C = A · B, all n × n bf16, accumulated in F32 (CUBLAS_COMPUTE_32F): the dense bf16 rate of
  // the tensor cores, as a bf16 training step's matrix products would run.
  const size_t elems = size_t(n) * size_t(n);
  void *a = nullptr, *b = nullptr, *c = nullptr;
  ok(cudaMalloc(&a, elems * 2), "cudaMalloc");
  ok(cudaMalloc(&b, elems * 2), "cudaMalloc");
  ok(cudaMalloc(&c, elems * 2), "cudaMalloc");
  ok(cudaMemset(a, 0x3c, elems * 2), "cudaMemset");  // bf16 0x3c3c ≈ 0.0115: finite, no denormals
  ok(cudaMemset(b, 0x3c, elems * 2), "cudaMemset");
  cublasHandle_t h = nullptr;
  FATHOM_CHECK(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS, "bf16_gemm_flops: cublasCreate failed.");
  const float one = 1.0f, zero = 0.0f;
  const float ms = best_event_ms(reps, nullptr, [&] {  // (the warm-up call also picks the kernel)
    const cublasStatus_t st = cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, a, CUDA_R_16BF, n, b,
                                           CUDA_R_16BF, n, &zero, c, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F,
                                           CUBLAS_GEMM_DEFAULT);
    FATHOM_CHECK(st == CUBLAS_STATUS_SUCCESS, "bf16_gemm_flops: cublasGemmEx failed (status ", int(st), ").");
  });
  cublasDestroy(h);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  return 2.0 * double(n) * n * n / (double(ms) * 1e-3);
}

void profiler_start() { cudaProfilerStart(); }
void profiler_stop() { cudaProfilerStop(); }

}  // namespace fathom::cuda
