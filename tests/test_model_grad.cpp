// The whole-model loss and gradient on the CPU (src/train/model_grad.h) on the v3-tiny and
// v2-lite-tiny fixtures: the training forward's loss equals the cross-entropy of the inference
// model's logits (which the fixture tests check against HF transformers), and the gradient of each
// weight tensor, projected on a random direction, equals the central difference of the loss along
// that direction. The fixtures and the token sequences are fixed, so the MoE choice (a
// discontinuity of the loss) is the same at every probe: the test is deterministic.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/error.h"
#include "fathom/model.h"
#include "ops/ops.h"
#include "test_util.h"
#include "train/data.h"
#include "train/model_grad.h"

using namespace fathom;
using namespace fathom::test;

namespace {

// mean next-token cross-entropy of the inference model (CPU, fp32, naive MLA), in double
// the inference model on the CPU in F32 with naive MLA (the layout training uses)
std::unique_ptr<Model> reference_model(const std::string& dir) {
  ModelOptions o;
  o.device = DeviceKind::Cpu;
  o.precision = Precision::Fp32;
  o.mla_mode = MlaMode::Naive;
  o.progress = false;
  return Model::load(dir, o);
}

double inference_loss(const std::string& dir, const std::vector<int32_t>& tokens) {
  auto m = reference_model(dir);
  KvCache cache = m->new_cache(int64_t(tokens.size()));
  const std::vector<int32_t> in(tokens.begin(), tokens.end() - 1);
  const ForwardOutput out = m->forward(in, cache, ForwardRequest{});
  const int64_t V = m->config().vocab_size;
  double loss = 0;
  for (size_t t = 0; t < in.size(); ++t) {
    const float* l = out.logits.f32() + int64_t(t) * V;
    double mx = -1e300, s = 0;
    for (int64_t v = 0; v < V; ++v) mx = std::max(mx, double(l[v]));
    for (int64_t v = 0; v < V; ++v) s += std::exp(double(l[v]) - mx);
    loss += mx + std::log(s) - l[tokens[t + 1]];
  }
  return loss / double(in.size());
}

// mean cross-entropy of the inference model's MTP module 0 (h: the main model's final-normed
// hidden states) against tokens[i + 2]
double inference_mtp_loss(const std::string& dir, const std::vector<int32_t>& tokens) {
  auto m = reference_model(dir);
  const std::vector<int32_t> in(tokens.begin(), tokens.end() - 1);
  KvCache cache = m->new_cache(int64_t(in.size()));
  const ForwardOutput out = m->forward(in, cache, ForwardRequest{});
  const Tensor logits = m->mtp_logits(in, out.final_hidden);  // (T - 1, V): row i predicts tokens[i + 2]
  const int64_t V = m->config().vocab_size, n = logits.dim(0);
  double loss = 0;
  for (int64_t t = 0; t < n; ++t) {
    const float* l = logits.f32() + t * V;
    double mx = -1e300, s = 0;
    for (int64_t v = 0; v < V; ++v) mx = std::max(mx, double(l[v]));
    for (int64_t v = 0; v < V; ++v) s += std::exp(double(l[v]) - mx);
    loss += mx + std::log(s) - l[tokens[size_t(t) + 2]];
  }
  return loss / double(n);
}

void check_model(const std::string& fixture, const std::vector<std::string>& probe_names, float balance_alpha = 0,
                 float mtp_lambda = 0, float capacity = 0) {
  const std::string dir = fixture_dir(fixture);
  auto gm = train::GradModel::load(dir);
  gm->set_balance_alpha(balance_alpha);
  gm->set_mtp_lambda(mtp_lambda);
  gm->set_capacity_factor(capacity);
  const int64_t V = gm->config().vocab_size;
  std::vector<int32_t> tokens;
  for (int i = 0; i < 14; ++i) tokens.push_back(int32_t((i * 37 + 11) % V));
  const double loss = gm->loss_and_grad(tokens);
  if (balance_alpha > 0) {
    EXPECT_GT(gm->last_balance_loss(), 0.0);
  }
  if (capacity == 0) {  // (dropping tokens changes the model the inference code runs)
    EXPECT_NEAR(gm->last_lm_loss(), inference_loss(dir, tokens), 1e-5 * loss) << fixture;
  } else {
    EXPECT_FALSE(gm->expert_dropped().empty()) << "the capacity factor " << capacity << " dropped nothing";
  }
  if (mtp_lambda > 0) {
    EXPECT_NEAR(gm->last_mtp_loss(), inference_mtp_loss(dir, tokens), 1e-5 * loss) << fixture;
  } else {
    EXPECT_EQ(gm->last_mtp_loss(), 0.0);
  }
  EXPECT_NEAR(loss, gm->last_lm_loss() + gm->last_balance_loss() + mtp_lambda * gm->last_mtp_loss(), 1e-12 * loss);
  std::mt19937 gen(42);
  for (const std::string& name : probe_names) {
    Tensor& w = gm->value(name);
    const Tensor& g = gm->grad(name);
    const std::vector<float> w0(w.f32(), w.f32() + w.numel());
    // A direction whose line crosses a routing boundary (an expert choice flips) makes the loss
    // jump: the central differences at h and h/2 then disagree, and another direction is drawn.
    bool checked = false;
    for (int attempt = 0; attempt < 4 && !checked; ++attempt) {
      std::vector<float> dir_v(static_cast<size_t>(w.numel()));
      std::normal_distribution<float> nd(0.0f, 1.0f);
      double norm = 0, along = 0;
      for (float& v : dir_v) {
        v = nd(gen);
        norm += double(v) * v;
      }
      norm = std::sqrt(norm);
      for (size_t i = 0; i < dir_v.size(); ++i) along += double(g.f32()[i]) * dir_v[i] / norm;  // g · v̂
      auto at = [&](double s) {
        for (size_t i = 0; i < dir_v.size(); ++i) w.f32()[i] = float(w0[i] + s * dir_v[i] / norm);
        return gm->loss(tokens);
      };
      const double h = 1e-2;
      const double n1 = (at(h) - at(-h)) / (2 * h), n2 = (at(h / 2) - at(-h / 2)) / h;
      for (size_t i = 0; i < dir_v.size(); ++i) w.f32()[i] = w0[i];
      const double tol = 2e-2 * std::fabs(n2) + 3e-4;
      if (std::fabs(n1 - n2) > tol) continue;  // not smooth along this line
      EXPECT_NEAR(along, n2, tol) << fixture << ": " << name;
      checked = true;
    }
    EXPECT_TRUE(checked) << fixture << ": " << name << ": no direction without a routing flip";
  }
}

TEST(ModelGrad, V3TinyMatchesInferenceAndFiniteDifferences) {
  check_model("v3-tiny", {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                          "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_a_proj.weight",
                          "model.layers.0.self_attn.q_a_layernorm.weight", "model.layers.0.self_attn.q_b_proj.weight",
                          "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                          "model.layers.0.self_attn.kv_a_layernorm.weight", "model.layers.0.self_attn.kv_b_proj.weight",
                          "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                          "model.layers.0.mlp.down_proj.weight", "model.layers.2.post_attention_layernorm.weight",
                          "model.layers.2.mlp.gate.weight", "model.layers.2.mlp.shared_experts.up_proj.weight",
                          "model.layers.3.mlp.experts.5.down_proj.weight", "model.layers.3.mlp.experts.9.gate_proj.weight"});
}

// With the sequence-wise balance loss in the objective (α 5, far above training's 1e-4, so that its share of the
// router's gradient is far above the bound), the router and the layers below it still match.
TEST(ModelGrad, TheBalanceLossJoinsTheGradient) {
  check_model("v3-tiny", {"model.layers.2.mlp.gate.weight", "model.layers.3.mlp.gate.weight",
                          "model.layers.2.self_attn.o_proj.weight", "model.layers.1.input_layernorm.weight"},
              5.0f);
}

// The MTP objective (DeepSeek-V3 §2.2) on v3-tiny-mtp: module 0's loss equals the cross-entropy of
// the inference model's mtp_logits (checked against the reference in test_fixtures), and the
// gradients of the module's own weights and of the main model's (which the MTP loss reaches
// through the hidden states) match finite differences. λ 1 so that the MTP share is large.
TEST(ModelGrad, TheMtpLossAndItsGradient) {
  check_model("v3-tiny-mtp",
              {"model.layers.4.enorm.weight", "model.layers.4.hnorm.weight", "model.layers.4.eh_proj.weight",
               "model.layers.4.embed_tokens.weight", "model.layers.4.shared_head.norm.weight",
               "model.layers.4.shared_head.head.weight", "model.layers.4.self_attn.q_b_proj.weight",
               "model.layers.4.self_attn.kv_b_proj.weight", "model.layers.4.mlp.gate.weight",
               "model.layers.4.mlp.shared_experts.down_proj.weight", "model.norm.weight",
               "model.layers.3.self_attn.o_proj.weight", "model.embed_tokens.weight"},
              0.0f, 1.0f);
}

TEST(ModelGrad, MtpSettingsAreChecked) {
  auto plain = train::GradModel::load(fixture_dir("v3-tiny"));
  EXPECT_THROW(plain->set_mtp_lambda(0.3f), Error);  // no MTP modules
  plain->set_mtp_lambda(0.0f);
  auto gm = train::GradModel::load(fixture_dir("v3-tiny-mtp"));
  EXPECT_EQ(gm->mtp_depth(), 1);
  EXPECT_TRUE(gm->has("model.layers.4.eh_proj.weight"));
  EXPECT_THROW(gm->set_mtp_lambda(-1.0f), Error);
  EXPECT_THROW(gm->set_mtp_lambda(std::nanf("")), Error);
  // λ 0: the MTP modules take no part, and the optimizer keeps them frozen
  train::AdamW opt;
  gm->add_to(opt);
  int frozen = 0;
  for (const train::Param& p : opt.params()) {
    const bool mtp = p.name.rfind("model.layers.4.", 0) == 0;
    EXPECT_EQ(p.frozen, mtp) << p.name;
    frozen += p.frozen;
  }
  EXPECT_GT(frozen, 10);
  const double l0 = gm->loss({3, 9, 27, 81, 243});
  EXPECT_EQ(gm->last_mtp_loss(), 0.0);
  gm->set_mtp_lambda(0.5f);
  const double l1 = gm->loss({3, 9, 27, 81, 243});
  EXPECT_GT(gm->last_mtp_loss(), 0.0);
  EXPECT_NEAR(l1, l0 + 0.5 * gm->last_mtp_loss(), 1e-9 * l1);
  // a two-token sequence has nothing for the MTP module to predict: the objective is the main loss
  const double l2 = gm->loss({3, 9});
  EXPECT_EQ(gm->last_mtp_loss(), 0.0);
  EXPECT_EQ(l2, gm->last_lm_loss());
}

// Activation recomputation changes what is kept, not what is computed: the same objective and every
// gradient bit for bit (MTP and the balance loss included), the same expert loads.
TEST(ModelGrad, RecomputationGivesTheSameGradients) {
  auto a = train::GradModel::load(fixture_dir("v3-tiny-mtp")), b = train::GradModel::load(fixture_dir("v3-tiny-mtp"));
  for (auto* m : {a.get(), b.get()}) {
    m->set_mtp_lambda(0.3f);
    m->set_balance_alpha(0.01f);
  }
  b->set_recompute(true);
  std::vector<int32_t> tokens;
  for (int i = 0; i < 20; ++i) tokens.push_back(int32_t((i * 53 + 7) % 1024));
  EXPECT_EQ(a->loss_and_grad(tokens), b->loss_and_grad(tokens));
  EXPECT_EQ(a->last_balance_loss(), b->last_balance_loss());
  for (const std::string& n : a->names()) {
    const Tensor &ga = a->grad(n), &gb = b->grad(n);
    ASSERT_EQ(std::memcmp(ga.data(), gb.data(), ga.nbytes()), 0) << n;
  }
  EXPECT_EQ(a->expert_load(), b->expert_load());
}

// A batch in one pass (rows stacked, attention and RoPE per sequence, the MTP module reading each
// sequence's own rows) is the mean of its sequences run one by one: the objective and its parts,
// every gradient (the batch's is the mean's), the expert loads. v3-tiny-mtp with MTP and the
// balance loss on, three sequences of random tokens (fresh each run), once with recomputation.
TEST(ModelGrad, ABatchIsTheMeanOfItsSequences) {
  const uint32_t seed = std::random_device{}();
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int32_t> tok(0, 1023);
  std::vector<std::vector<int32_t>> batch(3, std::vector<int32_t>(13));
  for (auto& s : batch)
    for (int32_t& t : s) t = tok(gen);
  for (bool recompute : {false, true}) {
    auto one = train::GradModel::load(fixture_dir("v3-tiny-mtp")), all = train::GradModel::load(fixture_dir("v3-tiny-mtp"));
    for (auto* m : {one.get(), all.get()}) {
      m->set_mtp_lambda(0.3f);
      m->set_balance_alpha(0.01f);
      m->set_recompute(recompute);
    }
    double obj = 0, lm = 0, mtp = 0, bal = 0;
    for (const auto& s : batch) {
      obj += one->loss_and_grad(s) / 3;
      lm += one->last_lm_loss() / 3, mtp += one->last_mtp_loss() / 3, bal += one->last_balance_loss() / 3;
    }
    const double got = all->loss_and_grad_batch(batch);
    EXPECT_NEAR(got, obj, 1e-6 * obj) << "seed " << seed;
    EXPECT_NEAR(all->last_lm_loss(), lm, 1e-6 * lm);
    EXPECT_NEAR(all->last_mtp_loss(), mtp, 1e-6 * mtp);
    EXPECT_NEAR(all->last_balance_loss(), bal, 1e-6 * bal + 1e-12);
    EXPECT_EQ(all->expert_load(), one->expert_load());
    double worst = 0;
    std::string where;
    for (const std::string& n : all->names()) {
      const Tensor &gb = all->grad(n), &gs = one->grad(n);
      double scale = 0;
      for (int64_t i = 0; i < gs.numel(); ++i) scale = std::max(scale, std::fabs(double(gs.f32()[i])) / 3);
      for (int64_t i = 0; i < gs.numel(); ++i) {
        const double e = std::fabs(double(gb.f32()[i]) - double(gs.f32()[i]) / 3) / (scale + 1e-6);
        if (!(e <= worst)) worst = std::isnan(e) ? INFINITY : e, where = n;
      }
    }
    EXPECT_LE(worst, 1e-4) << where << " (seed " << seed << ", recompute " << recompute << ")";
    EXPECT_EQ(all->loss_batch(batch), got) << "the loss alone is the same number";
  }
  auto m = train::GradModel::load(fixture_dir("v3-tiny"));
  EXPECT_THROW(m->loss_batch({{1, 2, 3}, {1, 2}}), Error);  // two lengths
  EXPECT_THROW(m->loss_batch({}), Error);
}

// Chat data's context-only tokens (train::kContextOnly) are read but not predicted: the loss is
// the mean cross-entropy of the other positions, each position's CE taken from the inference
// model run on the prefix that ends there.
TEST(ModelGrad, ContextOnlyTokensAreNotPredicted) {
  const std::string dir = fixture_dir("v3-tiny");
  const std::vector<int32_t> tokens = {5, 77, 300, 12, 901, 44, 618, 3};
  std::vector<double> ce;  // ce[t]: position t predicting tokens[t + 1]
  double prev = 0;
  for (size_t t = 0; t + 1 < tokens.size(); ++t) {
    const double mean = inference_loss(dir, std::vector<int32_t>(tokens.begin(), tokens.begin() + long(t) + 2));
    ce.push_back(mean * double(t + 1) - prev);
    prev = mean * double(t + 1);
  }
  std::vector<int32_t> marked = tokens;
  for (size_t t : {0, 1, 2, 5}) marked[t] = int32_t(uint32_t(marked[t]) | train::kContextOnly);
  double want = 0;  // targets 3, 4, 6, 7 are learnt: positions 2, 3, 5, 6
  for (size_t t : {2, 3, 5, 6}) want += ce[t] / 4;
  auto m = train::GradModel::load(dir);
  EXPECT_NEAR(m->loss(marked), want, 1e-5 * want);
  EXPECT_NEAR(m->loss(tokens), prev / double(tokens.size() - 1), 1e-5 * prev);
  // nothing to predict: a pass that adds nothing
  std::vector<int32_t> prompt = tokens;
  for (int32_t& t : prompt) t = int32_t(uint32_t(t) | train::kContextOnly);
  m->zero_grad();
  EXPECT_EQ(m->loss_and_grad(prompt), 0.0);
  for (const std::string& n : m->names())
    for (int64_t i = 0; i < m->grad(n).numel(); ++i) ASSERT_EQ(m->grad(n).f32()[i], 0.0f) << n;
}

// Expert capacity: a generous factor drops nothing and changes nothing; a tight one drops pairs
// (counted), never more than each expert's excess, and its gradient still matches finite
// differences (the dropped pairs are fixed along the probes, like the expert choice).
TEST(ModelGrad, ExpertCapacityDropsAndReports) {
  std::vector<int32_t> tokens;
  for (int i = 0; i < 14; ++i) tokens.push_back(int32_t((i * 37 + 11) % 1024));
  auto base = train::GradModel::load(fixture_dir("v3-tiny"));
  const double l0 = base->loss_and_grad(tokens);
  auto wide = train::GradModel::load(fixture_dir("v3-tiny"));
  wide->set_capacity_factor(100.0f);
  EXPECT_EQ(wide->loss_and_grad(tokens), l0);
  EXPECT_TRUE(wide->expert_dropped().empty());
  auto tight = train::GradModel::load(fixture_dir("v3-tiny"));
  tight->set_capacity_factor(0.5f);  // 13 tokens, top-4 of 16: at most ceil(0.5 · 13 · 4 / 16) = 2 per expert
  EXPECT_NE(tight->loss_and_grad(tokens), l0);
  int64_t dropped = 0, over = 0;
  for (const auto& [layer, n] : tight->expert_dropped()) dropped += n;
  for (const auto& [layer, load] : tight->expert_load())
    for (int64_t l : load) over += std::max<int64_t>(0, l - 2);
  EXPECT_EQ(dropped, over);  // exactly each expert's tokens beyond its capacity
  EXPECT_GT(dropped, 0);
  EXPECT_THROW(tight->set_capacity_factor(-1.0f), Error);
  check_model("v3-tiny", {"model.layers.2.mlp.gate.weight", "model.layers.3.mlp.experts.5.down_proj.weight",
                          "model.layers.1.self_attn.o_proj.weight"},
              0.0f, 0.0f, 0.5f);
}

// The whole training step on the GPU (the CUDA backend's forward and backward ops, weights and
// activations in GPU memory) against the CPU reference: the objective and every gradient of
// v3-tiny-mtp (MTP and the balance loss included) and of v2-lite-tiny (softmax router, no q LoRA).
TEST(ModelGrad, CudaGradientsMatchTheCpu) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA build or GPU: the GPU training step is not checked here";
  std::vector<int32_t> tokens;
  for (int i = 0; i < 21; ++i) tokens.push_back(int32_t((i * 53 + 7) % 1024));
  for (const char* fixture : {"v3-tiny-mtp", "v2-lite-tiny"}) {
    SCOPED_TRACE(fixture);
    auto cpu = train::GradModel::load(fixture_dir(fixture)), gpu = train::GradModel::load(fixture_dir(fixture));
    gpu->use_backend(make_cuda_ops(0));
    for (auto* m : {cpu.get(), gpu.get()}) {
      if (m->mtp_depth() > 0) m->set_mtp_lambda(0.3f);
      m->set_balance_alpha(0.01f);
    }
    const double lc = cpu->loss_and_grad(tokens), lg = gpu->loss_and_grad(tokens);
    EXPECT_NEAR(lg, lc, 1e-5 * lc);
    EXPECT_NEAR(gpu->last_mtp_loss(), cpu->last_mtp_loss(), 1e-5 * lc);
    EXPECT_EQ(gpu->expert_load(), cpu->expert_load());  // the same routing
    gpu->grads_to_host();
    double worst = 0;
    for (const std::string& n : cpu->names()) {
      const Tensor &a = gpu->grad(n), &b = cpu->grad(n);
      double num = 0, den = 0;
      for (int64_t i = 0; i < b.numel(); ++i) {
        const double d = double(a.f32()[i]) - b.f32()[i];
        num += d * d;
        den += double(b.f32()[i]) * b.f32()[i];
      }
      const double err = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
      EXPECT_LE(err, 1e-4) << n;
      worst = std::max(worst, err);
    }
    std::printf("  %s: %zu gradients within %.2e of the CPU's\n", fixture, cpu->names().size(), worst);
  }
}

TEST(ModelGrad, V2LiteTinyMatchesInferenceAndFiniteDifferences) {
  auto gm = train::GradModel::load(fixture_dir("v2-lite-tiny"));
  const ModelConfig& c = gm->config();
  std::vector<std::string> names = {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                                    "model.layers.0.self_attn.kv_b_proj.weight"};
  for (int l = 0; l < c.num_hidden_layers; ++l)
    if (c.is_moe_layer(l)) {
      names.push_back(cat("model.layers.", l, ".mlp.gate.weight"));
      names.push_back(cat("model.layers.", l, ".mlp.experts.1.up_proj.weight"));
      break;
    }
  check_model("v2-lite-tiny", names);
}

TEST(ModelGrad, BadSequencesAreErrors) {
  auto gm = train::GradModel::load(fixture_dir("v3-tiny"));
  EXPECT_THROW(gm->loss({5}), Error);
  EXPECT_THROW(gm->loss({5, int32_t(gm->config().vocab_size)}), Error);
  EXPECT_THROW(gm->loss({-3, 4}), Error);
}

}  // namespace
