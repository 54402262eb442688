// CPU attention with a split over keys ("flash-decoding"): the keys of each (query, KV head)
// are cut into chunks that threads process independently, each keeping a running max, a
// softmax denominator and an unnormalised output per query head; the partial results are
// merged afterwards with the usual rescaling by exp(max_c - max). All query heads that share
// a KV head (GQA/MQA groups, the 8-128 heads of absorbed MLA) are served by one pass over the
// keys, so each cached row is read once per group instead of once per head.
#pragma once
#include "core/thread_pool.h"
#include "ops/ops.h"

namespace fathom::cpu {

void attention(const AttentionParams& p, ThreadPool& pool);

}  // namespace fathom::cpu
