#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"

namespace fathom {

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// Throws unless v is a finite number in [lo, hi]; `range` spells the interval for the message.
void check_range(const char* name, float v, bool ok, const char* range) {
  FATHOM_CHECK(std::isfinite(v) && ok, "sampling parameter ", name, " must be a finite number in ",
               range, ", got ", v);
}

void check_ids(const char* what, const std::vector<int32_t>& ids, int64_t vocab) {
  for (size_t i = 0; i < ids.size(); ++i)
    FATHOM_CHECK(ids[i] >= 0 && ids[i] < vocab, what, " token ", i, " is id ", ids[i],
                 ", outside the vocabulary [0, ", vocab, ")");
}

}  // namespace

void SamplingParams::validate() const {
  check_range("temperature", temperature, temperature >= 0.0f, "[0, inf)");
  FATHOM_CHECK(top_k >= 0, "sampling parameter top_k must be >= 0 (0 = off), got ", top_k);
  check_range("top_p", top_p, top_p > 0.0f && top_p <= 1.0f, "(0, 1]");
  check_range("min_p", min_p, min_p >= 0.0f && min_p <= 1.0f, "[0, 1]");
  check_range("repetition_penalty", repetition_penalty, repetition_penalty > 0.0f, "(0, inf)");
  check_range("presence_penalty", presence_penalty,
              presence_penalty >= -2.0f && presence_penalty <= 2.0f, "[-2, 2]");
  check_range("frequency_penalty", frequency_penalty,
              frequency_penalty >= -2.0f && frequency_penalty <= 2.0f, "[-2, 2]");
}

LogprobResult log_softmax_top_n(const float* logits, int64_t vocab, int32_t chosen, int top_n) {
  check_logits(logits, vocab);
  FATHOM_CHECK(chosen >= 0 && chosen < vocab, "token id ", chosen,
               " for logprobs is outside the vocabulary [0, ", vocab, ")");
  FATHOM_CHECK(top_n >= 0, "number of top logprobs must be >= 0, got ", top_n);

  const float mx = *std::max_element(logits, logits + vocab);
  FATHOM_CHECK(mx != -kInf, "logits row has no finite value (every token is -inf)");
  double sum = 0.0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(double(logits[i]) - double(mx));
  const double log_z = double(mx) + std::log(sum);
  auto logprob = [&](int32_t id) { return float(double(logits[id]) - log_z); };

  LogprobResult r;
  r.chosen = {chosen, logprob(chosen)};
  // The n best in one pass: a heap whose front is the worst of those kept so far.
  const TokenRanks ranks{logits};
  const size_t n = size_t(std::min<int64_t>(top_n, vocab));
  std::vector<int32_t> best;
  best.reserve(n);
  for (int32_t i = 0; n > 0 && i < int32_t(vocab); ++i) {
    if (best.size() < n) {
      best.push_back(i);
      std::push_heap(best.begin(), best.end(), ranks);
    } else if (ranks(i, best.front())) {
      std::pop_heap(best.begin(), best.end(), ranks);
      best.back() = i;
      std::push_heap(best.begin(), best.end(), ranks);
    }
  }
  std::sort(best.begin(), best.end(), ranks);
  for (int32_t id : best) r.top.push_back({id, logprob(id)});
  return r;
}

Sampler::Sampler(const SamplingParams& p) : params_(p) {
  params_.validate();
  if (params_.has_seed) {
    rng_.seed(params_.seed);
  } else {
    std::random_device rd;
    rng_.seed((uint64_t(rd()) << 32) ^ uint64_t(rd()));
  }
}

double Sampler::draw_uniform() { return double(rng_() >> 11) * 0x1.0p-53; }

SampleRow Sampler::next_row() {
  SampleRow r;
  r.temperature = params_.temperature;
  r.top_k = params_.top_k;
  r.top_p = params_.top_p;
  r.min_p = params_.min_p;
  r.u = params_.temperature > 0.0f ? draw_uniform() : 0.0;
  return r;
}

void Sampler::apply_penalties(const float* logits, int64_t vocab,
                              const std::vector<int32_t>& prompt,
                              const std::vector<int32_t>& generated) {
  processed_.assign(logits, logits + vocab);
  const float rep = params_.repetition_penalty;
  const float presence = params_.presence_penalty, frequency = params_.frequency_penalty;
  const bool use_rep = rep != 1.0f, use_counts = presence != 0.0f || frequency != 0.0f;
  if (!use_rep && !use_counts) return;
  check_ids("generated", generated, vocab);

  if (use_rep) {
    check_ids("prompt", prompt, vocab);
    seen_.resize(size_t(vocab), 0);
    for (const std::vector<int32_t>* ids : {&prompt, &generated}) {
      for (int32_t id : *ids) {
        if (seen_[size_t(id)]) continue;
        seen_[size_t(id)] = 1;
        float& l = processed_[size_t(id)];
        l = l > 0.0f ? l / rep : l * rep;
        // A tiny penalty can push a large logit past float range; keep it the largest finite.
        if (l == kInf) l = std::numeric_limits<float>::max();
      }
    }
    for (int32_t id : prompt) seen_[size_t(id)] = 0;
    for (int32_t id : generated) seen_[size_t(id)] = 0;
  }
  if (use_counts) {
    counts_.resize(size_t(vocab), 0);
    for (int32_t id : generated) ++counts_[size_t(id)];
    for (int32_t id : generated) {
      const int32_t c = counts_[size_t(id)];
      if (c == 0) continue;  // already applied for an earlier occurrence
      processed_[size_t(id)] -= presence + frequency * float(c);
      counts_[size_t(id)] = 0;
    }
  }
}

int32_t Sampler::sample(const float* logits, int64_t vocab, const std::vector<int32_t>& prompt,
                        const std::vector<int32_t>& generated) {
  check_logits(logits, vocab);
  apply_penalties(logits, vocab, prompt, generated);
  return select_token(processed_.data(), vocab, next_row(), select_);
}

LogprobResult Sampler::last_logprobs(int32_t token, int top_n) const {
  FATHOM_CHECK(!processed_.empty(), "logprobs asked for before any token was sampled");
  return log_softmax_top_n(processed_.data(), int64_t(processed_.size()), token, top_n);
}

}  // namespace fathom
