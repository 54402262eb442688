// DeepSeek-V3's FP8 GEMM recipe on the CPU (src/ops/cpu/fp8_gemm.h): 1x128 activation
// quantization, the 128x128-block-scaled product promoted to fp32 every 128 of K, the grouped
// layouts for MoE experts — against the fp32 product of the dequantized values, and the same sum
// without promotion for contrast.
#include <cmath>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "core/dtype.h"
#include "core/error.h"
#include "model/random_init.h"
#include "model/weights.h"
#include "ops/cpu/fp8_gemm.h"
#include "ops/ops.h"
#include "test_util.h"

namespace fathom {
namespace {

std::vector<float> randn(std::mt19937& rng, int64_t n, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = d(rng);
  return v;
}

LinearWeight fp8_weight(const std::vector<float>& w, int64_t N, int64_t K) {
  LinearWeight l;
  l.name = "w";
  quantize_fp8(w.data(), N, K, 128, l.weight, l.scale_inv);
  return l;
}

struct Quantized {
  std::vector<uint8_t> q;
  std::vector<float> s;
};
Quantized quantize(const std::vector<float>& x, int64_t M, int64_t K) {
  Quantized a{std::vector<uint8_t>(x.size()), std::vector<float>(size_t(M * ((K + 127) / 128)))};
  quantize_1x128(a.q.data(), a.s.data(), x.data(), M, K);
  return a;
}

// The fp32 (double-accumulated) product of the dequantized activations and weight: the value
// the recipe must reproduce but for the order of its additions.
std::vector<float> dequantized_product(const Quantized& a, int64_t M, int64_t K, const LinearWeight& w) {
  const int64_t N = w.out_features(), Kt = (K + 127) / 128;
  const Tensor wd = dequantize(w);
  std::vector<float> out(static_cast<size_t>(M * N));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0;
      for (int64_t k = 0; k < K; ++k)
        acc += double(fp8e4m3_to_f32(a.q[size_t(m * K + k)]) * a.s[size_t(m * Kt + k / 128)]) * wd.f32()[n * K + k];
      out[size_t(m * N + n)] = float(acc);
    }
  return out;
}

double rel(const std::vector<float>& a, const std::vector<float>& b) { return test::rel_err(a.data(), b.data(), b.size()); }

TEST(Fp8Gemm, ActivationTilesAreScaledAlone) {
  std::mt19937 rng(1);
  const int64_t K = 300;  // tiles of 128, 128 and 44
  std::vector<float> x = randn(rng, 2 * K);
  // an outlier in row 0, tile 0: 300,000 maps to 448, so that tile's N(0, 1) values fall to
  // ~0.0015, below e4m3's smallest normal (2^-6): a few subnormal steps of 2^-9
  x[5] = 300000.0f;
  const Quantized a = quantize(x, 2, K);
  ASSERT_EQ(a.s.size(), 6u);
  for (int64_t m = 0; m < 2; ++m)
    for (int64_t t = 0; t < 3; ++t) {
      double err = 0, norm = 0, amax = 0;
      for (int64_t k = t * 128; k < std::min<int64_t>(K, (t + 1) * 128); ++k) {
        if (m == 0 && k == 5) {  // the outlier itself is exact (amax maps to 448); its neighbours pay
          EXPECT_NEAR(fp8e4m3_to_f32(a.q[5]) * a.s[0], 300000.0f, 1.0f);
          amax = 300000.0;
          continue;
        }
        const double v = x[size_t(m * K + k)], d = fp8e4m3_to_f32(a.q[size_t(m * K + k)]) * a.s[size_t(m * 3 + t)];
        err += (d - v) * (d - v);
        norm += v * v;
        amax = std::max(amax, std::fabs(v));
      }
      EXPECT_NEAR(a.s[size_t(m * 3 + t)], amax / 448.0, 1e-6 * amax) << m << " " << t;
      // e4m3 keeps 3 mantissa bits: a few percent of relative error; the outlier's own tile
      // loses its small values to it, every other tile — in its row too — keeps its precision
      if (m == 0 && t == 0)
        EXPECT_GT(std::sqrt(err / norm), 0.2);
      else
        EXPECT_LT(std::sqrt(err / norm), 0.05) << m << " " << t;
    }
  // an all-zero tile has scale 1 and zero codes; a non-finite value is an error
  std::vector<float> z(128, 0.0f);
  const Quantized qz = quantize(z, 1, 128);
  EXPECT_EQ(qz.s[0], 1.0f);
  EXPECT_EQ(qz.q[7], 0);
  z[3] = NAN;
  EXPECT_THROW(quantize(z, 1, 128), Error);
}

// K = 7168 (DeepSeek-V3's hidden size), N not a multiple of 128: the promoted product equals the
// fp32 product of the dequantized values to fp32 rounding, and the quantization itself costs
// about 3% against the unquantized product.
TEST(Fp8Gemm, PromotedProductIsTheDequantizedProduct) {
  std::mt19937 rng(2);
  const int64_t M = 5, N = 200, K = 7168;
  const std::vector<float> x = randn(rng, M * K), wf = randn(rng, N * K, 0.02f);
  const LinearWeight w = fp8_weight(wf, N, K);
  const Quantized a = quantize(x, M, K);
  std::vector<float> out(static_cast<size_t>(M * N));
  fp8_gemm(out.data(), a.q.data(), a.s.data(), M, w);
  EXPECT_LT(rel(out, dequantized_product(a, M, K, w)), 1e-6);
  std::vector<float> exact(static_cast<size_t>(M * N));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += double(x[size_t(m * K + k)]) * wf[size_t(n * K + k)];
      exact[size_t(m * N + n)] = float(acc);
    }
  const double q_err = rel(out, exact);
  EXPECT_GT(q_err, 1e-3);  // e4m3 is coarse ...
  EXPECT_LT(q_err, 6e-2);  // ... but 1x128 / 128x128 scales keep the product within a few percent
  RecordProperty("quantization_error", std::to_string(q_err));
  std::printf("FP8 GEMM, K = 7168: recipe vs the unquantized fp32 product %.2e\n", q_err);
}

// Without promotion one low-precision accumulator sums all 7,168 products: with 13 mantissa
// bits (the ~14 bits DeepSeek-V3 reports for the H800's FP8 accumulation) the error is orders of
// magnitude above the promoted product's; with 23 (fp32) it is fp32 rounding again.
TEST(Fp8Gemm, WithoutPromotionALimitedAccumulatorDrifts) {
  std::mt19937 rng(3);
  const int64_t M = 4, N = 64, K = 7168;
  const std::vector<float> x = randn(rng, M * K), wf = randn(rng, N * K, 0.02f);
  const LinearWeight w = fp8_weight(wf, N, K);
  const Quantized a = quantize(x, M, K);
  const std::vector<float> want = dequantized_product(a, M, K, w);
  std::vector<float> promoted(static_cast<size_t>(M * N)), fp32(promoted.size()), low(promoted.size());
  fp8_gemm(promoted.data(), a.q.data(), a.s.data(), M, w);
  fp8_gemm_unpromoted(fp32.data(), a.q.data(), a.s.data(), M, w, 23);
  fp8_gemm_unpromoted(low.data(), a.q.data(), a.s.data(), M, w, 13);
  const double e_promoted = rel(promoted, want), e_fp32 = rel(fp32, want), e_low = rel(low, want);
  EXPECT_LT(e_promoted, 1e-6);
  EXPECT_LT(e_fp32, 1e-5);
  EXPECT_GT(e_low, 100 * e_promoted);
  EXPECT_GT(e_low, 1e-4);
  RecordProperty("unpromoted_13_bit_error", std::to_string(e_low));
  std::printf("FP8 GEMM, K = 7168, against the dequantized fp32 product: promoted %.2e, one fp32 accumulator %.2e, "
              "one 13-bit accumulator %.2e\n", e_promoted, e_fp32, e_low);
  EXPECT_THROW(fp8_gemm_unpromoted(low.data(), a.q.data(), a.s.data(), M, w, 0), Error);
}

// MoE experts: rows sorted by expert with padding rows (contiguous), and per-expert row blocks
// with counts (masked) — each row the product with its own expert.
TEST(Fp8Gemm, GroupedLayoutsTakeEachRowsExpert) {
  std::mt19937 rng(4);
  const int64_t E = 3, N = 130, K = 256, M = 7;
  std::vector<LinearWeight> ws;
  for (int64_t e = 0; e < E; ++e) ws.push_back(fp8_weight(randn(rng, N * K, 0.05f), N, K));
  std::vector<const LinearWeight*> experts;
  for (const auto& w : ws) experts.push_back(&w);
  const std::vector<float> x = randn(rng, M * K);
  const Quantized a = quantize(x, M, K);
  const std::vector<int32_t> expert = {0, 0, 2, -1, 1, 1, 2};
  std::vector<float> out(static_cast<size_t>(M * N), 99.0f);
  fp8_gemm_grouped_contiguous(out.data(), a.q.data(), a.s.data(), M, experts, expert.data());
  for (int64_t m = 0; m < M; ++m) {
    const std::vector<float> row(out.begin() + m * N, out.begin() + (m + 1) * N);
    if (expert[size_t(m)] < 0) {
      EXPECT_EQ(row, std::vector<float>(size_t(N), 0.0f));
      continue;
    }
    std::vector<float> want(static_cast<size_t>(N));
    fp8_gemm(want.data(), a.q.data() + m * K, a.s.data() + m * 2, 1, ws[size_t(expert[size_t(m)])]);
    EXPECT_EQ(row, want) << "row " << m;
  }
  // masked: A (E, 3, K), counts 2, 0, 3; the rows past a count keep their poison
  const int64_t max_m = 3;
  const std::vector<float> xm = randn(rng, E * max_m * K);
  const Quantized am = quantize(xm, E * max_m, K);
  const std::vector<int32_t> count = {2, 0, 3};
  std::vector<float> outm(static_cast<size_t>(E * max_m * N), 99.0f);
  fp8_gemm_grouped_masked(outm.data(), am.q.data(), am.s.data(), max_m, experts, count.data());
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = 0; r < max_m; ++r) {
      const int64_t row = e * max_m + r;
      const std::vector<float> got(outm.begin() + row * N, outm.begin() + (row + 1) * N);
      if (r >= count[size_t(e)]) {
        EXPECT_EQ(got, std::vector<float>(size_t(N), 99.0f)) << "expert " << e << " row " << r;
        continue;
      }
      std::vector<float> want(static_cast<size_t>(N));
      fp8_gemm(want.data(), am.q.data() + row * K, am.s.data() + row * 2, 1, ws[size_t(e)]);
      EXPECT_EQ(got, want) << "expert " << e << " row " << r;
    }
  // bad input: an expert index out of range, a count over max_m, a weight that is not FP8
  const std::vector<int32_t> bad = {0, 3, 0, 0, 0, 0, 0};
  EXPECT_THROW(fp8_gemm_grouped_contiguous(out.data(), a.q.data(), a.s.data(), M, experts, bad.data()), Error);
  const std::vector<int32_t> too_many = {4, 0, 0};
  EXPECT_THROW(fp8_gemm_grouped_masked(outm.data(), am.q.data(), am.s.data(), max_m, experts, too_many.data()), Error);
  LinearWeight f32;
  f32.name = "f32";
  f32.weight = Tensor::empty({N, K});
  EXPECT_THROW(fp8_gemm(out.data(), a.q.data(), a.s.data(), 1, f32), Error);
}

// The CPU backend with set_fp8_activations: a matmul of an FP8 weight over more than 128 rows is
// the recipe (quantize_1x128, then fp8_gemm), bit for bit, also through matmul_batch; 128 rows or
// fewer, and a backend with it off, give the weight-only product.
TEST(Fp8Gemm, CpuBackendTakesTheRecipeWhenAsked) {
  std::mt19937 rng(5);
  const int64_t N = 96, K = 300;
  const LinearWeight w = fp8_weight(randn(rng, N * K, 0.05f), N, K);
  auto ops = make_cpu_ops();
  for (const int64_t M : {int64_t(129), int64_t(128)}) {
    const std::vector<float> x = randn(rng, M * K);
    const Quantized a = quantize(x, M, K);
    std::vector<float> recipe(size_t(M * N));
    fp8_gemm(recipe.data(), a.q.data(), a.s.data(), M, w);
    Tensor xt = Tensor::empty({M, K});
    std::copy(x.begin(), x.end(), xt.f32());
    Tensor off = Tensor::empty({M, N}), on = Tensor::empty({M, N}), batch = Tensor::empty({M, N});
    ASSERT_TRUE(ops->set_fp8_activations(false));
    ops->matmul(off, xt, w);
    ASSERT_TRUE(ops->set_fp8_activations(true));
    ops->matmul(on, xt, w);
    ops->matmul_batch({{batch.f32(), xt.f32(), M, &w}});
    const std::vector<float> von(on.f32(), on.f32() + M * N), voff(off.f32(), off.f32() + M * N),
        vbatch(batch.f32(), batch.f32() + M * N);
    if (M > kFp8ActivationRows) {
      EXPECT_EQ(von, recipe);
      EXPECT_EQ(vbatch, recipe);
      EXPECT_GT(rel(von, voff), 1e-3);  // the activations' quantization shows
    } else {
      EXPECT_EQ(von, voff);
    }
  }
  ASSERT_TRUE(ops->set_fp8_activations(false));
}

}  // namespace
}  // namespace fathom
