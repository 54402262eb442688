// Small fp32 vector primitives for the CPU kernels (AVX2/FMA when available).
#pragma once
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FATHOM_VEC_AVX2 1
#endif

namespace fathom::cpu {

#if FATHOM_VEC_AVX2
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
#endif

// sum_i a[i] * b[i]
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.0f;
#if FATHOM_VEC_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  s = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// out[h] = sum_i q[h * q_stride + i] * k[i] for h < n (n <= 8): one key against up to eight
// queries. Each head has its own accumulator, so the FMA chains run in parallel instead of
// one dot product waiting on its own latency; the key is loaded once for all of them.
inline void dot_many(const float* k, const float* q, int64_t q_stride, int n, int64_t d, float* out) {
  int64_t i = 0;
#if FATHOM_VEC_AVX2
  if (n == 8) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (; i + 8 <= d; i += 8) {
      const __m256 kv = _mm256_loadu_ps(k + i);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 0 * q_stride + i), kv, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 1 * q_stride + i), kv, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 2 * q_stride + i), kv, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 3 * q_stride + i), kv, a3);
      a4 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 4 * q_stride + i), kv, a4);
      a5 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 5 * q_stride + i), kv, a5);
      a6 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 6 * q_stride + i), kv, a6);
      a7 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 7 * q_stride + i), kv, a7);
    }
    out[0] = hsum(a0); out[1] = hsum(a1); out[2] = hsum(a2); out[3] = hsum(a3);
    out[4] = hsum(a4); out[5] = hsum(a5); out[6] = hsum(a6); out[7] = hsum(a7);
    for (int64_t j = i; j < d; ++j)
      for (int h = 0; h < 8; ++h) out[h] += q[h * q_stride + j] * k[j];
    return;
  }
#endif
  for (int h = 0; h < n; ++h) out[h] = dot(q + h * q_stride, k, d);
}

// y[i] += alpha * x[i]
inline void axpy(float* y, float alpha, const float* x, int64_t n) {
  int64_t i = 0;
#if FATHOM_VEC_AVX2
  __m256 va = _mm256_set1_ps(alpha);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// y[i] *= alpha
inline void scale(float* y, float alpha, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= alpha;
}

}  // namespace fathom::cpu
