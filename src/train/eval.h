// How good a trained model is, measured on held-out tokens (`fathom eval`):
// - the mean next-token cross-entropy (nats) and perplexity of the model over a split of
//   prepared shards, in windows of seq_len + 1 tokens (the first token of a window is context
//   only), through the inference path (Model::forward);
// - the same for two baselines of the same tokenizer, fitted on the training split: a unigram
//   (add-one smoothed) and a bigram interpolated with it (the weight chosen on the last 5% of
//   the training tokens, which the counts leave out) — what a model must beat to have learnt
//   more than token frequencies;
// - the greedy acceptance rate of the model's first MTP module: greedy continuations of
//   held-out prompts, then for each generated position whether the MTP module's argmax for the
//   token after next equals the token the main model chose there — the share of drafts that
//   self-speculative greedy decoding would accept.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "fathom/model.h"

namespace fathom::train {

struct LossResult {
  int64_t tokens = 0;  // predicted tokens
  double loss = 0;     // mean cross-entropy, nats per token
  double perplexity() const;
};

LossResult model_loss(Model& model, const std::vector<int32_t>& ids, int64_t seq_len, int64_t max_tokens);

struct NgramBaselines {
  LossResult unigram, bigram;
  double bigram_weight = 0;  // λ of λ·p(b|a) + (1−λ)·p(b)
};
NgramBaselines ngram_baselines(const std::vector<int32_t>& train, const std::vector<int32_t>& eval, int64_t vocab,
                               int64_t max_tokens);

struct MtpAcceptance {
  int64_t drafts = 0, accepted = 0;
  double rate() const { return drafts ? double(accepted) / double(drafts) : 0; }
};
// `prompts` windows of `prompt_len` tokens from `ids` (evenly spread), each continued greedily by
// `new_tokens`. Throws fathom::Error when the model has no MTP module.
MtpAcceptance mtp_acceptance(Model& model, const std::vector<int32_t>& ids, int prompts, int64_t prompt_len,
                             int64_t new_tokens);

}  // namespace fathom::train
