// CPU ops against straightforward double-precision references on fresh random inputs, and
// the MoE gate on hand-made cases whose answer is known.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "core/error.h"
#include "engine/sampler.h"
#include "ops/cpu/matmul.h"
#include "ops/cpu/vec.h"
#include "ops/ops.h"
#include "model/config.h"
#include "model/rope.h"
#include "test_util.h"

using namespace fathom;
using namespace fathom::test;

namespace {

struct Rng {
  Rng() : seed(std::random_device{}()), gen(seed) {}
  float normal() { return std::normal_distribution<float>(0.0f, 1.0f)(gen); }
  Tensor randn(Shape s) {
    Tensor t = Tensor::empty(std::move(s));
    for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = normal();
    return t;
  }
  uint32_t seed;
  std::mt19937 gen;
};

// attention in double, straight from the definition
void attention_reference(const AttentionParams& p, std::vector<double>& out) {
  const int group = p.n_q_heads / p.n_kv_heads;
  const float* kb = static_cast<const float*>(p.k);
  const float* vb = static_cast<const float*>(p.v);
  auto row = [&](int64_t j) {
    return p.block_table ? int64_t(p.block_table[j / p.block_size]) * p.block_size + j % p.block_size : j;
  };
  out.assign(size_t(p.n_q * p.n_q_heads * p.d_v), 0.0);
  for (int64_t i = 0; i < p.n_q; ++i)
    for (int h = 0; h < p.n_q_heads; ++h) {
      const int kh = h / group;
      const int64_t n = p.causal ? std::min(p.n_kv, p.q_pos0 + i + 1) : p.n_kv;
      std::vector<double> s(static_cast<size_t>(n));
      double mx = -1e300;
      for (int64_t j = 0; j < n; ++j) {
        double d = 0;
        for (int k = 0; k < p.d_qk; ++k)
          d += double(p.q[i * p.q_token_stride + h * p.q_head_stride + k]) *
               kb[row(j) * p.k_token_stride + kh * p.k_head_stride + k];
        s[size_t(j)] = d * p.scale;
        mx = std::max(mx, s[size_t(j)]);
      }
      double z = 0;
      for (auto& v : s) z += (v = std::exp(v - mx));
      for (int64_t j = 0; j < n; ++j)
        for (int k = 0; k < p.d_v; ++k)
          out[size_t((i * p.n_q_heads + h) * p.d_v + k)] +=
              s[size_t(j)] / z * vb[row(j) * p.v_token_stride + kh * p.v_head_stride + k];
    }
}

}  // namespace

TEST(Ops, AttentionMatchesReferenceForMhaGqaMqa) {
  Rng rng;
  auto ops = make_cpu_ops();
  struct Shape_ { int64_t nq, nkv, pos0; int hq, hkv, dqk, dv; bool causal; };
  for (Shape_ s : {Shape_{5, 5, 0, 4, 4, 48, 32, true}, Shape_{1, 37, 36, 8, 2, 64, 64, true},
                   Shape_{7, 20, 13, 6, 1, 72, 40, true}, Shape_{3, 9, 0, 2, 2, 17, 5, false},
                   // long enough that the keys are split into chunks and merged
                   Shape_{2, 700, 698, 8, 1, 40, 32, true}, Shape_{130, 130, 0, 4, 2, 24, 16, true},
                   Shape_{1, 1500, 0, 2, 2, 8, 8, false}}) {
    Tensor q = rng.randn({s.nq, s.hq, s.dqk}), k = rng.randn({s.nkv, s.hkv, s.dqk}), v = rng.randn({s.nkv, s.hkv, s.dv});
    Tensor out = Tensor::empty({s.nq, s.hq, s.dv});
    for (int64_t i = 0; i < out.numel(); ++i) out.f32()[i] = std::nanf("");  // catch unwritten elements
    AttentionParams p;
    p.q = q.f32(); p.q_token_stride = s.hq * s.dqk; p.q_head_stride = s.dqk;
    p.k = k.f32(); p.k_token_stride = s.hkv * s.dqk; p.k_head_stride = s.dqk;
    p.v = v.f32(); p.v_token_stride = s.hkv * s.dv; p.v_head_stride = s.dv;
    p.out = out.f32(); p.out_token_stride = s.hq * s.dv; p.out_head_stride = s.dv;
    p.n_q = s.nq; p.n_kv = s.nkv; p.q_pos0 = s.pos0; p.n_q_heads = s.hq; p.n_kv_heads = s.hkv;
    p.d_qk = s.dqk; p.d_v = s.dv; p.scale = 1.0f / std::sqrt(float(s.dqk)); p.causal = s.causal;
    ops->attention(p);
    std::vector<double> want;
    attention_reference(p, want);
    std::vector<float> wantf(want.begin(), want.end());
    EXPECT_LE(rel_err(out.f32(), wantf.data(), wantf.size()), 1e-5) << "seed " << rng.seed << " heads " << s.hq << "/" << s.hkv;
  }
}

TEST(Ops, AttentionReadsAPagedCacheThroughTheBlockTable) {
  Rng rng;
  auto ops = make_cpu_ops();
  // 100 keys in blocks of 16 scattered (shuffled) over a pool of 9 blocks; MQA like absorbed MLA
  const int64_t n_kv = 100, bs = 16, n_blocks = 9, nq = 3;
  const int hq = 4, dqk = 24, dv = 16;
  std::vector<int32_t> table(static_cast<size_t>(n_blocks));
  for (int i = 0; i < int(n_blocks); ++i) table[size_t(i)] = i;
  std::shuffle(table.begin(), table.end(), rng.gen);
  Tensor pool = rng.randn({n_blocks * bs, dqk});  // row = [latent (dv) | pe]
  Tensor q = rng.randn({nq, hq, dqk}), out = Tensor::empty({nq, hq, dv});
  for (int64_t i = 0; i < out.numel(); ++i) out.f32()[i] = std::nanf("");
  AttentionParams p;
  p.q = q.f32(); p.q_token_stride = hq * dqk; p.q_head_stride = dqk;
  p.k = pool.f32(); p.k_token_stride = dqk;
  p.v = pool.f32(); p.v_token_stride = dqk;
  p.block_table = table.data(); p.block_size = int(bs);
  p.out = out.f32(); p.out_token_stride = hq * dv; p.out_head_stride = dv;
  p.n_q = nq; p.n_kv = n_kv; p.q_pos0 = n_kv - nq; p.n_q_heads = hq; p.n_kv_heads = 1;
  p.d_qk = dqk; p.d_v = dv; p.scale = 0.2f; p.causal = true;
  ops->attention(p);
  std::vector<double> want;
  attention_reference(p, want);
  std::vector<float> wantf(want.begin(), want.end());
  EXPECT_LE(rel_err(out.f32(), wantf.data(), wantf.size()), 1e-5) << "seed " << rng.seed;
  // the same keys laid out contiguously give the same answer
  Tensor flat = Tensor::empty({n_kv, dqk});
  for (int64_t j = 0; j < n_kv; ++j)
    std::memcpy(flat.f32() + j * dqk, pool.f32() + (table[size_t(j / bs)] * bs + j % bs) * dqk, sizeof(float) * dqk);
  Tensor out2 = Tensor::empty({nq, hq, dv});
  p.k = p.v = flat.f32();
  p.block_table = nullptr;
  p.out = out2.f32();
  ops->attention(p);
  EXPECT_LE(rel_err(out2.f32(), out.f32(), size_t(out.numel())), 1e-6);
}

TEST(Ops, RopeTablesMatchTheModelsRope) {
  auto ops = make_cpu_ops();
  ModelConfig c = load_config(fixture_dir("v2-lite-tiny") + "/config.json");
  c.rope_scaling.type = "yarn";  // with YaRN's ramp and attention factor
  c.rope_scaling.factor = 40;
  c.rope_scaling.original_max_position_embeddings = 64;
  c.rope_scaling.mscale = 0.707;
  c.rope_scaling.mscale_all_dim = 0.707;
  Rope rope(c);
  std::vector<int64_t> pos = {0, 1, 7, 300, 4095};
  Tensor want_cos, want_sin;
  rope.tables(pos.data(), int64_t(pos.size()), want_cos, want_sin);
  Tensor p32 = Tensor::empty({int64_t(pos.size())}, DType::I32);
  for (size_t i = 0; i < pos.size(); ++i) p32.ptr<int32_t>()[i] = int32_t(pos[i]);
  Tensor inv = Tensor::empty({int64_t(rope.inv_freq().size())}, DType::F64);
  std::copy(rope.inv_freq().begin(), rope.inv_freq().end(), inv.ptr<double>());
  Tensor cos = Tensor::empty(want_cos.shape()), sin = Tensor::empty(want_sin.shape());
  ops->rope_tables(cos, sin, p32, inv, rope.attention_factor());
  for (int64_t i = 0; i < cos.numel(); ++i) {
    EXPECT_EQ(cos.f32()[i], want_cos.f32()[i]) << i;
    EXPECT_EQ(sin.f32()[i], want_sin.f32()[i]) << i;
  }
}

TEST(Ops, CopyStridedConvertsAndBroadcasts) {
  Rng rng;
  auto ops = make_cpu_ops();
  // in (3 tokens, stride 11): 5 columns broadcast to 2 heads of an output with strides 16 / 7
  Tensor in = rng.randn({3, 11});
  for (DType dt : {DType::F32, DType::BF16}) {
    Tensor out = Tensor::zeros({3, 16}, dt);
    CopyParams p;
    p.out = out.data(); p.out_token_stride = 16; p.out_head_stride = 7; p.out_dtype = dt;
    p.in = in.f32() + 2; p.in_token_stride = 11; p.in_head_stride = 0;
    p.n_tokens = 3; p.n_heads = 2; p.cols = 5;
    ops->copy(p);
    Tensor got = to_f32(out);
    for (int t = 0; t < 3; ++t)
      for (int c = 0; c < 16; ++c) {
        const int h = c / 7, col = c % 7;
        const bool written = h < 2 && col < 5;
        const float src = in.f32()[t * 11 + 2 + col];
        const float want = written ? (dt == DType::BF16 ? bf16_to_f32(f32_to_bf16(src)) : src) : 0.0f;
        EXPECT_EQ(got.f32()[t * 16 + c], want) << dtype_name(dt) << " t " << t << " c " << c;
      }
  }
}

TEST(Ops, MoeExpertsMixTheChosenExperts) {
  Rng rng;
  auto ops = make_cpu_ops();
  const int E = 5, K = 2;
  const int64_t T = 7, D = 12, I = 9;
  std::vector<LinearWeight> ws(static_cast<size_t>(3 * E));
  ExpertSet set;
  for (int e = 0; e < E; ++e) {
    ws[size_t(3 * e)].weight = rng.randn({I, D});
    ws[size_t(3 * e + 1)].weight = rng.randn({I, D});
    ws[size_t(3 * e + 2)].weight = rng.randn({D, I});
    set.experts.push_back({&ws[size_t(3 * e)], &ws[size_t(3 * e + 1)], &ws[size_t(3 * e + 2)]});
  }
  ops->prepare_experts(set);
  Tensor x = rng.randn({T, D}), weights = rng.randn({T, K}), ids = Tensor::empty({T, K}, DType::I32);
  for (int64_t t = 0; t < T; ++t) {
    ids.ptr<int32_t>()[t * K] = int32_t(t % E);
    ids.ptr<int32_t>()[t * K + 1] = int32_t((t * 3 + 1) % E == t % E ? (t + 1) % E : (t * 3 + 1) % E);
  }
  Tensor out = Tensor::empty({T, D});
  for (int64_t i = 0; i < out.numel(); ++i) out.f32()[i] = std::nanf("");
  ops->moe_experts(out, x, weights, ids, set);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t d = 0; d < D; ++d) {
      double want = 0;
      for (int k = 0; k < K; ++k) {
        const int e = ids.ptr<int32_t>()[t * K + k];
        const float* wg = ws[size_t(3 * e)].weight.f32();
        const float* wu = ws[size_t(3 * e + 1)].weight.f32();
        const float* wd = ws[size_t(3 * e + 2)].weight.f32();
        double y = 0;
        for (int64_t i = 0; i < I; ++i) {
          double g = 0, u = 0;
          for (int64_t j = 0; j < D; ++j) {
            g += double(wg[i * D + j]) * x.f32()[t * D + j];
            u += double(wu[i * D + j]) * x.f32()[t * D + j];
          }
          y += g / (1 + std::exp(-g)) * u * wd[d * I + i];
        }
        want += weights.f32()[t * K + k] * y;
      }
      ASSERT_NEAR(out.f32()[t * D + d], want, 1e-4 * (1 + std::fabs(want))) << "seed " << rng.seed << " t " << t;
    }
}

// Input norms (InputNorm) and accumulation fused into matmul_batch, moe_experts and swiglu give
// what the separate ops give: rmsnorm into a copy, the op, then add — also when the output is
// the input itself (the residual stream, as the decoder layer calls them).
TEST(Ops, InputNormAndAccumulateMatchTheSeparateOps) {
  Rng rng;
  auto ops = make_cpu_ops();
  const int64_t D = 24, I = 10, N = 13;
  auto close = [&](const Tensor& got, const Tensor& want, const char* what) {
    for (int64_t i = 0; i < want.numel(); ++i)
      ASSERT_NEAR(got.f32()[i], want.f32()[i], 1e-5 * (1 + std::fabs(want.f32()[i]))) << what << " seed " << rng.seed;
  };
  auto copy_of = [](const Tensor& t) {
    Tensor c = Tensor::empty(t.shape());
    std::memcpy(c.data(), t.data(), t.nbytes());
    return c;
  };
  Tensor g = rng.randn({D}), g2 = rng.randn({D});
  const float eps = 1e-6f;
  LinearWeight a, b;
  a.weight = rng.randn({N, D});
  b.weight = rng.randn({I, D});
  for (int64_t M : {1, 3}) {
    Tensor x = rng.randn({M, D}), h = Tensor::empty({M, D}), h2 = Tensor::empty({M, D});
    ops->rmsnorm(h, x, g, eps);
    ops->rmsnorm(h2, x, g2, eps);
    // two jobs share x and its norm, a third normalises x with another weight and accumulates
    Tensor wa = Tensor::empty({M, N}), wb = Tensor::empty({M, I}), base = rng.randn({M, N});
    Tensor wc = copy_of(base);
    ops->matmul(wa, h, a);
    ops->matmul(wb, h, b);
    Tensor prod = Tensor::empty({M, N});
    ops->matmul(prod, h2, a);
    ops->add(wc, prod);
    Tensor ga = Tensor::empty({M, N}), gb = Tensor::empty({M, I}), gc = copy_of(base);
    ops->matmul_batch({{ga.f32(), x.f32(), M, &a, InputNorm{&g, eps}},
                       {gb.f32(), x.f32(), M, &b, InputNorm{&g, eps}},
                       {gc.f32(), x.f32(), M, &a, InputNorm{&g2, eps}, /*accumulate=*/true}});
    close(ga, wa, "matmul_batch norm");
    close(gb, wb, "matmul_batch norm, second job");
    close(gc, wc, "matmul_batch norm + accumulate");
  }

  // experts: out = x, accumulating, normalised input
  const int E = 4, K = 2;
  const int64_t T = 5;
  std::vector<LinearWeight> ws(static_cast<size_t>(3 * E + 3));
  ExpertSet set, shared;
  for (int e = 0; e <= E; ++e) {
    ws[size_t(3 * e)].weight = rng.randn({I, D});
    ws[size_t(3 * e + 1)].weight = rng.randn({I, D});
    ws[size_t(3 * e + 2)].weight = rng.randn({D, I});
    (e < E ? set : shared).experts.push_back({&ws[size_t(3 * e)], &ws[size_t(3 * e + 1)], &ws[size_t(3 * e + 2)]});
  }
  ops->prepare_experts(set);
  ops->prepare_experts(shared);
  Tensor x = rng.randn({T, D}), weights = rng.randn({T, K}), ids = Tensor::empty({T, K}, DType::I32);
  for (int64_t t = 0; t < T; ++t) {
    ids.ptr<int32_t>()[t * K] = int32_t(t % E);
    ids.ptr<int32_t>()[t * K + 1] = int32_t((t + 1) % E);
  }
  Tensor h = Tensor::empty({T, D}), y = Tensor::empty({T, D}), want = copy_of(x);
  ops->rmsnorm(h, x, g, eps);
  ops->moe_experts(y, h, weights, ids, set, &shared);
  ops->add(want, y);
  Tensor got = copy_of(x);
  ops->moe_experts(got, got, weights, ids, set, &shared, /*accumulate=*/true, InputNorm{&g, eps});
  close(got, want, "moe_experts norm + accumulate into its input");

  want = copy_of(x);
  ops->swiglu(want, h, shared, /*accumulate=*/true);
  got = copy_of(x);
  ops->swiglu(got, got, shared, /*accumulate=*/true, InputNorm{&g, eps});
  close(got, want, "swiglu norm + accumulate into its input");
}

TEST(Ops, RmsNormAndSiluMul) {
  Rng rng;
  auto ops = make_cpu_ops();
  Tensor x = rng.randn({3, 37}), w = rng.randn({37}), out = Tensor::empty({3, 37});
  ops->rmsnorm(out, x, w, 1e-6f);
  for (int r = 0; r < 3; ++r) {
    double ss = 0;
    for (int i = 0; i < 37; ++i) ss += double(x.f32()[r * 37 + i]) * x.f32()[r * 37 + i];
    double inv = 1.0 / std::sqrt(ss / 37 + 1e-6);
    for (int i = 0; i < 37; ++i) EXPECT_NEAR(out.f32()[r * 37 + i], x.f32()[r * 37 + i] * inv * w.f32()[i], 1e-5);
  }
  Tensor g = rng.randn({2, 11}), u = rng.randn({2, 11}), o = Tensor::empty({2, 11});
  ops->silu_mul(o, g, u);
  for (int i = 0; i < 22; ++i) {
    double gv = g.f32()[i];
    EXPECT_NEAR(o.f32()[i], gv / (1 + std::exp(-gv)) * u.f32()[i], 1e-5);
  }
}

TEST(Ops, RopeRotatesPairsAndPreservesNorm) {
  auto ops = make_cpu_ops();
  for (bool interleaved : {true, false}) {
    // one token, one head, 4 rope dims after 2 untouched dims
    Tensor x = Tensor::empty({1, 6});
    float init[6] = {9, 9, 1, 2, 3, 4};
    std::copy(init, init + 6, x.f32());
    float c[2] = {std::cos(0.5f), std::cos(0.25f)}, s[2] = {std::sin(0.5f), std::sin(0.25f)};
    RopeParams p;
    p.x = x.f32(); p.n_tokens = 1; p.token_stride = 6; p.head_stride = 0; p.n_heads = 1; p.offset = 2; p.rope_dim = 4;
    p.cos = c; p.sin = s; p.interleaved = interleaved;
    ops->rope(p);
    EXPECT_EQ(x.f32()[0], 9.0f);
    EXPECT_EQ(x.f32()[1], 9.0f);
    // pair 0 is (1,2) interleaved or (1,3) halves, rotated by 0.5
    float a0 = 1, b0 = interleaved ? 2 : 3;
    float ra = x.f32()[2], rb = x.f32()[interleaved ? 3 : 4];
    EXPECT_NEAR(ra, a0 * c[0] - b0 * s[0], 1e-6);
    EXPECT_NEAR(rb, b0 * c[0] + a0 * s[0], 1e-6);
    double n2 = 0;
    for (int i = 2; i < 6; ++i) n2 += double(x.f32()[i]) * x.f32()[i];
    EXPECT_NEAR(n2, 1 + 4 + 9 + 16, 1e-4);
  }
}

namespace {
struct GateResult {
  std::vector<int32_t> experts;
  std::vector<float> weights;
};
GateResult run_gate(const std::vector<float>& logits, const std::vector<float>* bias, const MoeGateParams& p) {
  auto ops = make_cpu_ops();
  Tensor l = Tensor::empty({1, p.n_experts});
  std::copy(logits.begin(), logits.end(), l.f32());
  Tensor w = Tensor::empty({1, p.top_k}), e = Tensor::empty({1, p.top_k}, DType::I32);
  ops->moe_gate(w, e, l, bias ? bias->data() : nullptr, p);
  return {std::vector<int32_t>(e.ptr<int32_t>(), e.ptr<int32_t>() + p.top_k),
          std::vector<float>(w.f32(), w.f32() + p.top_k)};
}
float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
}  // namespace

TEST(Ops, MoeGateV3BiasChoosesButDoesNotWeigh) {
  MoeGateParams p;
  p.scoring = ScoringFunc::Sigmoid;
  p.n_experts = 4; p.top_k = 2; p.n_group = 1; p.topk_group = 1; p.norm_topk_prob = true; p.routed_scaling_factor = 2.5f;
  std::vector<float> logits = {2.0f, 1.0f, 0.0f, -1.0f};
  std::vector<float> bias = {0.0f, 0.0f, 0.0f, 1.0f};  // expert 3 gets chosen because of its bias
  GateResult r = run_gate(logits, &bias, p);
  EXPECT_EQ(r.experts, (std::vector<int32_t>{3, 0}));
  float s3 = sigmoid(-1.0f), s0 = sigmoid(2.0f);  // weights use the unbiased scores
  EXPECT_NEAR(r.weights[0], 2.5f * s3 / (s3 + s0), 1e-6);
  EXPECT_NEAR(r.weights[1], 2.5f * s0 / (s3 + s0), 1e-6);
  // without normalisation the weights are the raw scores times the scaling factor
  p.norm_topk_prob = false;
  r = run_gate(logits, &bias, p);
  EXPECT_NEAR(r.weights[0], 2.5f * s3, 1e-6);
}

TEST(Ops, MoeGateGroupsRankedByTop2Sum) {
  // 8 experts in 4 groups of 2; keep 1 group. Group 0 has the single best expert (0.9 + 0.0)
  // but group 1 has the best pair (0.6 + 0.6): V3 keeps group 1, V2's max rule keeps group 0.
  MoeGateParams p;
  p.scoring = ScoringFunc::Sigmoid;
  p.n_experts = 8; p.top_k = 2; p.n_group = 4; p.topk_group = 1; p.norm_topk_prob = false;
  auto logit = [](float s) { return std::log(s / (1 - s)); };  // inverse sigmoid
  std::vector<float> logits = {logit(0.9f), logit(0.01f), logit(0.6f), logit(0.6f),
                               logit(0.5f), logit(0.02f), logit(0.3f), logit(0.3f)};
  p.group_by_top2_sum = true;
  GateResult r = run_gate(logits, nullptr, p);
  std::vector<int32_t> e = r.experts;
  std::sort(e.begin(), e.end());
  EXPECT_EQ(e, (std::vector<int32_t>{2, 3}));
  p.group_by_top2_sum = false;
  r = run_gate(logits, nullptr, p);
  e = r.experts;
  std::sort(e.begin(), e.end());
  EXPECT_EQ(e, (std::vector<int32_t>{0, 1}));
}

TEST(Ops, MoeGateSoftmaxGreedy) {
  MoeGateParams p;
  p.scoring = ScoringFunc::Softmax;
  p.n_experts = 5; p.top_k = 2; p.routed_scaling_factor = 1.0f;
  std::vector<float> logits = {0.1f, 3.0f, -2.0f, 2.0f, 0.0f};
  GateResult r = run_gate(logits, nullptr, p);
  double z = 0;
  for (float l : logits) z += std::exp(l);
  EXPECT_EQ(r.experts, (std::vector<int32_t>{1, 3}));
  EXPECT_NEAR(r.weights[0], std::exp(3.0) / z, 1e-6);
  EXPECT_NEAR(r.weights[1], std::exp(2.0) / z, 1e-6);
}

TEST(Ops, MatmulPerHeadMatchesReference) {
  Rng rng;
  auto ops = make_cpu_ops();
  const int H = 3;
  const int64_t N = 19, K = 33;
  for (DType dtype : {DType::F32, DType::BF16}) {
    Tensor w = from_f32(rng.randn({H, N, K}).f32(), {H, N, K}, dtype);
    Tensor wall = to_f32(w);  // the exact values the kernel sees
    std::vector<Tensor> wf;
    for (int h = 0; h < H; ++h) wf.push_back(wall.slice_rows(h, h + 1).reshape({N, K}));
    for (int64_t T : {1, 3, 20}) {  // the decode path (≤ 8 tokens) and the prefill path
      // x: (T, H, K + 5) — padded rows exercise the strides
      Tensor x = rng.randn({T, H, K + 5}), out = Tensor::empty({T, H, N + 2});
      for (int64_t i = 0; i < out.numel(); ++i) out.f32()[i] = std::nanf("");
      HeadMatmulParams p;
      p.x = x.f32(); p.x_token_stride = H * (K + 5); p.x_head_stride = K + 5;
      p.out = out.f32(); p.out_token_stride = H * (N + 2); p.out_head_stride = N + 2;
      p.n_tokens = T;
      ops->matmul_per_head(p, w);
      for (int64_t t = 0; t < T; ++t)
        for (int h = 0; h < H; ++h)
          for (int64_t n = 0; n < N; ++n) {
            double want = 0;
            for (int64_t k = 0; k < K; ++k)
              want += double(x.f32()[(t * H + h) * (K + 5) + k]) * wf[size_t(h)].f32()[n * K + k];
            ASSERT_NEAR(out.f32()[(t * H + h) * (N + 2) + n], want, 1e-4 * (1 + std::fabs(want)))
                << "seed " << rng.seed << " T " << T << " " << dtype_name(dtype);
          }
    }
  }
}

TEST(Ops, MatmulBatchMatchesReference) {
  Rng rng;
  auto ops = make_cpu_ops();
  // jobs of every weight kind, decode (M = 1, sliced over threads) and prefill rows (M > 1)
  struct Spec { DType dtype; int64_t N, K, M; };
  std::vector<Spec> specs = {{DType::BF16, 300, 70, 1}, {DType::F8_E4M3, 260, 130, 1}, {DType::F32, 37, 9, 1},
                             {DType::F16, 33, 17, 3},   {DType::F8_E4M3, 129, 257, 2}, {DType::BF16, 1, 1, 1}};
  std::vector<LinearWeight> w(specs.size());
  std::vector<Tensor> x, out;
  std::vector<MatmulJob> jobs;
  for (size_t i = 0; i < specs.size(); ++i) {
    const Spec& s = specs[i];
    Tensor wf = rng.randn({s.N, s.K});
    w[i].name = cat("weight ", i);
    if (s.dtype == DType::F8_E4M3) fathom::cpu::scale(wf.f32(), 50.0f, wf.numel());  // use the e4m3 range
    w[i].weight = from_f32(wf.f32(), {s.N, s.K}, s.dtype);
    if (s.dtype == DType::F8_E4M3) {
      w[i].scale_inv = Tensor::empty({(s.N + 127) / 128, (s.K + 127) / 128});
      for (int64_t j = 0; j < w[i].scale_inv.numel(); ++j) w[i].scale_inv.f32()[j] = 0.01f * float(j + 1);
    }
    x.push_back(rng.randn({s.M, s.K}));
    out.push_back(Tensor::empty({s.M, s.N}));
    for (int64_t j = 0; j < out.back().numel(); ++j) out.back().f32()[j] = std::nanf("");
  }
  for (size_t i = 0; i < specs.size(); ++i) jobs.push_back({out[i].f32(), x[i].f32(), specs[i].M, &w[i]});
  ops->matmul_batch(jobs);
  for (size_t i = 0; i < specs.size(); ++i) {
    std::vector<float> want(static_cast<size_t>(out[i].numel()));
    cpu::matmul_reference(want.data(), x[i].f32(), specs[i].M, w[i]);
    EXPECT_LE(rel_err(out[i].f32(), want.data(), want.size()), 1e-5) << "job " << i << " seed " << rng.seed;
  }
}

namespace {
// The old absorbed-MLA cache append, op by op: rope of k_pe in kv, c_kv copied out, rmsnorm of
// it, and the two copies into the cache. kv is taken by value (a copy is roped).
void mla_append_by_parts(Ops& ops, const MlaAppendParams& p) {
  const int64_t T = p.n_tokens, R = p.kv_lora_rank, W = R + p.rope_dim;
  Tensor kv = Tensor::empty({T, W});
  for (int64_t t = 0; t < T; ++t) std::memcpy(kv.f32() + t * W, p.kv + t * p.kv_token_stride, sizeof(float) * size_t(W));
  RopeParams r;
  r.x = kv.f32(); r.n_tokens = T; r.token_stride = W; r.head_stride = 0; r.n_heads = 1; r.offset = int(R);
  r.rope_dim = p.rope_dim; r.cos = p.cos; r.sin = p.sin; r.interleaved = p.interleaved;
  ops.rope(r);
  Tensor c_kv = Tensor::empty({T, R}), weight = Tensor::view(const_cast<float*>(p.norm_weight), {R}, DType::F32, nullptr);
  CopyParams c;
  c.out = c_kv.f32(); c.out_token_stride = R; c.in = kv.f32(); c.in_token_stride = W; c.n_tokens = T; c.cols = int(R);
  ops.copy(c);
  ops.rmsnorm(c_kv, c_kv, weight, p.eps);
  const size_t elem = dtype_size(p.out_dtype);
  CopyParams a;
  a.out = static_cast<char*>(p.out) + size_t(p.pos0 * W) * elem;
  a.out_token_stride = W; a.out_dtype = p.out_dtype; a.out_token_index = p.out_token_index;
  a.in = c_kv.f32(); a.in_token_stride = R; a.n_tokens = T; a.cols = int(R);
  if (p.out_token_index) a.out = p.out;
  ops.copy(a);
  a.out = static_cast<char*>(a.out) + size_t(R) * elem;
  a.in = kv.f32() + R; a.in_token_stride = W; a.cols = p.rope_dim;
  ops.copy(a);
}
}  // namespace

TEST(Ops, MlaCacheAppendEqualsTheOpsItFuses) {
  Rng rng;
  auto ops = make_cpu_ops();
  struct Case { int64_t R; int rd; int64_t T, pad; };
  for (Case s : {Case{96, 32, 3, 0}, Case{512, 64, 17, 7}, Case{512, 64, 1, 0}, Case{40, 6, 5, 3}})
    for (DType dt : {DType::F32, DType::BF16})
      for (bool interleaved : {true, false})
        for (bool indexed : {false, true}) {
          const int64_t W = s.R + s.rd, rows = 2 * s.T + 9;
          Tensor kv = rng.randn({s.T, W + s.pad}), w = rng.randn({s.R}), cs = rng.randn({s.T, s.rd / 2}),
                 sn = rng.randn({s.T, s.rd / 2});
          for (int64_t i = 0; i < kv.numel(); ++i) kv.f32()[i] *= 3.0f;
          Tensor index = Tensor::empty({s.T}, DType::I32);
          for (int64_t t = 0; t < s.T; ++t) index.ptr<int32_t>()[t] = int32_t(2 * (s.T - 1 - t) + 1);  // reversed, gaps
          Tensor got = Tensor::empty({rows, W}, dt), want = Tensor::empty({rows, W}, dt);
          std::memset(got.data(), 0xA5, got.nbytes());
          std::memset(want.data(), 0xA5, want.nbytes());
          Tensor kv_before = Tensor::empty(kv.shape());
          std::memcpy(kv_before.data(), kv.data(), kv.nbytes());
          MlaAppendParams p;
          p.out_dtype = dt; p.pos0 = 4;  // ignored with an index p.out_token_index = indexed ? index.ptr<int32_t>() : nullptr;
          p.kv = kv.f32(); p.kv_token_stride = W + s.pad; p.n_tokens = s.T; p.kv_lora_rank = int(s.R); p.rope_dim = s.rd;
          p.norm_weight = w.f32(); p.eps = 1e-6f; p.cos = cs.f32(); p.sin = sn.f32(); p.interleaved = interleaved;
          p.out = want.data();
          mla_append_by_parts(*ops, p);
          p.out = got.data();
          ops->mla_cache_append(p);
          EXPECT_EQ(std::memcmp(got.data(), want.data(), got.nbytes()), 0)
              << "seed " << rng.seed << " R " << s.R << " rd " << s.rd << " T " << s.T << " " << dtype_name(dt)
              << " interleaved " << interleaved << " indexed " << indexed;
          EXPECT_EQ(std::memcmp(kv.data(), kv_before.data(), kv.nbytes()), 0) << "kv was modified";
          // exactly the T rows were written; the rest keep their bytes
          int64_t written = 0;
          for (int64_t r = 0; r < rows; ++r) {
            const uint8_t* b = static_cast<const uint8_t*>(got.data()) + size_t(r * W) * dtype_size(dt);
            bool sentinel = true;
            for (size_t i = 0; i < size_t(W) * dtype_size(dt); ++i) sentinel = sentinel && b[i] == 0xA5;
            written += sentinel ? 0 : 1;
          }
          EXPECT_EQ(written, s.T);
        }
}

TEST(Ops, RopeToASeparateOutputEqualsInPlaceThenCopy) {
  Rng rng;
  auto ops = make_cpu_ops();
  // q (T, H, nope + rd) roped into qabs (T, H, R + rd) at column R, as absorbed MLA does
  const int64_t T = 5, nope = 24, R = 40;
  const int H = 3, rd = 16;
  for (bool interleaved : {true, false}) {
    Tensor q = rng.randn({T, H, nope + rd}), cs = rng.randn({T, rd / 2}), sn = rng.randn({T, rd / 2});
    Tensor got = Tensor::empty({T, H, R + rd}), want = Tensor::empty({T, H, R + rd});
    for (int64_t i = 0; i < got.numel(); ++i) got.f32()[i] = want.f32()[i] = float(i);
    Tensor q_before = Tensor::empty(q.shape());
    std::memcpy(q_before.data(), q.data(), q.nbytes());
    RopeParams p;
    p.x = q.f32(); p.n_tokens = T; p.token_stride = H * (nope + rd); p.head_stride = nope + rd; p.n_heads = H;
    p.offset = int(nope); p.rope_dim = rd; p.cos = cs.f32(); p.sin = sn.f32(); p.interleaved = interleaved;
    p.out = got.f32(); p.out_token_stride = H * (R + rd); p.out_head_stride = R + rd; p.out_offset = int(R);
    ops->rope(p);
    EXPECT_EQ(std::memcmp(q.data(), q_before.data(), q.nbytes()), 0) << "the input was modified";
    p.out = nullptr;  // in place, then copied
    ops->rope(p);
    CopyParams c;
    c.out = want.f32() + R; c.out_token_stride = H * (R + rd); c.out_head_stride = R + rd;
    c.in = q.f32() + nope; c.in_token_stride = H * (nope + rd); c.in_head_stride = nope + rd;
    c.n_tokens = T; c.n_heads = H; c.cols = rd;
    ops->copy(c);
    EXPECT_EQ(std::memcmp(got.data(), want.data(), got.nbytes()), 0) << "seed " << rng.seed << " interleaved " << interleaved;
  }
}

TEST(Ops, MlaCacheAppendAndRopeRejectBadInput) {
  auto ops = make_cpu_ops();
  Tensor kv = Tensor::zeros({2, 20}), w = Tensor::zeros({16}), cs = Tensor::zeros({2, 2}), cache = Tensor::zeros({4, 20});
  MlaAppendParams p;
  p.out = cache.data(); p.kv = kv.f32(); p.kv_token_stride = 20; p.n_tokens = 2; p.kv_lora_rank = 16; p.rope_dim = 4;
  p.norm_weight = w.f32(); p.cos = cs.f32(); p.sin = cs.f32();
  ops->mla_cache_append(p);  // valid
  p.out_dtype = DType::F16;
  EXPECT_THROW(ops->mla_cache_append(p), Error);
  p.out_dtype = DType::BF16;
  p.rope_dim = 3;
  EXPECT_THROW(ops->mla_cache_append(p), Error);
  RopeParams r;
  r.x = kv.f32(); r.n_tokens = 2; r.token_stride = 20; r.n_heads = 1; r.offset = 16; r.rope_dim = 3;
  r.cos = cs.f32(); r.sin = cs.f32();
  EXPECT_THROW(ops->rope(r), Error);
}

// Ops::sample (the CPU op) chooses what Sampler::sample draws from the same logits with the same
// seed, step after step: the op gets its uniform number from Sampler::next_row, the sampler draws
// the same number itself. Several parameter mixes, one per row of a call; ties and masked tokens.
TEST(Ops, SampleMatchesTheSampler) {
  Rng rng;
  auto ops = make_cpu_ops();
  struct Mix { float temperature; int top_k; float top_p, min_p; };
  const std::vector<Mix> mixes = {{0.0f, 0, 1.0f, 0.0f},    {0.7f, 0, 1.0f, 0.0f},   {0.7f, 1, 1.0f, 0.0f},
                                  {0.7f, 50, 1.0f, 0.0f},   {1.0f, 5000, 0.9f, 0.0f}, {0.7f, 0, 0.9f, 0.0f},
                                  {1.3f, 0, 0.5f, 0.0f},    {0.7f, 0, 1.0f, 0.05f},  {0.6f, 50, 0.95f, 0.05f},
                                  {1.0f, 3, 0.5f, 0.2f},    {0.05f, 0, 0.9f, 0.0f},  {1.0f, 0, 0.999f, 0.0f}};
  const int64_t B = int64_t(mixes.size());
  for (int64_t V : {7, 1000, 32000}) {
    Tensor logits = rng.randn({B, V});
    for (int64_t b = 0; b < B; ++b) {
      float* l = logits.f32() + b * V;
      if (b % 3 == 1)
        for (int64_t i = 0; i < V; ++i) l[i] = std::round(2.0f * l[i]);  // many ties
      if (b % 4 == 2)
        for (int64_t i = 0; i < V; i += 3) l[i] = -INFINITY;  // masked tokens
    }
    std::vector<Sampler> drawers, samplers;
    for (int64_t b = 0; b < B; ++b) {
      SamplingParams sp;
      sp.temperature = mixes[size_t(b)].temperature;
      sp.top_k = mixes[size_t(b)].top_k;
      sp.top_p = mixes[size_t(b)].top_p;
      sp.min_p = mixes[size_t(b)].min_p;
      sp.seed = rng.seed + uint64_t(b);
      sp.has_seed = true;
      drawers.emplace_back(sp);
      samplers.emplace_back(sp);
    }
    Tensor params = Tensor::empty({B * int64_t(sizeof(SampleRow))}, DType::U8);
    Tensor ids = Tensor::empty({B}, DType::I32);
    for (int step = 0; step < 4; ++step) {
      for (int64_t b = 0; b < B; ++b) {
        const SampleRow row = drawers[size_t(b)].next_row();
        std::memcpy(static_cast<uint8_t*>(params.data()) + b * int64_t(sizeof(SampleRow)), &row, sizeof(row));
      }
      std::fill(ids.ptr<int32_t>(), ids.ptr<int32_t>() + B, -1);
      ops->sample(ids, logits, params);
      for (int64_t b = 0; b < B; ++b) {
        const int32_t want = samplers[size_t(b)].sample(logits.f32() + b * V, V, {}, {});
        EXPECT_EQ(ids.ptr<int32_t>()[b], want) << "V " << V << " row " << b << " step " << step << " seed " << rng.seed;
      }
    }
  }
  // A row out of range is an error, not a token.
  SampleRow bad;
  bad.temperature = 1.0f;
  bad.u = 1.0;
  Tensor one = rng.randn({1, 5}), bad_params = Tensor::empty({int64_t(sizeof(SampleRow))}, DType::U8);
  std::memcpy(bad_params.data(), &bad, sizeof(bad));
  Tensor id = Tensor::empty({1}, DType::I32);
  EXPECT_THROW(ops->sample(id, one, bad_params), Error);
}
