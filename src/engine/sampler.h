// Token sampling from one row of logits, in the order HuggingFace and vLLM apply it:
// penalties -> temperature -> top-k -> top-p -> min-p -> draw.
//
// The penalties are applied here; the rest is select_token (src/ops/cpu/sample.h), the choice
// that Ops::sample makes on the device too. Tokens are drawn by inverse CDF over the candidates
// in ascending id order with one uniform number from the sampler's own seeded RNG, so a seed
// gives the same tokens on every run for the same logits. Ties between equal logits always go
// to the lower token id (greedy argmax, the top-k boundary, the order top-p accumulates in).
#pragma once
#include <cstdint>
#include <random>
#include <vector>

#include "ops/cpu/sample.h"

namespace fathom {

struct SamplingParams {
  float temperature = 1.0f;  // >= 0; 0 = greedy (argmax, ties -> lowest id), others ignored
  int top_k = 0;             // keep the k most likely tokens; 0 = off (>= vocab is also off)
  float top_p = 1.0f;        // in (0, 1]: keep the smallest most-likely set with mass >= top_p
  float min_p = 0.0f;        // in [0, 1]: keep tokens with p >= min_p * p_max; 0 = off
  // > 0, HF/CTRL style over every id in prompt + generated (each counted once):
  // logit > 0 ? logit / penalty : logit * penalty. 1 = off.
  float repetition_penalty = 1.0f;
  // In [-2, 2], OpenAI style over generated ids only:
  // logit -= presence_penalty * (count > 0) + frequency_penalty * count.
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  uint64_t seed = 0;      // used when has_seed; the same seed draws the same tokens
  bool has_seed = false;  // false: seed from std::random_device

  // Throws fathom::Error naming the first bad parameter and its allowed range.
  void validate() const;
};

// One token and its log-probability (natural log) under a distribution.
struct TokenLogprob {
  int32_t id = 0;
  float logprob = 0.0f;  // <= 0; -inf for a token the logits rule out
};

// The chosen token's logprob and the top_n most likely tokens (descending; ties -> lower id).
struct LogprobResult {
  TokenLogprob chosen;
  std::vector<TokenLogprob> top;  // min(top_n, vocab) entries
};

// log_softmax of logits (vocab floats) at `chosen` plus its top_n entries, computed in double
// without sorting the row. logits may hold -inf, never NaN or +inf (fathom::Error).
LogprobResult log_softmax_top_n(const float* logits, int64_t vocab, int32_t chosen, int top_n);

class Sampler {
 public:
  // Validates p (fathom::Error) and seeds the RNG from p.seed or std::random_device.
  explicit Sampler(const SamplingParams& p);

  // logits: one row of vocab floats (not modified; -inf allowed, NaN / +inf -> fathom::Error).
  // prompt: the prompt's ids, generated: ids sampled so far; all in [0, vocab).
  // Returns a token id in [0, vocab).
  int32_t sample(const float* logits, int64_t vocab, const std::vector<int32_t>& prompt,
                 const std::vector<int32_t>& generated);

  // Logprobs of `token` and the top_n alternatives under the distribution the last sample()
  // drew from after penalties and temperature, before top-k/top-p/min-p truncation (vLLM's
  // "processed_logprobs"). With temperature 0 the penalised logits are used unscaled.
  LogprobResult last_logprobs(int32_t token, int top_n) const;

  const SamplingParams& params() const { return params_; }

  // The next uniform double in [0, 1) from 53 random bits of the RNG, identical on every
  // platform: the number sample() draws its token with when temperature > 0 (once per call).
  // A caller that lets Ops::sample choose on the device (no penalties) passes it as
  // SampleRow::u, so the tokens are those sample() would have drawn from the same logits.
  double draw_uniform();
  // The SampleRow of these parameters (penalties left out) with u = draw_uniform(), or u = 0
  // without drawing for temperature 0.
  SampleRow next_row();

 private:
  // Writes the penalised logits into processed_ (vocab floats).
  void apply_penalties(const float* logits, int64_t vocab, const std::vector<int32_t>& prompt,
                       const std::vector<int32_t>& generated);

  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<float> processed_;  // (vocab) penalised logits, then (l - max) / temperature
  std::vector<int32_t> counts_;   // (vocab) occurrences in generated; zero between calls
  std::vector<uint8_t> seen_;     // (vocab) id in prompt or generated; zero between calls
  SelectScratch select_;          // select_token's working memory
};

}  // namespace fathom
