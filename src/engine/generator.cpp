#include "engine/generator.h"

#include <algorithm>
#include <chrono>

#include "core/error.h"
#include "engine/stop.h"

namespace fathom {

void GenerateOptions::validate() const {
  sampling.validate();
  FATHOM_CHECK(max_tokens >= 1 && max_tokens <= (int64_t{1} << 24), "max_tokens ", max_tokens,
               " is out of range (expected 1 to 16777216)");
  for (const auto& s : stop) FATHOM_CHECK(!s.empty(), "a stop string is empty");
  FATHOM_CHECK(stop.size() <= 64, stop.size(), " stop strings given; at most 64 are allowed");
}

double GenerateResult::decode_tokens_per_second() const {
  return decode_seconds > 0 && ids.size() > 1 ? double(ids.size() - 1) / decode_seconds : 0.0;
}

Generator::Generator(Model& model, const Tokenizer& tokenizer)
    : model_(model), tok_(tokenizer), cache_(model.new_cache()) {
  for (int64_t id : model.config().eos_token_ids) eos_.push_back(static_cast<int32_t>(id));
  if (auto e = tokenizer.eos_id()) eos_.push_back(*e);
  std::sort(eos_.begin(), eos_.end());
  eos_.erase(std::unique(eos_.begin(), eos_.end()), eos_.end());
}

void Generator::reset() {
  cache_.clear();
  cached_.clear();
}

GenerateResult Generator::generate(const std::vector<int32_t>& prompt, const GenerateOptions& options,
                                   const std::function<void(std::string_view)>& on_text,
                                   const std::atomic<bool>* cancel) {
  options.validate();
  FATHOM_CHECK(!prompt.empty(), "the prompt is empty (no tokens)");
  model_.check_ids(prompt, "prompt");
  const int64_t max_pos = model_.config().max_position_embeddings;
  FATHOM_CHECK(static_cast<int64_t>(prompt.size()) < max_pos, "the prompt has ", prompt.size(),
               " tokens; the model's context is ", max_pos);
  GenerateResult r;
  r.prompt_tokens = static_cast<int64_t>(prompt.size());
  const int64_t max_new = std::min<int64_t>(options.max_tokens, max_pos - r.prompt_tokens);

  // Keep the longest cached prefix shared with this prompt (at least one token is recomputed
  // so that the last prompt position yields logits).
  size_t keep = 0;
  while (keep < cached_.size() && keep + 1 < prompt.size() && cached_[keep] == prompt[keep]) ++keep;
  cache_.truncate(static_cast<int64_t>(keep));
  cached_.resize(keep);
  r.reused_tokens = static_cast<int64_t>(keep);

  Sampler sampler(options.sampling);
  StopMatcher stops(options.stop);
  StreamDecoder detok(tok_, /*skip_special=*/true);  // as vLLM and HF pipelines print by default
  const int64_t vocab = model_.config().vocab_size;
  auto emit = [&](const std::string& piece) {
    if (piece.empty()) return;
    r.text += piece;
    if (on_text) on_text(piece);
  };

  using Clock = std::chrono::steady_clock;
  auto t0 = Clock::now();
  ForwardRequest req;
  req.last_logits_only = true;
  std::vector<int32_t> todo(prompt.begin() + static_cast<std::ptrdiff_t>(keep), prompt.end());
  ForwardOutput out = model_.forward(todo, cache_, req);
  cached_.insert(cached_.end(), todo.begin(), todo.end());
  auto t1 = Clock::now();
  r.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();

  r.finish_reason = "length";
  // Without penalties a step's token depends only on its logits and, when sampling, the
  // sampler's next uniform number: Model::decode_greedy (temperature 0) or decode_sample
  // chooses it on the device (a replayed CUDA graph on the GPU) and returns the token instead of
  // the logits. decode_sample gets its SampleRow from sampler.next_row(), so u comes from the
  // same seeded RNG sequence that sampler.sample() would draw from, and Ops::sample makes
  // select_token's choice. So on the CPU a seed still gives the tokens it gave when every step
  // went through forward() and sampler.sample(): the decode step computes the same logits
  // (checked: `fathom generate --temperature 0.7 --seed 1`, with top-k/top-p/min-p too, prints
  // the same text as before; RandomModel.DecodeSampleEqualsForwardBatch). On CUDA a token can
  // differ from the CPU's only where u lands within rounding of a CDF boundary.
  const SamplingParams& sp = options.sampling;
  const bool on_device = sp.repetition_penalty == 1.0f && sp.presence_penalty == 0.0f && sp.frequency_penalty == 0.0f;
  int32_t next = -1;
  for (int64_t step = 0; step < max_new; ++step) {
    if (cancel && cancel->load(std::memory_order_relaxed)) {
      r.finish_reason = "cancelled";
      break;
    }
    if (step == 0 || !on_device) {
      const float* logits = out.logits.ptr<float>() + (out.logits.dim(0) - 1) * vocab;
      next = sampler.sample(logits, vocab, prompt, r.ids);
    }
    if (!options.ignore_eos && std::binary_search(eos_.begin(), eos_.end(), next)) {
      r.finish_reason = "stop";
      break;
    }
    r.ids.push_back(next);
    emit(stops.push(detok.push(next)));
    if (stops.stopped()) {
      r.finish_reason = "stop";
      break;
    }
    if (step + 1 == max_new) break;
    if (on_device && sp.temperature == 0.0f) {
      next = model_.decode_greedy({next}, {&cache_})[0];
    } else if (on_device) {
      next = model_.decode_sample({next}, {&cache_}, {sampler.next_row()})[0];
    } else {
      out = model_.forward({next}, cache_, req);
    }
    cached_.push_back(r.ids.back());
  }
  if (!stops.stopped()) emit(stops.push(detok.flush()));
  if (!stops.stopped()) emit(stops.flush());
  // The last sampled token was not run through the model: the cache ends before it.
  r.decode_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
  return r;
}

}  // namespace fathom
