// The FP8 block-scaled GEMM recipe on the CPU (see fp8_gemm.h).
#include "ops/cpu/fp8_gemm.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

#include "core/dtype.h"
#include "core/error.h"
#include "core/thread_pool.h"

namespace fathom {

namespace {

int64_t tiles(int64_t K) { return (K + kFp8Tile - 1) / kFp8Tile; }

// Every e4m3 code's value, once.
const std::array<float, 256>& e4m3_table() {
  static const std::array<float, 256> t = [] {
    std::array<float, 256> v{};
    for (int i = 0; i < 256; ++i) v[size_t(i)] = fp8e4m3_to_f32(uint8_t(i));
    return v;
  }();
  return t;
}

void check_weight(const LinearWeight& w, const char* what) {
  FATHOM_CHECK(w.quantized() && w.block == kFp8Tile && w.scale_inv.defined(), what, ": weight ", w.name,
               " must be F8_E4M3 with 128x128 block scales");
  FATHOM_CHECK(w.scale_inv.dim(0) == tiles(w.out_features()) && w.scale_inv.dim(1) == tiles(w.in_features()), what,
               ": weight ", w.name, " has scales ", shape_str(w.scale_inv.shape()), " for ", w.out_features(), " x ",
               w.in_features());
}

// Rows [m0, m1) of out (., N) from qa/sa rows of the same index, against w: the promoted sum.
void rows_promoted(float* out, const uint8_t* qa, const float* sa, int64_t m0, int64_t m1, const LinearWeight& w) {
  const auto& lut = e4m3_table();
  const int64_t N = w.out_features(), K = w.in_features(), Kt = tiles(K);
  const uint8_t* wq = w.weight.ptr<uint8_t>();
  const float* sb = w.scale_inv.f32();
  for (int64_t m = m0; m < m1; ++m) {
    const uint8_t* a = qa + m * K;
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t* b = wq + n * K;
      float acc = 0.0f;  // the fp32 accumulator the tile sums are promoted into
      for (int64_t t = 0; t < Kt; ++t) {
        const int64_t k0 = t * kFp8Tile, k1 = std::min(K, k0 + kFp8Tile);
        double partial = 0.0;  // exact: products of e4m3 values are exact in fp32, their sum in double
        for (int64_t k = k0; k < k1; ++k) partial += double(lut[a[k]] * lut[b[k]]);
        acc += float(partial) * (sa[m * Kt + t] * sb[(n / kFp8Tile) * Kt + t]);
      }
      out[m * N + n] = acc;
    }
  }
}

// x rounded to nearest with `bits` explicit mantissa bits (23: unchanged).
float round_mantissa(float x, int bits) {
  if (bits >= 23 || !std::isfinite(x)) return x;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const int drop = 23 - bits;
  u += uint32_t(1) << (drop - 1);
  u &= ~((uint32_t(1) << drop) - 1);
  std::memcpy(&x, &u, 4);
  return x;
}

}  // namespace

void quantize_1x128(uint8_t* q, float* scales, const float* x, int64_t M, int64_t K) {
  FATHOM_CHECK(M >= 0 && K > 0, "quantize_1x128: ", M, " x ", K, " is not a matrix");
  for (int64_t i = 0; i < M * K; ++i)  // before the threads: an error cannot leave a worker
    FATHOM_CHECK(std::isfinite(x[i]), "quantize_1x128: row ", i / K, " column ", i % K, " is ", x[i]);
  const int64_t Kt = tiles(K);
  ThreadPool::global().parallel_for(M, [&](int64_t m0, int64_t m1, int) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t t = 0; t < Kt; ++t) {
        const int64_t k0 = t * kFp8Tile, k1 = std::min(K, k0 + kFp8Tile);
        float amax = 0.0f;
        for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(x[m * K + k]));
        const float s = amax > 0.0f ? amax / 448.0f : 1.0f;
        scales[m * Kt + t] = s;
        for (int64_t k = k0; k < k1; ++k) q[m * K + k] = f32_to_fp8e4m3(x[m * K + k] / s);
      }
  });
}

void fp8_gemm(float* out, const uint8_t* qa, const float* sa, int64_t M, const LinearWeight& w) {
  check_weight(w, "fp8_gemm");
  ThreadPool::global().parallel_for(M, [&](int64_t m0, int64_t m1, int) { rows_promoted(out, qa, sa, m0, m1, w); });
}

void fp8_gemm_unpromoted(float* out, const uint8_t* qa, const float* sa, int64_t M, const LinearWeight& w,
                         int mantissa_bits) {
  check_weight(w, "fp8_gemm_unpromoted");
  FATHOM_CHECK(mantissa_bits >= 1 && mantissa_bits <= 23, "fp8_gemm_unpromoted: ", mantissa_bits,
               " mantissa bits is out of range (1 to 23)");
  const auto& lut = e4m3_table();
  const int64_t N = w.out_features(), K = w.in_features(), Kt = tiles(K);
  const uint8_t* wq = w.weight.ptr<uint8_t>();
  const float* sb = w.scale_inv.f32();
  ThreadPool::global().parallel_for(M, [&](int64_t m0, int64_t m1, int) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t n = 0; n < N; ++n) {
        float acc = 0.0f;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t t = k / kFp8Tile;
          const float p = (lut[qa[m * K + k]] * sa[m * Kt + t]) * (lut[wq[n * K + k]] * sb[(n / kFp8Tile) * Kt + t]);
          acc = round_mantissa(acc + p, mantissa_bits);
        }
        out[m * N + n] = acc;
      }
  });
}

void fp8_gemm_grouped_contiguous(float* out, const uint8_t* qa, const float* sa, int64_t M,
                                 const std::vector<const LinearWeight*>& experts, const int32_t* expert) {
  FATHOM_CHECK(!experts.empty(), "fp8_gemm_grouped_contiguous: no experts");
  for (const LinearWeight* w : experts) {
    check_weight(*w, "fp8_gemm_grouped_contiguous");
    FATHOM_CHECK(w->weight.shape() == experts[0]->weight.shape(), "fp8_gemm_grouped_contiguous: expert ", w->name,
                 " is ", shape_str(w->weight.shape()), ", the first ", shape_str(experts[0]->weight.shape()));
  }
  const int64_t N = experts[0]->out_features(), K = experts[0]->in_features(), Kt = tiles(K);
  for (int64_t m = 0; m < M; ++m)
    FATHOM_CHECK(expert[m] >= -1 && expert[m] < int32_t(experts.size()), "fp8_gemm_grouped_contiguous: row ", m,
                 " names expert ", expert[m], " of ", experts.size());
  ThreadPool::global().parallel_for(M, [&](int64_t m0, int64_t m1, int) {
    for (int64_t m = m0; m < m1; ++m) {
      if (expert[m] < 0) {
        std::fill(out + m * N, out + (m + 1) * N, 0.0f);
        continue;
      }
      // this row alone against its expert (the row's pointers moved so that it is row 0)
      rows_promoted(out + m * N, qa + m * K, sa + m * Kt, 0, 1, *experts[size_t(expert[m])]);
    }
  });
}

void fp8_gemm_grouped_masked(float* out, const uint8_t* qa, const float* sa, int64_t max_m,
                             const std::vector<const LinearWeight*>& experts, const int32_t* count) {
  FATHOM_CHECK(!experts.empty() && max_m >= 0, "fp8_gemm_grouped_masked: no experts or a negative max_m");
  for (const LinearWeight* w : experts) {
    check_weight(*w, "fp8_gemm_grouped_masked");
    FATHOM_CHECK(w->weight.shape() == experts[0]->weight.shape(), "fp8_gemm_grouped_masked: expert ", w->name,
                 " is ", shape_str(w->weight.shape()), ", the first ", shape_str(experts[0]->weight.shape()));
  }
  const int64_t E = int64_t(experts.size()), N = experts[0]->out_features(), K = experts[0]->in_features();
  const int64_t Kt = tiles(K);
  for (int64_t e = 0; e < E; ++e)
    FATHOM_CHECK(count[e] >= 0 && count[e] <= max_m, "fp8_gemm_grouped_masked: expert ", e, " has ", count[e],
                 " rows of at most ", max_m);
  ThreadPool::global().parallel_for(E, [&](int64_t e0, int64_t e1, int) {
    for (int64_t e = e0; e < e1; ++e)
      rows_promoted(out + e * max_m * N, qa + e * max_m * K, sa + e * max_m * Kt, 0, count[e], *experts[size_t(e)]);
  });
}

}  // namespace fathom
