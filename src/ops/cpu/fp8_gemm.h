// DeepSeek-V3's FP8 GEMM recipe on the CPU: the reference the Hopper kernel (the FP8 issue's
// wgmma GEMM) is checked against, and the readable statement of what it computes.
//
// - Activations A (M, K) are quantized as they are produced, one scale per 1 x 128 tile of a row:
//   s = max|x| / 448 over the tile, q = e4m3(x / s) (quantize_1x128). A single outlier then
//   costs precision only in its own 128 values, not in the whole row or tensor.
// - Weights B (N, K) are e4m3 with one scale per 128 x 128 block, as the checkpoints store them
//   (`weight_scale_inv`, LinearWeight::scale_inv).
// - out[m, n] = Σ_t (Σ_{k in tile t} qa[m, k] · qb[n, k]) · sa[m, t] · sb[n / 128, t]: the
//   products of one 128-wide K tile are summed (on the GPU: by the tensor cores, whose FP8
//   accumulator keeps ~14 bits), then scaled and added into an fp32 accumulator — "promotion"
//   every 128 of K, which bounds the low-precision sum to 128 terms.
// Here each tile's sum is exact (fp32 products of two e4m3 values are exact; the sum is taken in
// double), so fp8_gemm is the recipe without accumulation error. fp8_gemm_unpromoted models the
// alternative the recipe avoids: one accumulator of `mantissa_bits` bits over all of K.
#pragma once
#include <cstdint>
#include <vector>

#include "ops/ops.h"

namespace fathom {

constexpr int kFp8Tile = 128;  // the K (and weight N) extent of one scale

// q (M, K) e4m3 codes and scales (M, ceil(K / 128)) F32 from x (M, K) F32: per row and 128-wide
// tile, s = max|x| / 448 (1 for an all-zero tile) and q = e4m3(x / s), rounded to nearest even.
void quantize_1x128(uint8_t* q, float* scales, const float* x, int64_t M, int64_t K);

// out (M, N) F32 = the recipe's product of quantized activations (quantize_1x128) and an FP8
// weight (N, K) with 128x128 block scales (block 128), promoted to fp32 every 128 of K.
void fp8_gemm(float* out, const uint8_t* qa, const float* sa, int64_t M, const LinearWeight& w);

// The same sum without promotion: every scaled product added into one accumulator rounded to
// `mantissa_bits` explicit bits after each addition (a model of the tensor cores' limited FP8
// accumulation, for contrast; 23 is fp32).
void fp8_gemm_unpromoted(float* out, const uint8_t* qa, const float* sa, int64_t M, const LinearWeight& w,
                         int mantissa_bits);

// Grouped GEMMs for MoE experts (DeepGEMM's two layouts), each row against its expert's weight:
// - contiguous (prefill, training): rows of A sorted by expert, expert[m] the expert of row m
//   (-1: a padding row, whose output is zero).
void fp8_gemm_grouped_contiguous(float* out, const uint8_t* qa, const float* sa, int64_t M,
                                 const std::vector<const LinearWeight*>& experts, const int32_t* expert);
// - masked (decode): A (E, max_m, K), expert e's first count[e] rows are real; out (E, max_m, N),
//   the rows past count[e] are left as they are.
void fp8_gemm_grouped_masked(float* out, const uint8_t* qa, const float* sa, int64_t max_m,
                             const std::vector<const LinearWeight*>& experts, const int32_t* count);

}  // namespace fathom
