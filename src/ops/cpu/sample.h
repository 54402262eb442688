// Choosing one token from a row of logits after penalties: temperature -> top-k -> top-p ->
// min-p -> inverse CDF at a given uniform number. The one reference for this choice: the
// engine's Sampler (src/engine/sampler.cpp) and CpuOps::sample call it, and the CUDA op
// (src/ops/cuda/sample.cu) is tested against it.
//
// Ranks: a larger logit first, the lower id on ties (greedy argmax, the top-k boundary, the
// order top-p accumulates in). Weights are exp(l) in double of l = (logit - max) / temperature
// in float, so the best token weighs exactly 1.
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "ops/ops.h"

namespace fathom {

// True when token a ranks before token b under `logits`.
struct TokenRanks {
  const float* logits;
  bool operator()(int32_t a, int32_t b) const {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  }
};

// Throws fathom::Error unless logits is a row of 1 to 2^31-1 values, each finite or -inf.
void check_logits(const float* logits, int64_t vocab);

// Working memory of select_token, kept by the caller so that calls after the first allocate
// nothing.
struct SelectScratch {
  std::vector<int32_t> ids;        // (candidates) the candidate ids in ascending order
  std::vector<int32_t> select;     // (vocab or k) partial selection
  std::vector<double> weights;     // (vocab) exp(l) for the candidate ids
  std::vector<double> bin_mass;    // (1024 bins) top-p: mass per logit bin
  std::vector<int32_t> bin_count;  // (1024 bins) top-p: ids per logit bin
  std::vector<int32_t> narrowed;   // (ids in one bin) top-p
};

// The token that `row` chooses from logits (vocab floats, finite or -inf, not checked here; no
// finite value -> fathom::Error). With temperature > 0 the row is overwritten with
// (l - max) / temperature, the distribution the token is drawn from; row.u is read only then.
// Candidate sets are found without sorting the vocabulary: top-k by one pass with a k-entry
// heap, top-p by binning logits and narrowing only the bin where the mass crosses top_p, min-p
// by a threshold; the draw walks the candidates in ascending id order, so the token does not
// depend on how the set was found.
int32_t select_token(float* logits, int64_t vocab, const SampleRow& row, SelectScratch& scratch);

namespace cpu {
// Ops::sample on host tensors: ids (B) I32, logits (B, V) F32, params (B * sizeof(SampleRow)) U8.
// Checks every row's logits and parameters (fathom::Error naming the row).
void sample(Tensor& ids, const Tensor& logits, const Tensor& params);
}  // namespace cpu

}  // namespace fathom
