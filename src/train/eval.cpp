// Held-out evaluation (see eval.h).
#include "train/eval.h"

#include <algorithm>
#include <cmath>
#include <unordered_map>

#include "core/error.h"

namespace fathom::train {

double LossResult::perplexity() const { return std::exp(loss); }

namespace {

// −log softmax(row)[target], in double.
double nll(const float* row, int64_t V, int32_t target) {
  double mx = row[0];
  for (int64_t v = 1; v < V; ++v) mx = std::max(mx, double(row[v]));
  double sum = 0;
  for (int64_t v = 0; v < V; ++v) sum += std::exp(double(row[v]) - mx);
  return std::log(sum) + mx - double(row[target]);
}

int32_t argmax(const float* row, int64_t V) { return int32_t(std::max_element(row, row + V) - row); }

}  // namespace

LossResult model_loss(Model& model, const std::vector<int32_t>& ids, int64_t seq_len, int64_t max_tokens) {
  FATHOM_CHECK(seq_len >= 1, "eval: seq_len must be at least 1, not ", seq_len);
  FATHOM_CHECK(int64_t(ids.size()) > seq_len, "eval: ", ids.size(), " tokens are fewer than one window of ",
               seq_len + 1);
  model.check_ids(ids, "evaluation tokens");
  const int64_t V = model.config().vocab_size;
  LossResult r;
  double total = 0;
  for (int64_t start = 0; start + seq_len < int64_t(ids.size()); start += seq_len) {
    if (max_tokens > 0 && r.tokens >= max_tokens) break;
    const std::vector<int32_t> window(ids.begin() + start, ids.begin() + start + seq_len + 1);
    const std::vector<int32_t> input(window.begin(), window.end() - 1);
    KvCache cache = model.new_cache(seq_len);
    const Tensor logits = model.forward(input, cache).logits;  // (seq_len, V)
    for (int64_t t = 0; t < seq_len; ++t) total += nll(logits.f32() + t * V, V, window[size_t(t + 1)]);
    r.tokens += seq_len;
  }
  r.loss = total / double(r.tokens);
  return r;
}

NgramBaselines ngram_baselines(const std::vector<int32_t>& train, const std::vector<int32_t>& eval, int64_t vocab,
                               int64_t max_tokens) {
  FATHOM_CHECK(vocab > 0 && train.size() >= 40 && eval.size() >= 2, "eval: the n-gram baselines need training and ",
               "evaluation tokens (", train.size(), " and ", eval.size(), " given)");
  // counts from the first 95% of the training tokens; the rest picks the bigram's weight
  const size_t fit_end = train.size() * 19 / 20;
  std::vector<double> uni(size_t(vocab), 1.0);  // add-one
  std::unordered_map<int64_t, double> bi;
  std::vector<double> from(size_t(vocab), 0.0);
  for (size_t i = 0; i < fit_end; ++i) {
    FATHOM_CHECK(train[i] >= 0 && train[i] < vocab, "eval: training token ", train[i], " at ", i,
                 " is outside the vocabulary of ", vocab);
    uni[size_t(train[i])] += 1;
    if (i + 1 < fit_end) {
      bi[int64_t(train[i]) * vocab + train[i + 1]] += 1;
      from[size_t(train[i])] += 1;
    }
  }
  const double uni_total = double(fit_end) + double(vocab);
  auto p_uni = [&](int32_t b) { return uni[size_t(b)] / uni_total; };
  auto p_bi = [&](int32_t a, int32_t b, double lambda) {
    const auto it = bi.find(int64_t(a) * vocab + b);
    const double c = it == bi.end() ? 0.0 : it->second;
    const double cond = from[size_t(a)] > 0 ? c / from[size_t(a)] : 0.0;
    return lambda * cond + (1 - lambda) * p_uni(b);
  };
  auto mean_nll = [&](const std::vector<int32_t>& ids, size_t begin, size_t end, double lambda, bool bigram) {
    double s = 0;
    int64_t n = 0;
    for (size_t i = begin + 1; i < end; ++i) {
      FATHOM_CHECK(ids[i] >= 0 && ids[i] < vocab, "eval: token ", ids[i], " at ", i, " is outside the vocabulary of ",
                   vocab);
      s -= std::log(bigram ? p_bi(ids[i - 1], ids[i], lambda) : p_uni(ids[i]));
      ++n;
    }
    return std::make_pair(s / double(n), n);
  };
  NgramBaselines r;
  double best = 1e300;
  for (int k = 1; k <= 19; ++k) {  // λ = 0.05 .. 0.95 on the held-back training tail
    const double lambda = 0.05 * k;
    const double l = mean_nll(train, fit_end, train.size(), lambda, true).first;
    if (l < best) best = l, r.bigram_weight = lambda;
  }
  const size_t end = max_tokens > 0 ? std::min(eval.size(), size_t(max_tokens) + 1) : eval.size();
  const auto u = mean_nll(eval, 0, end, 0, false);
  const auto b = mean_nll(eval, 0, end, r.bigram_weight, true);
  r.unigram = {u.second, u.first};
  r.bigram = {b.second, b.first};
  return r;
}

MtpAcceptance mtp_acceptance(Model& model, const std::vector<int32_t>& ids, int prompts, int64_t prompt_len,
                             int64_t new_tokens) {
  FATHOM_CHECK(model.has_mtp(), "eval: the model has no MTP module (num_nextn_predict_layers is 0)");
  FATHOM_CHECK(prompts >= 1 && prompt_len >= 1 && new_tokens >= 2, "eval: MTP acceptance needs prompts, a prompt length ",
               "and at least 2 new tokens");
  FATHOM_CHECK(int64_t(ids.size()) >= prompt_len, "eval: ", ids.size(), " tokens are fewer than one prompt of ",
               prompt_len);
  model.check_ids(ids, "evaluation tokens");
  const int64_t V = model.config().vocab_size;
  MtpAcceptance r;
  const int64_t span = int64_t(ids.size()) - prompt_len;
  for (int p = 0; p < prompts; ++p) {
    const int64_t start = prompts > 1 ? span * p / (prompts - 1) : 0;
    std::vector<int32_t> seq(ids.begin() + start, ids.begin() + start + prompt_len);
    const std::vector<int32_t> gen = model.generate_greedy(seq, new_tokens);
    seq.insert(seq.end(), gen.begin(), gen.end());
    KvCache cache = model.new_cache(int64_t(seq.size()));
    const ForwardOutput out = model.forward(seq, cache);
    const Tensor mtp = model.mtp_logits(seq, out.final_hidden);  // row i predicts seq[i + 2]
    // drafts made after a generated token: position i with i + 1 >= prompt_len, checked against
    // the main model's own greedy choice seq[i + 2]
    for (int64_t i = prompt_len - 1; i + 2 < int64_t(seq.size()); ++i) {
      ++r.drafts;
      r.accepted += argmax(mtp.f32() + i * V, V) == seq[size_t(i + 2)];
    }
  }
  return r;
}

}  // namespace fathom::train
