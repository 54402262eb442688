// The backend's cuBLAS handle and its F32 GEMM (see cublas_util.cuh).
#include "ops/cuda/cublas_util.cuh"

#include <atomic>
#include <mutex>

#include "core/error.h"
#include "ops/cuda/cuda_check.cuh"

namespace fathom::cuda {
namespace {
std::atomic<bool> g_bf16{false};
}  // namespace

// One cuBLAS handle per device, created on first use; each call sets the stream.
cublasHandle_t cublas_handle() {
  static std::mutex mu;
  static cublasHandle_t handles[64] = {};
  const int dev = thread_device();
  std::lock_guard<std::mutex> lock(mu);
  FATHOM_CHECK(dev >= 0 && dev < 64, "cuBLAS: device ", dev, " is out of range.");
  if (!handles[dev]) {
    const cublasStatus_t s = cublasCreate(&handles[dev]);
    FATHOM_CHECK(s == CUBLAS_STATUS_SUCCESS, "cuBLAS could not start (cublasCreate: status ", int(s), ").");
  }
  return handles[dev];
}

void check_cublas(cublasStatus_t s, const char* what) {
  FATHOM_CHECK(s == CUBLAS_STATUS_SUCCESS, what, " failed (cuBLAS status ", int(s), ").");
}

void set_bf16_gemms(bool enabled) { g_bf16 = enabled; }
bool bf16_gemms() { return g_bf16; }

namespace {
// The checks and set-up both GEMMs share: dims within cuBLAS's int range, the handle on `stream`;
// null when there is nothing to compute.
cublasHandle_t gemm_handle(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, int64_t batch,
                           cudaStream_t stream, const char* what) {
  constexpr int64_t kMax = (int64_t(1) << 31) - 1;
  FATHOM_CHECK(m <= kMax && n <= kMax && k <= kMax && lda <= kMax && ldb <= kMax && ldc <= kMax && batch <= kMax, what,
               ": GEMM dims ", m, " x ", n, " x ", k, " (leading dims ", lda, ", ", ldb, ", ", ldc, ", batch ", batch,
               ") exceed cuBLAS's int range.");
  if (m == 0 || n == 0 || batch == 0) return nullptr;
  cublasHandle_t h = cublas_handle();
  check_cublas(cublasSetStream(h, stream), "cublasSetStream");
  return h;
}
}  // namespace

void gemm_f32(cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
              int64_t lda, int64_t sa, const float* b, int64_t ldb, int64_t sb, float beta, float* c, int64_t ldc,
              int64_t sc, int64_t batch, cudaStream_t stream, const char* what) {
  cublasHandle_t h = gemm_handle(m, n, k, lda, ldb, ldc, batch, stream, what);
  if (!h) return;
  const bool bf16 = g_bf16;
  // PEDANTIC: true F32 products (no TF32 behind the library's back); DEFAULT lets the FAST_16BF
  // compute type use the tensor cores.
  check_cublas(cublasSetMathMode(h, bf16 ? CUBLAS_DEFAULT_MATH : CUBLAS_PEDANTIC_MATH), "cublasSetMathMode");
  check_cublas(cublasGemmStridedBatchedEx(h, ta, tb, int(m), int(n), int(k), &alpha, a, CUDA_R_32F, int(lda), sa, b,
                                          CUDA_R_32F, int(ldb), sb, &beta, c, CUDA_R_32F, int(ldc), sc, int(batch),
                                          bf16 ? CUBLAS_COMPUTE_32F_FAST_16BF : CUBLAS_COMPUTE_32F,
                                          CUBLAS_GEMM_DEFAULT),
               what);
}

void gemm_bf16(cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n, int64_t k, float alpha, const void* a,
               int64_t lda, int64_t sa, const void* b, int64_t ldb, int64_t sb, float beta, float* c, int64_t ldc,
               int64_t sc, int64_t batch, cudaStream_t stream, const char* what) {
  cublasHandle_t h = gemm_handle(m, n, k, lda, ldb, ldc, batch, stream, what);
  if (!h) return;
  check_cublas(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
  check_cublas(cublasGemmStridedBatchedEx(h, ta, tb, int(m), int(n), int(k), &alpha, a, CUDA_R_16BF, int(lda), sa, b,
                                          CUDA_R_16BF, int(ldb), sb, &beta, c, CUDA_R_32F, int(ldc), sc, int(batch),
                                          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               what);
}

}  // namespace fathom::cuda
