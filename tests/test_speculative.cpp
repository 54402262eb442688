// MTP self-speculative decoding: the model pieces it needs (Model::forward_batch_rows,
// Model::mtp_step against forward() and mtp_logits()) and the serving engine with
// EngineOptions::speculative, whose output must be plain decoding's — on the v3-tiny-mtp fixture
// (random weights: drafts mostly rejected) and on fathom-mini (a trained MTP module: most drafts
// accepted), greedy and seeded sampling.
#include <chrono>
#include <random>
#include <thread>
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

// Drafting requests on the paged cache: the MTP module's blocks are published, forked and
// preempted with the main ones. The drafts themselves are the check — a wrong MTP cache would
// change them, so the acceptance counts (not only the tokens, which verification keeps right
// anyway) must be those of requests that computed everything themselves.
class SpeculativePaged : public testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = std::string(FATHOM_SOURCE_DIR) + "/models/fathom-mini";
    model_ = load(dir_).release();
    tok_ = Tokenizer::load(dir_).release();
  }
  static void TearDownTestSuite() {
    delete model_;
    delete tok_;
  }
  static RequestParams request(const std::string& text, int64_t n, uint64_t seed = 0) {
    RequestParams p;
    p.prompt = tok_->encode(text, true);
    p.options.max_tokens = n;
    p.options.ignore_eos = true;
    p.options.sampling.temperature = 0.0f;
    if (seed) {
      p.options.sampling.temperature = 0.8f;
      p.options.sampling.seed = seed;
      p.options.sampling.has_seed = true;
    }
    return p;
  }
  // Waits (up to 10 s) until the engine runs nothing: its counts are then those of every step.
  static void idle(const Engine& e) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while ((e.stats().running > 0 || e.stats().waiting > 0) && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  static inline std::string dir_;
  static inline Model* model_ = nullptr;
  static inline Tokenizer* tok_ = nullptr;
};

// B shares A's first 16 tokens (4 blocks) and differs from token 16 on: its main cache could take
// 4 blocks, but the MTP module's 4th block holds position 15 combined with A's token 16, so both
// caches take 3 blocks and recompute from position 12.
TEST_F(SpeculativePaged, APrefixHitKeepsTheDrafts) {
  const std::vector<int32_t> x = tok_->encode("The Linux kernel is the core of the operating system. It manages the "
                                              "memory of every process, schedules them on the processors",
                                              true),
                             y = tok_->encode("A dictionary maps keys to values and a list keeps them in order", true);
  ASSERT_GE(x.size(), 22u);
  ASSERT_GE(y.size(), 8u);
  RequestParams a = request("", 24), b = request("", 24);
  a.prompt.assign(x.begin(), x.begin() + 22);
  b.prompt.assign(x.begin(), x.begin() + 16);
  b.prompt.insert(b.prompt.end(), y.begin() + 1, y.begin() + 7);
  auto run = [&](bool prefix, EngineStats* st) {
    EngineOptions o;
    o.speculative = true;
    o.prefix_caching = prefix;
    o.kv_block_size = 4;
    Engine e(*model_, *tok_, o);
    e.submit(a)->wait();
    idle(e);
    const EngineStats before = e.stats();
    const RequestResult r = e.submit(b)->wait();
    idle(e);
    *st = e.stats();
    st->spec_drafts -= before.spec_drafts;  // b's alone
    st->spec_accepted -= before.spec_accepted;
    return r.ids;
  };
  EngineStats with, without;
  const std::vector<int32_t> hit = run(true, &with), miss = run(false, &without);
  EXPECT_EQ(hit, miss);
  EXPECT_EQ(with.prefix_hit_tokens, 12);  // the blocks both caches have
  EXPECT_EQ(without.prefix_hit_tokens, 0);
  EXPECT_EQ(with.spec_drafts, without.spec_drafts);
  EXPECT_EQ(with.spec_accepted, without.spec_accepted);
  EXPECT_GT(with.spec_accepted, 0);
}

TEST_F(SpeculativePaged, SharedPromptsForkTheMtpCacheToo) {
  const std::vector<uint64_t> seeds = {0, 3, 4, 5};  // greedy, then three seeded samplers
  const std::string text = "In Python, a generator is a function that";
  int64_t alone_drafts = 0, alone_accepted = 0;
  std::vector<std::vector<int32_t>> alone;
  for (uint64_t seed : seeds) {
    EngineOptions o;
    o.speculative = true;
    Engine e(*model_, *tok_, o);
    alone.push_back(e.submit(request(text, 16, seed))->wait().ids);
    idle(e);
    alone_drafts += e.stats().spec_drafts;
    alone_accepted += e.stats().spec_accepted;
  }
  EngineOptions o;
  o.speculative = true;
  o.prefill_chunk = 1;  // the prompt takes several steps: the others join as followers
  o.kv_block_size = 4;
  Engine e(*model_, *tok_, o);
  std::vector<std::shared_ptr<RequestHandle>> hs;
  for (uint64_t seed : seeds) hs.push_back(e.submit(request(text, 16, seed)));
  for (size_t i = 0; i < hs.size(); ++i) EXPECT_EQ(hs[i]->wait().ids, alone[i]) << "seed " << seeds[i];
  idle(e);
  const EngineStats st = e.stats();
  EXPECT_EQ(st.forked_prompts, 3);
  EXPECT_EQ(st.spec_drafts, alone_drafts);
  EXPECT_EQ(st.spec_accepted, alone_accepted);
}

TEST_F(SpeculativePaged, PreemptedDraftingRequestsGiveTheirTokens) {
  const char* prompts[] = {"The list type in Python", "To create a new branch in Git,", "The Linux kernel",
                           "A dictionary maps keys to values"};
  std::vector<std::vector<int32_t>> plain;
  {
    Engine e(*model_, *tok_);
    for (const char* p : prompts) plain.push_back(e.submit(request(p, 20))->wait().ids);
  }
  EngineOptions o;
  o.speculative = true;
  o.max_batch = 4;
  o.kv_block_size = 4;
  o.max_kv_tokens = 48;  // four requests of ~28 positions each cannot all fit: preemptions
  Engine e(*model_, *tok_, o);
  std::vector<std::shared_ptr<RequestHandle>> hs;
  for (const char* p : prompts) hs.push_back(e.submit(request(p, 20)));
  for (size_t i = 0; i < hs.size(); ++i) {
    const RequestResult r = hs[i]->wait();
    EXPECT_EQ(r.finish_reason, "length") << r.error;
    EXPECT_EQ(r.ids, plain[i]) << prompts[i];
  }
  EXPECT_GT(e.stats().preemptions, 0);
  EXPECT_GT(e.stats().spec_accepted, 0);
}

}  // namespace
}  // namespace fathom::serve
