// The model against the HuggingFace transformers reference on every fixture of
// ../shared/data/fixtures: logits and every hidden state within 1e-4 relative error in both
// MLA modes, greedy generation identical, incremental decoding equal to a full forward — on
// the CPU, and on CUDA (skipped without a GPU) in fp32 mode with the same bounds and in bf16
// mode within 2e-2 with the same greedy tokens for the first 8 steps.
//
// bf16 and MoE routing: rounding the latent cache to bf16 moves hidden states by ~0.5%, which
// is enough to flip a near-tied router choice; the token whose experts changed then differs
// from the reference by 20-30% (measured on v3-tiny: one token in 24). In bf16 mode the bounds
// therefore hold per token for every token whose routing, and that of the tokens before it,
// is the fp32 model's; a token (or a greedy step) beyond them must show a routing difference
// against the fp32 CUDA model, checked here, or the test fails.
#include <gtest/gtest.h>

#include <algorithm>

#include "core/error.h"
#include "fathom/model.h"
#include "ops/ops.h"
#include "test_util.h"

using namespace fathom;
using namespace fathom::test;

namespace {

struct Case {
  std::string fixture;
  MlaMode mode;
  bool dequantize_fp8;
  DeviceKind device = DeviceKind::Cpu;
  Precision precision = Precision::Fp32;
  bool bf16() const { return precision == Precision::Bf16; }
  double bound() const { return bf16() ? 2e-2 : 1e-4; }  // against the reference
  // incremental against full forward in the same backend: the CPU sums in the same order
  double self_bound() const { return bf16() ? 2e-2 : device == DeviceKind::Cpu ? 1e-5 : 1e-4; }
};

std::string case_name(const testing::TestParamInfo<Case>& info) {
  std::string n = info.param.fixture + "_" + mla_mode_name(info.param.mode) + (info.param.dequantize_fp8 ? "_deq" : "");
  if (info.param.device == DeviceKind::Cuda) n += std::string("_cuda_") + precision_name(info.param.precision);
  std::replace(n.begin(), n.end(), '-', '_');
  return n;
}

class Fixture : public testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    const Case& c = GetParam();
    if (c.device == DeviceKind::Cuda && !cuda_available())
      GTEST_SKIP() << "no CUDA GPU (or a build without CUDA): the CUDA fixture cases are skipped";
    ModelOptions o;
    o.mla_mode = c.mode;
    o.dequantize_fp8 = c.dequantize_fp8;
    o.device = c.device;
    o.precision = c.precision;
    model = Model::load(fixture_dir(c.fixture), o);
    if (c.bf16()) {
      o.precision = Precision::Fp32;
      fp32_model = Model::load(fixture_dir(c.fixture), o);
    }
    ref = SafetensorsFile::open(fixture_dir(c.fixture) + "/reference.safetensors");
    rows = id_rows(ref->tensor("input_ids"));
  }
  // Per token of `ids`: whether the router of some layer < `layers` chose other experts for it,
  // or for a token before it, in the bf16 model than in the fp32 model.
  std::vector<bool> routing_changed(const std::vector<int32_t>& ids, int layers) {
    ForwardRequest req;
    req.expert_choices = true;
    KvCache ca = model->new_cache(int64_t(ids.size())), cb = fp32_model->new_cache(int64_t(ids.size()));
    ForwardOutput a = model->forward(ids, ca, req), b = fp32_model->forward(ids, cb, req);
    std::vector<bool> changed(ids.size(), false);
    for (int l = 0; l < layers && l < int(a.expert_choices.size()); ++l) {
      const ExpertChoices &x = a.expert_choices[size_t(l)], &y = b.expert_choices[size_t(l)];
      for (size_t t = 0; t < ids.size() && x.top_k > 0; ++t) {
        std::vector<int32_t> ex(x.ids.begin() + t * x.top_k, x.ids.begin() + (t + 1) * x.top_k);
        std::vector<int32_t> ey(y.ids.begin() + t * y.top_k, y.ids.begin() + (t + 1) * y.top_k);
        std::sort(ex.begin(), ex.end());
        std::sort(ey.begin(), ey.end());
        if (ex != ey) changed[t] = true;
      }
    }
    for (size_t t = 1; t < changed.size(); ++t) changed[t] = changed[t] || changed[t - 1];
    return changed;
  }
  // bf16: every token within the bound unless its routing changed; fp32: the whole tensor.
  void expect_close(const float* got, const float* want, int64_t T, int64_t W, const std::vector<int32_t>& ids,
                    int layers, const std::string& what) {
    const double whole = rel_err(got, want, size_t(T * W));
    if (!GetParam().bf16()) {
      EXPECT_LE(whole, GetParam().bound()) << what;
      return;
    }
    std::vector<bool> changed;
    int flips = 0;
    for (int64_t t = 0; t < T; ++t) {
      const double e = rel_err(got + t * W, want + t * W, size_t(W));
      if (e <= GetParam().bound()) continue;
      if (changed.empty()) changed = routing_changed(ids, layers);
      EXPECT_TRUE(changed[size_t(t)]) << what << ": token " << t << " is off by " << e
                                      << " while its routing (and that of the tokens before) is the fp32 model's";
      flips += changed[size_t(t)] ? 1 : 0;
    }
    if (flips) std::printf("[ note     ] %s: %d of %ld tokens beyond %.0e after a routing flip (whole-tensor error %.3g)\n",
                           what.c_str(), flips, long(T), GetParam().bound(), whole);
  }
  std::unique_ptr<Model> model, fp32_model;
  std::shared_ptr<SafetensorsFile> ref;
  std::vector<std::vector<int32_t>> rows;
};

TEST_P(Fixture, LogitsAndHiddenStatesMatchReference) {
  const ModelConfig& c = model->config();
  const int64_t T = int64_t(rows[0].size()), V = c.vocab_size, D = c.hidden_size;
  Tensor ref_logits = ref->tensor("logits");
  for (size_t b = 0; b < rows.size(); ++b) {
    KvCache cache = model->new_cache(T);
    ForwardRequest req;
    req.hidden_states = true;
    ForwardOutput o = model->forward(rows[b], cache, req);
    expect_close(o.logits.f32(), ref_logits.f32() + b * T * V, T, V, rows[b], c.num_hidden_layers,
                 cat("logits of row ", b));
    for (size_t i = 0; i < o.hidden_states.size(); ++i) {
      std::string name = "hidden_states." + std::to_string(i);
      if (!ref->contains(name)) continue;
      // hidden_states.i follows layers 0 .. i-1
      expect_close(o.hidden_states[i].f32(), ref->tensor(name).f32() + b * T * D, T, D, rows[b], int(i),
                   cat(name, " of row ", b));
    }
    if (ref->contains("hidden_states.0")) {
      EXPECT_EQ(o.hidden_states.size(), size_t(c.num_hidden_layers + 1));
    }
  }
}

TEST_P(Fixture, GreedyGenerationMatchesReference) {
  if (!ref->contains("generate_ids")) GTEST_SKIP() << "fixture has no generate_ids";
  const ModelConfig& c = model->config();
  Tensor gen = ref->tensor("generate_ids");  // (1, T + n)
  const int64_t T = int64_t(rows[0].size()), n = gen.dim(1) - T;
  std::vector<int32_t> got = model->generate_greedy(rows[0], n);
  ASSERT_EQ(int64_t(got.size()), n);
  const int64_t checked = GetParam().bf16() ? std::min<int64_t>(n, 8) : n;
  for (int64_t i = 0; i < checked; ++i) {
    int64_t want = gen.ptr<int64_t>()[T + i];
    if (got[size_t(i)] == want) continue;
    // A mismatch is only acceptable if the reference itself was a near tie at this step.
    std::vector<int32_t> prefix(gen.ptr<int64_t>(), gen.ptr<int64_t>() + T + i);
    KvCache cache = model->new_cache(T + i);
    ForwardRequest req;
    req.last_logits_only = true;
    ForwardOutput o = model->forward(prefix, cache, req);
    const float* l = o.logits.f32();
    float a = l[want], b = l[got[size_t(i)]];
    if (GetParam().bf16() && routing_changed(prefix, c.num_hidden_layers).back()) {
      std::printf("[ note     ] greedy step %ld differs from the reference after a bf16 routing flip\n", long(i));
      break;
    }
    ADD_FAILURE() << "step " << i << ": generated " << got[size_t(i)] << " (logit " << b << "), reference " << want
                  << " (logit " << a << ")";
    EXPECT_LE(std::fabs(a - b), GetParam().bf16() ? 2e-2f * std::max(1.0f, std::fabs(a)) : 1e-4f)
        << "not a tie: this is a bug";
    break;
  }
}

TEST_P(Fixture, IncrementalDecodeEqualsFullForward) {
  const ModelConfig& c = model->config();
  const std::vector<int32_t>& ids = rows[0];
  const int64_t T = int64_t(ids.size()), V = c.vocab_size;
  KvCache full_cache = model->new_cache(T);
  ForwardOutput full = model->forward(ids, full_cache);
  // a prefill of the first third, then one token at a time (with a small cache that must grow)
  KvCache cache = model->new_cache(2);
  const int64_t split = std::max<int64_t>(1, T / 3);
  ForwardOutput pre = model->forward(std::vector<int32_t>(ids.begin(), ids.begin() + split), cache);
  const double bound = GetParam().self_bound();
  EXPECT_LE(rel_err(pre.logits.f32(), full.logits.f32(), size_t(split * V)), bound);
  for (int64_t t = split; t < T; ++t) {
    ForwardOutput step = model->forward({ids[size_t(t)]}, cache);
    ASSERT_LE(rel_err(step.logits.f32(), full.logits.f32() + t * V, size_t(V)), bound) << "position " << t;
  }
  EXPECT_EQ(cache.length(), T);
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (const char* f : {"v3-tiny", "v3-dense", "v3-tiny-fp8", "v2-lite-tiny", "v3-tiny-mtp", "v3-realdims-fp8"})
    for (MlaMode m : {MlaMode::Naive, MlaMode::Absorbed}) cases.push_back({f, m, false});
  cases.push_back({"v3-tiny-fp8", MlaMode::Absorbed, true});
  cases.push_back({"v3-realdims-fp8", MlaMode::Absorbed, true});
  // the same on CUDA: fp32 in both MLA modes, bf16 in both
  for (const char* f : {"v3-tiny", "v3-dense", "v3-tiny-fp8", "v2-lite-tiny", "v3-tiny-mtp", "v3-realdims-fp8"})
    for (MlaMode m : {MlaMode::Naive, MlaMode::Absorbed})
      for (Precision p : {Precision::Fp32, Precision::Bf16}) cases.push_back({f, m, false, DeviceKind::Cuda, p});
  return cases;
}

}  // namespace

INSTANTIATE_TEST_SUITE_P(Reference, Fixture, testing::ValuesIn(all_cases()), case_name);

TEST(Mtp, MtpLogitsMatchReference) {
  for (DeviceKind dev : {DeviceKind::Cpu, DeviceKind::Cuda})
  for (MlaMode mode : {MlaMode::Naive, MlaMode::Absorbed}) {
    if (dev == DeviceKind::Cuda && !cuda_available()) continue;  // the CPU half still runs
    ModelOptions o;
    o.mla_mode = mode;
    o.device = dev;
    o.precision = Precision::Fp32;
    auto model = Model::load(fixture_dir("v3-tiny-mtp"), o);
    ASSERT_TRUE(model->has_mtp());
    auto ref = SafetensorsFile::open(fixture_dir("v3-tiny-mtp") + "/reference.safetensors");
    auto rows = id_rows(ref->tensor("input_ids"));
    Tensor want = ref->tensor("mtp_logits");  // (B, T-1, V)
    const int64_t T = int64_t(rows[0].size()), V = model->config().vocab_size;
    for (size_t b = 0; b < rows.size(); ++b) {
      KvCache cache = model->new_cache(T);
      ForwardOutput out = model->forward(rows[b], cache);
      Tensor got = model->mtp_logits(rows[b], out.final_hidden);
      ASSERT_EQ(got.shape(), (Shape{T - 1, V}));
      EXPECT_LE(rel_err(got.f32(), want.f32() + b * (T - 1) * V, size_t((T - 1) * V)), 1e-4)
          << "row " << b << " mode " << mla_mode_name(mode) << " on " << device_kind_name(dev);
      // the convention is h after the final norm: the pre-norm variant must differ
      Tensor pre = ref->tensor("mtp_logits_prenorm");
      EXPECT_GT(rel_err(got.f32(), pre.f32() + b * (T - 1) * V, size_t((T - 1) * V)), 1e-3);
    }
  }
}
