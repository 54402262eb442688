// AdamW, gradient clipping and the learning-rate schedules (src/train/optimizer.h) against the
// formulas written out in double, on fresh random inputs.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/error.h"
#include "ops/ops.h"
#include "train/optimizer.h"

using namespace fathom;
using namespace fathom::train;

namespace {

Tensor randn(std::mt19937& gen, Shape s, float scale = 1.0f) {
  Tensor t = Tensor::empty(std::move(s));
  std::normal_distribution<float> d(0.0f, scale);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = d(gen);
  return t;
}

TEST(Optimizer, AdamWFollowsTheDecoupledUpdate) {
  const uint32_t seed = std::random_device{}();
  std::mt19937 gen(seed);
  AdamWConfig cfg;  // 0.9 / 0.95, eps 1e-8, weight decay 0.1
  AdamW opt(cfg);
  Tensor w = randn(gen, {3, 4}), b = randn(gen, {4});  // a matrix (decayed) and a norm weight (not)
  opt.add("w", w, Tensor::zeros({3, 4}));
  opt.add("norm", b, Tensor::zeros({4}));
  EXPECT_TRUE(opt.params()[0].decay);
  EXPECT_FALSE(opt.params()[1].decay);
  // the reference, in double
  std::vector<std::vector<double>> p = {std::vector<double>(w.f32(), w.f32() + 12), std::vector<double>(b.f32(), b.f32() + 4)};
  std::vector<std::vector<double>> m = {std::vector<double>(12), std::vector<double>(4)}, v = m;
  const double lrs[] = {1e-3, 3e-3, 2e-3, 5e-4, 1e-3};
  for (int t = 1; t <= 5; ++t) {
    for (size_t k = 0; k < 2; ++k) {
      Param& pr = opt.params()[k];
      Tensor g = randn(gen, pr.grad.shape(), t == 3 ? 100.0f : 1.0f);  // one step with large gradients
      std::memcpy(pr.grad.data(), g.data(), g.nbytes());
      for (size_t i = 0; i < p[k].size(); ++i) {
        const double gi = g.f32()[i];
        if (pr.decay) p[k][i] *= 1 - lrs[t - 1] * cfg.weight_decay;
        m[k][i] = 0.9 * m[k][i] + 0.1 * gi;
        v[k][i] = 0.95 * v[k][i] + 0.05 * gi * gi;
        const double mh = m[k][i] / (1 - std::pow(0.9, t)), vh = v[k][i] / (1 - std::pow(0.95, t));
        p[k][i] -= lrs[t - 1] * mh / (std::sqrt(vh) + 1e-8);
      }
    }
    opt.step(float(lrs[t - 1]));
    EXPECT_EQ(opt.steps(), t);
    for (size_t k = 0; k < 2; ++k)
      for (size_t i = 0; i < p[k].size(); ++i)
        ASSERT_NEAR(opt.params()[k].value.f32()[i], p[k][i], 1e-6 * (1 + std::fabs(p[k][i])))
            << "step " << t << " param " << k << " element " << i << " (seed " << seed << ")";
  }
  opt.zero_grad();
  for (const Param& pr : opt.params())
    for (int64_t i = 0; i < pr.grad.numel(); ++i) ASSERT_EQ(pr.grad.f32()[i], 0.0f);
}

TEST(Optimizer, ClipsByTheGlobalNorm) {
  std::mt19937 gen(7);
  AdamW opt;
  Tensor g1 = randn(gen, {5, 2}), g2 = randn(gen, {3});
  opt.add("a", Tensor::zeros({5, 2}), g1);
  opt.add("b", Tensor::zeros({3}), g2);
  double ss = 0;
  for (const Tensor* g : {&g1, &g2})
    for (int64_t i = 0; i < g->numel(); ++i) ss += double(g->f32()[i]) * g->f32()[i];
  const double norm = std::sqrt(ss);
  const std::vector<float> before(g1.f32(), g1.f32() + g1.numel());
  EXPECT_NEAR(opt.clip_grad_norm(10 * norm), norm, 1e-9 * norm);  // under the limit: untouched
  for (int64_t i = 0; i < g1.numel(); ++i) ASSERT_EQ(g1.f32()[i], before[size_t(i)]);
  EXPECT_NEAR(opt.clip_grad_norm(norm / 4), norm, 1e-9 * norm);  // over: scaled to the limit
  double after = 0;
  for (const Tensor* g : {&g1, &g2})
    for (int64_t i = 0; i < g->numel(); ++i) after += double(g->f32()[i]) * g->f32()[i];
  EXPECT_NEAR(std::sqrt(after), norm / 4, 1e-5 * norm);
  g2.f32()[1] = NAN;  // a NaN gradient: reported, nothing scaled
  EXPECT_TRUE(std::isnan(opt.clip_grad_norm(1e-3)));
  EXPECT_THROW(opt.add("c", Tensor::zeros({2}), Tensor::zeros({3})), Error);
  EXPECT_THROW(AdamW(AdamWConfig{1.0f, 0.95f, 1e-8f, 0.1f}), Error);
}

// The optimizer on a backend (AdamW::use_backend; here the CPU backend, whose tensors are host
// ones, so CI runs it — test_trainer's CUDA run covers the GPU): the norm, the clipping and the
// update read and write the backend's copies only, and to_host() brings the result back equal
// to the host path's, which applies the same scales to the gradients eagerly.
TEST(Optimizer, RunsOnABackendAsOnTheHost) {
  const uint32_t seed = std::random_device{}();
  std::mt19937 gen(seed);
  auto ops = make_cpu_ops();
  AdamW host, dev;
  std::vector<Tensor> dvals, dgrads;
  for (Shape s : {Shape{6, 5}, Shape{7}}) {
    const Tensor w = randn(gen, s);
    Tensor w1 = Tensor::empty(s), w2 = Tensor::empty(s), w3 = Tensor::empty(s);
    std::memcpy(w1.data(), w.data(), w.nbytes());
    std::memcpy(w2.data(), w.data(), w.nbytes());
    std::memcpy(w3.data(), w.data(), w.nbytes());
    host.add("p", w1, Tensor::zeros(s));
    Param& p = dev.add("p", w2, Tensor::zeros(s));
    p.device_value = w3;  // the backend's copies (host memory for the CPU backend)
    p.device_grad = Tensor::zeros(s);
  }
  Param& loose = dev.params()[1];
  loose.device_grad = Tensor();
  EXPECT_THROW(dev.use_backend(*ops), Error);  // a parameter without its backend copy
  loose.device_grad = Tensor::zeros(loose.value.shape());
  dev.use_backend(*ops);
  EXPECT_TRUE(dev.on_backend());
  for (int t = 1; t <= 4; ++t) {
    for (size_t k = 0; k < 2; ++k) {
      const Tensor g = randn(gen, host.params()[k].grad.shape(), t == 2 ? 30.0f : 1.0f);
      std::memcpy(host.params()[k].grad.data(), g.data(), g.nbytes());
      std::memcpy(dev.params()[k].device_grad.data(), g.data(), g.nbytes());
      std::memset(dev.params()[k].grad.data(), 0xFF, g.nbytes());  // the host gradient is never read
    }
    host.scale_grads(0.5f);
    dev.scale_grads(0.5f);
    const double hn = host.clip_grad_norm(1.0), dn = dev.clip_grad_norm(1.0);
    EXPECT_NEAR(dn, hn, 1e-12 * hn) << "step " << t;
    host.step(1e-2f);
    dev.step(1e-2f);
  }
  dev.to_host();
  for (size_t k = 0; k < 2; ++k)
    for (int64_t i = 0; i < host.params()[k].value.numel(); ++i) {
      EXPECT_NEAR(dev.params()[k].value.f32()[i], host.params()[k].value.f32()[i], 1e-6) << "seed " << seed;
      EXPECT_NEAR(dev.params()[k].m.f32()[i], host.params()[k].m.f32()[i], 1e-6) << "seed " << seed;
      EXPECT_NEAR(dev.params()[k].v.f32()[i], host.params()[k].v.f32()[i], 1e-6) << "seed " << seed;
    }
  // a restored checkpoint's host values go out again
  dev.params()[0].value.f32()[0] = 42.0f;
  dev.to_device();
  EXPECT_EQ(dev.params()[0].device_value.f32()[0], 42.0f);
  dev.zero_grad();
  EXPECT_EQ(dev.params()[1].device_grad.f32()[3], 0.0f);
}

TEST(Optimizer, Schedules) {
  LrSchedule s;
  s.kind = LrSchedule::Kind::Cosine, s.peak = 1e-3, s.min_lr = 1e-4, s.warmup = 10, s.total = 110;
  EXPECT_DOUBLE_EQ(s.at(0), 1e-4);   // warm-up: peak * 1 / 10
  EXPECT_DOUBLE_EQ(s.at(9), 1e-3);   // the last warm-up step reaches the peak
  EXPECT_DOUBLE_EQ(s.at(10), 1e-3);  // cosine starts at the peak
  EXPECT_NEAR(s.at(60), 5.5e-4, 1e-12);  // half way: the mean of peak and min
  EXPECT_NEAR(s.at(110), 1e-4, 1e-12);
  EXPECT_NEAR(s.at(500), 1e-4, 1e-12);  // past the end it holds
  LrSchedule w;
  w.kind = LrSchedule::Kind::Wsd, w.peak = 2e-3, w.min_lr = 0, w.warmup = 5, w.total = 100, w.decay = 20;
  EXPECT_DOUBLE_EQ(w.at(50), 2e-3);  // stable
  EXPECT_DOUBLE_EQ(w.at(80), 2e-3);  // decay starts at total - decay
  EXPECT_NEAR(w.at(90), 1e-3, 1e-12);
  EXPECT_NEAR(w.at(100), 0.0, 1e-12);
  LrSchedule bad;
  bad.total = 0;
  EXPECT_THROW(bad.at(0), Error);
}

}  // namespace
