// The CUDA backend's cuBLAS handle (one per device, created on first use) and the F32 GEMM every
// cuBLAS product of the backend goes through (cublas_util.cu): the training backward
// (backward.cu, attention_gemm.cu) and the F32 GEMM of large matmuls (matmul.cu).
#pragma once
#include <cstdint>

#include <cublas_v2.h>
#include <cuda_runtime.h>

namespace fathom::cuda {

// The current device's handle; each caller sets its stream (cublasSetStream) before a call.
cublasHandle_t cublas_handle();
// A fathom::Error naming `what` unless s is CUBLAS_STATUS_SUCCESS.
void check_cublas(cublasStatus_t s, const char* what);

// Whether gemm_f32 rounds its inputs to bf16 for the tensor cores (process-wide; Ops::
// set_bf16_matmuls). Off: true F32 products (no TF32), the reference the tests compare against.
void set_bf16_gemms(bool enabled);
bool bf16_gemms();

// C (m × n) = α op(A) op(B) + β C over `batch` matrices `sa`, `sb`, `sc` floats apart, all F32 in
// memory and column-major as cuBLAS sees them; F32 accumulation. With bf16_gemms() the products
// run on tensor cores (CUBLAS_COMPUTE_32F_FAST_16BF: inputs rounded to bf16 — or to TF32, which
// cuBLAS picked on the H200 for F32 operands), else in true F32.
void gemm_f32(cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
              int64_t lda, int64_t sa, const float* b, int64_t ldb, int64_t sb, float beta, float* c, int64_t ldc,
              int64_t sc, int64_t batch, cudaStream_t stream, const char* what);

// The same with A and B BF16 in memory and C F32: true products of the bf16 values, F32
// accumulation (CUBLAS_COMPUTE_32F). The batched-decode matmul (matmul.cu) feeds it x split into
// bf16 high and low parts, which keeps its products at fp32 grade.
void gemm_bf16(cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n, int64_t k, float alpha, const void* a,
               int64_t lda, int64_t sa, const void* b, int64_t ldb, int64_t sb, float beta, float* c, int64_t ldc,
               int64_t sc, int64_t batch, cudaStream_t stream, const char* what);

}  // namespace fathom::cuda
