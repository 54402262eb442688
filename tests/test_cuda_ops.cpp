// Every op of the CUDA backend against the CPU backend (the reference), both called through the
// Ops interface, on fresh random inputs each run (the seed is printed with any failure),
// several shapes including odd ones. GPU outputs start as NaN bytes (a poisoned device tensor),
// so an element a kernel forgets to write fails the comparison. Bounds, per op:
//   bit-exact         fill_random, embedding, add, copy (F32 and BF16), argmax, memory round trips
//   1e-6              rope_tables                                max |a-b| / (|b|+1)
//   1e-5              rmsnorm, silu_mul, rope, mla_cache_append (F32; BF16 within one bf16 ulp)
//   1e-4              matmul (every dtype; with input norm and accumulation), matmul_per_head,
//   1e-3 (rel. L2)    matmul of FP8 weights over > 128 rows with set_fp8_activations (the recipe),
//                     attention, moe_experts and swiglu (also normalising x and adding into it),
//                     a captured and replayed graph of several ops
//   ids equal, 1e-6   moe_gate (inputs without near-ties)
//   ids equal, 1e-5   moe_route (norm, router and choice; rows whose choices are 1e-4 apart)
//   ids equal         sample (bar at most one u within 1e-9 of a CDF boundary)
// Skips — with the reason — when the build has no CUDA or the machine has no GPU (CI).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/tensor.h"
#include "ops/ops.h"

#ifdef FATHOM_HAVE_CUDA
#include "ops/cpu/sample.h"
#include "ops/cuda/cuda_ops.h"
#endif

namespace fathom {
namespace {

#ifndef FATHOM_HAVE_CUDA

TEST(CudaOps, Skipped) { GTEST_SKIP() << "built without CUDA (nvcc was not found at configure time)"; }

#else

class CudaOps : public testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device on this machine: CUDA op tests skipped";
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    trace_ = std::make_unique<testing::ScopedTrace>(__FILE__, __LINE__, cat("random seed ", seed_));
    cpu_ = make_cpu_ops();
    gpu_ = make_cuda_ops(0);
  }
  void TearDown() override { trace_.reset(); }

  uint32_t seed_ = 0;
  std::mt19937 rng_;
  std::unique_ptr<testing::ScopedTrace> trace_;
  std::unique_ptr<Ops> cpu_, gpu_;

  Tensor randn(Shape shape, float scale = 1.0f) {
    Tensor t = Tensor::empty(std::move(shape));
    std::normal_distribution<float> d(0.f, scale);
    for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = d(rng_);
    return t;
  }
  Tensor uniform(Shape shape, float lo, float hi) {
    Tensor t = Tensor::empty(std::move(shape));
    std::uniform_real_distribution<float> d(lo, hi);
    for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = d(rng_);
    return t;
  }
  // A host tensor of NaN bytes (0xFF: every float and bf16 a NaN).
  static Tensor host_poison(Shape shape, DType dtype = DType::F32) {
    Tensor t = Tensor::empty(std::move(shape), dtype);
    std::memset(t.data(), 0xFF, t.nbytes());
    return t;
  }
  Tensor gpu_poison(Shape shape, DType dtype = DType::F32) { return gpu_->upload(host_poison(std::move(shape), dtype)); }
  Tensor up(const Tensor& host) { return gpu_->upload(host); }
  Tensor down(const Tensor& dev) {
    Tensor h = Tensor::empty(dev.shape(), dev.dtype());
    gpu_->download(h.data(), dev);
    return h;
  }
  LinearWeight up(const LinearWeight& w) {
    LinearWeight g = w;
    g.weight = up(w.weight);
    if (w.quantized()) g.scale_inv = up(w.scale_inv);
    return g;
  }
  // A random (N, K) weight in dtype, entries of size ~1/sqrt(K); FP8 with random block scales.
  LinearWeight random_weight(int64_t N, int64_t K, DType dtype, int64_t block = 128) {
    LinearWeight w;
    w.name = cat("w", N, "x", K, "_", dtype_name(dtype));
    w.block = block;
    if (dtype == DType::F8_E4M3) {
      Tensor f = randn({N, K}, 100.0f);  // codes over the whole e4m3 range, saturating at 448
      w.weight = from_f32(f.f32(), {N, K}, dtype);
      w.scale_inv = uniform({(N + block - 1) / block, (K + block - 1) / block}, 0.5f, 2.0f);
      for (int64_t i = 0; i < w.scale_inv.numel(); ++i) w.scale_inv.f32()[i] /= 100.0f * std::sqrt(float(K));
    } else {
      Tensor f = randn({N, K}, 1.0f / std::sqrt(float(K)));
      w.weight = from_f32(f.f32(), {N, K}, dtype);
    }
    return w;
  }
  // Max |a - b| / (|b| + 1) over F32 host tensors; NaN anywhere gives infinity.
  static double max_err(const Tensor& got, const Tensor& want) {
    EXPECT_EQ(got.numel(), want.numel());
    double m = 0;
    for (int64_t i = 0; i < want.numel(); ++i) {
      const double d = std::fabs(double(got.f32()[i]) - want.f32()[i]) / (std::fabs(want.f32()[i]) + 1.0);
      if (!(d <= m)) m = std::isnan(d) ? INFINITY : d;
    }
    return m;
  }
  // The (n_tokens, n_heads, cols) elements of a strided F32 buffer, compacted.
  static Tensor gather(const Tensor& buf, int64_t n_tokens, int n_heads, int64_t cols, int64_t ts, int64_t hs) {
    Tensor t = Tensor::empty({n_tokens, n_heads, cols});
    for (int64_t i = 0; i < n_tokens; ++i)
      for (int h = 0; h < n_heads; ++h)
        std::memcpy(t.f32() + (i * n_heads + h) * cols, buf.f32() + i * ts + h * hs, sizeof(float) * size_t(cols));
    return t;
  }
  // Relative L2 error of F32 host tensors (NaN gives NaN, which fails every bound).
  static double test_rel(const Tensor& got, const Tensor& want) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < want.numel(); ++i) {
      const double d = double(got.f32()[i]) - want.f32()[i];
      num += d * d;
      den += double(want.f32()[i]) * want.f32()[i];
    }
    return std::sqrt(num / den);
  }
  static bool same_bytes(const Tensor& a, const Tensor& b) {
    return a.nbytes() == b.nbytes() && std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
  }
};

// ---- memory and errors

TEST_F(CudaOps, MemoryRoundTripsBytesExactly) {
  EXPECT_EQ(gpu_->device(), Device::CUDA);
  EXPECT_STREQ(gpu_->name(), "cuda");
  EXPECT_GT(gpu_->free_memory(), 0);
  // sizes around the 32 MiB staging chunks, odd byte counts, empty tensors
  for (int64_t n : {int64_t(0), int64_t(1), int64_t(3), int64_t(4097), int64_t(32) << 20, (int64_t(80) << 20) + 5}) {
    Tensor host = Tensor::empty({n}, DType::U8);
    for (int64_t i = 0; i < n; ++i) host.ptr<uint8_t>()[i] = uint8_t(rng_());
    Tensor dev = up(host);
    EXPECT_EQ(dev.device(), Device::CUDA);
    EXPECT_EQ(dev.shape(), host.shape());
    EXPECT_EQ(dev.dtype(), DType::U8);
    EXPECT_TRUE(same_bytes(down(dev), host)) << n << " bytes";
    // empty() + copy_bytes on the device
    Tensor copy = gpu_->empty({n}, DType::U8);
    gpu_->copy_bytes(copy.data(), dev.data(), size_t(n));
    EXPECT_TRUE(same_bytes(down(copy), host)) << n << " bytes through copy_bytes";
  }
  for (DType dt : {DType::F32, DType::BF16, DType::F16, DType::F8_E4M3, DType::I32}) {
    Tensor host = Tensor::empty({7, 13}, dt);
    for (size_t i = 0; i < host.nbytes(); ++i) static_cast<uint8_t*>(host.data())[i] = uint8_t(rng_());
    Tensor dev = up(host);
    EXPECT_EQ(dev.dtype(), dt);
    EXPECT_TRUE(same_bytes(down(dev), host)) << dtype_name(dt);
  }
}

TEST_F(CudaOps, ErrorsAreFathomErrors) {
  EXPECT_THROW(make_cuda_ops(cuda::device_count()), Error);  // one past the last GPU
  EXPECT_THROW(make_cuda_ops(-1), Error);
  try {
    gpu_->empty({int64_t(1) << 40});  // 4 TiB
    ADD_FAILURE() << "an impossible allocation succeeded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bytes"), std::string::npos) << e.what();
  }
  // the backend still works after the failure
  Tensor t = randn({4, 8});
  EXPECT_TRUE(same_bytes(down(up(t)), t));
  // a host tensor handed to a GPU op is a clear error, not a crash
  Tensor out = gpu_->empty({4, 8});
  EXPECT_THROW(gpu_->add(out, t), Error);
  Tensor ids = up(Tensor::zeros({1}, DType::I32));
  Tensor table = up(Tensor::zeros({4, 8}, DType::I64));
  Tensor emb = gpu_->empty({1, 8});
  EXPECT_THROW(gpu_->embedding(emb, ids, table), Error);
}

TEST_F(CudaOps, FillRandomIsBitIdentical) {
  for (DType dt : {DType::F32, DType::BF16, DType::F16, DType::F8_E4M3})
    for (int64_t n : {1, 1000, 65537 + 3}) {
      const uint64_t seed = (uint64_t(rng_()) << 32) | rng_();
      const float scale = dt == DType::F8_E4M3 ? 600.0f : 0.05f;  // FP8 saturates past 448
      Tensor want = Tensor::empty({n}, dt);
      cpu_->fill_random(want, seed, scale);
      Tensor got = gpu_poison({n}, dt);
      gpu_->fill_random(got, seed, scale);
      EXPECT_TRUE(same_bytes(down(got), want)) << dtype_name(dt) << " n " << n;
    }
}

// ---- elementwise

TEST_F(CudaOps, Embedding) {
  for (auto [V, H, T] : {std::tuple{50, 64, 7}, {1000, 129, 33}, {17, 7168, 3}}) {
    for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
      Tensor table32 = randn({V, H});
      Tensor table = from_f32(table32.f32(), table32.shape(), dt);
      Tensor ids = Tensor::empty({T}, DType::I32);
      for (int64_t i = 0; i < T; ++i) ids.ptr<int32_t>()[i] = int32_t(rng_() % uint32_t(V));
      Tensor want = Tensor::empty({T, H});
      cpu_->embedding(want, ids, table);
      Tensor got = gpu_poison({T, H}), d_ids = up(ids), d_table = up(table);
      gpu_->embedding(got, d_ids, d_table);
      EXPECT_EQ(max_err(down(got), want), 0.0) << "V " << V << " H " << H << " " << dtype_name(dt);
    }
  }
}

TEST_F(CudaOps, RmsNorm) {
  for (auto [M, N] : {std::pair{1, 7168}, {5, 1}, {33, 513}, {128, 2048}, {3, 100003}}) {
    Tensor x = randn({M, N}, 3.0f), w = randn({N});
    Tensor want = Tensor::empty({M, N});
    cpu_->rmsnorm(want, x, w, 1e-6f);
    Tensor dx = up(x), dw = up(w), got = gpu_poison({M, N});
    gpu_->rmsnorm(got, dx, dw, 1e-6f);
    EXPECT_LT(max_err(down(got), want), 1e-5) << "M " << M << " N " << N;
    gpu_->rmsnorm(dx, dx, dw, 1e-6f);  // in place, as the model calls it
    EXPECT_LT(max_err(down(dx), want), 1e-5) << "in place, M " << M << " N " << N;
  }
}

TEST_F(CudaOps, SiluMulAndAdd) {
  for (int64_t n : {1, 31, 4096, 1000003}) {
    Tensor g = randn({n}, 4.0f), u = randn({n});
    Tensor want = Tensor::empty({n});
    cpu_->silu_mul(want, g, u);
    Tensor dg = up(g), du = up(u), got = gpu_poison({n});
    gpu_->silu_mul(got, dg, du);
    EXPECT_LT(max_err(down(got), want), 1e-5) << "silu_mul n " << n;
    gpu_->silu_mul(dg, dg, du);  // out aliases gate
    EXPECT_LT(max_err(down(dg), want), 1e-5) << "silu_mul in place, n " << n;

    Tensor x = randn({n}), y = randn({n});
    Tensor dx = up(x), dy = up(y);
    cpu_->add(x, y);
    gpu_->add(dx, dy);
    EXPECT_EQ(max_err(down(dx), x), 0.0) << "add n " << n;
  }
}

TEST_F(CudaOps, CopyStridedConvertsAndBroadcasts) {
  struct Case { int64_t T; int H, cols; int64_t in_ts, in_hs, out_ts, out_hs; };
  for (Case c : {Case{3, 2, 5, 11, 0, 16, 7}, Case{7, 1, 576, 600, 0, 576, 0}, Case{33, 4, 64, 4 * 70, 70, 4 * 64 + 3, 64},
                 Case{1, 128, 192, 128 * 192, 192, 128 * 200, 200}}) {
    for (DType dt : {DType::F32, DType::BF16}) {
      const int64_t in_n = (c.T - 1) * c.in_ts + (c.H - 1) * c.in_hs + c.cols;
      const int64_t out_n = (c.T - 1) * c.out_ts + (c.H - 1) * c.out_hs + c.cols + 5;
      Tensor in = randn({in_n});
      Tensor want = host_poison({out_n}, dt);  // unwritten elements keep their bytes on both sides
      CopyParams p;
      p.out_token_stride = c.out_ts, p.out_head_stride = c.out_hs, p.out_dtype = dt;
      p.in_token_stride = c.in_ts, p.in_head_stride = c.in_hs;
      p.n_tokens = c.T, p.n_heads = c.H, p.cols = c.cols;
      p.out = want.data(), p.in = in.f32();
      cpu_->copy(p);
      Tensor din = up(in), got = gpu_poison({out_n}, dt);
      p.out = got.data(), p.in = din.f32();
      gpu_->copy(p);
      EXPECT_TRUE(same_bytes(down(got), want)) << dtype_name(dt) << " T " << c.T << " H " << c.H << " cols " << c.cols;
    }
  }
}

TEST_F(CudaOps, CopyToIndexedTokens) {
  // appending 3 tokens to rows of a cache given by a device index, BF16 like the KV cache
  const int64_t T = 3, cols = 576, cache_rows = 40;
  for (DType dt : {DType::F32, DType::BF16}) {
    Tensor in = randn({T, cols}), index = Tensor::empty({T}, DType::I32);
    for (int64_t t = 0; t < T; ++t) index.ptr<int32_t>()[t] = int32_t(7 + 11 * t);
    Tensor want = host_poison({cache_rows, cols}, dt);
    CopyParams p;
    p.out_token_stride = cols, p.out_dtype = dt, p.in_token_stride = cols, p.n_tokens = T, p.cols = int(cols);
    p.out = want.data(), p.in = in.f32(), p.out_token_index = index.ptr<int32_t>();
    cpu_->copy(p);
    Tensor din = up(in), dindex = up(index), got = gpu_poison({cache_rows, cols}, dt);
    p.out = got.data(), p.in = din.f32(), p.out_token_index = dindex.ptr<int32_t>();
    gpu_->copy(p);
    EXPECT_TRUE(same_bytes(down(got), want)) << dtype_name(dt);
  }
}

TEST_F(CudaOps, RopeTables) {
  for (int64_t T : {1, 5, 300}) {
    const int64_t half = 32;
    Tensor positions = Tensor::empty({T}, DType::I32), inv_freq = Tensor::empty({half}, DType::F64);
    for (int64_t t = 0; t < T; ++t) positions.ptr<int32_t>()[t] = int32_t(rng_() % 160000);
    for (int64_t i = 0; i < half; ++i) inv_freq.ptr<double>()[i] = std::pow(10000.0, -double(2 * i) / double(2 * half)) / 40.0;
    Tensor cos_want = Tensor::empty({T, half}), sin_want = Tensor::empty({T, half});
    cpu_->rope_tables(cos_want, sin_want, positions, inv_freq, 1.25f);
    Tensor dpos = up(positions), dinv = up(inv_freq), cos_got = gpu_poison({T, half}), sin_got = gpu_poison({T, half});
    gpu_->rope_tables(cos_got, sin_got, dpos, dinv, 1.25f);
    EXPECT_LT(max_err(down(cos_got), cos_want), 1e-6) << "T " << T;
    EXPECT_LT(max_err(down(sin_got), sin_want), 1e-6) << "T " << T;
  }
}

TEST_F(CudaOps, ArgmaxTakesTheFirstOfTies) {
  for (auto [B, V] : {std::pair<int64_t, int64_t>{1, 1}, {3, 7}, {8, 129280}, {5, 1000}, {2, 32000}, {3, 4}}) {
    Tensor logits = randn({B, V});
    for (int64_t b = 0; b < B; ++b)
      if (V > 2 && b % 2 == 0) {  // a tie for the maximum: the lower index wins
        float* l = logits.f32() + b * V;
        const float mx = *std::max_element(l, l + V) + 1.0f;
        l[V - 1] = mx;
        l[(b * 7919) % (V - 1)] = mx;
      }
    Tensor want = Tensor::empty({B}, DType::I32);
    cpu_->argmax(want, logits);
    Tensor dl = up(logits), got = gpu_poison({B}, DType::I32);
    gpu_->argmax(got, dl);
    EXPECT_TRUE(same_bytes(down(got), want)) << "B " << B << " V " << V;
  }
}

TEST_F(CudaOps, GraphReplaysWithNewInputs) {
  // A miniature decode step: ids from pinned memory -> embedding -> rmsnorm -> matmul -> argmax
  // -> pinned memory, captured once and replayed with new ids.
  const int64_t B = 3, V = 300, D = 64;
  Tensor table = randn({V, D}), norm = uniform({D}, 0.5f, 1.5f);
  LinearWeight head = random_weight(V, D, DType::BF16);
  Tensor d_table = up(table), d_norm = up(norm);
  LinearWeight d_head = up(head);
  Tensor in_host = gpu_->pinned_host({B}, DType::I32), next_host = gpu_->pinned_host({B}, DType::I32);
  Tensor in_dev = gpu_->empty({B}, DType::I32), next_dev = gpu_->empty({B}, DType::I32);
  Tensor logits = gpu_->empty({B, V});
  ASSERT_TRUE(gpu_->capture_begin());
  {
    gpu_->copy_from_host(in_dev, in_host);
    Tensor x = gpu_->empty({B, D});  // allocated and freed inside the graph
    gpu_->embedding(x, in_dev, d_table);
    gpu_->rmsnorm(x, x, d_norm, 1e-6f);
    gpu_->matmul(logits, x, d_head);
    gpu_->argmax(next_dev, logits);
    gpu_->copy_to_host(next_host, next_dev);
  }
  std::shared_ptr<void> graph = gpu_->capture_end();
  ASSERT_TRUE(graph);
  for (int round = 0; round < 3; ++round) {
    Tensor ids = Tensor::empty({B}, DType::I32);
    for (int64_t b = 0; b < B; ++b) ids.ptr<int32_t>()[b] = in_host.ptr<int32_t>()[b] = int32_t(rng_() % V);
    gpu_->replay(graph);
    gpu_->synchronize();
    Tensor x = Tensor::empty({B, D}), want = Tensor::empty({B, V});
    cpu_->embedding(x, ids, table);
    cpu_->rmsnorm(x, x, norm, 1e-6f);
    cpu_->matmul(want, x, head);
    Tensor got = down(logits), best = Tensor::empty({B}, DType::I32);
    EXPECT_LT(max_err(got, want), 1e-4) << "round " << round;
    cpu_->argmax(best, got);  // the GPU's argmax of its own logits, exactly
    EXPECT_TRUE(same_bytes(best, Tensor::view(next_host.data(), {B}, DType::I32, nullptr))) << "round " << round;
  }
}

TEST_F(CudaOps, Rope) {
  struct Case { int64_t T; int H, offset, dim; int64_t ts, hs; };
  for (Case c : {Case{1, 128, 128, 64, 128 * 192, 192}, Case{37, 16, 0, 64, 16 * 64, 64}, Case{5, 1, 512, 64, 600, 0},
                 Case{9, 3, 1, 6, 3 * 11 + 2, 11}}) {
    for (bool interleaved : {true, false}) {
      const int64_t n = (c.T - 1) * c.ts + (c.H - 1) * c.hs + c.offset + c.dim;
      Tensor x = randn({n}), cs = uniform({c.T, c.dim / 2}, -1.2f, 1.2f), sn = uniform({c.T, c.dim / 2}, -1.2f, 1.2f);
      Tensor dx = up(x), dcs = up(cs), dsn = up(sn);
      RopeParams p;
      p.n_tokens = c.T, p.token_stride = c.ts, p.head_stride = c.hs, p.n_heads = c.H, p.offset = c.offset,
      p.rope_dim = c.dim, p.interleaved = interleaved;
      p.x = x.f32(), p.cos = cs.f32(), p.sin = sn.f32();
      cpu_->rope(p);
      p.x = dx.f32(), p.cos = dcs.f32(), p.sin = dsn.f32();
      gpu_->rope(p);
      EXPECT_LT(max_err(down(dx), x), 1e-5) << "T " << c.T << " H " << c.H << " interleaved " << interleaved;
    }
  }
}

// ---- matmul

// Sets the GEMV kind (cuda::set_gemv_kind: the SIMT or the tensor-core kernels everywhere they
// fit) for a scope; the previous one after it.
class TensorCoreGemv {
 public:
  explicit TensorCoreGemv(bool on) : before_(cuda::gemv_kind()) {
    cuda::set_gemv_kind(on ? cuda::GemvKind::TensorCores : cuda::GemvKind::Simt);
  }
  ~TensorCoreGemv() { cuda::set_gemv_kind(before_); }
  TensorCoreGemv(const TensorCoreGemv&) = delete;
  TensorCoreGemv& operator=(const TensorCoreGemv&) = delete;

 private:
  cuda::GemvKind before_;
};

TEST_F(CudaOps, MatmulEveryDtypeAndShape) {
  for (bool tensor_cores : {false, true}) {  // the SIMT and the tensor-core GEMV (mma_gemv.cuh)
    const TensorCoreGemv mode(tensor_cores);
    SCOPED_TRACE(tensor_cores ? "tensor-core GEMV" : "SIMT GEMV");
    struct Case { int64_t N, K, block; };
    // odd sizes (scalar paths), aligned sizes (vector paths), FP8 edge blocks and block edges
    // that are not multiples of 16 or 8
    // the tensor-core GEMV (mma_gemv.cuh) takes K % 16 == 0 (and FP8 blocks of whole 128-column
    // units; 16-bit weights from K = 1024 on): a last unit of 16 columns (144, 1040), FP8 blocks of
    // 256, x staged in two chunks (2048 at M 8)
    for (Case c : {Case{19, 33, 128}, Case{256, 512, 128}, Case{300, 200, 128}, Case{130, 1000, 128}, Case{64, 96, 24},
                   Case{21, 45, 5}, Case{1000, 2048, 128}, Case{77, 144, 128}, Case{200, 400, 256}, Case{45, 1040, 128}}) {
      for (DType dt : {DType::F32, DType::BF16, DType::F16, DType::F8_E4M3}) {
        if (c.block != 128 && dt != DType::F8_E4M3) continue;
        LinearWeight w = random_weight(c.N, c.K, dt, c.block), dw = up(w);
        for (int64_t M : {1, 2, 5, 8, 9, 17, 33, 64, 100, 130}) {
          Tensor x = randn({M, c.K});
          Tensor want = Tensor::empty({M, c.N});
          cpu_->matmul(want, x, w);
          Tensor dx = up(x), got = gpu_poison({M, c.N});
          gpu_->matmul(got, dx, dw);
          EXPECT_LT(max_err(down(got), want), 1e-4)
              << dtype_name(dt) << " M " << M << " N " << c.N << " K " << c.K << " block " << c.block;
        }
      }
    }
  }
}

TEST_F(CudaOps, MatmulBatch) {
  for (bool tensor_cores : {false, true}) {  // the SIMT and the tensor-core GEMV (mma_gemv.cuh)
    const TensorCoreGemv mode(tensor_cores);
    SCOPED_TRACE(tensor_cores ? "tensor-core GEMV" : "SIMT GEMV");
    LinearWeight a = random_weight(576, 256, DType::BF16), b = random_weight(300, 256, DType::F8_E4M3),
                 c = random_weight(77, 40, DType::F32);
    LinearWeight da = up(a), db = up(b), dc = up(c);
    for (int64_t M : {1, 3, 20}) {
      Tensor x = randn({M, 256}), x2 = randn({M, 40});
      Tensor wa = Tensor::empty({M, 576}), wb = Tensor::empty({M, 300}), wc = Tensor::empty({M, 77});
      cpu_->matmul_batch({{wa.f32(), x.f32(), M, &a}, {wb.f32(), x.f32(), M, &b}, {wc.f32(), x2.f32(), M, &c}});
      Tensor dx = up(x), dx2 = up(x2);
      Tensor ga = gpu_poison({M, 576}), gb = gpu_poison({M, 300}), gc = gpu_poison({M, 77});
      gpu_->matmul_batch({{ga.f32(), dx.f32(), M, &da}, {gb.f32(), dx.f32(), M, &db}, {gc.f32(), dx2.f32(), M, &dc}});
      EXPECT_LT(max_err(down(ga), wa), 1e-4) << "M " << M;
      EXPECT_LT(max_err(down(gb), wb), 1e-4) << "M " << M;
      EXPECT_LT(max_err(down(gc), wc), 1e-4) << "M " << M;
    }
    // runs of one dtype and M share a launch (q_a and kv_a of MLA), up to four jobs per launch
    // (GEMVs, M <= 8) or two (the tensor cores' 9-to-128-row matmul: K 256 and 2048, sliced)
    for (DType dt : {DType::BF16, DType::F8_E4M3})
    for (int64_t K : {256, 2048}) {
      std::vector<LinearWeight> host, dev;
      for (int64_t n : {768, 576, 33, 130, 1}) host.push_back(random_weight(n, K, dt));
      for (const LinearWeight& w : host) dev.push_back(up(w));
      for (int64_t M : {1, 5, 20, 40}) {
        Tensor x = randn({M, K}), dx = up(x);
        std::vector<Tensor> want, got;
        std::vector<MatmulJob> cj, gj;
        for (size_t i = 0; i < host.size(); ++i) {
          want.push_back(Tensor::empty({M, host[i].out_features()}));
          got.push_back(gpu_poison({M, host[i].out_features()}));
        }
        for (size_t i = 0; i < host.size(); ++i) {
          cj.push_back({want[i].f32(), x.f32(), M, &host[i]});
          gj.push_back({got[i].f32(), dx.f32(), M, &dev[i]});
        }
        cpu_->matmul_batch(cj);
        gpu_->matmul_batch(gj);
        for (size_t i = 0; i < host.size(); ++i)
          EXPECT_LT(max_err(down(got[i]), want[i]), 1e-4) << dtype_name(dt) << " K " << K << " M " << M << " job " << i;
      }
    }
  }
}

// matmul_batch jobs that normalise their input (InputNorm: the norm inside the GEMV, or a
// normalised copy before the GEMM) and accumulate into out, against the CPU's same jobs.
TEST_F(CudaOps, MatmulInputNormAndAccumulate) {
  for (bool tensor_cores : {false, true}) {  // the SIMT and the tensor-core GEMV (mma_gemv.cuh)
    const TensorCoreGemv mode(tensor_cores);
    SCOPED_TRACE(tensor_cores ? "tensor-core GEMV" : "SIMT GEMV");
    struct Case { int64_t N, K; };
    for (Case c : {Case{576, 256}, Case{33, 45}, Case{2048, 2048}, Case{300, 7}}) {
      for (DType dt : {DType::F32, DType::BF16, DType::F8_E4M3}) {
        LinearWeight a = random_weight(c.N, c.K, dt), b = random_weight(c.N / 2 + 1, c.K, dt);
        LinearWeight da = up(a), db = up(b);
        Tensor g = randn({c.K}), dg = up(g);
        for (int64_t M : {1, 3, 8, 20, 70}) {  // 70: F32 goes to cuBLAS (beta 1 when accumulating)
          Tensor x = randn({M, c.K}, 3.0f), base = randn({M, c.N});
          Tensor wa = Tensor::empty({M, c.N}), wb = Tensor::empty({M, c.N / 2 + 1}), wc = Tensor::empty({M, c.N});
          std::copy(base.f32(), base.f32() + base.numel(), wc.f32());
          cpu_->matmul_batch({{wa.f32(), x.f32(), M, &a, InputNorm{&g, 1e-6f}},
                              {wb.f32(), x.f32(), M, &b, InputNorm{&g, 1e-6f}},
                              {wc.f32(), x.f32(), M, &a, {}, /*accumulate=*/true}});
          Tensor dx = up(x), ga = gpu_poison({M, c.N}), gb = gpu_poison({M, c.N / 2 + 1}), gc = up(base);
          gpu_->matmul_batch({{ga.f32(), dx.f32(), M, &da, InputNorm{&dg, 1e-6f}},
                              {gb.f32(), dx.f32(), M, &db, InputNorm{&dg, 1e-6f}},
                              {gc.f32(), dx.f32(), M, &da, {}, /*accumulate=*/true}});
          EXPECT_LT(max_err(down(ga), wa), 1e-4) << "norm " << dtype_name(dt) << " M " << M << " N " << c.N << " K " << c.K;
          EXPECT_LT(max_err(down(gb), wb), 1e-4) << "norm " << dtype_name(dt) << " M " << M << " N " << c.N << " K " << c.K;
          EXPECT_LT(max_err(down(gc), wc), 1e-4) << "accumulate " << dtype_name(dt) << " M " << M << " N " << c.N;
          // both at once: a projection into the residual stream from a normalised input
          Tensor wd = Tensor::empty({M, c.N}), gd = up(base);
          std::copy(base.f32(), base.f32() + base.numel(), wd.f32());
          cpu_->matmul_batch({{wd.f32(), x.f32(), M, &a, InputNorm{&g, 1e-6f}, true}});
          gpu_->matmul_batch({{gd.f32(), dx.f32(), M, &da, InputNorm{&dg, 1e-6f}, true}});
          EXPECT_LT(max_err(down(gd), wd), 1e-4) << "norm + accumulate " << dtype_name(dt) << " M " << M << " N " << c.N;
        }
      }
    }
  }
}

// FP8 weights in prefill with Ops::set_fp8_activations on both backends: the CPU's recipe
// (exact tile sums) and the GPU's FP8 x FP8 kernel agree to the tensor cores' accumulation
// (relative L2 1e-3), with an input norm and accumulating into the output too; both differ from
// the weight-only product by what quantizing the activations costs (a few percent), and 128 rows
// or fewer stay weight-only (1e-4, as MatmulEveryDtypeAndShape).
TEST_F(CudaOps, MatmulFp8ActivationsMatchTheCpu) {
  ASSERT_TRUE(cpu_->set_fp8_activations(true));
  ASSERT_TRUE(gpu_->set_fp8_activations(true));
  struct Case { int64_t M, N, K; };
  for (Case c : {Case{300, 200, 512}, Case{129, 256, 1536}, Case{128, 64, 256}, Case{513, 130, 208}}) {
    const LinearWeight w = random_weight(c.N, c.K, DType::F8_E4M3), dw = up(w);
    Tensor g = randn({c.K}), dg = up(g), x = randn({c.M, c.K}, 3.0f), base = randn({c.M, c.N}), dx = up(x);
    Tensor want = Tensor::empty({c.M, c.N}), wn = Tensor::empty({c.M, c.N}), wacc = Tensor::empty({c.M, c.N});
    std::copy(base.f32(), base.f32() + base.numel(), wacc.f32());
    cpu_->matmul(want, x, w);
    cpu_->matmul_batch({{wn.f32(), x.f32(), c.M, &w, InputNorm{&g, 1e-6f}}, {wacc.f32(), x.f32(), c.M, &w, {}, true}});
    Tensor got = gpu_poison({c.M, c.N}), gn = gpu_poison({c.M, c.N}), gacc = up(base);
    gpu_->matmul(got, dx, dw);
    gpu_->matmul_batch({{gn.f32(), dx.f32(), c.M, &dw, InputNorm{&dg, 1e-6f}}, {gacc.f32(), dx.f32(), c.M, &dw, {}, true}});
    const Tensor hg = down(got), hn = down(gn), hacc = down(gacc);
    const bool recipe = c.M > kFp8ActivationRows;
    const double bound = recipe ? 1e-3 : 1e-4;
    auto rel = [](const Tensor& a, const Tensor& b) { return test_rel(a, b); };
    EXPECT_LT(rel(hg, want), bound) << c.M << " x " << c.N << " x " << c.K;
    EXPECT_LT(rel(hn, wn), bound) << "norm " << c.M << " x " << c.N << " x " << c.K;
    EXPECT_LT(rel(hacc, wacc), bound) << "accumulate " << c.M << " x " << c.N << " x " << c.K;
    // against weight-only FP8 (the CPU with the recipe off)
    ASSERT_TRUE(cpu_->set_fp8_activations(false));
    Tensor exact = Tensor::empty({c.M, c.N});
    cpu_->matmul(exact, x, w);
    ASSERT_TRUE(cpu_->set_fp8_activations(true));
    const double q = rel(hg, exact);
    if (recipe) {
      EXPECT_GT(q, 1e-3) << "the activations were not quantized";
      EXPECT_LT(q, 6e-2) << "quantizing the activations cost too much";
    } else {
      EXPECT_LT(q, 1e-4);
    }
  }
  ASSERT_TRUE(gpu_->set_fp8_activations(false));
}

TEST_F(CudaOps, MatmulPerHead) {
  struct Case { int H; int64_t N, K, x_pad, out_pad; };
  // MLA absorption shapes (q_nope -> latent, latent -> v), odd ones, unaligned strides
  for (Case c : {Case{16, 512, 128, 64, 0}, Case{16, 128, 512, 0, 0}, Case{3, 19, 33, 1, 3}, Case{4, 64, 64, 2, 1}}) {
    for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
      Tensor w32 = randn({c.H, c.N, c.K}, 1.0f / std::sqrt(float(c.K)));
      Tensor w = from_f32(w32.f32(), w32.shape(), dt);
      Tensor dw = up(w);
      for (int64_t T : {1, 3, 8, 9, 40, 70}) {  // 70: F32 heads as one strided-batched cuBLAS SGEMM
        const int64_t x_hs = c.K + c.x_pad, x_ts = c.H * x_hs + c.x_pad % 2;  // odd pads: unaligned rows
        const int64_t o_hs = c.N + c.out_pad, o_ts = c.H * o_hs;
        Tensor x = randn({T * x_ts});
        Tensor want = host_poison({T * o_ts});
        HeadMatmulParams p;
        p.out_token_stride = o_ts, p.out_head_stride = o_hs, p.x_token_stride = x_ts, p.x_head_stride = x_hs;
        p.n_tokens = T;
        p.out = want.f32(), p.x = x.f32();
        cpu_->matmul_per_head(p, w);
        Tensor dx = up(x), got = gpu_poison({T * o_ts});
        p.out = got.f32(), p.x = dx.f32();
        gpu_->matmul_per_head(p, dw);
        EXPECT_LT(max_err(gather(down(got), T, c.H, c.N, o_ts, o_hs), gather(want, T, c.H, c.N, o_ts, o_hs)), 1e-4)
            << dtype_name(dt) << " H " << c.H << " N " << c.N << " K " << c.K << " T " << T;
      }
    }
  }
}

// W_UK with the q_pe RoPE and the latent-cache append in its launch (HeadMatmulParams'
// also_rope / also_append, absorbed MLA's decode): the same results as the three separate CPU
// ops, the GEMV (T <= 8) and the skinny tensor-core matmul (BF16, 9 to 128 rows) carrying them,
// other paths leaving them to their own kernels.
TEST_F(CudaOps, MatmulPerHeadWithSideOps) {
  const int H = 16, nope = 128, rd = 64;
  const int64_t R = 512, dq = nope + rd, W = R + rd;
  for (DType dt : {DType::BF16, DType::F32}) {
    Tensor w32 = randn({H, R, nope}, 1.0f / std::sqrt(float(nope)));
    Tensor w = from_f32(w32.f32(), w32.shape(), dt), dw = up(w);
    for (int64_t T : {1, 3, 9, 32}) {
      for (DType cache_dt : {DType::BF16, DType::F32}) {
        const bool interleaved = T % 2 == 1;
        Tensor q = randn({T, H, dq}), kv = randn({T, W}, 3.0f), g = randn({R});
        Tensor cs = uniform({T, rd / 2}, -1.2f, 1.2f), sn = uniform({T, rd / 2}, -1.2f, 1.2f);
        const int64_t rows = T + 4, pos0 = 2;
        auto run = [&](Ops& ops, const Tensor& wt, float* qp, const float* kvp, const float* gp, const float* cp,
                       const float* sp, float* out, void* cache) {
          HeadMatmulParams p;
          p.x = qp, p.x_token_stride = H * dq, p.x_head_stride = dq;
          p.out = out, p.out_token_stride = H * W, p.out_head_stride = W;
          p.n_tokens = T;
          RopeParams r;
          r.x = qp, r.n_tokens = T, r.token_stride = H * dq, r.head_stride = dq, r.n_heads = H, r.offset = nope;
          r.rope_dim = rd, r.cos = cp, r.sin = sp, r.interleaved = interleaved;
          r.out = out, r.out_token_stride = H * W, r.out_head_stride = W, r.out_offset = int(R);
          MlaAppendParams a;
          a.out = cache, a.out_dtype = cache_dt, a.pos0 = pos0, a.kv = kvp, a.kv_token_stride = W, a.n_tokens = T;
          a.kv_lora_rank = int(R), a.rope_dim = rd, a.norm_weight = gp, a.eps = 1e-6f, a.cos = cp, a.sin = sp;
          a.interleaved = interleaved;
          p.also_rope = &r;
          p.also_append = &a;
          ops.matmul_per_head(p, wt);
        };
        Tensor want = host_poison({T, H, W}), want_cache = host_poison({rows, W}, cache_dt);
        run(*cpu_, w, q.f32(), kv.f32(), g.f32(), cs.f32(), sn.f32(), want.f32(), want_cache.data());
        Tensor dq_ = up(q), dkv = up(kv), dg = up(g), dcs = up(cs), dsn = up(sn);
        Tensor got = gpu_poison({T, H, W}), got_cache = gpu_poison({rows, W}, cache_dt);
        run(*gpu_, dw, dq_.f32(), dkv.f32(), dg.f32(), dcs.f32(), dsn.f32(), got.f32(), got_cache.data());
        const std::string what = cat(dtype_name(dt), " T ", T, " cache ", dtype_name(cache_dt));
        EXPECT_LT(max_err(down(got), want), 1e-4) << what << ": the absorbed query";
        Tensor gc = down(got_cache);
        const size_t rb = size_t(W) * dtype_size(cache_dt);
        for (int64_t r0 = 0; r0 < rows; ++r0) {
          const uint8_t* a = static_cast<const uint8_t*>(gc.data()) + r0 * rb;
          const uint8_t* b = static_cast<const uint8_t*>(want_cache.data()) + r0 * rb;
          if (r0 < pos0 || r0 >= pos0 + T) {
            EXPECT_TRUE(std::all_of(a, a + rb, [](uint8_t x) { return x == 0xFF; })) << what << ": row " << r0 << " was written";
          } else if (cache_dt == DType::F32) {
            Tensor ga = Tensor::view(gc.f32() + r0 * W, {W}, DType::F32, nullptr);
            Tensor wa = Tensor::view(want_cache.f32() + r0 * W, {W}, DType::F32, nullptr);
            EXPECT_LT(max_err(ga, wa), 1e-5) << what << ": cache row " << r0;
          } else {  // within one bf16 ulp (the norm's sum rounds differently)
            const uint16_t* ua = reinterpret_cast<const uint16_t*>(a);
            const uint16_t* ub = reinterpret_cast<const uint16_t*>(b);
            int worst = 0;
            for (int64_t i = 0; i < W; ++i) {
              const bool same_sign = (ua[i] ^ ub[i]) < 0x8000;
              worst = std::max(worst, same_sign ? std::abs(int(ua[i]) - int(ub[i])) : (ua[i] & 0x7FFF) + (ub[i] & 0x7FFF));
            }
            EXPECT_LE(worst, 1) << what << ": cache row " << r0 << " (bf16 ulps)";
          }
        }
      }
    }
  }
  // a bad side op is an error before anything is launched
  Tensor q = up(randn({1, H, dq})), out = gpu_poison({1, H, W});
  Tensor w = up(from_f32(randn({H, R, nope}).f32(), {H, R, nope}, DType::BF16));
  HeadMatmulParams p;
  p.x = q.f32(), p.x_token_stride = H * dq, p.x_head_stride = dq;
  p.out = out.f32(), p.out_token_stride = H * W, p.out_head_stride = W, p.n_tokens = 1;
  RopeParams r;
  r.x = q.f32(), r.n_tokens = 1, r.token_stride = H * dq, r.head_stride = dq, r.n_heads = H, r.offset = nope, r.rope_dim = 3;
  r.cos = q.f32(), r.sin = q.f32();
  p.also_rope = &r;
  EXPECT_THROW(gpu_->matmul_per_head(p, w), Error);
  r.rope_dim = rd;
  MlaAppendParams a;
  a.out = out.data(), a.out_dtype = DType::F16, a.kv = q.f32(), a.kv_token_stride = W, a.n_tokens = 1;
  a.kv_lora_rank = int(R), a.rope_dim = rd, a.norm_weight = q.f32(), a.cos = q.f32(), a.sin = q.f32();
  p.also_append = &a;
  EXPECT_THROW(gpu_->matmul_per_head(p, w), Error);
}

// ---- attention

struct AttnCase {
  const char* what;
  int64_t n_q, n_kv, q_pos0;
  int hq, hkv, dqk, dv;
  bool causal;
  DType kv;
  int block_size;  // 0: contiguous cache
  bool v_in_k;     // V = the first dv columns of K (absorbed MLA)
  int pad;         // extra elements per K/V token row (unaligned strides when odd)
  int slack = 0;   // > 0: the key count comes from device memory (kv_len), n_kv + slack bounds it
};

TEST_F(CudaOps, Attention) {
  const AttnCase cases[] = {
      {"MHA decode chunk", 5, 40, 35, 4, 4, 64, 64, true, DType::F32, 0, false, 0},
      {"MHA prefill d192/128", 100, 100, 0, 3, 3, 192, 128, true, DType::F32, 0, false, 0},
      {"GQA long context (split-KV)", 3, 3000, 2997, 8, 2, 128, 128, true, DType::F32, 0, false, 0},
      {"GQA bf16 long context", 2, 3000, 2998, 8, 2, 128, 128, true, DType::BF16, 0, false, 0},
      {"absorbed MLA 16 heads", 1, 3000, 2999, 16, 1, 576, 512, true, DType::F32, 0, true, 0},
      {"absorbed MLA 128 heads bf16 paged", 2, 3000, 2998, 128, 1, 576, 512, true, DType::BF16, 64, true, 0},
      {"absorbed MLA prefill paged", 70, 70, 0, 16, 1, 576, 512, true, DType::F32, 16, true, 0},
      {"MQA separate V, unaligned", 4, 333, 329, 6, 1, 72, 40, true, DType::BF16, 0, false, 1},
      {"odd dims, not causal", 7, 50, 0, 2, 2, 33, 17, false, DType::F32, 0, false, 3},
      {"odd dims bf16 paged", 9, 200, 191, 4, 2, 33, 17, true, DType::BF16, 16, false, 1},
      {"no keys", 3, 0, 0, 4, 2, 64, 64, true, DType::F32, 0, false, 0},
      {"more queries than keys visible", 130, 130, 0, 4, 2, 24, 16, true, DType::F32, 0, false, 0},
      // F32 with 64 queries or more: the GEMM path (attention_gemm.cu) — after a prefix, not causal
      {"GEMM path: prefill after a prefix, GQA", 80, 200, 120, 4, 2, 48, 32, true, DType::F32, 0, false, 0},
      {"GEMM path: not causal, padded", 64, 90, 0, 3, 3, 40, 24, false, DType::F32, 0, false, 2},
      {"graph decode: kv_len on the device", 1, 1000, 999, 16, 1, 576, 512, true, DType::BF16, 64, true, 0, 3000},
      {"graph decode: kv_len, MHA", 1, 77, 76, 4, 4, 64, 64, true, DType::F32, 0, false, 0, 100},
      // the BF16 latent shape runs on tensor cores (attention_mla.cu)
      {"MLA latent: 5 keys", 1, 5, 4, 16, 1, 576, 512, true, DType::BF16, 0, true, 0},
      {"MLA latent: 2 tokens x 8 heads in one tile, paged", 2, 130, 128, 8, 1, 576, 512, true, DType::BF16, 16, true, 0},
      {"MLA latent: prefill, several tiles per block", 150, 150, 0, 16, 1, 576, 512, true, DType::BF16, 0, true, 0},
      {"MLA latent: long context", 1, 20000, 19999, 16, 1, 576, 512, true, DType::BF16, 64, true, 0},
      {"MLA latent: 2 KV heads, not causal", 3, 97, 0, 4, 2, 576, 512, false, DType::BF16, 0, true, 0},
      // 2 to 8 key chunks merge inside a thread-block cluster on Hopper (MlaLaunch::cluster_merge):
      // three row tiles of five chunks each, the last chunk partial, causal limits inside it
      {"MLA latent: 3 row tiles x 5 chunks, paged", 3, 300, 297, 16, 1, 576, 512, true, DType::BF16, 16, true, 0},
  };
  // twice: the F32 self-attentions of 64 queries or more on the GEMM path (attention_gemm.cu),
  // then all of them at the default threshold (1,024 queries), so on the kernels
  for (int64_t gemm_from : {int64_t(64), cuda::kAttentionGemmForwardMinQueries})
  for (const AttnCase& c : cases) {
    cuda::set_attention_gemm_forward_min_queries(gemm_from);
    SCOPED_TRACE(cat(c.what, gemm_from == 64 ? " (GEMM path from 64 queries)" : ""));
    // q (n_q, hq, dqk) with a token-stride pad; out (n_q, hq, dv) likewise
    const int64_t q_hs = c.dqk, q_ts = c.hq * q_hs + 3, o_hs = c.dv, o_ts = c.hq * o_hs + 2;
    Tensor q = randn({std::max<int64_t>(1, c.n_q * q_ts)});
    // the cache: rows (physical when paged) x hkv heads
    const int64_t bound = c.n_kv + c.slack;  // keys the cache holds room for
    const int64_t n_blocks = c.block_size ? (bound + c.block_size - 1) / c.block_size : 0;
    const int64_t pool_blocks = n_blocks + 2;  // spare blocks the table never points at
    const int64_t rows = c.block_size ? pool_blocks * c.block_size : bound;
    const int64_t k_hs = c.dqk + c.pad, k_ts = c.hkv * k_hs;
    const int64_t v_hs = c.v_in_k ? k_hs : c.dv + c.pad, v_ts = c.v_in_k ? k_ts : c.hkv * v_hs;
    Tensor k = randn({std::max<int64_t>(1, rows * k_ts)});
    Tensor v = c.v_in_k ? k : randn({std::max<int64_t>(1, rows * v_ts)});
    std::vector<int32_t> table(static_cast<size_t>(pool_blocks));
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), rng_);
    table.resize(size_t(std::max<int64_t>(1, n_blocks)));
    Tensor table_t = Tensor::empty({int64_t(table.size())}, DType::I32);
    std::copy(table.begin(), table.end(), table_t.ptr<int32_t>());

    // the GPU reads BF16 when asked; the CPU reads the same values widened to F32
    Tensor k_dev_host = k, v_dev_host = v;
    if (c.kv == DType::BF16) {
      k_dev_host = from_f32(k.f32(), k.shape(), DType::BF16);
      k = to_f32(k_dev_host);
      if (c.v_in_k) {
        v_dev_host = k_dev_host;
        v = k;
      } else {
        v_dev_host = from_f32(v.f32(), v.shape(), DType::BF16);
        v = to_f32(v_dev_host);
      }
    }
    AttentionParams p;
    p.q_token_stride = q_ts, p.q_head_stride = q_hs;
    p.k_token_stride = k_ts, p.k_head_stride = k_hs;
    p.v_token_stride = v_ts, p.v_head_stride = v_hs;
    p.block_size = c.block_size;
    p.out_token_stride = o_ts, p.out_head_stride = o_hs;
    p.n_q = c.n_q, p.n_kv = c.slack ? bound : c.n_kv, p.q_pos0 = c.q_pos0;
    const int32_t kv_len = int32_t(c.n_kv);
    Tensor kv_len_t = Tensor::empty({1}, DType::I32);
    kv_len_t.ptr<int32_t>()[0] = kv_len;
    p.n_q_heads = c.hq, p.n_kv_heads = c.hkv, p.d_qk = c.dqk, p.d_v = c.dv;
    p.scale = 1.0f / std::sqrt(float(c.dqk));
    p.causal = c.causal;

    Tensor want = host_poison({std::max<int64_t>(1, c.n_q * o_ts)});
    p.q = q.f32(), p.k = k.f32(), p.v = v.f32(), p.kv_dtype = DType::F32;
    p.block_table = c.block_size ? table_t.ptr<int32_t>() : nullptr;
    p.kv_len = c.slack ? &kv_len : nullptr;
    p.out = want.f32();
    cpu_->attention(p);

    Tensor dq = up(q), dk = up(k_dev_host), dv = c.v_in_k ? dk : up(v_dev_host), dtable = up(table_t);
    Tensor d_kv_len = up(kv_len_t);
    Tensor got = gpu_poison(want.shape());
    p.q = dq.f32(), p.k = dk.data(), p.v = dv.data(), p.kv_dtype = c.kv;
    p.block_table = c.block_size ? dtable.ptr<int32_t>() : nullptr;
    p.kv_len = c.slack ? d_kv_len.ptr<int32_t>() : nullptr;
    p.out = got.f32();
    gpu_->attention(p);
    EXPECT_LT(max_err(gather(down(got), c.n_q, c.hq, c.dv, o_ts, o_hs), gather(want, c.n_q, c.hq, c.dv, o_ts, o_hs)),
              1e-4);
  }
}

// Several sequences' attentions in one call (Ops::attention_batch, a batched decode step): the
// latent shape over one paged BF16 cache — the sequences' pages interleaved in the pool, key
// counts from 1 to 3,000 (one block, several chunks merged), a sequence of 2 queries (a verified
// draft) — against the CPU's attention of each; then a batch the latent kernel does not take
// (F32 keys), run one call each.
TEST_F(CudaOps, AttentionBatch) {
  const int H = 16, dqk = 576, dv = 512, bs = 64;
  const std::vector<std::pair<int64_t, int64_t>> seqs = {{1, 1}, {1, 77}, {2, 300}, {1, 3000}, {1, 64}, {1, 1029}};
  for (DType kv : {DType::BF16, DType::F32}) {
    SCOPED_TRACE(dtype_name(kv));
    int64_t blocks = 0;
    for (const auto& [n_q, n_kv] : seqs) blocks += (n_kv + bs - 1) / bs;
    std::vector<int32_t> order(static_cast<size_t>(blocks + 3));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng_);  // every sequence's pages anywhere in the pool
    const int64_t rows = int64_t(order.size()) * bs;
    Tensor k = randn({rows * dqk});
    Tensor k_dev_host = k;
    if (kv == DType::BF16) {
      k_dev_host = from_f32(k.f32(), k.shape(), DType::BF16);
      k = to_f32(k_dev_host);
    }
    Tensor dk = up(k_dev_host);
    std::vector<Tensor> qs, wants, gots, tables, dtables, dqs;
    std::vector<AttentionParams> cpu_ps, gpu_ps;
    size_t next = 0;
    for (const auto& [n_q, n_kv] : seqs) {
      const int64_t nb = (n_kv + bs - 1) / bs;
      Tensor table = Tensor::empty({nb}, DType::I32);
      for (int64_t b = 0; b < nb; ++b) table.ptr<int32_t>()[b] = order[next++];
      tables.push_back(table);
      qs.push_back(randn({n_q * H * dqk}));
      wants.push_back(host_poison({n_q * H * dv}));
      AttentionParams p;
      p.q_token_stride = H * dqk, p.q_head_stride = dqk;
      p.k_token_stride = dqk, p.k_head_stride = 0, p.v_token_stride = dqk, p.v_head_stride = 0;
      p.block_size = bs;
      p.out_token_stride = H * dv, p.out_head_stride = dv;
      p.n_q = n_q, p.n_kv = n_kv, p.q_pos0 = n_kv - n_q;
      p.n_q_heads = H, p.n_kv_heads = 1, p.d_qk = dqk, p.d_v = dv;
      p.scale = 1.0f / std::sqrt(float(dqk));
      p.causal = true;
      AttentionParams c = p;
      c.q = qs.back().f32(), c.k = k.f32(), c.v = k.f32(), c.kv_dtype = DType::F32;
      c.block_table = tables.back().ptr<int32_t>(), c.out = wants.back().f32();
      cpu_ps.push_back(c);
      dqs.push_back(up(qs.back()));
      dtables.push_back(up(table));
      gots.push_back(gpu_poison({n_q * H * dv}));
      AttentionParams g = p;
      g.q = dqs.back().f32(), g.k = dk.data(), g.v = dk.data(), g.kv_dtype = kv;
      g.block_table = dtables.back().ptr<int32_t>(), g.out = gots.back().f32();
      gpu_ps.push_back(g);
    }
    cpu_->attention_batch(cpu_ps);
    gpu_->attention_batch(gpu_ps);
    for (size_t i = 0; i < seqs.size(); ++i)
      EXPECT_LT(max_err(down(gots[i]), wants[i]), 1e-4) << "sequence " << i << ": " << seqs[i].first << " queries, "
                                                        << seqs[i].second << " keys";
  }
}

// The batch of a graph-replayed decode step (a uniform batch: attention_latent_uniform): every
// sequence's query, output, block table row and key count a fixed stride from the first's, the
// key counts read on the device, the grid sized for the tables' bound. Run eagerly, then
// captured in a graph and replayed with other key counts (and other tables) copied in from
// pinned memory — each time against the CPU's attention of each sequence.
TEST_F(CudaOps, AttentionBatchUniform) {
  const int H = 16, dqk = 576, dv = 512, bs = 16;
  const int64_t B = 7, W = 256;  // table width: a bound of 4,096 keys per sequence
  const int64_t pool_blocks = B * W / 2 + 5;
  Tensor k_dev_host = from_f32(randn({pool_blocks * bs * dqk}).f32(), {pool_blocks * bs * dqk}, DType::BF16);
  Tensor k = to_f32(k_dev_host), dk = up(k_dev_host);
  Tensor q = randn({B * H * dqk}), dq = up(q);
  // the inputs a replay reads: key counts, then the tables (B, W)
  Tensor in_host = gpu_->pinned_host({B + B * W}, DType::I32), in_dev = gpu_->empty({B + B * W}, DType::I32);
  Tensor got = gpu_poison({B * H * dv});
  std::vector<AttentionParams> gpu_ps;
  for (int64_t b = 0; b < B; ++b) {
    AttentionParams p;
    p.q = dq.f32() + b * H * dqk, p.q_token_stride = H * dqk, p.q_head_stride = dqk;
    p.k = dk.data(), p.v = dk.data(), p.kv_dtype = DType::BF16;
    p.k_token_stride = dqk, p.k_head_stride = 0, p.v_token_stride = dqk, p.v_head_stride = 0;
    p.block_table = in_dev.ptr<int32_t>() + B + b * W, p.block_size = bs;
    p.out = got.f32() + b * H * dv, p.out_token_stride = H * dv, p.out_head_stride = dv;
    p.n_q = 1, p.n_kv = W * bs, p.kv_len = in_dev.ptr<int32_t>() + b;
    p.n_q_heads = H, p.n_kv_heads = 1, p.d_qk = dqk, p.d_v = dv;
    p.scale = 1.0f / std::sqrt(float(dqk));
    p.causal = true;
    gpu_ps.push_back(p);
  }
  // new key counts (1 to the bound) and tables: distinct pool blocks per sequence, shuffled
  auto fill = [&](const std::vector<int32_t>& lens) {
    std::vector<int32_t> order(static_cast<size_t>(pool_blocks));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng_);
    int32_t* in = in_host.ptr<int32_t>();
    size_t next = 0;
    for (int64_t b = 0; b < B; ++b) {
      in[b] = lens[size_t(b)];
      const int64_t used = (lens[size_t(b)] + bs - 1) / bs;
      for (int64_t j = 0; j < W; ++j) in[B + b * W + j] = j < used ? order[next++] : 0;
    }
  };
  auto check = [&](const char* what) {
    const int32_t* in = in_host.ptr<int32_t>();
    Tensor all = down(got);
    for (int64_t b = 0; b < B; ++b) {
      Tensor want = host_poison({H * dv});
      Tensor table = Tensor::view(const_cast<int32_t*>(in + B + b * W), {W}, DType::I32, nullptr);
      AttentionParams c = gpu_ps[size_t(b)];
      c.q = q.f32() + b * H * dqk, c.k = k.f32(), c.v = k.f32(), c.kv_dtype = DType::F32;
      c.block_table = table.ptr<int32_t>(), c.out = want.f32(), c.kv_len = in + b;
      cpu_->attention(c);
      Tensor row = Tensor::view(all.f32() + b * H * dv, {H * dv}, DType::F32, nullptr);
      EXPECT_LT(max_err(row, want), 1e-4) << what << ": sequence " << b << ", " << in[b] << " keys";
    }
  };
  const std::vector<std::vector<int32_t>> rounds = {
      {1, 77, 300, 4096, 64, 1029, 2}, {2, 78, 301, 17, 65, 1030, 4000}, {4096, 1, 1, 1, 1, 1, 1}};
  fill(rounds[0]);
  gpu_->copy_from_host(in_dev, in_host);
  gpu_->attention_batch(gpu_ps);
  gpu_->synchronize();
  check("eager");
  ASSERT_TRUE(gpu_->capture_begin());
  gpu_->copy_from_host(in_dev, in_host);
  gpu_->attention_batch(gpu_ps);
  std::shared_ptr<void> graph = gpu_->capture_end();
  ASSERT_TRUE(graph);
  Tensor poison = gpu_->pinned_host({B * H * dv}, DType::F32);  // NaN over got before each replay
  std::fill(poison.f32(), poison.f32() + B * H * dv, std::numeric_limits<float>::quiet_NaN());
  for (size_t r = 1; r < rounds.size(); ++r) {
    fill(rounds[r]);
    gpu_->copy_from_host(got, poison);
    gpu_->replay(graph);
    gpu_->synchronize();
    check(r == 1 ? "replay 1" : "replay 2");
  }
}

// ---- MoE

// Whether every pair of values differs by more than rounding could blur (relative rel).
bool separated(std::vector<double> v, double rel) {
  std::sort(v.begin(), v.end());
  for (size_t i = 0; i + 1 < v.size(); ++i)
    if (v[i + 1] - v[i] <= rel * std::max(std::fabs(v[i]), std::fabs(v[i + 1]))) return false;
  return true;
}
// Router logits whose choice values and group ranks have no near-ties: float rounding in the
// exponentials (CPU and GPU differ by an ulp) cannot change which experts win. rel: the
// relative gap required (larger where the logits themselves are sums in different orders).
bool well_separated(const float* l, const float* bias, const MoeGateParams& p, double rel = 2e-6) {
  const int E = p.n_experts;
  std::vector<double> choice(static_cast<size_t>(E));
  double mx = *std::max_element(l, l + E), sum = 0;
  for (int e = 0; e < E; ++e) sum += std::exp(double(l[e]) - mx);
  for (int e = 0; e < E; ++e) {
    const double s = p.scoring == ScoringFunc::Sigmoid ? 1 / (1 + std::exp(-double(l[e]))) : std::exp(l[e] - mx) / sum;
    choice[size_t(e)] = s + (bias ? bias[e] : 0.0);
  }
  if (!separated(choice, rel)) return false;
  if (p.n_group <= 1) return true;
  const int per = E / p.n_group;
  std::vector<double> groups;
  for (int g = 0; g < p.n_group; ++g) {
    std::vector<double> v(choice.begin() + g * per, choice.begin() + (g + 1) * per);
    std::sort(v.rbegin(), v.rend());
    groups.push_back(p.group_by_top2_sum && per >= 2 ? v[0] + v[1] : v[0]);
  }
  return separated(groups, rel);
}

TEST_F(CudaOps, MoeGateChoosesTheSameExperts) {
  struct Case { const char* what; ScoringFunc scoring; int E, top_k, n_group, topk_group; bool top2, norm, bias; float rsf; };
  const Case cases[] = {
      {"V3 noaux_tc", ScoringFunc::Sigmoid, 256, 8, 8, 4, true, true, true, 2.5f},
      {"V2-Lite softmax", ScoringFunc::Softmax, 64, 6, 1, 1, true, false, false, 1.0f},
      {"V2 group_limited_greedy", ScoringFunc::Softmax, 160, 6, 8, 3, false, false, false, 16.0f},
      {"odd, sigmoid, bias, no groups", ScoringFunc::Sigmoid, 7, 3, 1, 1, true, true, true, 1.0f},
      {"groups of one", ScoringFunc::Sigmoid, 16, 4, 16, 5, true, true, false, 1.0f},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    MoeGateParams p;
    p.scoring = c.scoring, p.n_experts = c.E, p.top_k = c.top_k, p.n_group = c.n_group, p.topk_group = c.topk_group;
    p.group_by_top2_sum = c.top2, p.norm_topk_prob = c.norm, p.routed_scaling_factor = c.rsf;
    for (int64_t T : {1, 5, 37}) {
      // Logits: a shuffled ladder (distinct by 0.05) plus a little noise, so no two scores, choice
      // values or group ranks are within rounding of each other.
      // bias: a multiple of 1/1024 (exact) that reorders some experts
      Tensor bias = Tensor::empty({c.E});
      for (int e = 0; e < c.E; ++e) bias.f32()[e] = float(int(rng_() % 64) - 32) / 1024.0f;
      Tensor logits = Tensor::empty({T, c.E});
      for (int64_t t = 0; t < T; ++t) {
        float* l = logits.f32() + t * c.E;
        int tries = 0;
        do {
          std::vector<int> order(static_cast<size_t>(c.E));
          std::iota(order.begin(), order.end(), 0);
          std::shuffle(order.begin(), order.end(), rng_);
          std::uniform_real_distribution<float> noise(-0.005f, 0.005f);
          for (int e = 0; e < c.E; ++e) l[e] = (float(order[size_t(e)]) - c.E / 2.0f) * 0.05f + noise(rng_);
        } while (!well_separated(l, c.bias ? bias.f32() : nullptr, p) && ++tries < 1000);
        ASSERT_LT(tries, 1000) << "could not draw logits without near-ties";
      }
      Tensor w_want = Tensor::empty({T, c.top_k}), e_want = Tensor::empty({T, c.top_k}, DType::I32);
      cpu_->moe_gate(w_want, e_want, logits, c.bias ? bias.f32() : nullptr, p);
      Tensor dl = up(logits), db = up(bias);
      Tensor w_got = gpu_poison({T, c.top_k}), e_got = gpu_poison({T, c.top_k}, DType::I32);
      gpu_->moe_gate(w_got, e_got, dl, c.bias ? db.f32() : nullptr, p);
      EXPECT_TRUE(same_bytes(down(e_got), e_want)) << "T " << T;
      EXPECT_LT(max_err(down(w_got), w_want), 1e-6) << "T " << T;
    }
  }
}

// moe_route: the one-kernel form (9 to 64 tokens: norm, router and choice per token, the
// normalised rows left for the experts) and, outside that, the composition, against the CPU's
// composition (a matmul with the input norm, moe_gate; rmsnorm for the rows). The logits are sums over the hidden size in different orders on the two sides, so
// the tokens' rows are drawn until their choice values are 1e-4 apart (relative).
TEST_F(CudaOps, MoeRouteMatchesTheCpu) {
  struct Case { const char* what; ScoringFunc scoring; int E, top_k, n_group, topk_group; bool top2, norm, bias; int64_t D; };
  const Case cases[] = {
      {"v3-4.9b: sigmoid, 8 groups keep 4, bias", ScoringFunc::Sigmoid, 64, 6, 8, 4, true, true, true, 512},
      {"V2-Lite: softmax, no groups", ScoringFunc::Softmax, 64, 6, 1, 1, true, false, false, 256},
      {"odd: 7 experts, hidden 40 (no vector loads)", ScoringFunc::Sigmoid, 7, 3, 1, 1, true, true, true, 40},
  };
  for (const Case& c : cases)
    for (DType dt : {DType::BF16, DType::F32})
      for (bool with_norm : {true, false})
        for (int64_t T : {1, 9, 33, 70}) {
          SCOPED_TRACE(cat(c.what, ", ", dtype_name(dt), " router, ", with_norm ? "norm" : "no norm", ", T ", T));
          MoeGateParams p;
          p.scoring = c.scoring, p.n_experts = c.E, p.top_k = c.top_k, p.n_group = c.n_group;
          p.topk_group = c.topk_group, p.group_by_top2_sum = c.top2, p.norm_topk_prob = c.norm;
          p.routed_scaling_factor = 2.5f;
          const int64_t D = c.D;
          LinearWeight router = random_weight(c.E, D, dt);
          std::vector<double> w(static_cast<size_t>(c.E * D));
          for (size_t i = 0; i < w.size(); ++i)
            w[i] = dt == DType::F32 ? router.weight.f32()[i] : bf16_to_f32(router.weight.ptr<uint16_t>()[i]);
          Tensor g = uniform({D}, 0.5f, 1.5f), bias = Tensor::empty({c.E});
          for (int e = 0; e < c.E; ++e) bias.f32()[e] = float(int(rng_() % 64) - 32) / 1024.0f;
          const float eps = 1e-6f;
          Tensor x = Tensor::empty({T, D});
          for (int64_t t = 0; t < T; ++t) {
            float* xr = x.f32() + t * D;
            int tries = 0;
            for (;; ++tries) {
              ASSERT_LT(tries, 1000) << "could not draw a row without near-ties";
              std::normal_distribution<float> nd(0.f, 3.f);
              double ss = 0;
              for (int64_t k = 0; k < D; ++k) xr[k] = nd(rng_), ss += double(xr[k]) * xr[k];
              const double inv = with_norm ? 1 / std::sqrt(ss / double(D) + eps) : 1.0;
              std::vector<float> l(static_cast<size_t>(c.E));
              for (int e = 0; e < c.E; ++e) {
                double a = 0;
                for (int64_t k = 0; k < D; ++k)
                  a += w[size_t(e * D + k)] * xr[k] * (with_norm ? inv * g.f32()[k] : 1.0);
                l[size_t(e)] = float(a);
              }
              if (well_separated(l.data(), c.bias ? bias.f32() : nullptr, p, 1e-4)) break;
            }
          }
          const InputNorm norm_cpu = with_norm ? InputNorm{&g, eps} : InputNorm{};
          Tensor w_want = Tensor::empty({T, c.top_k}), e_want = Tensor::empty({T, c.top_k}, DType::I32), unused;
          EXPECT_FALSE(cpu_->moe_route(w_want, e_want, &unused, x, router, norm_cpu, c.bias ? bias.f32() : nullptr, p));
          Tensor dx = up(x), dg = up(g), db = up(bias);
          const LinearWeight drouter = up(router);
          const InputNorm norm_gpu = with_norm ? InputNorm{&dg, eps} : InputNorm{};
          Tensor w_got = gpu_poison({T, c.top_k}), e_got = gpu_poison({T, c.top_k}, DType::I32);
          Tensor xn_got;
          const bool made = gpu_->moe_route(w_got, e_got, &xn_got, dx, drouter, norm_gpu, c.bias ? db.f32() : nullptr, p);
          EXPECT_EQ(made, with_norm && T >= 9 && T <= 64);  // the one-kernel form, which makes the rows
          EXPECT_TRUE(same_bytes(down(e_got), e_want));
          EXPECT_LT(max_err(down(w_got), w_want), 1e-5);
          if (made) {
            Tensor xn_want = Tensor::empty({T, D});
            cpu_->rmsnorm(xn_want, x, g, eps);
            EXPECT_LT(max_err(down(xn_got), xn_want), 1e-5);
          }
        }
}

TEST_F(CudaOps, MoeExpertsMatchTheCpu) {
  // the SIMT and the tensor-core GEMV (mma_gemv.cuh), the latter with each form of the grouped
  // small tiles (cuda::GroupedForm); then (modes 3-5, FP8, one token) the default GEMV kind with
  // gate and up on the tensor cores, each tile's K split over 1, 2 and 4 warps
  for (int mode = 0; mode < 6; ++mode) {
    const bool tensor_cores = mode == 1 || mode == 2;
    const TensorCoreGemv gemv(tensor_cores);
    if (mode >= 3) cuda::set_gemv_kind(cuda::GemvKind::Auto);
    cuda::set_token_expert_tiles(mode == 3 ? 1 : mode == 4 ? 2 : mode == 5 ? 4 : 0);
    cuda::set_grouped_form(mode == 2 ? cuda::GroupedForm::Ahead : cuda::GroupedForm::ThreeBlocks);
    SCOPED_TRACE(mode == 0   ? "SIMT GEMV"
                 : mode == 1 ? "tensor-core GEMV, grouped three blocks a SM"
                 : mode == 2 ? "tensor-core GEMV, grouped next unit ahead"
                             : cat("one token's FP8 gate and up in tiles, K over ", mode == 3 ? 1 : mode == 4 ? 2 : 4,
                                   " warps"));
    struct Case { int E, K; int64_t D, I, block; };
    // {16, 4, 256, 128}: 33 tokens take the grouped path's small tiles (8 rows), on the tensor cores
    // (mma_gemv.cuh) as do 1 and 5 tokens there and in {4, 4, 512, 256} (the shared expert in pieces);
    // {12, 4, 1536, 136}: hidden 1,536, staged in two chunks of x by the three-block form;
    // {8, 3, 2048, 96}: one token's FP8 gate and up in tiles (modes 3-5), the last block partly past inter
    for (Case c : {Case{8, 3, 256, 136, 128}, Case{6, 2, 33, 19, 128}, Case{4, 4, 512, 256, 128}, Case{5, 2, 64, 48, 16},
                   Case{3, 2, 40, 24, 7}, Case{16, 4, 256, 128, 128}, Case{12, 4, 1536, 136, 128},
                   Case{8, 3, 2048, 96, 128}}) {
      for (DType dt : {DType::F32, DType::BF16, DType::F16, DType::F8_E4M3}) {
        if (c.block != 128 && dt != DType::F8_E4M3) continue;
        if (mode >= 3 && dt != DType::F8_E4M3) continue;
        std::vector<LinearWeight> host(static_cast<size_t>(3 * c.E)), dev(host.size());
        ExpertSet cpu_set, gpu_set;
        for (int e = 0; e < c.E; ++e) {
          for (int i = 0; i < 3; ++i) {
            const size_t j = size_t(3 * e + i);
            host[j] = i < 2 ? random_weight(c.I, c.D, dt, c.block) : random_weight(c.D, c.I, dt, c.block);
            dev[j] = up(host[j]);
          }
          cpu_set.experts.push_back({&host[size_t(3 * e)], &host[size_t(3 * e + 1)], &host[size_t(3 * e + 2)]});
          gpu_set.experts.push_back({&dev[size_t(3 * e)], &dev[size_t(3 * e + 1)], &dev[size_t(3 * e + 2)]});
        }
        cpu_->prepare_experts(cpu_set);
        gpu_->prepare_experts(gpu_set);
        // a shared expert of twice the intermediate size (as DeepSeek's 2 shared experts are)
        LinearWeight hs[3] = {random_weight(2 * c.I, c.D, dt, c.block), random_weight(2 * c.I, c.D, dt, c.block),
                              random_weight(c.D, 2 * c.I, dt, c.block)};
        LinearWeight ds[3] = {up(hs[0]), up(hs[1]), up(hs[2])};
        ExpertSet cpu_shared, gpu_shared;
        cpu_shared.experts.push_back({&hs[0], &hs[1], &hs[2]});
        gpu_shared.experts.push_back({&ds[0], &ds[1], &ds[2]});
        cpu_->prepare_experts(cpu_shared);
        gpu_->prepare_experts(gpu_shared);
        // 1 and 5 tokens take the gather path, 33 and 130 the grouped one (several tiles per expert)
        for (int64_t T : {1, 5, 33, 130}) {
          if (mode >= 3 && T != 1) continue;
          Tensor x = randn({T, c.D}), weights = uniform({T, c.K}, 0.1f, 1.0f);
          Tensor ids = Tensor::empty({T, c.K}, DType::I32);
          for (int64_t t = 0; t < T; ++t) {  // K distinct experts per token
            std::vector<int> order(static_cast<size_t>(c.E));
            std::iota(order.begin(), order.end(), 0);
            std::shuffle(order.begin(), order.end(), rng_);
            for (int k = 0; k < c.K; ++k) ids.ptr<int32_t>()[t * c.K + k] = order[size_t(k)];
          }
          for (bool with_shared : {false, true}) {
            Tensor want = Tensor::empty({T, c.D});
            cpu_->moe_experts(want, x, weights, ids, cpu_set, with_shared ? &cpu_shared : nullptr);
            Tensor dx = up(x), dwts = up(weights), dids = up(ids), got = gpu_poison({T, c.D});
            gpu_->moe_experts(got, dx, dwts, dids, gpu_set, with_shared ? &gpu_shared : nullptr);
            EXPECT_LT(max_err(down(got), want), 1e-4) << dtype_name(dt) << " E " << c.E << " K " << c.K << " D " << c.D
                                                      << " I " << c.I << " T " << T << (with_shared ? " + shared" : "");
          }
          // as the decoder layer calls it: x += experts(rmsnorm(x)), out being x itself
          Tensor g = randn({c.D}), dg = up(g), want = Tensor::empty({T, c.D});
          std::copy(x.f32(), x.f32() + x.numel(), want.f32());
          cpu_->moe_experts(want, want, weights, ids, cpu_set, &cpu_shared, true, InputNorm{&g, 1e-6f});
          Tensor dx = up(x), dwts = up(weights), dids = up(ids);
          gpu_->moe_experts(dx, dx, dwts, dids, gpu_set, &gpu_shared, true, InputNorm{&dg, 1e-6f});
          EXPECT_LT(max_err(down(dx), want), 1e-4) << "norm + accumulate into x, " << dtype_name(dt) << " E " << c.E
                                                   << " D " << c.D << " I " << c.I << " T " << T;
        }
      }
    }
  }
  cuda::set_grouped_form(cuda::GroupedForm::Auto);
  cuda::set_token_expert_tiles(-1);
}

// The dense SwiGLU (shared experts, dense MLP) through the expert kernels: out = or += .
TEST_F(CudaOps, SwigluMatchesTheCpu) {
  for (bool tensor_cores : {false, true}) {  // the SIMT and the tensor-core GEMV (mma_gemv.cuh)
    const TensorCoreGemv mode(tensor_cores);
    SCOPED_TRACE(tensor_cores ? "tensor-core GEMV" : "SIMT GEMV");
    struct Case { int64_t D, I, block; };
    for (Case c : {Case{256, 512, 128}, Case{33, 19, 128}, Case{2048, 1024, 128}, Case{40, 24, 7}}) {
      for (DType dt : {DType::F32, DType::BF16, DType::F16, DType::F8_E4M3}) {
        if (c.block != 128 && dt != DType::F8_E4M3) continue;
        LinearWeight hg = random_weight(c.I, c.D, dt, c.block), hu = random_weight(c.I, c.D, dt, c.block),
                     hd = random_weight(c.D, c.I, dt, c.block);
        LinearWeight dg = up(hg), du = up(hu), dd = up(hd);
        ExpertSet cpu_set, gpu_set;
        cpu_set.experts.push_back({&hg, &hu, &hd});
        gpu_set.experts.push_back({&dg, &du, &dd});
        cpu_->prepare_experts(cpu_set);
        gpu_->prepare_experts(gpu_set);
        for (int64_t T : {1, 3, 8}) {
          for (bool acc : {false, true}) {
            Tensor x = randn({T, c.D}), base = randn({T, c.D});
            Tensor want = Tensor::empty({T, c.D});
            std::copy(base.f32(), base.f32() + base.numel(), want.f32());
            cpu_->swiglu(want, x, cpu_set, acc);
            Tensor dx = up(x), got = acc ? up(base) : gpu_poison({T, c.D});
            gpu_->swiglu(got, dx, gpu_set, acc);
            EXPECT_LT(max_err(down(got), want), 1e-4)
                << dtype_name(dt) << " D " << c.D << " I " << c.I << " T " << T << (acc ? " accumulate" : "");
          }
          // the dense MLP as the decoder layer calls it: x += swiglu(rmsnorm(x)), out being x
          Tensor x = randn({T, c.D}), nw = randn({c.D}), dnw = up(nw), want = Tensor::empty({T, c.D});
          std::copy(x.f32(), x.f32() + x.numel(), want.f32());
          cpu_->swiglu(want, want, cpu_set, true, InputNorm{&nw, 1e-6f});
          Tensor dx = up(x);
          gpu_->swiglu(dx, dx, gpu_set, true, InputNorm{&dnw, 1e-6f});
          EXPECT_LT(max_err(down(dx), want), 1e-4) << "norm + accumulate into x, " << dtype_name(dt) << " D " << c.D
                                                   << " T " << T;
        }
      }
    }
  }
}

TEST_F(CudaOps, AddRmsNormFusesTheResidual) {
  for (auto [M, N] : {std::pair<int64_t, int64_t>{1, 7168}, {5, 1}, {33, 513}, {3, 2048}}) {
    Tensor x = randn({M, N}), y = randn({M, N}), w = randn({N});
    Tensor xw = Tensor::empty({M, N}), hw = Tensor::empty({M, N});
    std::copy(x.f32(), x.f32() + x.numel(), xw.f32());
    cpu_->add_rmsnorm(xw, y, hw, w, 1e-6f);
    Tensor dx = up(x), dy = up(y), dw = up(w), dh = gpu_poison({M, N});
    gpu_->add_rmsnorm(dx, dy, dh, dw, 1e-6f);
    EXPECT_EQ(max_err(down(dx), xw), 0.0) << "residual, M " << M << " N " << N;
    EXPECT_LT(max_err(down(dh), hw), 1e-5) << "norm, M " << M << " N " << N;
  }
}

TEST_F(CudaOps, RopeToASeparateOutput) {
  // q (T, H, nope + rd) roped into qabs (T, H, R + rd) at column R (absorbed MLA), and odd shapes
  struct Case { int64_t T; int H, offset, dim; int64_t ts, hs; int out_offset; int64_t out_ts, out_hs; };
  for (Case c : {Case{1, 128, 128, 64, 128 * 192, 192, 512, 128 * 576, 576}, Case{17, 16, 128, 64, 16 * 192, 192, 512, 16 * 576, 576},
                 Case{3, 3, 1, 6, 3 * 11 + 2, 11, 5, 3 * 13 + 1, 13}, Case{5, 1, 96, 32, 130, 0, 96, 128, 0}}) {
    for (bool interleaved : {true, false}) {
      const int64_t n = (c.T - 1) * c.ts + (c.H - 1) * c.hs + c.offset + c.dim;
      const int64_t out_n = (c.T - 1) * c.out_ts + (c.H - 1) * c.out_hs + c.out_offset + c.dim + 3;
      Tensor x = randn({n}), cs = uniform({c.T, c.dim / 2}, -1.2f, 1.2f), sn = uniform({c.T, c.dim / 2}, -1.2f, 1.2f);
      Tensor want = host_poison({out_n});
      Tensor dx = up(x), dcs = up(cs), dsn = up(sn), got = gpu_poison({out_n});
      RopeParams p;
      p.n_tokens = c.T, p.token_stride = c.ts, p.head_stride = c.hs, p.n_heads = c.H, p.offset = c.offset,
      p.rope_dim = c.dim, p.interleaved = interleaved;
      p.out_token_stride = c.out_ts, p.out_head_stride = c.out_hs, p.out_offset = c.out_offset;
      p.x = x.f32(), p.cos = cs.f32(), p.sin = sn.f32(), p.out = want.f32();
      cpu_->rope(p);
      p.x = dx.f32(), p.cos = dcs.f32(), p.sin = dsn.f32(), p.out = got.f32();
      gpu_->rope(p);
      Tensor g = down(got);
      EXPECT_TRUE(same_bytes(down(dx), x)) << "the input was modified";
      const int64_t ots = c.out_ts, ohs = c.out_hs;
      auto slice = [&](Tensor& t) {  // the rotated dims: from column out_offset of every (token, head)
        return gather(Tensor::view(t.f32() + c.out_offset, {out_n - c.out_offset}, DType::F32, nullptr), c.T, c.H, c.dim,
                      ots, ohs);
      };
      EXPECT_LT(max_err(slice(g), slice(want)), 1e-5)
          << "T " << c.T << " H " << c.H << " interleaved " << interleaved;
      // everything else still holds the poison
      for (int64_t i = 0; i < c.T; ++i)
        for (int h = 0; h < c.H; ++h)
          std::memset(g.f32() + i * ots + h * ohs + c.out_offset, 0xFF, sizeof(float) * size_t(c.dim));
      EXPECT_TRUE(same_bytes(g, host_poison({out_n}))) << "T " << c.T << " H " << c.H << ": a write outside the slice";
    }
  }
}

TEST_F(CudaOps, MlaCacheAppendMatchesTheCpu) {
  struct Case { int64_t R; int rd; int64_t T; };
  for (Case c : {Case{512, 64, 1}, Case{512, 64, 3}, Case{512, 64, 17}, Case{96, 32, 1}, Case{96, 32, 3}, Case{96, 32, 17},
                 Case{7, 2, 3}}) {
    for (DType dt : {DType::F32, DType::BF16})
      for (bool indexed : {false, true}) {
        const bool interleaved = (c.T + (indexed ? 1 : 0)) % 2 == 1;
        const int64_t W = c.R + c.rd, pad = 5, rows = 2 * c.T + 6, pos0 = 3;
        Tensor kv = randn({c.T, W + pad}, 3.0f), w = randn({c.R}), cs = uniform({c.T, c.rd / 2}, -1.2f, 1.2f),
               sn = uniform({c.T, c.rd / 2}, -1.2f, 1.2f), index = Tensor::empty({c.T}, DType::I32);
        for (int64_t t = 0; t < c.T; ++t) index.ptr<int32_t>()[t] = int32_t(2 * (c.T - 1 - t) + 1);  // reversed, with gaps
        Tensor want = host_poison({rows, W}, dt);
        Tensor dkv = up(kv), dw = up(w), dcs = up(cs), dsn = up(sn), dindex = up(index), got = gpu_poison({rows, W}, dt);
        MlaAppendParams p;
        p.out_dtype = dt, p.pos0 = pos0, p.kv_token_stride = W + pad, p.n_tokens = c.T, p.kv_lora_rank = int(c.R),
        p.rope_dim = c.rd, p.eps = 1e-6f, p.interleaved = interleaved;
        p.out = want.data(), p.kv = kv.f32(), p.norm_weight = w.f32(), p.cos = cs.f32(), p.sin = sn.f32(),
        p.out_token_index = indexed ? index.ptr<int32_t>() : nullptr;
        cpu_->mla_cache_append(p);
        p.out = got.data(), p.kv = dkv.f32(), p.norm_weight = dw.f32(), p.cos = dcs.f32(), p.sin = dsn.f32(),
        p.out_token_index = indexed ? dindex.ptr<int32_t>() : nullptr;
        gpu_->mla_cache_append(p);
        Tensor g = down(got);
        EXPECT_TRUE(same_bytes(down(dkv), kv)) << "kv was modified";
        const std::string what = cat("R ", c.R, " rd ", c.rd, " T ", c.T, " ", dtype_name(dt), indexed ? " indexed" : "");
        int64_t rows_written = 0;
        for (int64_t r = 0; r < rows; ++r) {
          const bool written = indexed ? (r % 2 == 1 && r < 2 * c.T) : (r >= pos0 && r < pos0 + c.T);
          rows_written += written;
          if (!written) {  // the sentinel (NaN bytes) is untouched
            const size_t rb = size_t(W) * dtype_size(dt);
            EXPECT_TRUE(std::all_of(static_cast<uint8_t*>(g.data()) + r * rb, static_cast<uint8_t*>(g.data()) + (r + 1) * rb,
                                    [](uint8_t b) { return b == 0xFF; }))
                << what << ": row " << r << " was written";
            continue;
          }
          if (dt == DType::F32) {
            Tensor a = Tensor::view(g.f32() + r * W, {W}, DType::F32, nullptr);
            Tensor b = Tensor::view(want.f32() + r * W, {W}, DType::F32, nullptr);
            EXPECT_LT(max_err(a, b), 1e-5) << what << " row " << r;
          } else {  // within one bf16 ulp of the CPU (the norm's sum rounds differently)
            const uint16_t* a = g.ptr<uint16_t>() + r * W;
            const uint16_t* b = want.ptr<uint16_t>() + r * W;
            int worst = 0;
            for (int64_t i = 0; i < W; ++i) {
              const bool same_sign = (a[i] ^ b[i]) < 0x8000;
              worst = std::max(worst, same_sign ? std::abs(int(a[i]) - int(b[i])) : (a[i] & 0x7FFF) + (b[i] & 0x7FFF));
            }
            EXPECT_LE(worst, 1) << what << " row " << r << " (bf16 ulps)";
          }
        }
        EXPECT_EQ(rows_written, c.T) << what;
      }
  }
}

TEST_F(CudaOps, MlaCacheAppendAndRopeRejectBadInput) {
  Tensor kv = up(Tensor::zeros({2, 20})), w = up(Tensor::zeros({16})), cs = up(Tensor::zeros({2, 2}));
  Tensor cache = gpu_poison({4, 20});
  MlaAppendParams p;
  p.out = cache.data(), p.kv = kv.f32(), p.kv_token_stride = 20, p.n_tokens = 2, p.kv_lora_rank = 16, p.rope_dim = 4;
  p.norm_weight = w.f32(), p.cos = cs.f32(), p.sin = cs.f32();
  gpu_->mla_cache_append(p);  // valid
  gpu_->synchronize();
  p.out_dtype = DType::F16;
  EXPECT_THROW(gpu_->mla_cache_append(p), Error);
  p.out_dtype = DType::BF16, p.rope_dim = 3;
  EXPECT_THROW(gpu_->mla_cache_append(p), Error);
  RopeParams r;
  r.x = kv.f32(), r.n_tokens = 2, r.token_stride = 20, r.n_heads = 1, r.offset = 16, r.rope_dim = 3;
  r.cos = cs.f32(), r.sin = cs.f32();
  EXPECT_THROW(gpu_->rope(r), Error);
  // the backend still works
  gpu_->synchronize();
}


// ---- sampling

// Ops::sample on the GPU picks the CPU op's token for the same logits and u, for many parameter
// mixes (one per row of a call), ties and masked tokens, flat and peaked rows, vocabularies up
// to DeepSeek's. The GPU sums in another order, so a u within rounding of a CDF boundary could
// go either way: a mismatch is forgiven only when moving u by 1e-9 either way changes the CPU's
// token (decided on the host in double), and at most once in the whole test, which should
// essentially never happen. Then a captured graph replayed with new rows copied in each time.
TEST_F(CudaOps, Sample) {
  struct Mix { float temperature; int top_k; float top_p, min_p; };
  const std::vector<Mix> mixes = {
      {0.0f, 0, 1.0f, 0.0f},  {0.7f, 0, 1.0f, 0.0f},   {0.7f, 1, 1.0f, 0.0f},      {0.7f, 50, 1.0f, 0.0f},
      {0.7f, 5000, 1.0f, 0.0f}, {1.0f, 0, 0.9f, 0.0f}, {1.0f, 0, 0.5f, 0.0f},      {1.0f, 0, 1.0f, 0.0f},
      {0.7f, 0, 1.0f, 0.05f}, {0.7f, 50, 0.9f, 0.0f},  {0.6f, 5000, 0.95f, 0.05f}, {1.3f, 0, 0.9f, 0.05f},
      {0.05f, 0, 0.9f, 0.0f}, {1.0f, 3, 0.5f, 0.2f},   {1.0f, 0, 0.999f, 0.0f},    {0.7f, 0, 0.5f, 0.05f}};
  auto draw_u = [&] { return double(((uint64_t(rng_()) << 32) | rng_()) >> 11) * 0x1.0p-53; };
  auto pack = [](const std::vector<SampleRow>& rows) {
    Tensor t = Tensor::empty({int64_t(rows.size() * sizeof(SampleRow))}, DType::U8);
    std::memcpy(t.data(), rows.data(), t.nbytes());
    return t;
  };
  int compared = 0, forgiven = 0;
  // got: the GPU's ids (host memory) for logits (B, V) on the host and rows.
  auto check = [&](const Tensor& got, const Tensor& logits, const std::vector<SampleRow>& rows, const std::string& what) {
    const int64_t B = int64_t(rows.size()), V = logits.dim(1);
    Tensor want = Tensor::empty({B}, DType::I32);
    cpu_->sample(want, logits, pack(rows));
    SelectScratch scratch;
    for (int64_t b = 0; b < B; ++b) {
      ++compared;
      const int32_t g = got.ptr<int32_t>()[b], w = want.ptr<int32_t>()[b];
      if (g == w) continue;
      auto cpu_at = [&](double u) {
        SampleRow r = rows[size_t(b)];
        r.u = std::clamp(u, 0.0, std::nextafter(1.0, 0.0));
        std::vector<float> row(logits.f32() + b * V, logits.f32() + (b + 1) * V);
        return select_token(row.data(), V, r, scratch);
      };
      const int32_t below = cpu_at(rows[size_t(b)].u - 1e-9), above = cpu_at(rows[size_t(b)].u + 1e-9);
      const bool at_boundary = below != above && (g == below || g == above);
      EXPECT_TRUE(at_boundary) << what << " row " << b << ": GPU " << g << ", CPU " << w << " (T "
                               << rows[size_t(b)].temperature << " top_k " << rows[size_t(b)].top_k << " top_p "
                               << rows[size_t(b)].top_p << " min_p " << rows[size_t(b)].min_p << " u "
                               << rows[size_t(b)].u << ")";
      forgiven += at_boundary;
    }
  };

  const int64_t B = int64_t(mixes.size());
  for (int64_t V : {7, 1000, 32000, 129280}) {
    for (int round = 0; round < 3; ++round) {
      Tensor logits = randn({B, V}, round == 2 ? 8.0f : 2.0f);  // round 2: peaked rows
      for (int64_t b = 0; b < B; ++b) {
        float* l = logits.f32() + b * V;
        if ((b + round) % 3 == 1)
          for (int64_t i = 0; i < V; ++i) l[i] = std::round(l[i]);  // many ties
        if ((b + round) % 5 == 2)
          for (int64_t i = 1; i < V; i += 4) l[i] = -INFINITY;  // masked tokens
      }
      std::vector<SampleRow> rows;
      for (const Mix& m : mixes) rows.push_back({m.temperature, m.top_k, m.top_p, m.min_p, draw_u()});
      Tensor got = gpu_poison({B}, DType::I32);
      gpu_->sample(got, up(logits), up(pack(rows)));
      check(down(got), logits, rows, cat("V ", V, " round ", round));
    }
  }

  const int64_t GB = 3, GV = 1000;
  Tensor logits = randn({GB, GV}, 2.0f), d_logits = up(logits);
  Tensor rows_host = gpu_->pinned_host({GB * int64_t(sizeof(SampleRow))}, DType::U8);
  Tensor rows_dev = gpu_->empty({GB * int64_t(sizeof(SampleRow))}, DType::U8);
  Tensor ids_dev = gpu_->empty({GB}, DType::I32), ids_host = gpu_->pinned_host({GB}, DType::I32);
  ASSERT_TRUE(gpu_->capture_begin());
  gpu_->copy_from_host(rows_dev, rows_host);
  gpu_->sample(ids_dev, d_logits, rows_dev);
  gpu_->copy_to_host(ids_host, ids_dev);
  std::shared_ptr<void> graph = gpu_->capture_end();
  ASSERT_TRUE(graph);
  for (int replay = 0; replay < 4; ++replay) {
    std::vector<SampleRow> rows = {{0.8f, replay == 1 ? 20 : 0, 0.9f, 0.0f, draw_u()},
                                   {replay == 2 ? 0.0f : 1.0f, 0, 1.0f, 0.05f, draw_u()},
                                   {0.7f, 50, replay == 3 ? 0.5f : 1.0f, 0.0f, draw_u()}};
    std::memcpy(rows_host.data(), rows.data(), rows_host.nbytes());
    std::memset(ids_host.data(), 0xFF, ids_host.nbytes());
    gpu_->replay(graph);
    gpu_->synchronize();
    Tensor got = Tensor::empty({GB}, DType::I32);
    std::memcpy(got.data(), ids_host.data(), got.nbytes());
    check(got, logits, rows, cat("graph replay ", replay));
  }
  EXPECT_LE(forgiven, 1) << "mismatches at a CDF boundary among " << compared << " rows";
}

#endif

}  // namespace
}  // namespace fathom
