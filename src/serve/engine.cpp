// The serving engine's scheduler (see engine.h).
#include "serve/engine.h"

#include <algorithm>
#include <chrono>

#include "core/error.h"
#include "engine/stop.h"

namespace fathom::serve {

using Clock = std::chrono::steady_clock;

static double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// A request inside the engine: its handle, cache, sampler and streaming state.
struct Engine::Running {
  std::shared_ptr<RequestHandle> handle;
  RequestParams params;
  Clock::time_point submitted;
  // The sequence so far: the prompt, then every generated token (the last one, `pending`, not yet
  // in the cache). The cache holds its first cache->length() tokens.
  std::vector<int32_t> context;
  std::optional<KvCache> cache;  // paged, from the engine's pool
  std::optional<Sampler> sampler;
  std::optional<StopMatcher> stops;
  std::optional<StreamDecoder> detok;
  int64_t max_new = 0;
  int32_t pending = -1;   // the sampled token the next decode step feeds the model
  // Prefill: context[0, prefill_end) go into the cache, a chunk per step; `prefilled` are in. A
  // fresh request prefills its prompt; a preempted one its prompt and every generated token.
  int64_t prefilled = 0, prefill_end = 0;
  bool prefilling() const { return prefilled < prefill_end; }
  // Shared prompts: the request whose prefill this one waits for, to fork its cache (null: none).
  Running* leader = nullptr;
  bool first = true;
  Clock::time_point last_token;  // when the previous token was streamed
  // MTP self-speculative decoding: the MTP module's own KV cache, and its guess of the token
  // after `pending` (-1: none yet), which the next step verifies.
  bool spec = false;
  std::optional<KvCache> mtp_cache;
  int32_t draft = -1;
};

void LatencyHistogram::observe(double seconds) {
  size_t i = 0;
  while (i + 1 < kBuckets && seconds > kBounds[i]) ++i;
  ++counts[i];
  ++count;
  sum += seconds;
}

bool RequestHandle::next(TokenEvent& event, bool& got_event, bool& done, int timeout_ms) {
  std::unique_lock<std::mutex> lock(mu_);
  got_event = false;
  done = false;
  if (!cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms), [&] { return !events_.empty() || finished_; }))
    return false;
  if (!events_.empty()) {
    event = std::move(events_.front());
    events_.pop_front();
    got_event = true;
  }
  done = finished_ && events_.empty();
  return true;
}

RequestResult RequestHandle::wait() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return finished_; });
  events_.clear();
  return result_;
}

Engine::Engine(Model& model, const Tokenizer& tokenizer, EngineOptions options)
    : model_(model), tok_(tokenizer), opt_(options) {
  FATHOM_CHECK(opt_.max_batch >= 1 && opt_.max_batch <= 1024, "engine: max_batch ", opt_.max_batch,
               " is out of range (1 to 1024)");
  FATHOM_CHECK(opt_.prefill_chunk >= 1, "engine: prefill_chunk ", opt_.prefill_chunk, " must be at least 1");
  FATHOM_CHECK(opt_.max_kv_tokens >= 0, "engine: max_kv_tokens ", opt_.max_kv_tokens, " must not be negative");
  FATHOM_CHECK(opt_.max_queue >= 0 && opt_.max_queue <= 1000000, "engine: max_queue ", opt_.max_queue,
               " is out of range (0 to 1000000)");
  FATHOM_CHECK(opt_.trace_steps >= 0 && opt_.trace_steps <= 1000000, "engine: trace_steps ", opt_.trace_steps,
               " is out of range (0 to 1000000)");
  for (int64_t id : model.config().eos_token_ids) eos_.push_back(int32_t(id));
  if (auto e = tokenizer.eos_id()) eos_.push_back(*e);
  std::sort(eos_.begin(), eos_.end());
  eos_.erase(std::unique(eos_.begin(), eos_.end()), eos_.end());
  vocab_ = model.config().vocab_size;
  max_pos_ = model.config().max_position_embeddings;
  const int bs = opt_.kv_block_size;
  FATHOM_CHECK(bs >= 1 && bs <= 4096, "engine: kv_block_size ", bs, " is out of range (1 to 4096)");
  int64_t tokens = opt_.max_kv_tokens;
  if (tokens == 0) {
    if (model.kv_budget_tokens() > 0) {
      // the GPU budget; with MTP drafting, a share kept for the MTP module's own (one-layer,
      // contiguous) caches
      tokens = model.kv_budget_tokens();
      if (opt_.speculative && model.has_mtp())
        tokens = (tokens - 1) * model.config().num_hidden_layers / (model.config().num_hidden_layers + 1);
    } else {  // host memory: max_batch full contexts, at most 1 GiB
      const int64_t token_bytes = KvCache::bytes_per_token_per_layer(model.config(), model.options().mla_mode, 4) *
                                  model.config().num_hidden_layers;
      tokens = std::min<int64_t>(int64_t(opt_.max_batch) * max_pos_, (int64_t(1) << 30) / token_bytes);
    }
    tokens = std::max<int64_t>(tokens / bs * bs, bs);
  }
  tokens = (tokens + bs - 1) / bs * bs;  // whole blocks
  if (opt_.speculative && model.has_mtp() && model.kv_budget_tokens() > 0) {
    const int64_t L = model.config().num_hidden_layers;
    FATHOM_CHECK(tokens + (tokens + L - 1) / L <= model.kv_budget_tokens(), "a KV cache of ", tokens,
                 " tokens and the MTP module's caches of as many positions (one layer) need room for ",
                 tokens + (tokens + L - 1) / L, " tokens, but the GPU memory budget leaves ", model.kv_budget_tokens(),
                 "; lower --max-kv-tokens or raise --gpu-memory");
  }
  pool_ = model.new_block_pool(tokens, bs);
  // MTP drafting: the module's one-layer caches are paged too, as many positions as the main
  // cache's (their length follows the main cache's)
  if (opt_.speculative && model.has_mtp()) mtp_pool_ = model.new_block_pool(tokens, bs, /*mtp=*/true);
  kv_tokens_total_ = tokens;
  stats_.kv_capacity = tokens;
  rate_mark_ = Clock::now();
  waker_ = std::thread([this] { wake_loop(); });
  thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  {
    std::lock_guard<std::mutex> lock(wake_mu_);
    wake_stop_ = true;
  }
  wake_cv_.notify_all();
  if (waker_.joinable()) waker_.join();
}

void Engine::hand_over_wakes() {
  if (to_wake_.empty()) return;
  {
    std::lock_guard<std::mutex> lock(wake_mu_);
    waking_.insert(waking_.end(), to_wake_.begin(), to_wake_.end());
  }
  to_wake_.clear();
  wake_cv_.notify_one();
}

void Engine::wake_loop() {
  std::vector<std::shared_ptr<RequestHandle>> now;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(wake_mu_);
      wake_cv_.wait(lock, [&] { return wake_stop_ || !waking_.empty(); });
      if (waking_.empty()) return;  // stopping, and every hand-over done
      now.swap(waking_);
    }
    for (const auto& h : now) h->cv_.notify_all();
    now.clear();
  }
}

std::shared_ptr<RequestHandle> Engine::submit(RequestParams params) {
  params.options.validate();
  FATHOM_CHECK(!params.prompt.empty(), "the prompt is empty (no tokens)");
  model_.check_ids(params.prompt, "prompt");
  const int64_t n = int64_t(params.prompt.size());
  FATHOM_CHECK(n < max_pos_, "the prompt has ", n, " tokens, which leaves no room in the model's context of ",
               max_pos_, " tokens");
  FATHOM_CHECK(n <= kv_tokens_total_, "the prompt has ", n, " tokens but the server's KV cache holds ",
               kv_tokens_total_, " tokens in all");
  FATHOM_CHECK(params.top_logprobs >= -1 && params.top_logprobs <= 20, "top_logprobs ", params.top_logprobs,
               " is out of range (0 to 20)");
  auto r = std::make_unique<Running>();
  r->handle = std::make_shared<RequestHandle>();
  r->params = std::move(params);
  r->submitted = Clock::now();
  r->max_new = std::min<int64_t>(r->params.options.max_tokens, max_pos_ - n);
  r->context = r->params.prompt;
  r->prefill_end = n;
  r->handle->result_.prompt_tokens = n;
  auto h = r->handle;
  {
    std::lock_guard<std::mutex> lock(mu_);
    FATHOM_CHECK(!stop_, "the engine is shutting down");
    if (int64_t(waiting_.size()) >= opt_.max_queue)
      throw EngineBusy(cat("the server is busy: ", waiting_.size(), " requests are already waiting (the limit is ",
                           opt_.max_queue, "); retry later"));
    waiting_.push_back(std::move(r));
    ++stats_.waiting;
  }
  cv_.notify_all();
  return h;
}

EngineStats Engine::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

std::vector<StepRecord> Engine::step_trace() const {
  std::lock_guard<std::mutex> lock(mu_);
  return std::vector<StepRecord>(trace_.begin(), trace_.end());
}

void Engine::finish(Running& r, const std::string& reason, const std::string& error) {
  if (reason != "cancelled" && reason != "error" && r.stops && r.detok && !r.stops->stopped()) {
    // what the stream decoder and the stop matcher still held back
    std::string tail = r.stops->push(r.detok->flush());
    if (!r.stops->stopped()) tail += r.stops->flush();
    if (!tail.empty()) {
      std::lock_guard<std::mutex> lock(r.handle->mu_);
      r.handle->result_.text += tail;
      TokenEvent e;
      e.id = -1;  // no token: text released at the end
      e.text = std::move(tail);
      r.handle->events_.push_back(std::move(e));
    }
  }
  {
    std::lock_guard<std::mutex> lock(r.handle->mu_);
    r.handle->result_.finish_reason = reason;
    r.handle->result_.error = error;
    r.handle->finished_ = true;
  }
  r.handle->cv_.notify_all();
  if (!chaining_) {  // the KV cache's blocks go back now, not when the handle dies (a chained step
    // still running on the cache: when drop_finished drops the request)
    r.cache.reset();
    r.mtp_cache.reset();
  }
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.requests_finished;
}

bool Engine::device_samples(const Running& r) {
  const SamplingParams& p = r.sampler->params();
  return r.params.top_logprobs < 0 && p.repetition_penalty == 1.0f && p.presence_penalty == 0.0f &&
         p.frequency_penalty == 0.0f;
}

bool Engine::ends_by_eos(const Running& r, int32_t id) const {
  return !r.params.options.ignore_eos && std::binary_search(eos_.begin(), eos_.end(), id);
}

bool Engine::take_token(Running& r, int32_t id, const float* logits) {
  RequestHandle& h = *r.handle;
  const Clock::time_point now = Clock::now();
  {
    const double latency = std::chrono::duration<double>(now - (r.first ? r.submitted : r.last_token)).count();
    std::lock_guard<std::mutex> lock(mu_);
    (r.first ? stats_.ttft : stats_.inter_token).observe(latency);
  }
  r.last_token = now;
  if (r.first) {
    r.first = false;
    std::lock_guard<std::mutex> lock(h.mu_);
    h.result_.ttft_seconds = seconds_since(r.submitted);
  }
  if (ends_by_eos(r, id)) {
    finish(r, "stop");
    return false;
  }
  TokenEvent e;
  e.id = id;
  if (r.params.top_logprobs >= 0 && logits) e.logprobs = r.sampler->last_logprobs(id, r.params.top_logprobs);
  e.text = r.stops->push(r.detok->push(id));
  {
    std::lock_guard<std::mutex> lock(h.mu_);
    h.result_.ids.push_back(id);
    h.result_.text += e.text;
    h.events_.push_back(std::move(e));
  }
  r.context.push_back(id);
  if (to_wake_.empty() || to_wake_.back() != r.handle) to_wake_.push_back(r.handle);  // after the step
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.tokens_generated;
  }
  if (r.stops->stopped()) {
    finish(r, "stop");
    return false;
  }
  if (int64_t(h.result_.ids.size()) >= r.max_new) {
    finish(r, "length");
    return false;
  }
  r.pending = id;
  return true;
}

void Engine::admit(std::vector<std::unique_ptr<Running>>& batch, std::vector<std::unique_ptr<Running>>& fresh) {
  // A newcomer gets its cache, sampler and stream state now; its prompt is prefilled by the
  // steps that follow, a chunk at a time beside the others' decoding (loop()). A preempted
  // request comes back with its state and recomputes its cache the same way.
  for (auto& r : fresh) {
    try {
      const bool resumed = bool(r->sampler);
      r->spec = opt_.speculative && model_.has_mtp();
      r->cache.emplace(pool_);
      r->prefilled = 0;
      r->draft = -1;
      if (r->spec) r->mtp_cache.emplace(mtp_pool_);
      // the same sequence as one being prefilled: wait for it, then fork its cache (Engine::step)
      for (auto& o : batch)
        if (!o->leader && o->prefilling() && o->prefill_end == r->prefill_end && o->context == r->context) {
          r->leader = o.get();
          break;
        }
      if (opt_.prefix_caching && !r->leader) {
        // published blocks of this sequence's start, leaving at least its last token to run
        // (its logits give the next token)
        const int64_t hit = r->cache->attach_prefix(r->context, r->prefill_end - 1);
        r->prefilled = hit;
        if (r->spec) {
          // and the MTP module's blocks of the same positions (keyed by the sequence shifted by
          // one: position p combines token p + 1); both caches start where both have the blocks
          const int64_t mtp_hit =
              r->mtp_cache->attach_prefix(r->context, hit, mtp_prefix_root(r->context[0]), /*shift=*/1);
          if (mtp_hit < hit) {
            r->cache->truncate(mtp_hit);
            pool_->count_lookup(0, mtp_hit - hit);  // recomputed after all
            r->prefilled = mtp_hit;
          }
        }
      }
      if (!resumed) {
        r->sampler.emplace(r->params.options.sampling);
        r->stops.emplace(r->params.options.stop);
        r->detok.emplace(tok_, /*skip_special=*/true);
        std::lock_guard<std::mutex> lock(r->handle->mu_);
        r->handle->result_.queue_seconds = seconds_since(r->submitted);
      }
      batch.push_back(std::move(r));
    } catch (const std::exception& e) {
      finish(*r, "error", e.what());
    }
  }
  fresh.clear();
}

void Engine::preempt(std::unique_ptr<Running> r) {
  r->cache.reset();
  r->mtp_cache.reset();
  r->draft = -1;
  r->leader = nullptr;
  // recompute everything the cache held, and the pending token: prefilling it gives the logits
  // its decoding step would have
  r->prefilled = 0;
  r->prefill_end = int64_t(r->context.size());
  std::lock_guard<std::mutex> lock(mu_);
  waiting_.push_front(std::move(r));
  ++stats_.preemptions;
  stats_.waiting = int64_t(waiting_.size());
}

void Engine::plan(std::vector<std::unique_ptr<Running>>& batch, std::vector<Running*>& rows,
                  std::vector<std::vector<int32_t>>& tokens, std::vector<KvCache*>& caches,
                  std::vector<int64_t>& want) {
  for (;;) {
    // Every decoding request feeds its pending token (and its draft, when it has one); prefilling
    // requests feed their next prompt chunk, within prefill_chunk tokens per step in all (the
    // oldest first, at least one chunk per step), so a long prompt never stalls the others for
    // more than a chunk's worth of work. Requests waiting for a shared prompt feed nothing.
    rows.clear();
    tokens.clear();
    caches.clear();
    want.clear();
    int64_t budget = opt_.prefill_chunk, blocks = 0, mtp_blocks = 0;
    for (auto& r : batch) {
      if (r->leader) continue;
      if (r->prefilling()) {
        if (budget <= 0) continue;
        const int64_t take = std::min(r->prefill_end - r->prefilled, budget);
        budget -= take;
        tokens.emplace_back(r->context.begin() + r->prefilled, r->context.begin() + r->prefilled + take);
        want.push_back(r->spec ? take : 1);  // the MTP module needs every position's hidden state
        if (r->spec && r->prefilled + take == r->prefill_end)
          for (const auto& f : batch)  // a follower forks r's MTP cache and writes this chunk into it
            if (f->leader == r.get()) mtp_blocks += r->mtp_cache->blocks_needed(take) + 1;
      } else if (r->draft >= 0 && r->cache->length() + 2 <= max_pos_) {
        tokens.push_back({r->pending, r->draft});
        want.push_back(2);
      } else {
        tokens.push_back({r->pending});
        want.push_back(1);
      }
      blocks += r->cache->blocks_needed(int64_t(tokens.back().size()));
      // the MTP module takes as many positions as the step feeds (or fewer: a rejected draft)
      if (r->spec) mtp_blocks += r->mtp_cache->blocks_needed(int64_t(tokens.back().size()));
      caches.push_back(&*r->cache);
      rows.push_back(r.get());
    }
    if (blocks <= pool_->free_blocks() && (!mtp_pool_ || mtp_blocks <= mtp_pool_->free_blocks())) return;
    // Not enough blocks: the request admitted last gives its own back and waits again. Alone, a
    // request that still does not fit has outgrown the whole cache: it ends there.
    size_t victim = batch.size();
    for (size_t i = batch.size(); i-- > 0;)
      if (!batch[i]->leader) {
        victim = i;
        break;
      }
    FATHOM_ASSERT(victim < batch.size(), "a step without rows cannot lack blocks");
    bool alone = true;
    for (size_t i = 0; i < batch.size(); ++i) alone = alone && (i == victim || batch[i]->leader);
    for (auto& o : batch)
      if (o->leader == batch[victim].get()) o->leader = nullptr;  // they prefill on their own
    if (alone) {
      Running& v = *batch[victim];
      if (v.prefilling())
        finish(v, "error", cat("the sequence of ", v.prefill_end, " tokens does not fit the KV cache of ",
                               kv_tokens_total_, " tokens"));
      else
        finish(v, "length");
    } else {
      preempt(std::move(batch[victim]));
    }
    batch.erase(batch.begin() + int64_t(victim));
    if (batch.empty()) {
      rows.clear();
      return;
    }
  }
}

bool Engine::step(const std::vector<std::unique_ptr<Running>>& batch, const std::vector<Running*>& rows,
                  const std::vector<std::vector<int32_t>>& tokens, const std::vector<KvCache*>& caches,
                  const std::vector<int64_t>& want) {
  bool any_spec = false;
  for (const Running* r : rows) any_spec = any_spec || r->spec;
  // A step of plain decoding whose requests need nothing of the logits but the token (no
  // penalties, no logprobs) samples where the logits are (on the GPU for CUDA): B ids come back
  // instead of B rows of logits, and each sampler's next_row() draws the number sample() would.
  bool on_device = !any_spec;
  for (const Running* r : rows) on_device = on_device && !r->prefilling() && device_samples(*r);
  std::vector<int32_t> device_ids;
  Model::BatchRows out;
  std::vector<SampleRow> srows;
  if (on_device)
    for (Running* r : rows) srows.push_back(r->sampler->next_row());
  const Clock::time_point model_start = Clock::now();
  if (any_spec) {
    out = model_.forward_batch_rows(tokens, caches, want);
  } else if (on_device) {
    device_ids = model_.forward_batch_sample(tokens, caches, srows);
  } else {
    out.logits = model_.forward_batch(tokens, caches);  // want is 1 everywhere: the last rows
  }
  double model_s = std::chrono::duration<double>(Clock::now() - model_start).count();
  const int64_t D = model_.config().hidden_size;
  int64_t prompt_tokens = 0, drafts = 0, accepted = 0, forked = 0;
  // what the MTP module takes next, per drafting request: the tokens that followed the positions
  // just run, and those positions' hidden states
  std::vector<std::vector<int32_t>> mtp_next;
  std::vector<KvCache*> mtp_caches;
  std::vector<Running*> mtp_rows;
  std::vector<float> mtp_h;
  auto feed_mtp = [&](Running& r, std::vector<int32_t> next, int64_t row0) {
    if (r.handle->finished_ || next.empty()) return;
    const float* h = out.hidden.ptr<float>() + row0 * D;
    mtp_h.insert(mtp_h.end(), h, h + int64_t(next.size()) * D);
    mtp_next.push_back(std::move(next));
    mtp_caches.push_back(&*r.mtp_cache);
    mtp_rows.push_back(&r);
  };
  auto sample = [&](Running& r, const float* row) {
    return r.sampler->sample(row, vocab_, r.params.prompt, r.handle->result_.ids);
  };
  int64_t row0 = 0;  // the first returned row of sequence b
  for (size_t b = 0; b < rows.size(); row0 += want[b], ++b) {
    Running& r = *rows[b];
    auto logits_row = [&](int64_t i) { return out.logits.ptr<float>() + (row0 + i) * vocab_; };
    if (r.prefilling()) {
      const int64_t s0 = r.prefilled, k = int64_t(tokens[b].size()), n = r.prefill_end;
      r.prefilled += k;
      prompt_tokens += k;
      std::vector<int32_t> next(r.context.begin() + s0 + 1, r.context.begin() + std::min(s0 + k + 1, n));
      if (r.prefilling()) {  // more of the prompt next step
        if (r.spec) feed_mtp(r, std::move(next), row0);
        continue;
      }
      const float* row = logits_row(want[b] - 1);
      // requests waiting for this prompt fork its cache now, before this one's token (which may
      // finish it), and draw their own first token from the same logits
      for (const auto& f : batch)
        if (f->leader == &r) {
          f->leader = nullptr;
          f->cache.emplace(r.cache->fork());
          f->prefilled = f->prefill_end;
          ++forked;
          take_token(*f, sample(*f, row), row);
          if (f->spec) {
            // the MTP positions before this chunk are r's; the chunk's it computes itself, its
            // last one combining its own first token
            f->mtp_cache.emplace(r.mtp_cache->fork());
            if (!f->handle->finished_) {
              std::vector<int32_t> own = next;
              own.push_back(f->pending);
              feed_mtp(*f, std::move(own), row0);
            }
          }
        }
      take_token(r, sample(r, row), row);
      if (r.spec && !r.handle->finished_) {
        next.push_back(r.pending);  // the last prompt position's next token: the one just sampled
        feed_mtp(r, std::move(next), row0);
      }
      continue;
    }
    if (tokens[b].size() == 1) {  // plain decoding
      if (on_device) {
        take_token(r, device_ids[b], nullptr);
        continue;
      }
      const float* row = logits_row(0);
      take_token(r, sample(r, row), row);
      if (r.spec) feed_mtp(r, {r.pending}, row0);
      continue;
    }
    // Verifying the draft d = tokens[b][1]: the main model's token at the pending position is
    // drawn as plain decoding would (the sampler's next number); if it is d, d stands and the
    // logits after d give one more token in the same step. Drawn this way — accept exactly when
    // the draw equals the draft — the output is the plain decoder's, token for token and, for
    // temperature > 0, in distribution (the draft is accepted with probability p(d), else the
    // token is a draw from p without d: rejection sampling against a one-hot draft).
    const int32_t d = tokens[b][1];
    ++drafts;
    const float* row0p = logits_row(0);
    const int32_t a = sample(r, row0p);
    if (a == d) {
      ++accepted;
      if (!take_token(r, d, row0p)) continue;
      const float* row1 = logits_row(1);
      take_token(r, sample(r, row1), row1);
      feed_mtp(r, {d, r.pending}, row0);
    } else {
      r.cache->truncate(r.cache->length() - 1);  // the draft's position goes
      if (!take_token(r, a, row0p)) continue;
      feed_mtp(r, {r.pending}, row0);
    }
  }
  for (Running* r : rows) r->draft = -1;
  if (!mtp_rows.empty()) {
    const Tensor h = Tensor::view(mtp_h.data(), {int64_t(mtp_h.size()) / D, D}, DType::F32, nullptr);
    const Clock::time_point mtp_start = Clock::now();
    const Tensor draft_logits = model_.mtp_step(mtp_next, h, mtp_caches);
    model_s += std::chrono::duration<double>(Clock::now() - mtp_start).count();
    for (size_t i = 0; i < mtp_rows.size(); ++i) {
      Running& r = *mtp_rows[i];
      if (r.prefilling() || r.handle->finished_) continue;
      const float* row = draft_logits.ptr<float>() + int64_t(i) * vocab_;
      r.draft = int32_t(std::max_element(row, row + vocab_) - row);  // the MTP module's greedy guess
    }
  }
  // blocks now full of known tokens go to the prefix cache (the MTP module's keyed by the
  // sequence shifted by one)
  if (opt_.prefix_caching)
    for (const auto& r : batch) {
      if (r->handle->finished_) continue;
      if (r->cache) r->cache->publish(r->context);
      if (r->mtp_cache) r->mtp_cache->publish(r->context, mtp_prefix_root(r->context[0]), /*shift=*/1);
    }
  std::lock_guard<std::mutex> lock(mu_);
  stats_.prompt_tokens += prompt_tokens;
  stats_.spec_drafts += drafts;
  stats_.spec_accepted += accepted;
  if (on_device) stats_.device_sampled += int64_t(rows.size());
  stats_.forked_prompts += forked;
  if (on_device) stats_.decode_model_seconds += model_s;
  return on_device;
}

bool Engine::chainable(const std::vector<std::unique_ptr<Running>>& batch, const std::vector<Running*>& rows) {
  if (rows.empty() || rows.size() != batch.size()) return false;
  for (const Running* r : rows)
    if (r->spec || r->prefilling() || r->leader || !r->cache || r->handle->finished_ || r->handle->cancelled() ||
        !device_samples(*r))
      return false;
  if (pool_->free_blocks() < int64_t(rows.size())) return false;  // a new block for each, at most
  std::lock_guard<std::mutex> lock(mu_);
  return waiting_.empty() && !stop_;
}

// A chain of plain decoding steps (Engine::chainable held for rows, every request of the batch
// with its pending token): step k + 1 is launched (Model::decode_launch: its tokens are step k's,
// its room the next position of each cache) before step k's tokens are handed out — detokenized,
// matched against stop strings, given to the requests — so that work runs beside the device's.
// The chain stops (no launch after a step) when chainable fails or a request ends at that step
// by EOS or length; a request a stop string ends while the next step runs has that step's token
// dropped (its cache stays until drop_finished: chaining_).
void Engine::decode_chain(const std::vector<std::unique_ptr<Running>>& batch, const std::vector<Running*>& rows) {
  std::vector<KvCache*> caches;
  std::vector<int32_t> next;
  for (Running* r : rows) caches.push_back(&*r->cache), next.push_back(r->pending);
  auto sample_rows = [&] {
    std::vector<SampleRow> s;
    for (Running* r : rows) s.push_back(r->sampler->next_row());
    return s;
  };
  auto ends_here = [&](const Running& r, int32_t id) {  // take_token would finish r with id
    return ends_by_eos(r, id) || int64_t(r.handle->result_.ids.size()) + 1 >= r.max_new;
  };
  // chaining_ for this call, and no step left running on the caches, whatever leaves it (an
  // error: the caller finishes the requests, which frees their caches)
  struct Chaining {
    Engine& e;
    bool launched = false;
    explicit Chaining(Engine& en) : e(en) { e.chaining_ = true; }
    ~Chaining() {
      if (launched) try {
          e.model_.decode_wait();
        } catch (...) {  // the error that brought us here is the one to report
        }
      e.chaining_ = false;
    }
  } chaining(*this);
  double model_s = 0;
  // launches the step of these tokens; its record (EngineOptions::trace_steps) so far
  auto launch = [&](const std::vector<int32_t>& tokens) {
    StepRecord r;
    r.launched = Clock::now();
    r.batch = int32_t(rows.size());
    model_.decode_launch(tokens, caches, sample_rows());
    chaining.launched = true;
    r.launch_seconds = seconds_since(r.launched);
    model_s += r.launch_seconds;
    return r;
  };
  Clock::time_point step_start = Clock::now();
  StepRecord rec = launch(next), next_rec;  // this step's record and, once launched, the next one's
  for (bool more = true; more;) {
    const Clock::time_point t = Clock::now();
    chaining.launched = false;
    const std::vector<int32_t> ids = model_.decode_wait();
    rec.back = Clock::now();
    rec.wait_seconds = std::chrono::duration<double>(rec.back - t).count();
    model_s += rec.wait_seconds;
    more = chainable(batch, rows);
    for (size_t b = 0; b < rows.size() && more; ++b) more = !ends_here(*rows[b], ids[b]);
    if (more) next_rec = launch(ids);
    for (size_t b = 0; b < rows.size(); ++b)
      if (!rows[b]->handle->finished_) take_token(*rows[b], ids[b], nullptr);  // (ended: dropped)
    hand_over_wakes();
    if (opt_.prefix_caching)
      for (Running* r : rows)
        if (!r->handle->finished_) r->cache->publish(r->context);
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++stats_.steps;
      ++stats_.decode_steps;
      stats_.chained_steps += more;  // the next step was launched before these tokens went out
      stats_.device_sampled += int64_t(rows.size());
      stats_.decode_model_seconds += model_s;
      const Clock::time_point now = Clock::now();
      stats_.decode_step_seconds += std::chrono::duration<double>(now - step_start).count();
      step_start = now;
      if (opt_.trace_steps > 0) {
        if (int64_t(trace_.size()) >= opt_.trace_steps) trace_.pop_front();
        trace_.push_back(rec);
      }
    }
    rec = next_rec;
    model_s = 0;
    publish(batch);
  }
}

void Engine::drop_finished(std::vector<std::unique_ptr<Running>>& batch) {
  // a request whose leader is gone (finished, cancelled) prefills its prompt itself
  for (auto& r : batch)
    if (r->leader && (r->leader->handle->finished_ || r->handle->finished_)) r->leader = nullptr;
  batch.erase(std::remove_if(batch.begin(), batch.end(), [](const auto& r) { return r->handle->finished_; }),
              batch.end());
}

void Engine::publish(const std::vector<std::unique_ptr<Running>>& batch) {
  std::lock_guard<std::mutex> lock(mu_);
  stats_.running = int64_t(batch.size());
  const int64_t bs = pool_->block_size();
  stats_.kv_tokens = pool_->used_blocks() * bs;
  stats_.kv_cached_tokens = pool_->cached_blocks() * bs;
  const KvPoolStats& ps = pool_->stats();
  stats_.prefix_query_tokens = ps.prefix_query_tokens;
  stats_.prefix_hit_tokens = ps.prefix_hit_tokens;
  stats_.cow_copies = ps.cow_copies;
  const Clock::time_point now = Clock::now();
  const double dt = std::chrono::duration<double>(now - rate_mark_).count();
  if (dt >= 1.0) {
    stats_.tokens_per_second = double(stats_.tokens_generated - rate_tokens_) / dt;
    rate_mark_ = now;
    rate_tokens_ = stats_.tokens_generated;
  }
}

void Engine::loop() {
  std::vector<std::unique_ptr<Running>> batch, fresh;
  for (;;) {
    Clock::time_point busy;  // from here (work to do) to the end of the step
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !waiting_.empty() || !batch.empty(); });
      if (stop_) break;
      busy = Clock::now();
      // Admission: a place in the batch, and free blocks for the prompt (not counting prefix
      // hits) beyond one block of headroom per running request; the first request always.
      int64_t free = pool_->free_blocks() - int64_t(batch.size());
      const int64_t bs = pool_->block_size();
      while (!waiting_.empty() && int(batch.size() + fresh.size()) < opt_.max_batch) {
        const Running& w = *waiting_.front();
        const int64_t need = (w.prefill_end + bs - 1) / bs;
        if (need > free && !(batch.empty() && fresh.empty())) break;
        free -= need;
        fresh.push_back(std::move(waiting_.front()));
        waiting_.pop_front();
      }
      stats_.waiting = int64_t(waiting_.size());
    }
    // cancelled while waiting: never prefilled
    for (auto& r : fresh)
      if (r->handle->cancelled()) finish(*r, "cancelled");
    fresh.erase(std::remove_if(fresh.begin(), fresh.end(), [](const auto& r) { return r->handle->finished_; }),
                fresh.end());
    if (!fresh.empty()) admit(batch, fresh);
    for (auto& r : batch)
      if (r->handle->cancelled()) finish(*r, "cancelled");
    drop_finished(batch);
    publish(batch);
    if (batch.empty()) continue;
    std::vector<std::vector<int32_t>> tokens;
    std::vector<KvCache*> caches;
    std::vector<Running*> rows;
    std::vector<int64_t> want;  // rows of each sequence whose logits (and hidden states) come back
    plan(batch, rows, tokens, caches, want);
    bool plain = false, chained = false;  // a step of plain decoding sampled on the device; a chain of them
    if (!rows.empty()) {
      try {
        bool one_each = true;
        for (const auto& t : tokens) one_each = one_each && t.size() == 1;
        if (one_each && chainable(batch, rows)) {
          chained = true;
          decode_chain(batch, rows);  // counts its own steps
        } else {
          plain = step(batch, rows, tokens, caches, want);
        }
      } catch (const std::exception& e) {
        for (Running* r : rows) finish(*r, "error", e.what());
      }
      hand_over_wakes();  // the requests that got tokens (a separate thread makes the calls)
    }
    drop_finished(batch);
    publish(batch);
    if (!chained) {
      std::lock_guard<std::mutex> lock(mu_);
      ++stats_.steps;
      if (plain) {
        ++stats_.decode_steps;
        stats_.decode_step_seconds += std::chrono::duration<double>(Clock::now() - busy).count();
      }
    }
  }
  // shutting down: whatever is left ends "cancelled"
  for (auto& r : batch) finish(*r, "cancelled");
  for (auto& r : fresh) finish(*r, "cancelled");
  std::deque<std::unique_ptr<Running>> left;
  {
    std::lock_guard<std::mutex> lock(mu_);
    left.swap(waiting_);
  }
  for (auto& r : left) finish(*r, "cancelled");
}

}  // namespace fathom::serve
