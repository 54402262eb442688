#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/error.h"

namespace fathom {

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// Throws unless v is a finite number in [lo, hi]; `range` spells the interval for the message.
void check_range(const char* name, float v, bool ok, const char* range) {
  FATHOM_CHECK(std::isfinite(v) && ok, "sampling parameter ", name, " must be a finite number in ",
               range, ", got ", v);
}

// NaN and +inf in a logits row are a broken model or a broken caller, never a distribution.
void check_logits(const float* logits, int64_t vocab) {
  FATHOM_CHECK(logits != nullptr, "logits row is null");
  FATHOM_CHECK(vocab > 0 && vocab <= std::numeric_limits<int32_t>::max(),
               "logits row must have between 1 and 2^31-1 entries, got ", vocab);
  for (int64_t i = 0; i < vocab; ++i) {
    const float l = logits[i];
    FATHOM_CHECK(!std::isnan(l) && l != kInf, "logits row holds ", l, " at token ", i,
                 "; logits must be finite or -inf");
  }
}

void check_ids(const char* what, const std::vector<int32_t>& ids, int64_t vocab) {
  for (size_t i = 0; i < ids.size(); ++i)
    FATHOM_CHECK(ids[i] >= 0 && ids[i] < vocab, what, " token ", i, " is id ", ids[i],
                 ", outside the vocabulary [0, ", vocab, ")");
}

// True when token a ranks before token b: larger logit first, the lower id on ties.
struct Ranks {
  const float* logits;
  bool operator()(int32_t a, int32_t b) const {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  }
};

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
  const Ranks ranks{logits};
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

double Sampler::uniform() { return double(rng_() >> 11) * 0x1.0p-53; }

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
  float* l = processed_.data();  // (vocab)

  int32_t argmax = -1;
  float mx = -kInf;
  for (int32_t i = 0; i < int32_t(vocab); ++i)
    if (l[i] > mx) mx = l[i], argmax = i;
  FATHOM_CHECK(argmax >= 0, "logits row has no finite value (every token is -inf)");
  if (params_.temperature == 0.0f) return argmax;

  // Shift before scaling so that a tiny temperature cannot overflow: the best token is now 0.
  const float t = params_.temperature;
  for (int64_t i = 0; i < vocab; ++i) l[i] = (l[i] - mx) / t;

  const Ranks ranks{l};
  weights_.resize(size_t(vocab));
  double* w = weights_.data();  // (vocab) exp(l[id]), filled only for candidate ids
  // The candidate set: either every id (in id order) or ids_[0, n_cand) in rank order.
  bool all = true;
  size_t n_cand = size_t(vocab);

  const int64_t k = params_.top_k;
  if (k > 0 && k < vocab) {
    ids_.resize(size_t(vocab));
    std::iota(ids_.begin(), ids_.end(), 0);
    std::nth_element(ids_.begin(), ids_.begin() + k, ids_.end(), ranks);
    std::sort(ids_.begin(), ids_.begin() + k, ranks);
    all = false;
    n_cand = size_t(k);
    for (size_t j = 0; j < n_cand; ++j) w[ids_[j]] = std::exp(double(l[ids_[j]]));
  } else {
    for (int64_t i = 0; i < vocab; ++i) w[i] = std::exp(double(l[i]));
  }

  if (params_.top_p < 1.0f) {
    double total = 0.0;
    if (all) {
      for (int64_t i = 0; i < vocab; ++i) total += w[i];
    } else {
      for (size_t j = 0; j < n_cand; ++j) total += w[ids_[j]];
    }
    const double target = double(params_.top_p) * total;
    // Keep a token while the mass ranked above it is below top_p. Over the whole vocabulary,
    // rank a small head first and widen it only when its mass falls short.
    size_t head = all ? std::min<size_t>(size_t(vocab), 64) : n_cand;
    if (all) {
      ids_.resize(size_t(vocab));
      std::iota(ids_.begin(), ids_.end(), 0);
    }
    for (;;) {
      if (all) {
        if (head < size_t(vocab)) std::nth_element(ids_.begin(), ids_.begin() + int64_t(head), ids_.end(), ranks);
        std::sort(ids_.begin(), ids_.begin() + int64_t(head), ranks);
      }
      double mass = 0.0;
      size_t keep = 0;
      while (keep < head && mass < target) mass += w[ids_[keep++]];
      if (mass >= target || head == n_cand) {
        n_cand = std::max<size_t>(keep, 1);
        all = false;
        break;
      }
      head = std::min<size_t>(n_cand, head * 8);
    }
  }

  if (params_.min_p > 0.0f) {
    // The best token has weight exp(0) = 1 and is always a candidate, so p >= min_p * p_max
    // is w >= min_p.
    const double floor_w = params_.min_p;
    if (all) {
      ids_.clear();
      for (int32_t i = 0; i < int32_t(vocab); ++i)
        if (w[i] >= floor_w) ids_.push_back(i);
      n_cand = ids_.size();
      all = false;
    } else {
      size_t keep = 0;
      while (keep < n_cand && w[ids_[keep]] >= floor_w) ++keep;  // ids_ is in rank order
      n_cand = keep;
    }
  }

  // Inverse CDF over the candidates with one uniform draw.
  auto id_at = [&](size_t j) { return all ? int32_t(j) : ids_[j]; };
  double total = 0.0;
  for (size_t j = 0; j < n_cand; ++j) total += w[id_at(j)];
  const double u = uniform() * total;
  double cum = 0.0;
  int32_t last_positive = argmax;
  for (size_t j = 0; j < n_cand; ++j) {
    const int32_t id = id_at(j);
    if (w[id] <= 0.0) continue;
    cum += w[id];
    last_positive = id;
    if (u < cum) return id;
  }
  return last_positive;  // rounding left u at the very top of the CDF
}

LogprobResult Sampler::last_logprobs(int32_t token, int top_n) const {
  FATHOM_CHECK(!processed_.empty(), "logprobs asked for before any token was sampled");
  return log_softmax_top_n(processed_.data(), int64_t(processed_.size()), token, top_n);
}

}  // namespace fathom
