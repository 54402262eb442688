#include "ops/cpu/matmul.h"

#include <cblas.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define FATHOM_MATMUL_SIMD 1
#else
#define FATHOM_MATMUL_SIMD 0
#endif

namespace fathom::cpu {

namespace {

// ---- tunables (measured with bench/bench_matmul.cpp on the 2-core Zen3 development machine)

// From this many x rows on, packing a panel of the weight once and reusing it for every row
// beats converting the weight in registers for each group of x rows. With the weight in cache
// packing wins from about 6 rows, but a weight read from DRAM (every layer of a decode step)
// streams through the row kernel at full speed while the packed path stalls on it, so the
// switch is later: at 8 rows the row kernel was 1.9x faster cold and 1.0x hot, at 32 rows
// packing was 1.2x faster cold and 1.6x hot (1536x512 BF16, one thread).
constexpr int64_t kPrefillMinRows = 16;
// The streaming (decode) kernel takes up to this many x rows per pass over a weight row.
constexpr int kGemvMR = 4;
// The prefill micro-kernel: kMicroRows rows of x by kStrip weight rows, as outer products:
// 6 x 2 accumulators + 2 weight vectors + 1 broadcast = 15 ymm registers, and per step of k
// 8 loads feed 12 FMAs (Zen3 sustains 2 FMAs and at most 2 ymm loads a cycle).
constexpr int kMicroRows = 6;
constexpr int64_t kStrip = 16;
// A prefill panel is kPanelRows weight rows by kPanelCols columns of K, dequantized to fp32
// and packed in strips of kStrip rows: 64 KiB that stay in the 512 KiB L2 while the x rows
// stream past (the x rows of one micro-kernel call, 6 KiB, stay in L1).
constexpr int64_t kPanelRows = 64;
constexpr int64_t kPanelCols = 256;
static_assert(kPanelRows % kStrip == 0 && kPanelCols % 8 == 0);
// Waking another thread costs about a microsecond; below this much weight per thread the
// streaming path stays on one thread.
constexpr int64_t kMinGemvBytesPerThread = 24 << 10;
constexpr double kMinPrefillFlopsPerThread = 2e5;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// e4m3 byte -> the f16 bit pattern whose value is the e4m3 value / 256, exactly, subnormals
// included: e4m3 and f16 both put the exponent right after the sign, f16 has one more exponent
// bit (bias 15 instead of 7, hence the 2^-8) and seven more mantissa bits (hence the shift by 7).
// NaN codes (0x7F, 0xFF) come out as ±1.875, i.e. ±480 after the 256 is folded back in.
inline uint16_t fp8_to_f16_div256(uint8_t b) { return uint16_t(((b & 0x7Fu) << 7) | ((b & 0x80u) << 8)); }

// The same conversion as a table, for scalar tails: code -> value / 256.
const std::array<float, 256> kFp8Div256 = [] {
  std::array<float, 256> t{};
  for (int c = 0; c < 256; ++c) t[size_t(c)] = f16_to_f32(fp8_to_f16_div256(uint8_t(c)));
  return t;
}();

// Element k of a weight row as float; F8_E4M3 gives value / 256 (the 256 lives in the scale).
template <DType D>
inline float load1(const uint8_t* row, int64_t k) {
  if constexpr (D == DType::F32) {
    float v;
    std::memcpy(&v, row + 4 * k, 4);
    return v;
  } else if constexpr (D == DType::BF16 || D == DType::F16) {
    uint16_t h;
    std::memcpy(&h, row + 2 * k, 2);
    return D == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
  } else {
    return kFp8Div256[row[k]];
  }
}

void check_weight(const LinearWeight& w) {
  const Tensor& t = w.weight;
  FATHOM_CHECK(t.defined(), "matmul: weight '", w.name, "' has no data.");
  FATHOM_CHECK(t.device() == Device::CPU, "matmul: weight '", w.name, "' is not in CPU memory.");
  FATHOM_CHECK(t.ndim() == 2, "matmul: weight '", w.name, "' has shape ", shape_str(t.shape()),
               "; expected 2 dimensions [out_features, in_features].");
  const DType d = t.dtype();
  FATHOM_CHECK(d == DType::F32 || d == DType::BF16 || d == DType::F16 || d == DType::F8_E4M3,
               "matmul: weight '", w.name, "' has dtype ", dtype_name(d), "; expected F32, BF16, F16 or F8_E4M3.");
  if (d != DType::F8_E4M3) return;
  FATHOM_CHECK(w.block > 0, "matmul: weight '", w.name, "' has quantization block ", w.block,
               "; expected a positive size.");
  const Tensor& s = w.scale_inv;
  const Shape expected = {ceil_div(t.dim(0), w.block), ceil_div(t.dim(1), w.block)};
  FATHOM_CHECK(s.defined() && s.dtype() == DType::F32 && s.shape() == expected, "matmul: FP8 weight '", w.name,
               "' of shape ", shape_str(t.shape()), " needs an F32 scale_inv of shape ", shape_str(expected),
               " for ", w.block, "x", w.block, " blocks; found ",
               s.defined() ? std::string(dtype_name(s.dtype())) + " " + shape_str(s.shape()) : std::string("none"),
               ".");
}

// Everything a chunk of work needs; one per matmul call.
struct Problem {
  float* out;          // (M, N)
  const float* x;      // (M, K)
  int64_t M, N, K;
  const uint8_t* w;    // (N, K) in the weight's dtype
  int64_t row_bytes;   // K * element size
  const float* scale;  // F8_E4M3: (ceil(N/block), ceil(K/block)), else null
  int64_t block;
  int64_t scale_cols;  // ceil(K/block)
};

// The factor that multiplies load1<F8>/load8<F8> values of row n, column block kb.
inline float fp8_scale(const Problem& p, int64_t n, int64_t kb) {
  return p.scale[(n / p.block) * p.scale_cols + kb] * 256.0f;
}

#if FATHOM_MATMUL_SIMD

// Eight elements [k, k+8) of a weight row as floats; F8_E4M3 gives value / 256.
template <DType D>
inline __m256 load8(const uint8_t* row, int64_t k) {
  if constexpr (D == DType::F32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + k);
  } else if constexpr (D == DType::BF16) {
    // bf16 is the top half of an fp32: widen to 32 bits and shift into place.
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (D == DType::F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * k)));
  } else {
    // fp8_to_f16_div256 in three instructions: sign-extending the byte to 16 bits and shifting
    // left by 7 puts exponent and mantissa in place and the sign in bits 15 and 14; clearing
    // bit 14 leaves the f16 pattern.
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k));
    __m128i h = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(b), 7), _mm_set1_epi16(int16_t(0xBFFF)));
    return _mm256_cvtph_ps(h);
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The streaming kernel: one weight row against MR rows of x.
//   out[m*ldo] = sum_k x[m*ldx + k] * W[k],  x: (MR, K) with row stride ldx,  W = load*<D>(w, k): (K)
// One row at a time keeps the weight a single sequential stream, which the hardware
// prefetchers follow best (tiles of 4 interleaved rows measured slower from DRAM); U
// independent accumulators per x row (8, 4, 2, 2 for MR = 1..4) hide the FMA and conversion
// latency when the weight is in cache. Each converted weight vector is used MR times. The
// summation order depends only on MR and K, so any partition of N gives the same bits.
// The line prefetch_bytes ahead is requested as each line is read: it keeps memory busy while
// the core converts (measured to help FP8 most), and prefetches never fault past the end.
template <DType D, int MR>
void gemv_row(float* out, int64_t ldo, const float* x, int64_t ldx, const uint8_t* w, int64_t K,
              int64_t prefetch_bytes) {
  constexpr int U = MR == 1 ? 8 : MR == 2 ? 4 : 2;
  constexpr int64_t kElem = D == DType::F32 ? 4 : D == DType::F8_E4M3 ? 1 : 2;
  __m256 acc[U][MR];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < MR; ++m) acc[u][m] = _mm256_setzero_ps();

  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    for (int u = 0; u < U; ++u) {
      if ((u * 8 * kElem) % 64 == 0)  // once per cache line
        _mm_prefetch(reinterpret_cast<const char*>(w + (k + 8 * u) * kElem + prefetch_bytes), _MM_HINT_T0);
      const __m256 wv = load8<D>(w, k + 8 * u);
      for (int m = 0; m < MR; ++m) acc[u][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k + 8 * u), acc[u][m]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = load8<D>(w, k);
    for (int m = 0; m < MR; ++m) acc[0][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k), acc[0][m]);
  }
  for (int m = 0; m < MR; ++m) {
    // Pairwise, so the tree does not depend on anything but U.
    for (int width = U / 2; width >= 1; width /= 2)
      for (int u = 0; u < width; ++u) acc[u][m] = _mm256_add_ps(acc[u][m], acc[u + width][m]);
    float s = hsum(acc[0][m]);
    for (int64_t kk = k; kk < K; ++kk) s += x[m * ldx + kk] * load1<D>(w, kk);
    out[m * ldo] = s;
  }
}

using GemvFn = void (*)(float*, int64_t, const float*, int64_t, const uint8_t*, int64_t, int64_t);
template <DType D>
constexpr GemvFn kGemvRow[kGemvMR + 1] = {nullptr, &gemv_row<D, 1>, &gemv_row<D, 2>, &gemv_row<D, 3>,
                                          &gemv_row<D, 4>};

// Weight rows [n0, n1) against all M (< kPrefillMinRows) rows of x, converting the weight in
// registers as it streams by.
template <DType D>
void gemv_rows(const Problem& p, const float* x, int64_t n0, int64_t n1) {
  // Far enough ahead to cover the memory latency at one core's share of the bandwidth.
  constexpr int64_t kPrefetchBytes = 2048;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m0 = 0; m0 < p.M; m0 += kGemvMR)
      kGemvRow<D>[std::min<int64_t>(kGemvMR, p.M - m0)](p.out + m0 * p.N + n, p.N, x + m0 * p.K, p.K,
                                                        p.w + n * p.row_bytes, p.K, kPrefetchBytes);
}

template <DType D>
void gemv_chunk(const Problem& p, int64_t n0, int64_t n1) {
  if constexpr (D != DType::F8_E4M3) {
    gemv_rows<D>(p, p.x, n0, n1);
  } else {
    // Rows of one block row share their scales, so instead of scaling each weight vector, x is
    // scaled once per block row: xs[m][k] = x[m][k] * scale_inv[n/block][k/block] * 256.
    thread_local std::vector<float> xs;  // (M, K)
    xs.resize(size_t(p.M * p.K));
    for (int64_t s0 = n0; s0 < n1;) {
      const int64_t s1 = std::min(n1, (s0 / p.block + 1) * p.block);
      for (int64_t kb = 0; kb < p.scale_cols; ++kb) {
        const float s = fp8_scale(p, s0, kb);
        const int64_t k1 = std::min(p.K, (kb + 1) * p.block);
        for (int64_t m = 0; m < p.M; ++m)
          for (int64_t k = kb * p.block; k < k1; ++k) xs[size_t(m * p.K + k)] = p.x[m * p.K + k] * s;
      }
      gemv_rows<D>(p, xs.data(), s0, s1);
      s0 = s1;
    }
  }
}

// ---- prefill

// In-register transpose of an 8x8 block: r[i][j] becomes r[j][i].
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// Weight rows [n0, n0 + rows) (rows <= kStrip), columns [k0, k0 + kc), dequantized to fp32 and
// stored k-major so the micro-kernel reads one contiguous line of 16 weights per k:
// dst (kc, kStrip): dst[k][r] = W[n0 + r][k0 + k], zero for r >= rows.
template <DType D>
void pack_strip(float* dst, const Problem& p, int64_t n0, int64_t rows, int64_t k0, int64_t kc) {
  for (int64_t h = 0; h < kStrip; h += 8) {
    const int64_t valid = std::clamp<int64_t>(rows - h, 0, 8);
    if (valid == 0) {  // past the last weight row
      for (int64_t k = 0; k < kc; ++k) std::memset(dst + k * kStrip + h, 0, 8 * sizeof(float));
      continue;
    }
    const uint8_t* src[8];  // rows past the last weight row repeat it; their values are unused
    for (int64_t i = 0; i < 8; ++i) src[i] = p.w + (n0 + h + std::min(i, valid - 1)) * p.row_bytes;
    int64_t k = 0;
    if (valid == 8) {
      // Full groups of 8 columns that share one scale per row (FP8: within one column block).
      while (k + 8 <= kc) {
        int64_t k_end = kc;
        __m256 scale[8];
        if constexpr (D == DType::F8_E4M3) {
          const int64_t kb = (k0 + k) / p.block;
          k_end = std::min(kc, (kb + 1) * p.block - k0);
          if (k_end - k < 8) break;  // a block narrower than 8 columns here: scalar below
          for (int i = 0; i < 8; ++i) scale[i] = _mm256_set1_ps(fp8_scale(p, n0 + h + i, kb));
        }
        for (; k + 8 <= k_end; k += 8) {
          __m256 v[8];
          for (int i = 0; i < 8; ++i) {
            v[i] = load8<D>(src[i], k0 + k);
            if constexpr (D == DType::F8_E4M3) v[i] = _mm256_mul_ps(v[i], scale[i]);
          }
          transpose8(v);
          for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (k + j) * kStrip + h, v[j]);
        }
        if constexpr (D == DType::F8_E4M3) {
          if (k < k_end) break;  // the block ends inside a group of 8: scalar from here on
        }
      }
    }
    for (; k < kc; ++k) {
      for (int64_t i = 0; i < 8; ++i) {
        float v = 0.0f;
        if (i < valid) {
          v = load1<D>(src[i], k0 + k);
          if constexpr (D == DType::F8_E4M3) v *= fp8_scale(p, n0 + h + i, (k0 + k) / p.block);
        }
        dst[k * kStrip + h + i] = v;
      }
    }
  }
}

// out (MR, nr) (=|+=) x (MR, kc) · strip, with strip (kc, kStrip) from pack_strip and nr <= 16
// its valid columns. Broadcasting x[m][k] against 16 weights per step makes every output a
// plain sum over k in order, so no horizontal reductions are needed.
// One row of the micro-kernel: lo/hi += x[m][k] * (b0, b1).
__attribute__((always_inline)) inline void fma_row(const float* xk, __m256 b0, __m256 b1, __m256& lo, __m256& hi) {
  const __m256 a = _mm256_broadcast_ss(xk);
  lo = _mm256_fmadd_ps(a, b0, lo);
  hi = _mm256_fmadd_ps(a, b1, hi);
}

template <int MR>
void micro(float* out, int64_t ldo, const float* x, int64_t ldx, const float* strip, int64_t kc, int64_t nr,
           bool accumulate) {
  // Named accumulators rather than an array: GCC would otherwise keep the array in memory and
  // store it back on every step of k.
  const __m256 zero = _mm256_setzero_ps();
  __m256 c00 = zero, c01 = zero, c10 = zero, c11 = zero, c20 = zero, c21 = zero;
  __m256 c30 = zero, c31 = zero, c40 = zero, c41 = zero, c50 = zero, c51 = zero;
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(strip + k * kStrip);
    const __m256 b1 = _mm256_loadu_ps(strip + k * kStrip + 8);
    fma_row(x + k, b0, b1, c00, c01);
    if constexpr (MR > 1) fma_row(x + ldx + k, b0, b1, c10, c11);
    if constexpr (MR > 2) fma_row(x + 2 * ldx + k, b0, b1, c20, c21);
    if constexpr (MR > 3) fma_row(x + 3 * ldx + k, b0, b1, c30, c31);
    if constexpr (MR > 4) fma_row(x + 4 * ldx + k, b0, b1, c40, c41);
    if constexpr (MR > 5) fma_row(x + 5 * ldx + k, b0, b1, c50, c51);
  }
  __m256 c[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  if (nr == kStrip) {
    for (int m = 0; m < MR; ++m) {
      float* o = out + m * ldo;
      if (accumulate) {
        c[m][0] = _mm256_add_ps(c[m][0], _mm256_loadu_ps(o));
        c[m][1] = _mm256_add_ps(c[m][1], _mm256_loadu_ps(o + 8));
      }
      _mm256_storeu_ps(o, c[m][0]);
      _mm256_storeu_ps(o + 8, c[m][1]);
    }
  } else {
    // The last strip of a chunk: only nr columns exist (or belong to this thread).
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(nr)), lane);
    const __m256i mask1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(nr) - 8), lane);
    for (int m = 0; m < MR; ++m) {
      float* o = out + m * ldo;
      if (accumulate) {
        c[m][0] = _mm256_add_ps(c[m][0], _mm256_maskload_ps(o, mask0));
        c[m][1] = _mm256_add_ps(c[m][1], _mm256_maskload_ps(o + 8, mask1));
      }
      _mm256_maskstore_ps(o, mask0, c[m][0]);
      _mm256_maskstore_ps(o + 8, mask1, c[m][1]);
    }
  }
}

using MicroFn = void (*)(float*, int64_t, const float*, int64_t, const float*, int64_t, int64_t, bool);
constexpr MicroFn kMicro[kMicroRows + 1] = {nullptr, &micro<1>, &micro<2>, &micro<3>, &micro<4>, &micro<5>, &micro<6>};

// Requests the cache lines of a block of weight rows a few at a time. A panel reads short
// segments of many rows (kc elements each), too short for the hardware prefetchers to pick up
// from DRAM, so while one panel is multiplied the next one is prefetched, spread over the
// micro-kernel calls: all at once would stall on the core's few outstanding-miss slots.
class PanelPrefetch {
 public:
  PanelPrefetch() = default;
  // rows [n0, n0 + rows), bytes [b0, b1) of each row.
  PanelPrefetch(const Problem& p, int64_t n0, int64_t rows, int64_t b0, int64_t b1)
      : base_(p.w + n0 * p.row_bytes + b0), row_bytes_(p.row_bytes), rows_(rows), bytes_(b1 - b0) {}
  int64_t lines() const { return rows_ * ceil_div(bytes_, 64); }
  void issue(int64_t count) {
    for (; count > 0 && row_ < rows_; --count) {
      _mm_prefetch(reinterpret_cast<const char*>(base_ + row_ * row_bytes_ + offset_), _MM_HINT_T0);
      offset_ += 64;
      if (offset_ >= bytes_) {
        offset_ = 0;
        ++row_;
      }
    }
  }

 private:
  const uint8_t* base_ = nullptr;
  int64_t row_bytes_ = 0, rows_ = 0, bytes_ = 0, row_ = 0, offset_ = 0;
};

// Weight rows [n0, n1) against all rows of x, a packed panel at a time.
template <DType D>
void prefill_chunk_packed(const Problem& p, int64_t n0, int64_t n1) {
  constexpr int64_t kElem = D == DType::F32 ? 4 : D == DType::F8_E4M3 ? 1 : 2;
  thread_local std::vector<float> packed;  // (kPanelRows / kStrip, kPanelCols, kStrip)
  packed.resize(size_t(kPanelRows * kPanelCols));
  for (int64_t p0 = n0; p0 < n1; p0 += kPanelRows) {
    const int64_t rows = std::min(kPanelRows, n1 - p0);
    const int64_t strips = ceil_div(rows, kStrip);
    for (int64_t k0 = 0; k0 < p.K; k0 += kPanelCols) {
      const int64_t kc = std::min(kPanelCols, p.K - k0);
      for (int64_t s = 0; s < strips; ++s)
        pack_strip<D>(packed.data() + s * kc * kStrip, p, p0 + s * kStrip, std::min(kStrip, rows - s * kStrip), k0, kc);

      // The next panel: the next slice of these rows, else the first slice of the next rows.
      PanelPrefetch next;
      if (k0 + kc < p.K)
        next = PanelPrefetch(p, p0, rows, (k0 + kc) * kElem, std::min(p.K, k0 + 2 * kc) * kElem);
      else if (p0 + kPanelRows < n1)
        next = PanelPrefetch(p, p0 + kPanelRows, std::min(kPanelRows, n1 - p0 - kPanelRows), 0,
                             std::min(p.K, kPanelCols) * kElem);
      const int64_t calls = ceil_div(p.M, kMicroRows) * strips;
      const int64_t per_call = ceil_div(next.lines(), calls);

      // The x rows of one call (6, kc) stay in L1 while they meet every strip of the panel.
      for (int64_t m0 = 0; m0 < p.M; m0 += kMicroRows)
        for (int64_t s = 0; s < strips; ++s) {
          next.issue(per_call);
          kMicro[std::min<int64_t>(kMicroRows, p.M - m0)](p.out + m0 * p.N + p0 + s * kStrip, p.N,
                                                          p.x + m0 * p.K + k0, p.K, packed.data() + s * kc * kStrip,
                                                          kc, std::min(kStrip, rows - s * kStrip), k0 > 0);
        }
    }
  }
}

#endif  // FATHOM_MATMUL_SIMD

// Weight rows [n0, n0 + rows), columns [k0, k0 + kc) dequantized to fp32: dst (rows, kc).
template <DType D>
void dequantize_panel(float* dst, const Problem& p, int64_t n0, int64_t rows, int64_t k0, int64_t kc) {
  for (int64_t i = 0; i < rows; ++i) {
    const uint8_t* row = p.w + (n0 + i) * p.row_bytes;
    float* d = dst + i * kc;
    // Segments of constant scale: one per column block for FP8, the whole slice otherwise.
    for (int64_t a = k0; a < k0 + kc;) {
      int64_t b = k0 + kc;
      float s = 1.0f;
      if constexpr (D == DType::F8_E4M3) {
        b = std::min(b, (a / p.block + 1) * p.block);
        s = fp8_scale(p, n0 + i, a / p.block);
      }
      int64_t k = a;
#if FATHOM_MATMUL_SIMD
      const __m256 sv = _mm256_set1_ps(s);
      for (; k + 8 <= b; k += 8) {
        __m256 v = load8<D>(row, k);
        if constexpr (D == DType::F8_E4M3) v = _mm256_mul_ps(v, sv);
        _mm256_storeu_ps(d + (k - k0), v);
      }
#endif
      for (; k < b; ++k) d[k - k0] = D == DType::F8_E4M3 ? load1<D>(row, k) * s : load1<D>(row, k);
      a = b;
    }
  }
}

// Weight rows [n0, n1) against all rows of x, a row-major fp32 panel at a time, multiplied by
// OpenBLAS (kBlas) or, without AVX2, by plain loops.
template <DType D, bool kBlas>
void prefill_chunk_rowmajor(const Problem& p, int64_t n0, int64_t n1) {
  thread_local std::vector<float> panel_buf;  // (kPanelRows, kPanelCols)
  for (int64_t p0 = n0; p0 < n1; p0 += kPanelRows) {
    const int64_t rows = std::min(kPanelRows, n1 - p0);
    for (int64_t k0 = 0; k0 < p.K; k0 += kPanelCols) {
      const int64_t kc = std::min(kPanelCols, p.K - k0);
      const float* panel;  // (rows, kc) with row stride ldp
      int64_t ldp;
      if constexpr (D == DType::F32) {
        panel = reinterpret_cast<const float*>(p.w) + p0 * p.K + k0;
        ldp = p.K;
      } else {
        panel_buf.resize(size_t(kPanelRows * kPanelCols));
        dequantize_panel<D>(panel_buf.data(), p, p0, rows, k0, kc);
        panel = panel_buf.data();
        ldp = kc;
      }
      if constexpr (kBlas) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, blasint(p.M), blasint(rows), blasint(kc), 1.0f,
                    p.x + k0, blasint(p.K), panel, blasint(ldp), k0 > 0 ? 1.0f : 0.0f, p.out + p0, blasint(p.N));
      } else {
        for (int64_t m = 0; m < p.M; ++m)
          for (int64_t r = 0; r < rows; ++r) {
            const float* xr = p.x + m * p.K + k0;
            const float* wr = panel + r * ldp;
            float s = 0.0f;
            for (int64_t k = 0; k < kc; ++k) s += xr[k] * wr[k];
            float& o = p.out[m * p.N + p0 + r];
            o = k0 > 0 ? o + s : s;
          }
      }
    }
  }
}

template <DType D>
void run(const Problem& p, ThreadPool& pool, bool blas) {
  const int threads = pool.size();
#if FATHOM_MATMUL_SIMD
  if (!blas && p.M < kPrefillMinRows) {
    // At least kMinGemvBytesPerThread of weight per chunk.
    const int64_t grain = ceil_div(kMinGemvBytesPerThread, p.row_bytes * p.M);
    pool.parallel_for(p.N, [&](int64_t b, int64_t e, int) { gemv_chunk<D>(p, b, e); }, grain);
    return;
  }
#endif
  // Panels of kPanelRows, smaller when that would leave threads idle, and one thread for
  // problems too small to pay for waking the others.
  int64_t grain = std::min(kPanelRows, round_up(ceil_div(p.N, threads), kStrip));
  if (2.0 * double(p.M) * double(p.N) * double(p.K) < kMinPrefillFlopsPerThread * 2) grain = p.N;
  if (blas) {
    pool.parallel_for(p.N, [&](int64_t b, int64_t e, int) { prefill_chunk_rowmajor<D, true>(p, b, e); }, grain);
    return;
  }
#if FATHOM_MATMUL_SIMD
  pool.parallel_for(p.N, [&](int64_t b, int64_t e, int) { prefill_chunk_packed<D>(p, b, e); }, grain);
#else
  pool.parallel_for(p.N, [&](int64_t b, int64_t e, int) { prefill_chunk_rowmajor<D, false>(p, b, e); }, grain);
#endif
}

void dispatch(float* out, const float* x, int64_t M, const LinearWeight& w, ThreadPool& pool, bool blas) {
  check_weight(w);
  FATHOM_ASSERT(M >= 0, "matmul with ", M, " rows");
  const DType d = w.weight.dtype();
  Problem p{};
  p.out = out;
  p.x = x;
  p.M = M;
  p.N = w.out_features();
  p.K = w.in_features();
  p.w = static_cast<const uint8_t*>(w.weight.data());
  p.row_bytes = p.K * int64_t(dtype_size(d));
  if (d == DType::F8_E4M3) {
    p.scale = w.scale_inv.f32();
    p.block = w.block;
    p.scale_cols = ceil_div(p.K, w.block);
  }
  if (M == 0 || p.N == 0) return;
  if (p.K == 0) {
    std::fill(out, out + M * p.N, 0.0f);
    return;
  }
  switch (d) {
    case DType::F32: return run<DType::F32>(p, pool, blas);
    case DType::BF16: return run<DType::BF16>(p, pool, blas);
    case DType::F16: return run<DType::F16>(p, pool, blas);
    default: return run<DType::F8_E4M3>(p, pool, blas);
  }
}

}  // namespace

void matmul(float* out, const float* x, int64_t M, const LinearWeight& w, ThreadPool& pool) {
  dispatch(out, x, M, w, pool, false);
}

void matmul_prefill_blas(float* out, const float* x, int64_t M, const LinearWeight& w, ThreadPool& pool) {
  // OpenBLAS would otherwise start its own thread team inside each of ours.
  static const bool single_threaded = [] {
    openblas_set_num_threads(1);
    return true;
  }();
  (void)single_threaded;
  dispatch(out, x, M, w, pool, true);
}

void matmul_reference(float* out, const float* x, int64_t M, const LinearWeight& w) {
  check_weight(w);
  const int64_t N = w.out_features(), K = w.in_features();
  const DType d = w.weight.dtype();
  const size_t elem = dtype_size(d);
  const auto* wb = static_cast<const uint8_t*>(w.weight.data());
  std::vector<double> row(static_cast<size_t>(K));  // W[n] dequantized, exactly
  float v;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      convert_to_f32(d, wb + size_t(n * K + k) * elem, &v, 1);
      double e = v;
      if (d == DType::F8_E4M3) e *= double(w.scale_inv.f32()[(n / w.block) * ceil_div(K, w.block) + k / w.block]);
      row[size_t(k)] = e;
    }
    for (int64_t m = 0; m < M; ++m) {
      double s = 0.0;
      for (int64_t k = 0; k < K; ++k) s += double(x[m * K + k]) * row[size_t(k)];
      out[m * N + n] = float(s);
    }
  }
}

}  // namespace fathom::cpu
