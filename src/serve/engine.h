// The serving engine: continuous batching of generation requests over one model.
//
// Requests arrive from any thread (submit) and wait in a bounded queue; one scheduler thread
// owns the model. Each iteration it admits waiting requests while the batch has room (and the KV
// cache has blocks for their prompts), then runs ONE step for every running request together —
// one ragged forward_batch in which decoding requests feed their last token and newcomers the
// next chunk of their prompt (chunked prefill, up to prefill_chunk prompt tokens per step): the
// projections, MoE and LM head over all rows at once, attention per sequence over its own blocks
// (Ops::attention_batch: one launch on the GPU). It samples
// each decoding row (and each prompt that just finished prefilling) with that request's own
// parameters and streams the new text. A request leaves the batch the step it finishes (EOS, a
// stop string, max_tokens, the context's end) or is cancelled, and the next waiting one takes its
// place at the next iteration: requests join and leave between steps, never waiting for the
// slowest one of a fixed batch. While every running request only decodes (nobody waiting, no
// prompt left, sampled on the device), the steps are chained (Engine::decode_chain): the next
// one runs on the device while the host hands out the tokens of the one before.
//
// The KV cache is paged (model/kv_pool.h): one pool of blocks of kv_block_size tokens shared by
// every request, taken a block at a time as a sequence grows. On top of it:
// - prefix caching: blocks full of known tokens are published; a newcomer whose prompt starts
//   with published blocks takes them and prefills only the rest (the hit rate is in stats).
// - shared prompts: a newcomer with the same prompt as one admitted with it (the `n` choices of
//   one API request, or two clients at once) waits for that prompt's prefill and then forks its
//   cache — the prompt is computed once, and each writes its own tokens into copies of the
//   shared last block (copy-on-write).
// - preemption: when a step needs more blocks than are free, the request admitted last gives its
//   blocks back and returns to the front of the queue; re-admitted, it recomputes its prompt and
//   the tokens it had generated (from the prefix cache when its blocks are still there) and goes
//   on where it stopped. No request is lost and its output is what it would have been.
// With `speculative`, the model's MTP module drafts a token ahead for every request and the main
// model verifies it in the next step (Engine::step). The module's own one-layer caches are paged
// in a pool of their own, published and forked alongside the main ones, so drafting requests
// take prefix hits and share prompts too.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "engine/generator.h"
#include "engine/sampler.h"
#include "fathom/model.h"
#include "fathom/tokenizer.h"
#include "model/kv_pool.h"

namespace fathom::serve {

struct EngineOptions {
  int max_batch = 8;    // requests decoded together at most
  int max_queue = 64;   // requests waiting beyond the batch; more: EngineBusy (HTTP 429)
  // Prompt tokens prefilled per step, in all: a long prompt is prefilled a chunk per step beside
  // the running requests' decoding instead of stalling them for its whole length.
  int64_t prefill_chunk = 512;
  // The KV cache's size in tokens, rounded up to whole blocks: what all requests hold together.
  // 0: on CUDA all the GPU memory budget leaves for it (Model::kv_budget_tokens), on the CPU
  // max_batch full contexts, at most 1 GiB. A prompt longer than the whole cache is refused; a
  // request that outgrows it alone ends with "length".
  int64_t max_kv_tokens = 0;
  int kv_block_size = 16;      // tokens per KV block
  bool prefix_caching = true;  // reuse published prompt blocks across requests
  // MTP self-speculative decoding, when the model has an MTP module: each step the module drafts
  // the token after the next, and the next step verifies it alongside (accepted: two tokens for
  // one step of the main model). The output is what plain decoding gives (see Engine::step).
  bool speculative = false;
  // Keep a record of each chained decode step (Engine::step_trace), at most this many (the
  // oldest dropped): what a benchmark needs to split a step's time between the model's calls and
  // the host's. 0: none.
  int64_t trace_steps = 0;
};

// What a request asks for.
struct RequestParams {
  std::vector<int32_t> prompt;  // token ids, non-empty, within the vocabulary
  GenerateOptions options;      // sampling, max_tokens, stop strings, ignore_eos
  int top_logprobs = -1;        // -1: no logprobs; 0..20: the chosen token's and this many alternatives
};

// One generated token, as the scheduler streams it.
struct TokenEvent {
  int32_t id = 0;
  std::string text;                       // the text this token released (may be empty: a partial
                                          // UTF-8 character or a possible stop string held back)
  std::optional<LogprobResult> logprobs;  // when asked for
};

struct RequestResult {
  std::vector<int32_t> ids;  // generated tokens (EOS not included)
  std::string text;          // all the text released, up to a stop string
  std::string finish_reason; // "stop", "length", "cancelled", or "error"
  std::string error;         // with "error": what went wrong
  int64_t prompt_tokens = 0;
  double queue_seconds = 0;  // submit -> admitted
  double ttft_seconds = 0;   // submit -> first token
};

// A submitted request, as its submitter sees it: events to take in order, then the result.
class RequestHandle {
 public:
  // Waits up to timeout_ms for the next event or the end; returns false on timeout. `event` is
  // filled when one was waiting; `done` turns true once the result is final and every event has
  // been taken.
  bool next(TokenEvent& event, bool& got_event, bool& done, int timeout_ms);
  // Blocks until the request has finished; the events are dropped.
  RequestResult wait();
  const RequestResult& result() const { return result_; }  // final once done
  // Asks the scheduler to stop this request at its next step ("cancelled"); safe from any thread.
  void cancel() { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }

 private:
  friend class Engine;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<TokenEvent> events_;
  bool finished_ = false;
  RequestResult result_;
  std::atomic<bool> cancelled_{false};
};

// The queue is full: the caller should answer 429 (and may retry later).
struct EngineBusy : Error {
  using Error::Error;
};

// A latency histogram in Prometheus's form: counts[i] observations <= kBounds[i] seconds
// (cumulative when written out), the last bucket +Inf.
struct LatencyHistogram {
  static constexpr double kBounds[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0};
  static constexpr size_t kBuckets = std::size(kBounds) + 1;
  int64_t counts[kBuckets] = {};
  int64_t count = 0;
  double sum = 0;
  void observe(double seconds);
};

struct EngineStats {
  int64_t waiting = 0, running = 0;
  int64_t requests_finished = 0, tokens_generated = 0, steps = 0;
  int64_t prompt_tokens = 0;  // prompt (and recomputed) tokens run through the model
  int64_t kv_tokens = 0;      // KV-cache positions held by requests (their blocks, in tokens)
  int64_t kv_capacity = 0;    // the KV cache's size, in tokens
  int64_t kv_cached_tokens = 0;  // published blocks nobody holds (kept for prefix hits), in tokens
  int64_t prefix_query_tokens = 0, prefix_hit_tokens = 0;  // prompt tokens looked up / found cached
  int64_t forked_prompts = 0;  // requests that took another's prefilled prompt (shared prompts)
  int64_t cow_copies = 0;      // shared blocks copied before a write
  int64_t preemptions = 0;     // requests sent back to the queue for lack of blocks
  int64_t spec_drafts = 0, spec_accepted = 0;  // MTP drafts verified, and accepted
  int64_t device_sampled = 0;  // tokens chosen where the logits are (Model::forward_batch_sample)
  // Steps of plain decoding (every row one token, sampled on the device) and the scheduler's time
  // in them: inside the model's calls, and all of it from the moment it had work (the rest is the
  // host's own: planning, detokenizing, stop strings, handing tokens to the requests).
  int64_t decode_steps = 0;
  int64_t chained_steps = 0;  // of those, launched before the step before them was handed out
  double decode_model_seconds = 0, decode_step_seconds = 0;
  double tokens_per_second = 0;  // generated, over the last second or more of work
  LatencyHistogram ttft;         // submit -> first token, per request
  LatencyHistogram inter_token;  // between a request's consecutive tokens
};

// One chained decode step as the scheduler saw it (EngineOptions::trace_steps).
struct StepRecord {
  std::chrono::steady_clock::time_point launched;  // its decode_launch call began
  std::chrono::steady_clock::time_point back;      // its tokens were back (decode_wait returned)
  double launch_seconds = 0;  // the decode_launch call (preparing the inputs, launching)
  double wait_seconds = 0;    // the decode_wait call
  int32_t batch = 0;          // requests in the step
};

class Engine {
 public:
  Engine(Model& model, const Tokenizer& tokenizer, EngineOptions options = {});
  ~Engine();  // stops the scheduler; requests still waiting or running end "cancelled"
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Validates the request (fathom::Error naming what is wrong: empty prompt, an id out of the
  // vocabulary, a prompt that leaves no room in the context, bad sampling options) and queues it.
  // Throws EngineBusy when max_queue requests are already waiting.
  std::shared_ptr<RequestHandle> submit(RequestParams params);

  EngineStats stats() const;
  // The last EngineOptions::trace_steps chained decode steps, oldest first.
  std::vector<StepRecord> step_trace() const;
  const Model& model() const { return model_; }
  const Tokenizer& tokenizer() const { return tok_; }
  // Tokens that end a sequence (the model's eos ids and the tokenizer's).
  const std::vector<int32_t>& eos_ids() const { return eos_; }

 private:
  struct Running;
  void loop();
  void admit(std::vector<std::unique_ptr<Running>>& batch, std::vector<std::unique_ptr<Running>>& fresh);
  // Applies a sampled token to r; returns false when r has finished.
  bool take_token(Running& r, int32_t id, const float* logits);
  void finish(Running& r, const std::string& reason, const std::string& error = "");
  // Gives r's blocks back and puts it at the front of the queue, to recompute later.
  void preempt(std::unique_ptr<Running> r);
  // The next step's plan; preempts (newest first) until the pool has the blocks it needs.
  void plan(std::vector<std::unique_ptr<Running>>& batch, std::vector<Running*>& rows,
            std::vector<std::vector<int32_t>>& tokens, std::vector<KvCache*>& caches, std::vector<int64_t>& want);
  // Whether r's next token can be chosen by Ops::sample where the logits are: no penalties, no
  // logprobs (those need the row of logits on the host).
  static bool device_samples(const Running& r);
  // Whether id ends r as an end-of-sequence token (take_token's first check).
  bool ends_by_eos(const Running& r, int32_t id) const;
  // One forward step over these rows (tokens[b] for rows[b]: a prompt chunk, a pending token, or
  // a pending token and its draft), then the sampling, the draft verification and the MTP drafts
  // for the next step. True when it was a step of plain decoding sampled on the device.
  bool step(const std::vector<std::unique_ptr<Running>>& batch, const std::vector<Running*>& rows,
            const std::vector<std::vector<int32_t>>& tokens, const std::vector<KvCache*>& caches,
            const std::vector<int64_t>& want);
  // Removes finished requests from the batch (and releases those that waited for them).
  void drop_finished(std::vector<std::unique_ptr<Running>>& batch);
  // running and the KV-cache figures of stats_ as they are now
  void publish(const std::vector<std::unique_ptr<Running>>& batch);
  // Steps of plain decoding chained through Model::decode_launch / decode_wait: each step is
  // launched as soon as the one before it is back, and the host hands that one's tokens out
  // while the device runs it (engine.cpp). chainable: whether rows (all of the batch) may start
  // such a chain, or go on with it — no request waiting, cancelled, finished, prefilling,
  // drafting or sampled on the host, and room in the pool for every next token.
  bool chainable(const std::vector<std::unique_ptr<Running>>& batch, const std::vector<Running*>& rows);
  void decode_chain(const std::vector<std::unique_ptr<Running>>& batch, const std::vector<Running*>& rows);
  // The requests that got tokens this step are woken by waker_ (wake_loop), handed over once a
  // step (hand_over_wakes), so the scheduler does not make a wake-up call a token before it can
  // start the next step (finish() still wakes a request itself).
  void hand_over_wakes();
  void wake_loop();

  Model& model_;
  const Tokenizer& tok_;
  EngineOptions opt_;
  std::vector<int32_t> eos_;
  int64_t vocab_ = 0, max_pos_ = 0;
  std::shared_ptr<KvBlockPool> pool_;  // the paged KV cache (the scheduler thread's)
  std::shared_ptr<KvBlockPool> mtp_pool_;  // with MTP drafting: the MTP module's paged caches
  std::chrono::steady_clock::time_point rate_mark_;  // tokens_per_second: when it was last measured
  int64_t rate_tokens_ = 0;                           // and tokens_generated then
  int64_t kv_tokens_total_ = 0;        // its size in tokens

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Running>> waiting_;
  bool stop_ = false;
  EngineStats stats_;
  std::deque<StepRecord> trace_;  // (under mu_) EngineOptions::trace_steps
  std::thread thread_;

  bool chaining_ = false;  // a chained step may be running: finish() leaves caches to drop_finished
  std::vector<std::shared_ptr<RequestHandle>> to_wake_;  // the scheduler's: woken after this step
  std::mutex wake_mu_;
  std::condition_variable wake_cv_;
  std::vector<std::shared_ptr<RequestHandle>> waking_;  // handed to waker_ (under wake_mu_)
  bool wake_stop_ = false;
  std::thread waker_;
};

}  // namespace fathom::serve
