// cpu::matmul (SIMD streaming and panel paths) against cpu::matmul_reference (scalar, double
// accumulation) on fresh random inputs for every weight dtype and odd shapes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "ops/cpu/matmul.h"
#include "ops/cpu/membw.h"

using namespace fathom;

namespace {

// A fresh seed per run (FATHOM_TEST_SEED=... reproduces one); failures print it.
uint32_t test_seed() {
  if (const char* s = std::getenv("FATHOM_TEST_SEED")) return uint32_t(std::strtoul(s, nullptr, 10));
  return std::random_device{}();
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A random weight (N, K) of dtype d. FP8 draws every finite code (subnormals included; the NaN
// codes 0x7F/0xFF are left out, see matmul.h) and a random power-of-two-ish scale per block.
LinearWeight random_weight(DType d, int64_t N, int64_t K, int64_t block, std::mt19937& rng) {
  LinearWeight w;
  w.name = "test.weight";
  w.block = block;
  w.weight = Tensor::empty({N, K}, d);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t n = N * K;
  switch (d) {
    case DType::F32:
    case DType::BF16:
    case DType::F16: {
      std::vector<float> values(static_cast<size_t>(n));
      for (float& v : values) v = normal(rng);
      w.weight = from_f32(values.data(), {N, K}, d);
      break;
    }
    case DType::F8_E4M3: {
      std::uniform_int_distribution<int> code(0, 253);
      for (int64_t i = 0; i < n; ++i) {
        int c = code(rng);
        if (c >= 0x7F) ++c;  // skip 0x7F
        w.weight.ptr<uint8_t>()[i] = uint8_t(c);
      }
      w.scale_inv = Tensor::empty({ceil_div(N, block), ceil_div(K, block)});
      std::uniform_real_distribution<float> mant(0.5f, 2.0f);
      std::uniform_int_distribution<int> exp(-12, 2);
      for (int64_t i = 0; i < w.scale_inv.numel(); ++i) w.scale_inv.f32()[i] = std::ldexp(mant(rng), exp(rng));
      break;
    }
    default:
      ADD_FAILURE() << "unsupported dtype";
  }
  return w;
}

// |W|: the same weight with every sign bit cleared (all four dtypes keep the sign in the top bit).
LinearWeight abs_weight(const LinearWeight& w) {
  LinearWeight a = w;
  a.weight = Tensor::empty(w.weight.shape(), w.weight.dtype());
  const size_t elem = dtype_size(w.weight.dtype());
  const auto* src = static_cast<const uint8_t*>(w.weight.data());
  auto* dst = static_cast<uint8_t*>(a.weight.data());
  std::memcpy(dst, src, w.weight.nbytes());
  for (int64_t i = 0; i < w.weight.numel(); ++i) dst[size_t(i) * elem + elem - 1] &= 0x7F;
  return a;
}

std::vector<float> random_x(int64_t M, int64_t K, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(size_t(M * K));
  for (float& v : x) v = normal(rng);
  return x;
}

using MatmulFn = void (*)(float*, const float*, int64_t, const LinearWeight&, ThreadPool&);

// Runs fn and compares it with the reference: ‖a − b‖ ≤ 1e-5 · ‖Σ_k |x_k W_k|‖ over the whole
// output, and per element |a − b| ≤ (K + 8) · ε · Σ_k |x_k W_k|, the classical bound for a
// float dot product in any summation order (plus the one rounding of dequantizing an FP8
// element). Both are relative to the magnitude of the products, not of the result: a result
// that cancels to almost zero (one output of 200 random products, say) has a large relative
// error in any fp32 summation order.
void check_against_reference(MatmulFn fn, DType d, int64_t M, int64_t N, int64_t K, int64_t block, ThreadPool& pool,
                             std::mt19937& rng) {
  SCOPED_TRACE(::testing::Message() << dtype_name(d) << " M=" << M << " N=" << N << " K=" << K << " block=" << block);
  LinearWeight w = random_weight(d, N, K, block, rng);
  std::vector<float> x = random_x(M, K, rng);  // (M, K)
  std::vector<float> out(size_t(M * N), std::numeric_limits<float>::quiet_NaN());  // (M, N), poisoned
  std::vector<float> ref(size_t(M * N));                                            // (M, N)
  std::vector<float> mag(size_t(M * N));                                            // (M, N) Σ|x||W|
  fn(out.data(), x.data(), M, w, pool);
  cpu::matmul_reference(ref.data(), x.data(), M, w);
  std::vector<float> abs_x(x);
  for (float& v : abs_x) v = std::fabs(v);
  cpu::matmul_reference(mag.data(), abs_x.data(), M, abs_weight(w));

  const double eps = std::numeric_limits<float>::epsilon();
  double err2 = 0.0, mag2 = 0.0;
  int bad = 0;
  for (int64_t i = 0; i < M * N; ++i) {
    const double a = out[size_t(i)], b = ref[size_t(i)];
    ASSERT_TRUE(std::isfinite(a)) << "output element (" << i / N << ", " << i % N << ") is " << a
                                  << " (unwritten or overflowed)";
    err2 += (a - b) * (a - b);
    mag2 += double(mag[size_t(i)]) * mag[size_t(i)];
    const double bound = double(K + 8) * eps * double(mag[size_t(i)]) + 1e-30;
    if (std::fabs(a - b) > bound && ++bad <= 5)
      ADD_FAILURE() << "element (" << i / N << ", " << i % N << "): got " << a << ", reference " << b
                    << ", |diff| " << std::fabs(a - b) << " > bound " << bound;
  }
  if (mag2 > 0) EXPECT_LE(std::sqrt(err2 / mag2), 1e-5);
  else EXPECT_EQ(err2, 0.0);
}

void check_all_shapes(MatmulFn fn, DType d) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed << " (rerun with FATHOM_TEST_SEED=" << seed << ")");
  std::mt19937 rng(seed);
  ThreadPool pool(3);  // more threads than cores: uneven splits, chunk edges inside tiles and blocks
  for (int64_t M : {1, 2, 3, 4, 5, 7, 15, 16, 64})
    for (int64_t N : {1, 5, 96, 130, 257})
      for (int64_t K : {1, 7, 16, 96, 200, 300}) {
        check_against_reference(fn, d, M, N, K, 128, pool, rng);
        if (::testing::Test::HasFatalFailure()) return;
      }
  // Several K slices per prefill panel (K > 512) and many row blocks per thread.
  for (int64_t M : {1, 5, 20}) check_against_reference(fn, d, M, 700, 1100, 128, pool, rng);
  if (d == DType::F8_E4M3) {
    // Blocks that do not divide the tiles: partial blocks everywhere, block rows that start in
    // the middle of a tile of rows and of a thread's chunk.
    for (int64_t block : {1, 5, 16, 48})
      for (int64_t M : {1, 2, 7, 17}) check_against_reference(fn, d, M, 131, 203, block, pool, rng);
  }
}

void matmul_fn(float* out, const float* x, int64_t M, const LinearWeight& w, ThreadPool& pool) {
  cpu::matmul(out, x, M, w, pool);
}
void blas_fn(float* out, const float* x, int64_t M, const LinearWeight& w, ThreadPool& pool) {
  cpu::matmul_prefill_blas(out, x, M, w, pool);
}

}  // namespace

TEST(Matmul, F32MatchesReference) { check_all_shapes(matmul_fn, DType::F32); }
TEST(Matmul, Bf16MatchesReference) { check_all_shapes(matmul_fn, DType::BF16); }
TEST(Matmul, F16MatchesReference) { check_all_shapes(matmul_fn, DType::F16); }
TEST(Matmul, Fp8E4M3MatchesReference) { check_all_shapes(matmul_fn, DType::F8_E4M3); }

TEST(Matmul, BlasPrefillMatchesReference) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  ThreadPool pool(2);
  for (DType d : {DType::F32, DType::BF16, DType::F16, DType::F8_E4M3})
    for (int64_t M : {1, 8, 33}) {
      check_against_reference(blas_fn, d, M, 130, 300, 128, pool, rng);
      check_against_reference(blas_fn, d, M, 97, 1100, 128, pool, rng);
    }
}

// Every output element is summed in an order that does not depend on how N is split, so the
// thread count must not change a single bit.
TEST(Matmul, ThreadCountDoesNotChangeResult) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  ThreadPool one(1), three(3);
  for (DType d : {DType::F32, DType::BF16, DType::F16, DType::F8_E4M3})
    for (int64_t M : {1, 2, 3, 4, 5, 7, 16, 17}) {
      const int64_t N = 1000, K = 700;
      SCOPED_TRACE(::testing::Message() << dtype_name(d) << " M=" << M);
      LinearWeight w = random_weight(d, N, K, 128, rng);
      std::vector<float> x = random_x(M, K, rng);
      std::vector<float> a(size_t(M * N), std::nanf("")), b(size_t(M * N), std::nanf(""));
      cpu::matmul(a.data(), x.data(), M, w, one);
      cpu::matmul(b.data(), x.data(), M, w, three);
      EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0);
    }
}

TEST(Matmul, RejectsBadWeights) {
  ThreadPool pool(1);
  std::vector<float> x(16), out(16);
  LinearWeight w;
  w.name = "model.layers.0.mlp.up_proj.weight";
  w.weight = Tensor::zeros({4, 4}, DType::I32);
  EXPECT_THROW(cpu::matmul(out.data(), x.data(), 1, w, pool), Error);
  w.weight = Tensor::zeros({16}, DType::BF16);
  EXPECT_THROW(cpu::matmul(out.data(), x.data(), 1, w, pool), Error);
  w.weight = Tensor::zeros({4, 4}, DType::F8_E4M3);  // no scales
  EXPECT_THROW(cpu::matmul(out.data(), x.data(), 1, w, pool), Error);
  w.scale_inv = Tensor::zeros({2, 1});  // expected [1, 1]
  try {
    cpu::matmul(out.data(), x.data(), 1, w, pool);
    ADD_FAILURE() << "no error for a scale_inv of the wrong shape";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("up_proj"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("[1, 1]"), std::string::npos) << e.what();
  }
}

TEST(Matmul, ReadBandwidthIsPositive) {
  ThreadPool pool(2);
  const double gbps = cpu::measure_read_bandwidth(pool, size_t(8) << 20, 1);
  EXPECT_TRUE(std::isfinite(gbps));
  EXPECT_GT(gbps, 0.0);
}
