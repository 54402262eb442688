// Sampler: greedy, seeded determinism, the empirical distribution against softmax(logits / T),
// the exact support of top-k / top-p / min-p against a full-sort oracle, penalties against their
// formulas, parameter validation and bad logits.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "core/error.h"
#include "engine/sampler.h"

using namespace fathom;

namespace {

const std::vector<int32_t> kNone;

std::vector<float> random_logits(int64_t vocab, uint64_t seed, float scale = 3.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> l(static_cast<size_t>(vocab));
  for (float& x : l) x = normal(rng);
  return l;
}

SamplingParams seeded(uint64_t seed = 1234) {
  SamplingParams p;
  p.seed = seed;
  p.has_seed = true;
  return p;
}

// The oracle: the candidate set and its renormalised probabilities, by sorting everything.
std::map<int32_t, double> allowed_distribution(const std::vector<float>& logits, const SamplingParams& p) {
  const int64_t vocab = int64_t(logits.size());
  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  if (p.temperature == 0.0f) return {{order[0], 1.0}};
  std::vector<double> prob(logits.size());
  double z = 0;
  for (size_t i = 0; i < logits.size(); ++i) z += prob[i] = std::exp((double(logits[i]) - logits[order[0]]) / p.temperature);
  for (double& x : prob) x /= z;
  if (p.top_k > 0 && p.top_k < vocab) order.resize(size_t(p.top_k));
  double kept = 0;
  for (int32_t id : order) kept += prob[id];
  if (p.top_p < 1.0f) {
    double before = 0;
    size_t n = 0;
    while (n < order.size() && before < p.top_p * kept) before += prob[order[n++]];
    order.resize(n);
  }
  const double p_max = prob[order[0]];
  std::map<int32_t, double> out;
  double total = 0;
  for (int32_t id : order)
    if (prob[id] >= p.min_p * p_max) out[id] = prob[id], total += prob[id];
  for (auto& [id, q] : out) q /= total;
  return out;
}

std::vector<int64_t> histogram(Sampler& s, const std::vector<float>& logits, int n) {
  std::vector<int64_t> counts(logits.size(), 0);
  for (int i = 0; i < n; ++i) ++counts[size_t(s.sample(logits.data(), int64_t(logits.size()), kNone, kNone))];
  return counts;
}

// Pearson's statistic of counts against expected probabilities (cells with q = 0 must be empty).
double chi_square(const std::vector<int64_t>& counts, const std::vector<double>& q, int n) {
  double stat = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (q[i] == 0) {
      EXPECT_EQ(counts[i], 0) << "token " << i << " has probability 0";
      continue;
    }
    const double e = q[i] * n;
    stat += (double(counts[i]) - e) * (double(counts[i]) - e) / e;
  }
  return stat;
}

// Samples many times and checks the support is exactly the oracle's set (every allowed token
// likely enough to show up does show up).
void expect_support(const std::vector<float>& logits, const SamplingParams& p, int n) {
  const auto allowed = allowed_distribution(logits, p);
  Sampler s(p);
  const auto counts = histogram(s, logits, n);
  for (size_t id = 0; id < counts.size(); ++id) {
    auto it = allowed.find(int32_t(id));
    if (it == allowed.end()) {
      EXPECT_EQ(counts[id], 0) << "token " << id << " is outside the allowed set";
    } else if (it->second * n > 30) {
      EXPECT_GT(counts[id], 0) << "allowed token " << id << " (p=" << it->second << ") never drawn";
    }
  }
}

}  // namespace

TEST(Sampler, GreedyIsArgmaxWithTiesToLowestId) {
  SamplingParams p = seeded();
  p.temperature = 0.0f;
  Sampler s(p);
  for (uint64_t seed = 0; seed < 20; ++seed) {
    auto l = random_logits(1000, seed);
    const int32_t want = int32_t(std::max_element(l.begin(), l.end()) - l.begin());
    EXPECT_EQ(s.sample(l.data(), 1000, kNone, kNone), want);
  }
  std::vector<float> tie = {1.0f, 5.0f, -std::numeric_limits<float>::infinity(), 5.0f, 5.0f};
  EXPECT_EQ(s.sample(tie.data(), 5, kNone, kNone), 1);
}

TEST(Sampler, TopKOneIsGreedyAtAnyTemperature) {
  for (float t : {0.01f, 0.5f, 1.0f, 3.0f, 100.0f}) {
    SamplingParams p = seeded(uint64_t(t * 100));
    p.temperature = t;
    p.top_k = 1;
    Sampler s(p);
    for (uint64_t seed = 0; seed < 20; ++seed) {
      auto l = random_logits(5000, seed);
      const int32_t want = int32_t(std::max_element(l.begin(), l.end()) - l.begin());
      EXPECT_EQ(s.sample(l.data(), 5000, kNone, kNone), want) << "temperature " << t;
    }
  }
}

TEST(Sampler, SameSeedSameTokensOtherSeedOthers) {
  auto l = random_logits(32000, 7, 1.0f);
  auto draw = [&](uint64_t seed, SamplingParams p) {
    p.seed = seed;
    p.has_seed = true;
    Sampler s(p);
    std::vector<int32_t> out;
    for (int i = 0; i < 200; ++i) out.push_back(s.sample(l.data(), 32000, kNone, out));
    return out;
  };
  SamplingParams plain, truncated;
  truncated.top_k = 100;
  truncated.top_p = 0.8f;
  truncated.min_p = 0.01f;
  truncated.frequency_penalty = 0.3f;
  for (const SamplingParams& p : {plain, truncated}) {
    EXPECT_EQ(draw(42, p), draw(42, p));
    EXPECT_NE(draw(42, p), draw(43, p));
  }
}

TEST(Sampler, EmpiricalDistributionMatchesTemperatureSoftmax) {
  const std::vector<float> l = {1.0f, 2.0f, 0.5f, -1.0f, 3.0f, 0.0f, 2.5f, -3.0f};
  const int n = 200000;
  for (float t : {0.7f, 1.0f, 2.0f}) {
    SamplingParams p = seeded(99);
    p.temperature = t;
    Sampler s(p);
    const auto counts = histogram(s, l, n);
    std::vector<double> q(l.size());
    double z = 0;
    for (size_t i = 0; i < l.size(); ++i) z += q[i] = std::exp(double(l[i]) / t);
    for (double& x : q) x /= z;
    // 7 degrees of freedom: P(chi2 > 40) ~ 1e-6.
    EXPECT_LT(chi_square(counts, q, n), 40.0) << "temperature " << t;
  }
}

TEST(Sampler, TruncatedDistributionIsRenormalised) {
  const std::vector<float> l = {1.0f, 2.0f, 0.5f, -1.0f, 3.0f, 0.0f, 2.5f, -3.0f};
  const int n = 200000;
  SamplingParams p = seeded(5);
  p.top_k = 4;
  p.top_p = 0.9f;
  p.temperature = 1.3f;
  const auto allowed = allowed_distribution(l, p);
  ASSERT_EQ(allowed.size(), 3u);  // {4, 6, 1} reach 0.9 of the top-4 mass
  std::vector<double> q(l.size(), 0.0);
  for (auto [id, pr] : allowed) q[size_t(id)] = pr;
  Sampler s(p);
  EXPECT_LT(chi_square(histogram(s, l, n), q, n), 30.0);  // 2 dof: P(chi2 > 30) ~ 3e-7
}

TEST(Sampler, TopKTopPMinPKeepExactlyTheAllowedTokens) {
  // Probabilities 0.4, 0.3, 0.15, 0.1, 0.05 for ids 3, 0, 4, 1, 2: boundaries are far from ties.
  const std::vector<float> l = {std::log(0.3f), std::log(0.1f), std::log(0.05f), std::log(0.4f), std::log(0.15f)};
  auto support = [&](SamplingParams p) {
    std::set<int32_t> seen;
    Sampler s(p);
    for (int i = 0; i < 20000; ++i) seen.insert(s.sample(l.data(), 5, kNone, kNone));
    return seen;
  };
  SamplingParams p = seeded();
  p.top_k = 2;
  EXPECT_EQ(support(p), (std::set<int32_t>{3, 0}));
  p = seeded();
  p.top_p = 0.8f;  // mass before id 1 is 0.85
  EXPECT_EQ(support(p), (std::set<int32_t>{3, 0, 4}));
  p.top_p = 0.3f;  // only the first
  EXPECT_EQ(support(p), (std::set<int32_t>{3}));
  p = seeded();
  p.min_p = 0.3f;  // p >= 0.12
  EXPECT_EQ(support(p), (std::set<int32_t>{3, 0, 4}));
  p.min_p = 0.2f;  // p >= 0.08
  EXPECT_EQ(support(p), (std::set<int32_t>{3, 0, 4, 1}));
  p.min_p = 1.0f;
  EXPECT_EQ(support(p), (std::set<int32_t>{3}));
  p = seeded();
  p.top_k = 4;
  p.top_p = 0.95f;  // of the top-4 mass 0.95: 0.4, 0.3, 0.15 = 0.85/0.95 < 0.95 -> all four
  p.min_p = 0.3f;   // then p >= 0.3 * p_max drops id 1
  EXPECT_EQ(support(p), (std::set<int32_t>{3, 0, 4}));
}

TEST(Sampler, RandomTruncationsMatchTheFullSortOracle) {
  std::mt19937_64 rng(11);
  for (int trial = 0; trial < 24; ++trial) {
    SamplingParams p = seeded(uint64_t(trial));
    p.temperature = std::uniform_real_distribution<float>(0.3f, 2.0f)(rng);
    p.top_k = trial % 3 == 0 ? 0 : int(rng() % 40) + 1;
    p.top_p = trial % 2 == 0 ? 1.0f : std::uniform_real_distribution<float>(0.2f, 0.99f)(rng);
    p.min_p = trial % 4 == 1 ? std::uniform_real_distribution<float>(0.01f, 0.5f)(rng) : 0.0f;
    expect_support(random_logits(200, uint64_t(trial) + 100, 2.0f), p, 20000);
  }
}

TEST(Sampler, TopPOverTheFullDeepSeekVocabulary) {
  // Large candidate sets go through log-weight bins; only the bin where the mass crosses top_p
  // is sorted. A flat row (top_p = 0.9 needs ~100k tokens), a peaked one, and one with many
  // tied and masked logits (ties across the boundary go to the lower id).
  const int64_t vocab = 129280;
  auto flat = random_logits(vocab, 3, 0.05f);
  auto peaked = random_logits(vocab, 4, 4.0f);
  auto tied = random_logits(vocab, 5, 1.0f);
  for (size_t i = 0; i < tied.size(); ++i)
    tied[i] = i % 7 == 0 ? -std::numeric_limits<float>::infinity() : std::round(tied[i] * 2.0f) / 2.0f;
  for (const auto& [row, top_p] : {std::pair{&flat, 0.9f}, {&peaked, 0.5f}, {&tied, 0.7f}, {&tied, 0.05f}}) {
    SamplingParams p = seeded();
    p.top_p = top_p;
    const auto allowed = allowed_distribution(*row, p);
    Sampler s(p);
    for (int i = 0; i < 300; ++i) {
      const int32_t id = s.sample(row->data(), vocab, kNone, kNone);
      ASSERT_TRUE(allowed.count(id)) << "token " << id << " is outside the top-p " << top_p << " set";
    }
  }
  // The exact boundary: 1,000 equal logits, top_p = 0.25005 keeps ids [0, 250] (mass before
  // id 250 is 0.25 < 0.25005, before id 251 it is 0.251), tie order = id order.
  std::vector<float> equal(1000, 0.0f);
  SamplingParams p = seeded();
  p.top_p = 0.25005f;
  Sampler s(p);
  int32_t hi = 0;
  for (int i = 0; i < 5000; ++i) hi = std::max(hi, s.sample(equal.data(), 1000, kNone, kNone));
  EXPECT_EQ(hi, 250);
}

TEST(Sampler, PenaltiesFollowTheirFormulas) {
  const std::vector<float> l = {2.0f, -2.0f, 1.0f, 0.5f, 3.0f, -1.0f};
  const std::vector<int32_t> prompt = {0, 1, 0};
  const std::vector<int32_t> generated = {2, 2, 3, 2};
  SamplingParams p = seeded();
  p.repetition_penalty = 2.0f;
  p.presence_penalty = 0.5f;
  p.frequency_penalty = 0.25f;
  // Repetition over {0, 1, 2, 3} once each, then presence/frequency over counts {2: 3, 3: 1}.
  const std::vector<float> want = {2.0f / 2,  -2.0f * 2, 1.0f / 2 - 0.5f - 0.25f * 3,
                                   0.5f / 2 - 0.5f - 0.25f * 1, 3.0f, -1.0f};
  Sampler s(p);
  const int32_t id = s.sample(l.data(), 6, prompt, generated);
  const LogprobResult got = s.last_logprobs(id, 6);
  const LogprobResult ref = log_softmax_top_n(want.data(), 6, id, 6);
  ASSERT_EQ(got.top.size(), 6u);
  for (size_t i = 0; i < 6; ++i) {
    EXPECT_EQ(got.top[i].id, ref.top[i].id);
    EXPECT_NEAR(got.top[i].logprob, ref.top[i].logprob, 1e-6);
  }
  EXPECT_NEAR(got.chosen.logprob, ref.chosen.logprob, 1e-6);

  // Greedy sees the penalised logits: a repeated winner loses to the runner-up.
  SamplingParams g;
  g.temperature = 0.0f;
  const std::vector<float> two = {1.0f, 0.9f};
  EXPECT_EQ(Sampler(g).sample(two.data(), 2, kNone, kNone), 0);
  g.presence_penalty = 0.2f;
  EXPECT_EQ(Sampler(g).sample(two.data(), 2, kNone, {0}), 1);
  EXPECT_EQ(Sampler(g).sample(two.data(), 2, {0}, kNone), 0);  // presence ignores the prompt
  g.presence_penalty = 0.0f;
  g.repetition_penalty = 1.2f;
  EXPECT_EQ(Sampler(g).sample(two.data(), 2, {0}, kNone), 1);  // repetition counts the prompt
  g.repetition_penalty = 1.0f;
  g.frequency_penalty = -1.0f;  // negative: encourages repeats
  EXPECT_EQ(Sampler(g).sample(two.data(), 2, kNone, {1}), 1);
}

TEST(Sampler, TemperatureScalesTheLogprobs) {
  const std::vector<float> l = {1.0f, 2.0f, -0.5f};
  SamplingParams p = seeded();
  p.temperature = 0.5f;
  Sampler s(p);
  const int32_t id = s.sample(l.data(), 3, kNone, kNone);
  const std::vector<float> scaled = {2.0f, 4.0f, -1.0f};
  EXPECT_NEAR(s.last_logprobs(id, 0).chosen.logprob, log_softmax_top_n(scaled.data(), 3, id, 0).chosen.logprob, 1e-6);
}

TEST(Sampler, LogSoftmaxTopN) {
  auto l = random_logits(1000, 8);
  l[10] = l[20] = 50.0f;  // a tie at the top goes to the lower id
  l[5] = -std::numeric_limits<float>::infinity();
  const LogprobResult r = log_softmax_top_n(l.data(), 1000, 5, 4);
  double z = 0;
  for (float x : l) z += std::exp(double(x) - 50.0);
  const double log_z = 50.0 + std::log(z);
  ASSERT_EQ(r.top.size(), 4u);
  EXPECT_EQ(r.top[0].id, 10);
  EXPECT_EQ(r.top[1].id, 20);
  EXPECT_NEAR(r.top[0].logprob, 50.0 - log_z, 1e-6);
  std::vector<float> sorted = l;
  std::sort(sorted.begin(), sorted.end(), std::greater<float>());
  for (size_t i = 0; i < 4; ++i) EXPECT_NEAR(r.top[i].logprob, sorted[i] - log_z, 1e-5);
  EXPECT_EQ(r.chosen.id, 5);
  EXPECT_EQ(r.chosen.logprob, -std::numeric_limits<float>::infinity());
  EXPECT_EQ(log_softmax_top_n(l.data(), 1000, 0, 5000).top.size(), 1000u);
  EXPECT_THROW(log_softmax_top_n(l.data(), 1000, 1000, 1), Error);
  EXPECT_THROW(log_softmax_top_n(l.data(), 1000, 0, -1), Error);
}

TEST(Sampler, ValidateNamesEachBadParameter) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  struct Case {
    std::string name;
    void (*set)(SamplingParams&, float);
    std::vector<float> bad;
  };
  const std::vector<Case> cases = {
      {"temperature", [](SamplingParams& p, float v) { p.temperature = v; }, {nan, inf, -0.1f}},
      {"top_p", [](SamplingParams& p, float v) { p.top_p = v; }, {nan, 0.0f, -0.5f, 1.01f}},
      {"min_p", [](SamplingParams& p, float v) { p.min_p = v; }, {nan, -0.01f, 1.5f}},
      {"top_k", [](SamplingParams& p, float v) { p.top_k = int(v); }, {-1.0f, -100.0f}},
      {"repetition_penalty", [](SamplingParams& p, float v) { p.repetition_penalty = v; }, {nan, inf, 0.0f, -1.0f}},
      {"presence_penalty", [](SamplingParams& p, float v) { p.presence_penalty = v; }, {nan, 2.01f, -2.5f}},
      {"frequency_penalty", [](SamplingParams& p, float v) { p.frequency_penalty = v; }, {nan, inf, 3.0f, -2.01f}},
  };
  for (const Case& c : cases) {
    for (float v : c.bad) {
      SamplingParams p;
      c.set(p, v);
      try {
        p.validate();
        ADD_FAILURE() << c.name << " = " << v << " was accepted";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find(c.name), std::string::npos) << e.what();
      }
      EXPECT_THROW(Sampler{p}, Error) << c.name << " = " << v;
    }
  }
  SamplingParams edge;  // the ends of each range are allowed
  edge.temperature = 0.0f;
  edge.top_p = 1.0f;
  edge.min_p = 1.0f;
  edge.presence_penalty = -2.0f;
  edge.frequency_penalty = 2.0f;
  edge.repetition_penalty = 1e-3f;
  EXPECT_NO_THROW(edge.validate());
}

TEST(Sampler, BadLogitsAndIdsAreErrorsNotCrashes) {
  Sampler s(seeded());
  std::vector<float> l = {0.0f, 1.0f, 2.0f};
  l[1] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(s.sample(l.data(), 3, kNone, kNone), Error);
  l[1] = std::numeric_limits<float>::infinity();
  EXPECT_THROW(s.sample(l.data(), 3, kNone, kNone), Error);
  const float ninf = -std::numeric_limits<float>::infinity();
  std::vector<float> masked = {ninf, ninf, ninf};
  EXPECT_THROW(s.sample(masked.data(), 3, kNone, kNone), Error);
  masked[2] = 0.0f;  // -inf masks a token; one finite logit is enough
  EXPECT_EQ(s.sample(masked.data(), 3, kNone, kNone), 2);
  EXPECT_THROW(s.sample(nullptr, 3, kNone, kNone), Error);
  EXPECT_THROW(s.sample(masked.data(), 0, kNone, kNone), Error);
  SamplingParams p = seeded();
  p.repetition_penalty = 1.1f;
  Sampler penalised(p);
  EXPECT_THROW(penalised.sample(masked.data(), 3, {3}, kNone), Error);
  EXPECT_THROW(penalised.sample(masked.data(), 3, kNone, {-1}), Error);
  EXPECT_THROW(Sampler(seeded()).last_logprobs(0, 1), Error);  // nothing sampled yet
  // A tiny temperature or penalty must not overflow into NaN.
  SamplingParams cold = seeded();
  cold.temperature = 1e-30f;
  cold.repetition_penalty = 1e-30f;
  std::vector<float> big = {1e30f, -1e30f, 3e38f};
  EXPECT_EQ(Sampler(cold).sample(big.data(), 3, {0}, kNone), 0);
}

TEST(Sampler, FastAtDeepSeekVocabulary) {
  const int64_t vocab = 129280;
  auto l = random_logits(vocab, 21, 2.0f);
  std::vector<int32_t> prompt(2000), generated;
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = int32_t((i * 7919) % vocab);
  SamplingParams p = seeded();
  p.temperature = 0.6f;
  p.top_k = 50;
  p.top_p = 0.95f;
  p.repetition_penalty = 1.1f;
  p.frequency_penalty = 0.1f;
  Sampler s(p);
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 100; ++i) generated.push_back(s.sample(l.data(), vocab, prompt, generated));
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / 100;
  RecordProperty("ms_per_token_top_k_top_p", std::to_string(ms));
  std::printf("sample() at vocab %lld with top_k/top_p/penalties: %.3f ms per token\n", (long long)vocab, ms);
  SamplingParams q = seeded();
  q.top_p = 0.9f;
  Sampler s2(q);
  const auto t1 = std::chrono::steady_clock::now();
  for (int i = 0; i < 100; ++i) s2.sample(l.data(), vocab, kNone, kNone);
  const double ms2 = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t1).count() / 100;
  std::printf("sample() at vocab %lld with top_p only: %.3f ms per token\n", (long long)vocab, ms2);
  EXPECT_LT(ms, 100.0);  // only a sanity bound: sanitizer builds are slow
}
