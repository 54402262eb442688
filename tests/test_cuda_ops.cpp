// CUDA ops against the CPU ops (the reference backend) on fresh random inputs every run,
// several shapes including odd ones, with outputs poisoned (NaN) before each launch so an
// element a kernel forgets to write fails the comparison. Skips — with the reason — when the
// build has no CUDA or the machine has no GPU (CI).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/tensor.h"
#include "ops/ops.h"

#ifdef FATHOM_HAVE_CUDA
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
    cpu_ = make_cpu_ops();
  }
  std::unique_ptr<Ops> cpu_;
  std::mt19937 rng_{std::random_device{}()};

  Tensor random(Shape shape, float scale = 1.0f) {
    Tensor t = Tensor::empty(shape);
    std::normal_distribution<float> d(0.f, scale);
    for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = d(rng_);
    return t;
  }
  static std::unique_ptr<cuda::DeviceBuffer> to_device(const Tensor& t) {
    auto b = std::make_unique<cuda::DeviceBuffer>(t.nbytes());
    b->upload(t.data(), t.nbytes());
    return b;
  }
  static std::unique_ptr<cuda::DeviceBuffer> poisoned(size_t bytes) {
    auto b = std::make_unique<cuda::DeviceBuffer>(bytes);
    b->fill_bytes(0xFF);  // every float NaN
    return b;
  }
  static std::vector<float> from_device(const cuda::DeviceBuffer& b, int64_t n) {
    cuda::synchronize();
    std::vector<float> v(static_cast<size_t>(n));
    b.download(v.data(), v.size() * sizeof(float));
    return v;
  }
  // Max |a - b| / (|b| + 1): NaN anywhere fails.
  static double max_err(const std::vector<float>& got, const Tensor& want) {
    double m = 0;
    for (int64_t i = 0; i < want.numel(); ++i) {
      const double d = std::fabs(double(got[size_t(i)]) - want.f32()[i]) / (std::fabs(want.f32()[i]) + 1.0);
      if (!(d <= m)) m = std::isnan(d) ? INFINITY : d;
    }
    return m;
  }
};

TEST_F(CudaOps, Embedding) {
  for (auto [V, H, T] : {std::tuple{50, 64, 7}, {1000, 129, 33}, {17, 7168, 3}}) {
    for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
      Tensor table32 = random({V, H});
      Tensor table = from_f32(table32.f32(), table32.shape(), dt);
      std::vector<int32_t> ids(static_cast<size_t>(T));
      for (auto& id : ids) id = int32_t(rng_() % uint32_t(V));
      Tensor want = Tensor::empty({T, H});
      cpu_->embedding(want, ids.data(), T, table);
      auto d_table = to_device(table);
      cuda::DeviceBuffer d_ids(ids.size() * sizeof(int32_t));
      d_ids.upload(ids.data(), ids.size() * sizeof(int32_t));
      auto d_out = poisoned(size_t(T * H) * sizeof(float));
      cuda::embedding(d_out->as<float>(), d_ids.as<int32_t>(), T, d_table->data(), dt, H);
      EXPECT_EQ(max_err(from_device(*d_out, T * H), want), 0.0) << "V " << V << " H " << H << " " << dtype_name(dt);
    }
  }
}

TEST_F(CudaOps, RmsNorm) {
  for (auto [M, N] : {std::pair{1, 7168}, {5, 1}, {33, 513}, {128, 2048}, {3, 100003}}) {
    Tensor x = random({M, N}, 3.0f), w = random({N});
    Tensor want = Tensor::empty({M, N});
    cpu_->rmsnorm(want, x, w, 1e-6f);
    auto dx = to_device(x), dw = to_device(w);
    auto d_out = poisoned(x.nbytes());
    cuda::rmsnorm(d_out->as<float>(), dx->as<float>(), dw->as<float>(), M, N, 1e-6f);
    EXPECT_LT(max_err(from_device(*d_out, M * N), want), 1e-5) << "M " << M << " N " << N;
    // In place (out aliases x), as the model calls it.
    cuda::rmsnorm(dx->as<float>(), dx->as<float>(), dw->as<float>(), M, N, 1e-6f);
    EXPECT_LT(max_err(from_device(*dx, M * N), want), 1e-5) << "in place, M " << M << " N " << N;
  }
}

TEST_F(CudaOps, SiluMulAndAdd) {
  for (int64_t n : {1, 31, 4096, 1000003}) {
    Tensor g = random({n}, 4.0f), u = random({n});
    Tensor want = Tensor::empty({n});
    cpu_->silu_mul(want, g, u);
    auto dg = to_device(g), du = to_device(u);
    auto d_out = poisoned(g.nbytes());
    cuda::silu_mul(d_out->as<float>(), dg->as<float>(), du->as<float>(), n);
    EXPECT_LT(max_err(from_device(*d_out, n), want), 1e-5) << "silu_mul n " << n;

    Tensor x = random({n}), y = random({n});
    auto dx = to_device(x), dy = to_device(y);
    cpu_->add(x, y);
    cuda::add(dx->as<float>(), dy->as<float>(), n);
    EXPECT_EQ(max_err(from_device(*dx, n), x), 0.0) << "add n " << n;
  }
}

TEST_F(CudaOps, ErrorsAreFathomErrors) {
  EXPECT_THROW(cuda::DeviceBuffer(size_t(1) << 60), Error);  // absurd allocation: a clear error, no crash
  Tensor t = random({4, 8});
  auto d = to_device(t);
  EXPECT_THROW(cuda::embedding(d->as<float>(), nullptr, 1, d->data(), DType::I64, 8), Error);
}

#endif

}  // namespace
}  // namespace fathom
