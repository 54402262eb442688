// The CUDA backend's cuBLAS handle (one per device, created on first use, true F32 products: no
// TF32) and its status check; the training backward (backward.cu) and the F32 GEMM of large
// matmuls (matmul.cu) share them.
#pragma once
#include <cublas_v2.h>

namespace fathom::cuda {

// The current device's handle; each caller sets its stream (cublasSetStream) before a call.
cublasHandle_t cublas_handle();
// A fathom::Error naming `what` unless s is CUBLAS_STATUS_SUCCESS.
void check_cublas(cublasStatus_t s, const char* what);

}  // namespace fathom::cuda
