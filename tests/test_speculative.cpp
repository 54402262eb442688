// MTP self-speculative decoding: the model pieces it needs (Model::forward_batch_rows,
// Model::mtp_step against forward() and mtp_logits()) and the serving engine with
// EngineOptions::speculative, whose output must be plain decoding's — on the v3-tiny-mtp fixture
// (random weights: drafts mostly rejected) and on fathom-mini (a trained MTP module: most drafts
// accepted), greedy and seeded sampling.
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "fathom/model.h"
#include "fathom/tokenizer.h"
#include "serve/engine.h"
#include "test_util.h"

namespace fathom::serve {
namespace {

std::unique_ptr<Model> load(const std::string& dir) {
  ModelOptions o;
  o.device = DeviceKind::Cpu;
  o.precision = Precision::Fp32;
  return Model::load(dir, o);
}

double rel(const float* a, const float* b, size_t n) { return test::rel_err(a, b, n); }

std::vector<int32_t> random_ids(std::mt19937& rng, int64_t n, int64_t vocab) {
  std::uniform_int_distribution<int32_t> d(2, int32_t(vocab) - 1);
  std::vector<int32_t> ids;
  for (int64_t i = 0; i < n; ++i) ids.push_back(d(rng));
  return ids;
}

TEST(Speculative, BatchRowsAndMtpStepsMatchTheWholeSequencePaths) {
  auto m = load(test::fixture_dir("v3-tiny-mtp"));
  const int64_t V = m->config().vocab_size, D = m->config().hidden_size;
  std::mt19937 rng(11);
  const std::vector<int32_t> ids = random_ids(rng, 14, V);
  const int64_t T = int64_t(ids.size());
  KvCache c1 = m->new_cache(T);
  ForwardRequest req;
  const ForwardOutput whole = m->forward(ids, c1, req);
  // every row of a sequence through forward_batch_rows, beside another sequence
  KvCache c2 = m->new_cache(T), c3 = m->new_cache(8);
  const std::vector<int32_t> other = random_ids(rng, 5, V);
  const Model::BatchRows rows = m->forward_batch_rows({other, ids}, {&c3, &c2}, {2, T});
  ASSERT_EQ(rows.logits.dim(0), 2 + T);
  EXPECT_LT(rel(rows.logits.ptr<float>() + 2 * V, whole.logits.ptr<float>(), size_t(T * V)), 1e-5);
  EXPECT_LT(rel(rows.hidden.ptr<float>() + 2 * D, whole.final_hidden.ptr<float>(), size_t(T * D)), 1e-5);
  EXPECT_EQ(c2.length(), T);
  // the MTP module over the whole sequence, then incrementally in two pieces
  const Tensor mtp = m->mtp_logits(ids, whole.final_hidden);  // (T-1, V): row i predicts ids[i+2]
  KvCache mc = m->new_mtp_cache(T);
  const int64_t k = 6;
  const std::vector<int32_t> next_a(ids.begin() + 1, ids.begin() + 1 + k), next_b(ids.begin() + 1 + k, ids.end());
  const Tensor ha = whole.final_hidden.slice_rows(0, k), hb = whole.final_hidden.slice_rows(k, T - 1);
  const Tensor la = m->mtp_step({next_a}, ha, {&mc});
  EXPECT_LT(rel(la.ptr<float>(), mtp.ptr<float>() + (k - 1) * V, size_t(V)), 1e-5);
  const Tensor lb = m->mtp_step({next_b}, hb, {&mc});
  EXPECT_LT(rel(lb.ptr<float>(), mtp.ptr<float>() + (T - 2) * V, size_t(V)), 1e-5);
  EXPECT_EQ(mc.length(), T - 1);
  // bad input is an error
  EXPECT_THROW(m->forward_batch_rows({ids}, {&c1}, {T + 1}), Error);
  EXPECT_THROW(m->mtp_step({next_a}, hb, {&mc}), Error);  // rows and ids disagree
  KvCache main_cache = m->new_cache(4);
  EXPECT_THROW(m->mtp_step({next_a}, ha, {&main_cache}), Error);  // not an MTP cache
}

// Runs each request through an engine with and without speculation; returns both results.
std::pair<std::vector<RequestResult>, std::vector<RequestResult>> both(Model& m, const Tokenizer& tok,
                                                                       const std::vector<RequestParams>& reqs,
                                                                       EngineStats* spec_stats) {
  std::vector<RequestResult> plain, spec;
  for (bool speculative : {false, true}) {
    EngineOptions o;
    o.max_batch = 3;
    o.prefill_chunk = 7;  // prompts prefilled over several steps, drafting as they go
    o.speculative = speculative;
    Engine e(m, tok, o);
    std::vector<std::shared_ptr<RequestHandle>> hs;
    for (const auto& r : reqs) hs.push_back(e.submit(r));
    for (auto& h : hs) (speculative ? spec : plain).push_back(h->wait());
    if (speculative) *spec_stats = e.stats();
  }
  return {plain, spec};
}

TEST(Speculative, TheOutputIsPlainDecodingsOnTheFixture) {
  auto m = load(test::fixture_dir("v3-tiny-mtp"));
  auto tok = Tokenizer::load(std::string(FATHOM_SHARED_DATA) + "/deepseek-v3-tokenizer");
  std::mt19937 rng(5);
  std::vector<RequestParams> reqs;
  for (int i = 0; i < 5; ++i) {
    RequestParams p;
    p.prompt = random_ids(rng, 3 + 4 * i, m->config().vocab_size);
    p.options.max_tokens = 20;
    p.options.sampling.temperature = 0.0f;
    p.options.ignore_eos = true;
    reqs.push_back(p);
  }
  EngineStats st;
  const auto [plain, spec] = both(*m, *tok, reqs, &st);
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(spec[i].ids, plain[i].ids) << "request " << i;
    EXPECT_EQ(spec[i].ids.size(), 20u);
  }
  EXPECT_GT(st.spec_drafts, 20);  // every decode step after the first verified a draft
}

// A request that fills the context to its last position: its cache (and, drafting, the MTP's)
// fits the context exactly, and the last steps decode without a draft; the same tokens either way.
TEST(Speculative, ARequestThatFillsTheContextEndsAtItsLength) {
  auto m = load(test::fixture_dir("v3-tiny-mtp"));
  auto tok = Tokenizer::load(std::string(FATHOM_SHARED_DATA) + "/deepseek-v3-tokenizer");
  std::mt19937 rng(9);
  RequestParams p;
  p.prompt = random_ids(rng, 10, m->config().vocab_size);
  const int64_t ctx = m->config().max_position_embeddings;
  p.options.max_tokens = ctx - 10;
  p.options.sampling.temperature = 0.0f;
  p.options.ignore_eos = true;
  EngineStats st;
  const auto [plain, spec] = both(*m, *tok, {p}, &st);
  EXPECT_EQ(plain[0].finish_reason, "length") << plain[0].error;
  EXPECT_EQ(spec[0].finish_reason, "length") << spec[0].error;
  EXPECT_EQ(int64_t(plain[0].ids.size()), ctx - 10);
  EXPECT_EQ(spec[0].ids, plain[0].ids);
}

TEST(Speculative, TheOutputIsPlainDecodingsOnFathomMini) {
  const std::string dir = std::string(FATHOM_SOURCE_DIR) + "/models/fathom-mini";
  auto m = load(dir);
  auto tok = Tokenizer::load(dir);
  std::vector<RequestParams> reqs;
  const char* prompts[] = {"The list type in Python", "To create a new branch in Git,", "The Linux kernel",
                           "A dictionary maps keys to values"};
  for (int i = 0; i < 4; ++i) {
    RequestParams p;
    p.prompt = tok->encode(prompts[i], true);
    p.options.max_tokens = 32;
    p.options.ignore_eos = true;
    if (i % 2 == 0) {
      p.options.sampling.temperature = 0.0f;  // greedy
    } else {
      p.options.sampling.temperature = 0.8f;  // seeded sampling: the same draws in the same order
      p.options.sampling.top_p = 0.9f;
      p.options.sampling.seed = 100 + uint64_t(i);
      p.options.sampling.has_seed = true;
    }
    reqs.push_back(p);
  }
  EngineStats st;
  const auto [plain, spec] = both(*m, *tok, reqs, &st);
  for (size_t i = 0; i < reqs.size(); ++i) EXPECT_EQ(spec[i].text, plain[i].text) << prompts[i];
  // a trained MTP module: most drafts stand (77% greedy on the validation split)
  ASSERT_GT(st.spec_drafts, 0);
  const double rate = double(st.spec_accepted) / double(st.spec_drafts);
  EXPECT_GT(rate, 0.3) << st.spec_accepted << " of " << st.spec_drafts;
  RecordProperty("acceptance", std::to_string(rate));
  std::printf("fathom-mini MTP drafts accepted: %lld of %lld (%.1f%%): %.2f tokens per verifying step of a request\n",
              (long long)st.spec_accepted, (long long)st.spec_drafts, 100.0 * rate, 1.0 + rate);
}

}  // namespace
}  // namespace fathom::serve
