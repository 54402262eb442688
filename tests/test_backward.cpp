// The CPU backward passes (src/train/backward.h) against central finite differences of the
// forward computed in double straight from its definition, on fresh random inputs (the seed is
// printed with any failure). The scalar differentiated is L = Σ dout ⊙ forward(inputs) for a
// random dout, so each check covers the whole Jacobian-vector product. Bound: |analytic −
// numeric| ≤ 1e-4 · (|numeric| + 1e-2 · max|numeric|) per element — the analytic side is fp32, the
// numeric side double with a step of 1e-3 · max(1, |x|) (the step the float input actually
// takes), whose own error (~1e-6 relative) is far below that.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include "core/error.h"
#include "ops/ops.h"
#include "train/backward.h"

using namespace fathom;

namespace {

struct Rng {
  Rng() : seed(std::random_device{}()), gen(seed) {}
  Tensor randn(Shape s, float scale = 1.0f) {
    Tensor t = Tensor::empty(std::move(s));
    std::normal_distribution<float> d(0.0f, scale);
    for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = d(gen);
    return t;
  }
  uint32_t seed;
  std::mt19937 gen;
};

Tensor copy_of(const Tensor& t) {
  Tensor c = Tensor::empty(t.shape(), t.dtype());
  std::memcpy(c.data(), t.data(), t.nbytes());
  return c;
}

// d L / d x[i] for every element of x by central differences; L reads x through the tensor.
std::vector<double> numeric_grad(Tensor& x, const std::function<double()>& L) {
  std::vector<double> g(static_cast<size_t>(x.numel()));
  for (int64_t i = 0; i < x.numel(); ++i) {
    const float x0 = x.f32()[i];
    const double h = 1e-3 * std::max(1.0, double(std::fabs(x0)));
    x.f32()[i] = float(x0 + h);
    const double hp = double(x.f32()[i]) - x0;  // the step actually taken in float
    const double lp = L();
    x.f32()[i] = float(x0 - h);
    const double hm = x0 - double(x.f32()[i]);
    const double lm = L();
    x.f32()[i] = x0;
    g[size_t(i)] = (lp - lm) / (hp + hm);
  }
  return g;
}

// analytic (F32 tensor, minus `base` when the gradient accumulated onto it) against numeric
void expect_grad(const Tensor& analytic, const std::vector<double>& numeric, const char* what, uint32_t seed,
                 const Tensor* base = nullptr) {
  ASSERT_EQ(analytic.numel(), int64_t(numeric.size())) << what;
  double mx = 0;
  for (double v : numeric) mx = std::max(mx, std::fabs(v));
  for (size_t i = 0; i < numeric.size(); ++i) {
    const double a = double(analytic.f32()[i]) - (base ? double(base->f32()[i]) : 0.0);
    ASSERT_LE(std::fabs(a - numeric[i]), 1e-4 * (std::fabs(numeric[i]) + 1e-2 * mx) + 1e-9)
        << what << " element " << i << ": analytic " << a << " numeric " << numeric[i] << " (seed " << seed << ")";
  }
}

double dot(const Tensor& a, const std::vector<double>& b) {
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += double(a.f32()[i]) * b[size_t(i)];
  return s;
}

TEST(Backward, RmsNorm) {
  Rng rng;
  const int64_t M = 3, N = 37;
  const float eps = 1e-6f;
  Tensor x = rng.randn({M, N}), w = rng.randn({N}), dout = rng.randn({M, N});
  auto forward = [&]() {  // L = Σ dout ⊙ rmsnorm(x) in double
    double L = 0;
    for (int64_t m = 0; m < M; ++m) {
      double ss = 0;
      for (int64_t i = 0; i < N; ++i) ss += double(x.f32()[m * N + i]) * x.f32()[m * N + i];
      const double r = 1.0 / std::sqrt(ss / N + eps);
      for (int64_t i = 0; i < N; ++i) L += double(dout.f32()[m * N + i]) * x.f32()[m * N + i] * r * w.f32()[i];
    }
    return L;
  };
  Tensor dx = Tensor::empty({M, N}), dw0 = rng.randn({N}), dw = copy_of(dw0);
  train::rmsnorm_backward(dx, dw, dout, x, w, eps);
  expect_grad(dx, numeric_grad(x, forward), "dx", rng.seed);
  expect_grad(dw, numeric_grad(w, forward), "dweight (accumulated)", rng.seed, &dw0);
  // the forward it inverts is the op's: the double reference above agrees with Ops::rmsnorm
  auto ops = make_cpu_ops();
  Tensor out = Tensor::empty({M, N});
  ops->rmsnorm(out, x, w, eps);
  std::vector<double> d(dout.f32(), dout.f32() + dout.numel());
  EXPECT_NEAR(dot(out, d), forward(), 1e-4 * (1 + std::fabs(forward())));
}

TEST(Backward, Matmul) {
  Rng rng;
  const int64_t M = 4, K = 19, N = 7;
  Tensor x = rng.randn({M, K}), w = rng.randn({N, K}), dout = rng.randn({M, N});
  auto forward = [&]() {
    double L = 0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double y = 0;
        for (int64_t k = 0; k < K; ++k) y += double(x.f32()[m * K + k]) * w.f32()[n * K + k];
        L += y * dout.f32()[m * N + n];
      }
    return L;
  };
  Tensor dx = Tensor::empty({M, K}), dw0 = rng.randn({N, K}), dw = copy_of(dw0);
  train::matmul_backward(dx, dw, dout, x, w);
  expect_grad(dx, numeric_grad(x, forward), "dx", rng.seed);
  expect_grad(dw, numeric_grad(w, forward), "dw (accumulated)", rng.seed, &dw0);
  // without dx (the first layer's input): only dw, accumulated again
  Tensor none, dw2 = copy_of(dw);
  train::matmul_backward(none, dw2, dout, x, w);
  expect_grad(dw2, numeric_grad(w, forward), "dw, second accumulation", rng.seed, &dw);
  // a weight gradient of the wrong shape is an error
  Tensor bad = Tensor::zeros({N, K + 1});
  EXPECT_THROW(train::matmul_backward(dx, bad, dout, x, w), Error);
}

// The stacked products of the routed experts (Ops::matmul_stacked and its backward, the CPU
// reference): group g's rows against weight g's, forward and gradients against finite
// differences of the whole stack — a row or weight of the wrong group changes L and fails.
TEST(Backward, StackedMatmul) {
  Rng rng;
  const int64_t G = 3, M = 2, K = 5, N = 4;
  Tensor x = rng.randn({G * M, K}), w = rng.randn({G * N, K}), dout = rng.randn({G * M, N});
  auto forward = [&]() {
    double L = 0;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          double y = 0;
          for (int64_t k = 0; k < K; ++k) y += double(x.f32()[(g * M + m) * K + k]) * w.f32()[(g * N + n) * K + k];
          L += y * dout.f32()[(g * M + m) * N + n];
        }
    return L;
  };
  auto ops = make_cpu_ops();
  Tensor out = Tensor::empty({G * M, N});
  ops->matmul_stacked(out, x, w, G);
  double L = 0;
  for (int64_t i = 0; i < out.numel(); ++i) L += double(out.f32()[i]) * dout.f32()[i];
  EXPECT_NEAR(L, forward(), 1e-4 * (std::fabs(forward()) + 1));
  Tensor dx = Tensor::empty({G * M, K}), dw0 = rng.randn({G * N, K}), dw = copy_of(dw0);
  ops->matmul_stacked_backward(dx, dw, dout, x, w, G);
  expect_grad(dx, numeric_grad(x, forward), "dx", rng.seed);
  expect_grad(dw, numeric_grad(w, forward), "dw (accumulated)", rng.seed, &dw0);
  Tensor bad = Tensor::empty({G * M + 1, N});
  EXPECT_THROW(ops->matmul_stacked(bad, x, w, G), Error);  // out is not G groups of M x N
  EXPECT_THROW(ops->matmul_stacked(out, x, w, 2), Error);  // 2 groups of 6 outputs: out would be 6 x 6
  EXPECT_THROW(ops->matmul_stacked(out, x, w, 5), Error);  // 12 weight rows are not 5 groups
}

// gather_sum_rows: each token's rows summed in order of k, dropped (-1) slots skipped, written or
// accumulated; positions past the input are an error.
TEST(Backward, GatherSumRows) {
  Rng rng;
  const int64_t P = 5, N = 3;
  const Tensor in = rng.randn({P, N});
  Tensor pos = Tensor::empty({3, 2}, DType::I32);
  const int32_t p[6] = {4, 0, -1, -1, 2, 2};
  std::memcpy(pos.data(), p, sizeof p);
  auto ops = make_cpu_ops();
  Tensor out = rng.randn({3, N}), base = copy_of(out);
  ops->gather_sum_rows(out, in, pos, false);
  for (int64_t j = 0; j < N; ++j) {
    EXPECT_EQ(out.f32()[0 * N + j], 0.0f + in.f32()[4 * N + j] + in.f32()[0 * N + j]);
    EXPECT_EQ(out.f32()[1 * N + j], 0.0f);
    EXPECT_EQ(out.f32()[2 * N + j], 0.0f + in.f32()[2 * N + j] + in.f32()[2 * N + j]);
  }
  out = copy_of(base);
  ops->gather_sum_rows(out, in, pos, true);
  for (int64_t j = 0; j < N; ++j) {
    EXPECT_EQ(out.f32()[1 * N + j], base.f32()[1 * N + j]);
    EXPECT_EQ(out.f32()[0 * N + j], base.f32()[0 * N + j] + in.f32()[4 * N + j] + in.f32()[0 * N + j]);
  }
  pos.ptr<int32_t>()[3] = int32_t(P);  // past the input's rows
  EXPECT_THROW(ops->gather_sum_rows(out, in, pos, false), Error);
  Tensor wide = Tensor::empty({3, N + 1});
  pos.ptr<int32_t>()[3] = 0;
  EXPECT_THROW(ops->gather_sum_rows(wide, in, pos, false), Error);  // rows of N into rows of N + 1
}

TEST(Backward, EmbeddingScattersRepeatedIds) {
  Rng rng;
  const int64_t V = 9, H = 5, T = 6;
  Tensor ids = Tensor::empty({T}, DType::I32);
  const int32_t chosen[T] = {3, 0, 3, 8, 3, 1};
  for (int64_t t = 0; t < T; ++t) ids.ptr<int32_t>()[t] = chosen[t];
  Tensor table = rng.randn({V, H}), dout = rng.randn({T, H});
  auto forward = [&]() {
    double L = 0;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h) L += double(dout.f32()[t * H + h]) * table.f32()[chosen[t] * H + h];
    return L;
  };
  Tensor d0 = rng.randn({V, H}), dtable = copy_of(d0);
  train::embedding_backward(dtable, dout, ids);
  expect_grad(dtable, numeric_grad(table, forward), "dtable (accumulated)", rng.seed, &d0);
  ids.ptr<int32_t>()[2] = int32_t(V);  // an id past the vocabulary
  EXPECT_THROW(train::embedding_backward(dtable, dout, ids), Error);
}

TEST(Backward, SiluMul) {
  Rng rng;
  Tensor g = rng.randn({3, 11}, 3.0f), u = rng.randn({3, 11}), dout = rng.randn({3, 11});
  auto forward = [&]() {
    double L = 0;
    for (int64_t i = 0; i < g.numel(); ++i) {
      const double gv = g.f32()[i];
      L += double(dout.f32()[i]) * gv / (1 + std::exp(-gv)) * u.f32()[i];
    }
    return L;
  };
  Tensor dg = Tensor::empty({3, 11}), du = Tensor::empty({3, 11});
  train::silu_mul_backward(dg, du, dout, g, u);
  expect_grad(dg, numeric_grad(g, forward), "dgate", rng.seed);
  expect_grad(du, numeric_grad(u, forward), "dup", rng.seed);
}

TEST(Backward, RopeIsTheInverseRotation) {
  Rng rng;
  auto ops = make_cpu_ops();
  const int64_t T = 3;
  const int H = 2, rope = 8, offset = 3, cols = 13;  // rope slice [3, 11) of 13 columns per head
  const int half = rope / 2;
  for (bool interleaved : {true, false}) {
    Tensor cosv = Tensor::empty({T, half}), sinv = Tensor::empty({T, half});
    std::uniform_real_distribution<float> ang(-3.0f, 3.0f);
    for (int64_t i = 0; i < cosv.numel(); ++i) {
      const float a = ang(rng.gen);
      cosv.f32()[i] = 1.3f * std::cos(a);  // an attention factor (YaRN's mscale) scales both
      sinv.f32()[i] = 1.3f * std::sin(a);
    }
    Tensor x = rng.randn({T, H, cols}), dout = rng.randn({T, H, cols});
    RopeParams p;
    p.n_tokens = T, p.token_stride = H * cols, p.head_stride = cols, p.n_heads = H, p.offset = offset;
    p.rope_dim = rope, p.cos = cosv.f32(), p.sin = sinv.f32(), p.interleaved = interleaved;
    // y = rope(x) in double: the pair (a, b) of angle i becomes (a c − b s, a s + b c)
    auto rope_double = [&](std::vector<double>& y) {
      y.assign(x.f32(), x.f32() + x.numel());
      for (int64_t t = 0; t < T; ++t)
        for (int h = 0; h < H; ++h)
          for (int i = 0; i < half; ++i) {
            const int64_t base = (t * H + h) * cols + offset;
            const int64_t a = base + (interleaved ? 2 * i : i), bb = base + (interleaved ? 2 * i + 1 : i + half);
            const double c = cosv.f32()[t * half + i], sn = sinv.f32()[t * half + i];
            const double xa = x.f32()[a], xb = x.f32()[bb];
            y[size_t(a)] = xa * c - xb * sn;
            y[size_t(bb)] = xa * sn + xb * c;
          }
    };
    auto forward = [&]() {
      std::vector<double> y;
      rope_double(y);
      double L = 0;
      for (int64_t i = 0; i < x.numel(); ++i) L += double(dout.f32()[i]) * y[size_t(i)];
      return L;
    };
    {  // the double reference is the op's rotation
      std::vector<double> y;
      rope_double(y);
      Tensor got = copy_of(x);
      RopeParams q = p;
      q.x = got.f32();
      ops->rope(q);
      for (int64_t i = 0; i < got.numel(); ++i) ASSERT_NEAR(got.f32()[i], y[size_t(i)], 1e-5 * (1 + std::fabs(y[size_t(i)])));
    }
    Tensor dx = copy_of(dout);
    RopeParams b = p;
    b.x = dx.f32();
    train::rope_backward(b);
    expect_grad(dx, numeric_grad(x, forward), interleaved ? "d(in), interleaved pairs" : "d(in), halves", rng.seed);
  }
}

// Self-attention as training runs it (causal, q_pos0 0), a chunk after earlier keys (q_pos0 > 0),
// non-causal; GQA (4 query heads on 2 KV heads), d_qk != d_v, padded strides.
TEST(Backward, Attention) {
  Rng rng;
  struct Case { int64_t n_q, n_kv, q_pos0; bool causal; };
  for (Case c : {Case{5, 5, 0, true}, Case{3, 7, 4, true}, Case{4, 6, 0, false}}) {
    const int H = 4, G = 2, dqk = 6, dv = 5;
    const int64_t qts = H * (dqk + 1), kts = G * (dqk + 2), vts = G * dv;  // padded rows
    Tensor q = rng.randn({c.n_q, qts}), k = rng.randn({c.n_kv, kts}), v = rng.randn({c.n_kv, vts});
    Tensor dout = rng.randn({c.n_q, H, dv});
    AttentionParams p;
    p.q = q.f32(), p.q_token_stride = qts, p.q_head_stride = dqk + 1;
    p.k = k.f32(), p.k_token_stride = kts, p.k_head_stride = dqk + 2;
    p.v = v.f32(), p.v_token_stride = vts, p.v_head_stride = dv;
    p.out_token_stride = H * dv, p.out_head_stride = dv;
    p.n_q = c.n_q, p.n_kv = c.n_kv, p.q_pos0 = c.q_pos0, p.causal = c.causal;
    p.n_q_heads = H, p.n_kv_heads = G, p.d_qk = dqk, p.d_v = dv, p.scale = 0.37f;
    auto forward = [&]() {  // L = Σ dout ⊙ attention(q, k, v), from the definition in double
      double L = 0;
      for (int64_t i = 0; i < c.n_q; ++i)
        for (int h = 0; h < H; ++h) {
          const int g = h / (H / G);
          const int64_t n = c.causal ? std::min(c.n_kv, c.q_pos0 + i + 1) : c.n_kv;
          std::vector<double> s(static_cast<size_t>(n));
          double mx = -1e300, sum = 0;
          for (int64_t j = 0; j < n; ++j) {
            double d = 0;
            for (int e = 0; e < dqk; ++e) d += double(q.f32()[i * qts + h * (dqk + 1) + e]) * k.f32()[j * kts + g * (dqk + 2) + e];
            s[size_t(j)] = d * p.scale;
            mx = std::max(mx, s[size_t(j)]);
          }
          for (double& x : s) sum += (x = std::exp(x - mx));
          for (int e = 0; e < dv; ++e) {
            double o = 0;
            for (int64_t j = 0; j < n; ++j) o += s[size_t(j)] / sum * v.f32()[j * vts + g * dv + e];
            L += o * dout.f32()[(i * H + h) * dv + e];
          }
        }
      return L;
    };
    {  // the double reference is the op's forward
      auto ops = make_cpu_ops();
      Tensor out = Tensor::empty({c.n_q, H, dv});
      AttentionParams f = p;
      f.out = out.f32();
      ops->attention(f);
      std::vector<double> d(dout.f32(), dout.f32() + dout.numel());
      ASSERT_NEAR(dot(out, d), forward(), 1e-4 * (1 + std::fabs(forward())));
    }
    Tensor dq = Tensor::zeros(q.shape()), dk = Tensor::zeros(k.shape()), dvv = Tensor::zeros(v.shape());
    train::attention_backward(dq.f32(), dk.f32(), dvv.f32(), dout.f32(), p);
    expect_grad(dq, numeric_grad(q, forward), "dq", rng.seed);
    expect_grad(dk, numeric_grad(k, forward), "dk", rng.seed);
    expect_grad(dvv, numeric_grad(v, forward), "dv", rng.seed);
  }
}

// The router's gradient through the chosen experts' weights (the choice itself is held fixed):
// V3 (sigmoid, normalised top-k, scaling 2.5, bias, groups), V2-Lite (softmax, raw top-k) and
// softmax with normalisation.
TEST(Backward, MoeGateThroughTheRoutingWeights) {
  Rng rng;
  auto ops = make_cpu_ops();
  struct Case { ScoringFunc scoring; int E, K, n_group, topk_group; bool norm; float rsf; };
  for (Case c : {Case{ScoringFunc::Sigmoid, 16, 4, 4, 2, true, 2.5f}, Case{ScoringFunc::Softmax, 12, 3, 1, 1, false, 1.0f},
                 Case{ScoringFunc::Softmax, 9, 2, 1, 1, true, 1.5f}}) {
    MoeGateParams p;
    p.scoring = c.scoring, p.n_experts = c.E, p.top_k = c.K, p.n_group = c.n_group, p.topk_group = c.topk_group;
    p.norm_topk_prob = c.norm, p.routed_scaling_factor = c.rsf;
    const int64_t T = 4;
    Tensor logits = rng.randn({T, c.E}, 2.0f), bias = rng.randn({c.E}, 0.1f), dw = rng.randn({T, c.K});
    Tensor weights = Tensor::empty({T, c.K}), ids = Tensor::empty({T, c.K}, DType::I32);
    ops->moe_gate(weights, ids, logits, c.scoring == ScoringFunc::Sigmoid ? bias.f32() : nullptr, p);
    auto routing = [&](std::vector<double>& w) {  // the weights of the chosen experts, in double
      w.assign(size_t(T * c.K), 0.0);
      for (int64_t t = 0; t < T; ++t) {
        std::vector<double> sc(static_cast<size_t>(c.E));
        double mx = -1e300, sum = 0;
        for (int e = 0; e < c.E; ++e) mx = std::max(mx, double(logits.f32()[t * c.E + e]));
        for (int e = 0; e < c.E; ++e) {
          const double l = logits.f32()[t * c.E + e];
          sc[size_t(e)] = c.scoring == ScoringFunc::Sigmoid ? 1 / (1 + std::exp(-l)) : std::exp(l - mx);
          sum += sc[size_t(e)];
        }
        if (c.scoring == ScoringFunc::Softmax)
          for (double& x : sc) x /= sum;
        double raw = 0;
        for (int k = 0; k < c.K; ++k) raw += sc[size_t(ids.ptr<int32_t>()[t * c.K + k])];
        for (int k = 0; k < c.K; ++k) {
          const double r = sc[size_t(ids.ptr<int32_t>()[t * c.K + k])];
          w[size_t(t * c.K + k)] = (c.norm ? r / (raw + 1e-20) : r) * c.rsf;
        }
      }
    };
    std::vector<double> w0;
    routing(w0);
    for (size_t i = 0; i < w0.size(); ++i) ASSERT_NEAR(weights.f32()[i], w0[i], 1e-5 * (1 + std::fabs(w0[i])));
    auto forward = [&]() {
      std::vector<double> w;
      routing(w);
      double L = 0;
      for (size_t i = 0; i < w.size(); ++i) L += w[i] * dw.f32()[i];
      return L;
    };
    Tensor dlogits = Tensor::empty({T, c.E});
    train::moe_gate_backward(dlogits, dw, logits, ids, p);
    expect_grad(dlogits, numeric_grad(logits, forward), "dlogits", rng.seed);
  }
}

TEST(Backward, CrossEntropyFusedAndInPlace) {
  Rng rng;
  const int64_t T = 5, V = 11;
  Tensor logits = rng.randn({T, V}, 2.0f), targets = Tensor::empty({T}, DType::I32);
  const int32_t tg[T] = {4, -1, 0, 10, 4};  // row 1 has no target (padding)
  for (int64_t t = 0; t < T; ++t) targets.ptr<int32_t>()[t] = tg[t];
  const float dloss = 1.0f / 4;  // the mean over the 4 rows with a target
  auto forward = [&]() {
    double L = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (tg[t] < 0) continue;
      double mx = -1e300, s = 0;
      for (int64_t v = 0; v < V; ++v) mx = std::max(mx, double(logits.f32()[t * V + v]));
      for (int64_t v = 0; v < V; ++v) s += std::exp(double(logits.f32()[t * V + v]) - mx);
      L += (mx + std::log(s) - logits.f32()[t * V + tg[t]]) * dloss;
    }
    return L;
  };
  const double want_mean = forward();
  Tensor losses = Tensor::empty({T}), dlogits = Tensor::empty({T, V});
  EXPECT_EQ(train::cross_entropy_backward(losses, dlogits, logits, targets, dloss), 4);
  double mean = 0;
  for (int64_t t = 0; t < T; ++t) mean += losses.f32()[t] * dloss;
  EXPECT_NEAR(mean, want_mean, 1e-6 * (1 + want_mean));
  EXPECT_EQ(losses.f32()[1], 0.0f);
  expect_grad(dlogits, numeric_grad(logits, forward), "dlogits", rng.seed);
  // in place: the gradient overwrites the logits (no second (T, V) buffer)
  Tensor inplace = copy_of(logits), l2 = Tensor::empty({T});
  train::cross_entropy_backward(l2, inplace, inplace, targets, dloss);
  for (int64_t i = 0; i < inplace.numel(); ++i) ASSERT_EQ(inplace.f32()[i], dlogits.f32()[i]) << "element " << i;
  for (int64_t t = 0; t < T; ++t) EXPECT_EQ(l2.f32()[t], losses.f32()[t]);
  // a confident row: the target's gradient p − 1 keeps its digits (no cancellation)
  Tensor sure = Tensor::zeros({1, V}), one = Tensor::empty({1}, DType::I32), ls = Tensor::empty({1}),
         ds = Tensor::empty({1, V});
  sure.f32()[3] = 20.0f;
  one.ptr<int32_t>()[0] = 3;
  train::cross_entropy_backward(ls, ds, sure, one, 1.0f);
  const double p_other = std::exp(-20.0) / (1 + (V - 1) * std::exp(-20.0));
  EXPECT_NEAR(ds.f32()[3], -(V - 1) * p_other, 1e-6 * (V - 1) * p_other);
  // a target past the vocabulary is an error
  one.ptr<int32_t>()[0] = int32_t(V);
  EXPECT_THROW(train::cross_entropy_backward(ls, ds, sure, one, 1.0f), Error);
}

}  // namespace
