// Text generation for one sequence: prefill the prompt into the KV cache, then sample one
// token at a time, stream the new text as it becomes complete UTF-8, and stop at EOS, a stop
// string, max_tokens or a cancel request. A later call may start with the same prompt prefix
// (a chat's earlier turns): the cached prefix is kept and only the rest is prefilled.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/sampler.h"
#include "fathom/model.h"
#include "fathom/tokenizer.h"

namespace fathom {

struct GenerateOptions {
  SamplingParams sampling;
  int64_t max_tokens = 256;         // new tokens at most; >= 1
  std::vector<std::string> stop;    // stop strings (not included in the output)
  bool ignore_eos = false;          // keep going after an end-of-sequence token
  void validate() const;            // throws fathom::Error naming the bad option
};

struct GenerateResult {
  std::vector<int32_t> ids;      // the new tokens (a stop string's tokens included, EOS not)
  std::string text;              // the streamed text, special tokens left out (ends before a stop string)
  std::string finish_reason;     // "stop" (EOS or stop string), "length", "cancelled"
  int64_t prompt_tokens = 0;     // of the prompt given
  int64_t reused_tokens = 0;     // prompt tokens found already in the cache
  double prefill_seconds = 0, decode_seconds = 0;
  double decode_tokens_per_second() const;
};

class Generator {
 public:
  Generator(Model& model, const Tokenizer& tokenizer);

  // `on_text` receives each new piece of text (never a split UTF-8 character) as it is
  // produced; `cancel` (optional) is polled between tokens.
  GenerateResult generate(const std::vector<int32_t>& prompt, const GenerateOptions& options,
                          const std::function<void(std::string_view)>& on_text = {},
                          const std::atomic<bool>* cancel = nullptr);

  // The ids the cache holds now (prompt + generated tokens of the last call).
  const std::vector<int32_t>& cached_ids() const { return cached_; }
  void reset();
  const std::vector<int32_t>& eos_ids() const { return eos_; }

 private:
  Model& model_;
  const Tokenizer& tok_;
  KvCache cache_;
  std::vector<int32_t> cached_;  // ids whose K/V the cache holds, in order
  std::vector<int32_t> eos_;
};

}  // namespace fathom
