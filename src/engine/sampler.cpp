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

// The nucleus: among `ids` (ascending id order; consumed), the tokens in rank order are kept
// while the mass ranked above them is below `target`; returns the lowest-ranked kept id.
// w = exp(l). Rather than sorting, the ids are binned by logit (the bin index is monotone in
// the logit, so rank order never crosses bins), the mass per bin finds the bin where the sum
// crosses target, and only that bin is narrowed again, until it is small enough to sort or is
// one tie class, whose rank order is its id order. Each round is one linear pass. bin_mass,
// bin_count and next are scratch, owned by the caller so that a call allocates nothing.
int32_t nucleus_last(std::vector<int32_t>& ids, const float* l, const double* w, double target,
                     const Ranks& ranks, std::vector<double>& bin_mass, std::vector<int32_t>& bin_count,
                     std::vector<int32_t>& next) {
  double above = 0.0;  // mass of the tokens ranked above every id still in `ids`
  // Walks ids already in rank order.
  auto walk = [&](const std::vector<int32_t>& ranked) {
    for (size_t j = 0; j + 1 < ranked.size(); ++j) {
      above += w[ranked[j]];
      if (above >= target) return ranked[j];
    }
    return ranked.back();
  };
  constexpr int kBins = 1024;
  for (;;) {
    if (ids.size() <= 64) {
      std::sort(ids.begin(), ids.end(), ranks);
      return walk(ids);
    }
    float top = -kInf, bottom = kInf;  // range of the finite logits
    for (int32_t id : ids) {
      if (l[id] == -kInf) continue;
      top = std::max(top, l[id]);
      bottom = std::min(bottom, l[id]);
    }
    // One tie class (the -inf ones, with no mass, rank after it in id order too).
    if (!(bottom < top)) return walk(ids);

    // In double so that a range of a few ulps cannot overflow the scale.
    const double per_unit = double(kBins - 1) / (double(top) - double(bottom));
    auto bin_of = [&](int32_t id) {
      const double x = (double(top) - double(l[id])) * per_unit;  // +inf for -inf logits
      return x < double(kBins - 1) ? int(x) : kBins - 1;
    };
    bin_mass.assign(kBins, 0.0);
    bin_count.assign(kBins, 0);
    for (int32_t id : ids) {
      const int b = bin_of(id);
      bin_mass[size_t(b)] += w[id];
      ++bin_count[size_t(b)];
    }
    // The first bin whose mass reaches target; if rounding leaves none, the last non-empty one.
    int boundary = -1, last_nonempty = -1;
    double run = above, before_last = above;
    for (int b = 0; b < kBins; ++b) {
      if (bin_count[size_t(b)] == 0) continue;
      if (run + bin_mass[size_t(b)] >= target) {
        boundary = b;
        break;
      }
      last_nonempty = b;
      before_last = run;
      run += bin_mass[size_t(b)];
    }
    if (boundary < 0) {
      boundary = last_nonempty;
      run = before_last;
    }
    above = run;
    // The top and bottom logits fall in different bins, so this bin is a strict subset.
    next.clear();
    for (int32_t id : ids)
      if (bin_of(id) == boundary) next.push_back(id);
    ids.swap(next);
  }
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
  // The candidate set: every id when `all`, else ids_ (ascending id order, so that the draw
  // walks the CDF in an order that does not depend on how the set was found).
  bool all = true;
  ids_.clear();

  const int64_t k = params_.top_k;
  if (k > 0 && k < vocab) {
    // One pass with a heap of the k best so far, its front the worst of them.
    select_.clear();
    for (int32_t i = 0; i < int32_t(vocab); ++i) {
      if (int64_t(select_.size()) < k) {
        select_.push_back(i);
        std::push_heap(select_.begin(), select_.end(), ranks);
      } else if (ranks(i, select_.front())) {
        std::pop_heap(select_.begin(), select_.end(), ranks);
        select_.back() = i;
        std::push_heap(select_.begin(), select_.end(), ranks);
      }
    }
    ids_.assign(select_.begin(), select_.end());
    std::sort(ids_.begin(), ids_.end());
    all = false;
    for (int32_t id : ids_) w[id] = double(std::exp(l[id]));
  } else {
    for (int64_t i = 0; i < vocab; ++i) w[i] = double(std::exp(l[i]));
  }

  if (params_.top_p < 1.0f) {
    if (all) {
      select_.resize(size_t(vocab));
      std::iota(select_.begin(), select_.end(), 0);
    } else {
      select_ = ids_;
    }
    double total = 0.0;
    for (int32_t id : select_) total += w[id];
    const int32_t last = nucleus_last(select_, l, w, double(params_.top_p) * total, ranks, bin_mass_, bin_count_, narrowed_);
    // Keep every candidate ranked at or above the last kept token, in id order.
    if (all) {
      ids_.clear();
      for (int32_t i = 0; i < int32_t(vocab); ++i)
        if (!ranks(last, i)) ids_.push_back(i);
    } else {
      ids_.erase(std::remove_if(ids_.begin(), ids_.end(), [&](int32_t id) { return ranks(last, id); }),
                 ids_.end());
    }
    all = false;
  }

  if (params_.min_p > 0.0f) {
    // The best token has weight exp(0) = 1 and survives top-k and top-p, so
    // p >= min_p * p_max is w >= min_p.
    const double floor_w = params_.min_p;
    if (all) {
      for (int32_t i = 0; i < int32_t(vocab); ++i)
        if (w[i] >= floor_w) ids_.push_back(i);
    } else {
      ids_.erase(std::remove_if(ids_.begin(), ids_.end(), [&](int32_t id) { return w[id] < floor_w; }),
                 ids_.end());
    }
    all = false;
  }
  const size_t n_cand = all ? size_t(vocab) : ids_.size();

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
