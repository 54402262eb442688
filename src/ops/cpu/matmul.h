// CPU matmul, the hot path of CPU inference: out (M, N) = x (M, K) · Wᵀ with W (N, K) kept in
// the checkpoint's dtype (F32, BF16, F16, or F8_E4M3 with block scales) and dequantized on the
// fly, fp32 accumulation.
//
// Two regimes, chosen by M:
// - decode and small batches (M < 16): memory bound, every weight byte is read exactly once.
//   Each thread takes a contiguous range of weight rows and streams them one row at a time,
//   converting in registers, with up to 4 rows of x sharing each converted weight vector.
// - prefill (M >= 16): compute bound. Each thread dequantizes a panel of 64 weight rows (256
//   columns of K at a time) into a packed fp32 buffer that stays in L2 and multiplies all M
//   rows of x against it with a 6x16 AVX2 outer-product kernel, so the conversion cost is
//   amortized over M.
//
// Splitting is over N only, and each output element is summed in the same order whatever the
// partition, so results are bitwise identical for any number of threads.
#pragma once
#include <cstdint>

#include "core/thread_pool.h"
#include "ops/ops.h"

namespace fathom::cpu {

// out (M, N) = x (M, K) · Wᵀ,  W = w.weight (N, K).
// x and out are row-major contiguous and must not overlap. For F8_E4M3, W[n][k] is
// fp8(W[n][k]) * scale_inv[n / block][k / block]. Throws fathom::Error when the weight is not
// a 2-D tensor of a supported dtype or its scales have the wrong shape. The SIMD path reads the
// fp8 NaN codes (0x7F, 0xFF) as ±480 instead of NaN; checkpoints never contain them.
void matmul(float* out, const float* x, int64_t M, const LinearWeight& w, ThreadPool& pool);

// The oracle for tests: each weight element dequantized with the core/dtype.h converters,
// products and sums in double, one thread. Slow; for tests only.
void matmul_reference(float* out, const float* x, int64_t M, const LinearWeight& w);

// The prefill path for every M with OpenBLAS cblas_sgemm on row-major dequantized panels
// instead of fathom's packed kernel (same panels, same threading). Kept as the peer that
// bench/bench_matmul.cpp measures against, and tested like matmul; the engine does not use it
// because the own kernel measured 1.0-1.5x faster on the development machine.
void matmul_prefill_blas(float* out, const float* x, int64_t M, const LinearWeight& w, ThreadPool& pool);

}  // namespace fathom::cpu
