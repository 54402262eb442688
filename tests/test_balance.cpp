// Expert balancing for training (src/train/balance.h): the bias update rule, a skewed router
// it evens out, and the sequence-wise balance loss with its gradient against finite differences.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <vector>

#include "core/error.h"
#include "ops/ops.h"
#include "train/balance.h"

using namespace fathom;
using namespace fathom::train;

namespace {

TEST(Balance, BiasMovesTowardTheMeanLoad) {
  Tensor bias = Tensor::zeros({4});
  update_expert_bias(bias, {5, 1, 3, 3}, 0.01f);  // mean 3
  EXPECT_FLOAT_EQ(bias.f32()[0], -0.01f);
  EXPECT_FLOAT_EQ(bias.f32()[1], 0.01f);
  EXPECT_EQ(bias.f32()[2], 0.0f);
  EXPECT_EQ(bias.f32()[3], 0.0f);
  update_expert_bias(bias, {2, 2, 2, 3}, 0.5f);  // mean 2.25: no rounding to 2
  EXPECT_FLOAT_EQ(bias.f32()[3], -0.5f);
  EXPECT_FLOAT_EQ(bias.f32()[2], 0.5f);
  EXPECT_DOUBLE_EQ(load_imbalance({5, 1, 3, 3}), 5.0 / 3.0);
  EXPECT_THROW(update_expert_bias(bias, {1, 2}, 0.1f), Error);
  EXPECT_THROW(update_expert_bias(bias, {1, 2, 3, 4}, -0.1f), Error);
}

// A router that prefers experts 0 and 1 for every token: without the bias update they take all
// the tokens (max/mean load 4 with 8 experts, top-2); with γ > 0 the bias steers the choice
// toward the others until the load is nearly even — while the routing weights stay the scores.
TEST(Balance, AuxLossFreeBiasEvensASkewedRouter) {
  auto ops = make_cpu_ops();
  const int E = 8, K = 2;
  const int64_t T = 64;
  MoeGateParams p;
  p.scoring = ScoringFunc::Sigmoid, p.n_experts = E, p.top_k = K, p.norm_topk_prob = true;
  auto run = [&](float gamma) {
    std::mt19937 gen(1234);
    std::normal_distribution<float> noise(0.0f, 0.3f);
    Tensor bias = Tensor::zeros({E}), logits = Tensor::empty({T, E});
    Tensor w = Tensor::empty({T, K}), ids = Tensor::empty({T, K}, DType::I32);
    double late = 0;
    for (int step = 0; step < 300; ++step) {
      for (int64_t t = 0; t < T; ++t)
        for (int e = 0; e < E; ++e) logits.f32()[t * E + e] = (e < 2 ? 1.5f : 0.0f) + noise(gen);
      ops->moe_gate(w, ids, logits, bias.f32(), p);
      const std::vector<int64_t> load = expert_load(ids, E);
      if (step >= 250) late += load_imbalance(load) / 50;
      update_expert_bias(bias, load, gamma);
    }
    return late;
  };
  const double fixed = run(0.0f), balanced = run(0.01f);
  EXPECT_GT(fixed, 3.5);       // experts 0 and 1 take (nearly) everything
  EXPECT_LT(balanced, 1.6);    // close to even
  EXPECT_LT(balanced, fixed / 2);
}

TEST(Balance, SequenceBalanceLossAndItsGradient) {
  const uint32_t seed = std::random_device{}();
  std::mt19937 gen(seed);
  std::normal_distribution<float> nd(0.0f, 1.5f);
  for (ScoringFunc scoring : {ScoringFunc::Sigmoid, ScoringFunc::Softmax}) {
    const int E = 6, K = 2;
    const std::vector<int64_t> lens = {3, 4};
    const int64_t T = 7;
    const float alpha = 0.25f, dloss = 2.0f;
    MoeGateParams p;
    p.scoring = scoring, p.n_experts = E, p.top_k = K;
    Tensor logits = Tensor::empty({T, E}), ids = Tensor::empty({T, K}, DType::I32);
    for (int64_t i = 0; i < logits.numel(); ++i) logits.f32()[i] = nd(gen);
    for (int64_t t = 0; t < T; ++t) {
      ids.ptr<int32_t>()[t * K] = int32_t(t % E);
      ids.ptr<int32_t>()[t * K + 1] = int32_t((t * 5 + 1) % E == t % E ? (t + 1) % E : (t * 5 + 1) % E);
    }
    // the loss from the definition, in double
    auto loss = [&]() {
      double L = 0;
      int64_t t0 = 0;
      for (int64_t n : lens) {
        std::vector<double> f(E, 0.0), P(E, 0.0);
        for (int64_t t = t0; t < t0 + n; ++t)
          for (int k = 0; k < K; ++k) f[size_t(ids.ptr<int32_t>()[t * K + k])] += double(E) / (K * double(n));
        for (int64_t t = t0; t < t0 + n; ++t) {
          std::vector<double> s(E);
          double sum = 0, mx = -1e300;
          for (int e = 0; e < E; ++e) mx = std::max(mx, double(logits.f32()[t * E + e]));
          for (int e = 0; e < E; ++e) {
            const double l = logits.f32()[t * E + e];
            sum += (s[size_t(e)] = scoring == ScoringFunc::Sigmoid ? 1 / (1 + std::exp(-l)) : std::exp(l - mx));
          }
          for (int e = 0; e < E; ++e) P[size_t(e)] += s[size_t(e)] / sum / double(n);
        }
        double seq = 0;
        for (int e = 0; e < E; ++e) seq += f[size_t(e)] * P[size_t(e)];
        L += alpha * seq / double(lens.size());
        t0 += n;
      }
      return L;
    };
    Tensor d0 = Tensor::empty({T, E});  // what dlogits held before: the loss's gradient is added to it
    for (int64_t i = 0; i < d0.numel(); ++i) d0.f32()[i] = 0.25f;
    Tensor dl = Tensor::empty({T, E});
    std::memcpy(dl.data(), d0.data(), d0.nbytes());
    const double got = sequence_balance_loss(dl, logits, ids, lens, alpha, p, dloss);
    EXPECT_NEAR(got, loss(), 1e-9 * (1 + loss()));
    for (int64_t i = 0; i < logits.numel(); ++i) {
      const float x0 = logits.f32()[i];
      logits.f32()[i] = x0 + 1e-3f;
      const double hp = double(logits.f32()[i]) - x0, lp = loss();
      logits.f32()[i] = x0 - 1e-3f;
      const double hm = x0 - double(logits.f32()[i]), lm = loss();
      logits.f32()[i] = x0;
      const double numeric = dloss * (lp - lm) / (hp + hm), analytic = double(dl.f32()[i]) - d0.f32()[i];
      ASSERT_NEAR(analytic, numeric, 1e-4 * std::fabs(numeric) + 1e-7) << "element " << i << " (seed " << seed << ")";
    }
  }
  Tensor dl = Tensor::zeros({2, 4}), l = Tensor::zeros({2, 4}), ids = Tensor::zeros({2, 1}, DType::I32);
  MoeGateParams p;
  p.n_experts = 4, p.top_k = 1;
  EXPECT_THROW(sequence_balance_loss(dl, l, ids, {3}, 0.1f, p), Error);  // sequences do not cover the rows
}

}  // namespace
