#include "ops/cpu/sample.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "core/error.h"

namespace fathom {

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// The nucleus: among `ids` (ascending id order; consumed), the tokens in rank order are kept
// while the mass ranked above them is below `target`; returns the lowest-ranked kept id.
// w = exp(l). Rather than sorting, the ids are binned by logit (the bin index is monotone in
// the logit, so rank order never crosses bins), the mass per bin finds the bin where the sum
// crosses target, and only that bin is narrowed again, until it is small enough to sort or is
// one tie class, whose rank order is its id order. Each round is one linear pass.
int32_t nucleus_last(std::vector<int32_t>& ids, const float* l, const double* w, double target, SelectScratch& s) {
  const TokenRanks ranks{l};
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
    s.bin_mass.assign(kBins, 0.0);
    s.bin_count.assign(kBins, 0);
    for (int32_t id : ids) {
      const int b = bin_of(id);
      s.bin_mass[size_t(b)] += w[id];
      ++s.bin_count[size_t(b)];
    }
    // The first bin whose mass reaches target; if rounding leaves none, the last non-empty one.
    int boundary = -1, last_nonempty = -1;
    double run = above, before_last = above;
    for (int b = 0; b < kBins; ++b) {
      if (s.bin_count[size_t(b)] == 0) continue;
      if (run + s.bin_mass[size_t(b)] >= target) {
        boundary = b;
        break;
      }
      last_nonempty = b;
      before_last = run;
      run += s.bin_mass[size_t(b)];
    }
    if (boundary < 0) {
      boundary = last_nonempty;
      run = before_last;
    }
    above = run;
    // The top and bottom logits fall in different bins, so this bin is a strict subset.
    s.narrowed.clear();
    for (int32_t id : ids)
      if (bin_of(id) == boundary) s.narrowed.push_back(id);
    ids.swap(s.narrowed);
  }
}

void check_row(const SampleRow& r, int64_t b) {
  FATHOM_CHECK(std::isfinite(r.temperature) && r.temperature >= 0.0f, "sample: row ", b, " has temperature ",
               r.temperature, "; expected a finite number >= 0");
  FATHOM_CHECK(r.top_k >= 0, "sample: row ", b, " has top_k ", r.top_k, "; expected >= 0 (0 = off)");
  FATHOM_CHECK(r.top_p > 0.0f && r.top_p <= 1.0f, "sample: row ", b, " has top_p ", r.top_p, "; expected (0, 1]");
  FATHOM_CHECK(r.min_p >= 0.0f && r.min_p <= 1.0f, "sample: row ", b, " has min_p ", r.min_p, "; expected [0, 1]");
  FATHOM_CHECK(r.u >= 0.0 && r.u < 1.0, "sample: row ", b, " has u ", r.u, "; expected [0, 1)");
}

}  // namespace

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

int32_t select_token(float* l, int64_t vocab, const SampleRow& row, SelectScratch& s) {
  int32_t argmax = -1;
  float mx = -kInf;
  for (int32_t i = 0; i < int32_t(vocab); ++i)
    if (l[i] > mx) mx = l[i], argmax = i;
  FATHOM_CHECK(argmax >= 0, "logits row has no finite value (every token is -inf)");
  if (row.temperature == 0.0f) return argmax;

  // Shift before scaling so that a tiny temperature cannot overflow: the best token is now 0.
  // (+0.0f turns a -0 quotient into +0: the two are equal, and the GPU's keys must agree.)
  const float t = row.temperature;
  for (int64_t i = 0; i < vocab; ++i) l[i] = (l[i] - mx) / t + 0.0f;

  const TokenRanks ranks{l};
  s.weights.resize(size_t(vocab));
  double* w = s.weights.data();  // (vocab) exp(l[id]), filled only for candidate ids
  // The candidate set: every id when `all`, else s.ids (ascending id order).
  bool all = true;
  s.ids.clear();

  const int64_t k = row.top_k;
  if (k > 0 && k < vocab) {
    // One pass with a heap of the k best so far, its front the worst of them.
    s.select.clear();
    for (int32_t i = 0; i < int32_t(vocab); ++i) {
      if (int64_t(s.select.size()) < k) {
        s.select.push_back(i);
        std::push_heap(s.select.begin(), s.select.end(), ranks);
      } else if (ranks(i, s.select.front())) {
        std::pop_heap(s.select.begin(), s.select.end(), ranks);
        s.select.back() = i;
        std::push_heap(s.select.begin(), s.select.end(), ranks);
      }
    }
    s.ids.assign(s.select.begin(), s.select.end());
    std::sort(s.ids.begin(), s.ids.end());
    all = false;
    for (int32_t id : s.ids) w[id] = std::exp(double(l[id]));
  } else {
    for (int64_t i = 0; i < vocab; ++i) w[i] = std::exp(double(l[i]));
  }

  if (row.top_p < 1.0f) {
    if (all) {
      s.select.resize(size_t(vocab));
      std::iota(s.select.begin(), s.select.end(), 0);
    } else {
      s.select = s.ids;
    }
    double total = 0.0;
    for (int32_t id : s.select) total += w[id];
    const int32_t last = nucleus_last(s.select, l, w, double(row.top_p) * total, s);
    // Keep every candidate ranked at or above the last kept token, in id order.
    if (all) {
      s.ids.clear();
      for (int32_t i = 0; i < int32_t(vocab); ++i)
        if (!ranks(last, i)) s.ids.push_back(i);
    } else {
      s.ids.erase(std::remove_if(s.ids.begin(), s.ids.end(), [&](int32_t id) { return ranks(last, id); }),
                  s.ids.end());
    }
    all = false;
  }

  if (row.min_p > 0.0f) {
    // The best token weighs exp(0) = 1 and survives top-k and top-p, so p >= min_p * p_max is
    // w >= min_p.
    const double floor_w = row.min_p;
    if (all) {
      for (int32_t i = 0; i < int32_t(vocab); ++i)
        if (w[i] >= floor_w) s.ids.push_back(i);
    } else {
      s.ids.erase(std::remove_if(s.ids.begin(), s.ids.end(), [&](int32_t id) { return w[id] < floor_w; }),
                  s.ids.end());
    }
    all = false;
  }
  const size_t n_cand = all ? size_t(vocab) : s.ids.size();

  // Inverse CDF over the candidates in id order at u.
  auto id_at = [&](size_t j) { return all ? int32_t(j) : s.ids[j]; };
  double total = 0.0;
  for (size_t j = 0; j < n_cand; ++j) total += w[id_at(j)];
  const double at = row.u * total;
  double cum = 0.0;
  int32_t last_positive = argmax;
  for (size_t j = 0; j < n_cand; ++j) {
    const int32_t id = id_at(j);
    if (w[id] <= 0.0) continue;
    cum += w[id];
    last_positive = id;
    if (at < cum) return id;
  }
  return last_positive;  // rounding left u at the very top of the CDF
}

namespace cpu {

void sample(Tensor& ids, const Tensor& logits, const Tensor& params) {
  const int64_t B = ids.numel();
  FATHOM_CHECK(ids.dtype() == DType::I32 && logits.dtype() == DType::F32 && B > 0 && logits.numel() % B == 0,
               "sample: ids ", dtype_name(ids.dtype()), " ", shape_str(ids.shape()), " and logits ",
               dtype_name(logits.dtype()), " ", shape_str(logits.shape()), "; expected I32 (B) and F32 (B, vocab)");
  FATHOM_CHECK(params.nbytes() == size_t(B) * sizeof(SampleRow), "sample: params hold ", params.nbytes(),
               " bytes; expected ", B, " rows of ", sizeof(SampleRow));
  const int64_t V = logits.numel() / B;
  SelectScratch scratch;
  std::vector<float> row_logits;
  for (int64_t b = 0; b < B; ++b) {
    SampleRow r;
    std::memcpy(&r, static_cast<const uint8_t*>(params.data()) + b * int64_t(sizeof(SampleRow)), sizeof(r));
    check_row(r, b);
    const float* l = logits.f32() + b * V;
    check_logits(l, V);
    row_logits.assign(l, l + V);  // select_token rescales its row in place
    ids.ptr<int32_t>()[b] = select_token(row_logits.data(), V, r, scratch);
  }
}

}  // namespace cpu

}  // namespace fathom
