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
  std::optional<KvCache> cache;
  std::optional<Sampler> sampler;
  std::optional<StopMatcher> stops;
  std::optional<StreamDecoder> detok;
  int64_t max_new = 0;
  int32_t pending = -1;   // the sampled token the next decode step feeds the model
  int64_t prefilled = 0;  // prompt tokens in the cache so far (chunked prefill)
  bool first = true;
  // MTP self-speculative decoding: the MTP module's own KV cache, and its guess of the token
  // after `pending` (-1: none yet), which the next step verifies.
  bool spec = false;
  std::optional<KvCache> mtp_cache;
  int32_t draft = -1;
};

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
  for (int64_t id : model.config().eos_token_ids) eos_.push_back(int32_t(id));
  if (auto e = tokenizer.eos_id()) eos_.push_back(*e);
  std::sort(eos_.begin(), eos_.end());
  eos_.erase(std::unique(eos_.begin(), eos_.end()), eos_.end());
  vocab_ = model.config().vocab_size;
  max_pos_ = model.config().max_position_embeddings;
  thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

std::shared_ptr<RequestHandle> Engine::submit(RequestParams params) {
  params.options.validate();
  FATHOM_CHECK(!params.prompt.empty(), "the prompt is empty (no tokens)");
  model_.check_ids(params.prompt, "prompt");
  const int64_t n = int64_t(params.prompt.size());
  FATHOM_CHECK(n < max_pos_, "the prompt has ", n, " tokens, which leaves no room in the model's context of ",
               max_pos_, " tokens");
  FATHOM_CHECK(params.top_logprobs >= -1 && params.top_logprobs <= 20, "top_logprobs ", params.top_logprobs,
               " is out of range (0 to 20)");
  auto r = std::make_unique<Running>();
  r->handle = std::make_shared<RequestHandle>();
  r->params = std::move(params);
  r->submitted = Clock::now();
  r->max_new = std::min<int64_t>(r->params.options.max_tokens, max_pos_ - n);
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
  r.cache.reset();  // the KV cache's memory goes back now, not when the handle dies
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.requests_finished;
}

bool Engine::take_token(Running& r, int32_t id, const float* logits) {
  RequestHandle& h = *r.handle;
  if (r.first) {
    r.first = false;
    std::lock_guard<std::mutex> lock(h.mu_);
    h.result_.ttft_seconds = seconds_since(r.submitted);
  }
  if (!r.params.options.ignore_eos && std::binary_search(eos_.begin(), eos_.end(), id)) {
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
  h.cv_.notify_all();
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
  // steps that follow, a chunk at a time beside the others' decoding (loop()).
  for (auto& r : fresh) {
    try {
      const int64_t n = int64_t(r->params.prompt.size());
      r->spec = opt_.speculative && model_.has_mtp();
      // + 1 when drafting: a draft verified past the last token, room the context may not have
      // (then the last steps decode plainly: loop() feeds a draft only while it fits)
      const int64_t need = n + r->max_new + (r->spec && n + r->max_new < max_pos_ ? 1 : 0);
      r->cache.emplace(model_.new_cache(need));
      if (r->spec) r->mtp_cache.emplace(model_.new_mtp_cache(need));
      r->sampler.emplace(r->params.options.sampling);
      r->stops.emplace(r->params.options.stop);
      r->detok.emplace(tok_, /*skip_special=*/true);
      {
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

void Engine::step(const std::vector<Running*>& rows, const std::vector<std::vector<int32_t>>& tokens,
                  const std::vector<KvCache*>& caches, const std::vector<int64_t>& want) {
  bool any_spec = false;
  for (const Running* r : rows) any_spec = any_spec || r->spec;
  Model::BatchRows out;
  if (any_spec) {
    out = model_.forward_batch_rows(tokens, caches, want);
  } else {
    out.logits = model_.forward_batch(tokens, caches);  // want is 1 everywhere: the last rows
  }
  const int64_t D = model_.config().hidden_size;
  int64_t prompt_tokens = 0, drafts = 0, accepted = 0;
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
  int64_t row0 = 0;  // the first returned row of sequence b
  for (size_t b = 0; b < rows.size(); row0 += want[b], ++b) {
    Running& r = *rows[b];
    const int64_t n = int64_t(r.params.prompt.size());
    auto logits_row = [&](int64_t i) { return out.logits.ptr<float>() + (row0 + i) * vocab_; };
    if (r.prefilled < n) {
      const int64_t s0 = r.prefilled, k = int64_t(tokens[b].size());
      r.prefilled += k;
      prompt_tokens += k;
      std::vector<int32_t> next(r.params.prompt.begin() + s0 + 1, r.params.prompt.begin() + std::min(s0 + k + 1, n));
      if (r.prefilled < n) {  // more of the prompt next step
        if (r.spec) feed_mtp(r, std::move(next), row0);
        continue;
      }
      const float* row = logits_row(want[b] - 1);
      take_token(r, r.sampler->sample(row, vocab_, r.params.prompt, r.handle->result_.ids), row);
      if (r.spec && !r.handle->finished_) {
        next.push_back(r.pending);  // the last prompt position's next token: the one just sampled
        feed_mtp(r, std::move(next), row0);
      }
      continue;
    }
    if (tokens[b].size() == 1) {  // plain decoding
      const float* row = logits_row(0);
      take_token(r, r.sampler->sample(row, vocab_, r.params.prompt, r.handle->result_.ids), row);
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
    const int32_t a = r.sampler->sample(row0p, vocab_, r.params.prompt, r.handle->result_.ids);
    if (a == d) {
      ++accepted;
      if (!take_token(r, d, row0p)) continue;
      const float* row1 = logits_row(1);
      take_token(r, r.sampler->sample(row1, vocab_, r.params.prompt, r.handle->result_.ids), row1);
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
    const Tensor draft_logits = model_.mtp_step(mtp_next, h, mtp_caches);
    for (size_t i = 0; i < mtp_rows.size(); ++i) {
      Running& r = *mtp_rows[i];
      if (r.prefilled < int64_t(r.params.prompt.size()) || r.handle->finished_) continue;
      const float* row = draft_logits.ptr<float>() + int64_t(i) * vocab_;
      r.draft = int32_t(std::max_element(row, row + vocab_) - row);  // the MTP module's greedy guess
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  stats_.prompt_tokens += prompt_tokens;
  stats_.spec_drafts += drafts;
  stats_.spec_accepted += accepted;
}

void Engine::publish(const std::vector<std::unique_ptr<Running>>& batch) {
  std::lock_guard<std::mutex> lock(mu_);
  stats_.running = int64_t(batch.size());
  stats_.kv_tokens = 0;
  for (const auto& r : batch) stats_.kv_tokens += r->cache ? r->cache->capacity() : 0;
}

void Engine::loop() {
  std::vector<std::unique_ptr<Running>> batch, fresh;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !waiting_.empty() || !batch.empty(); });
      if (stop_) break;
      // admission: a place in the batch, and room in the KV budget for prompt + max_tokens
      int64_t held = 0;
      for (const auto& r : batch) held += r->cache ? r->cache->capacity() : 0;
      while (!waiting_.empty() && int(batch.size() + fresh.size()) < opt_.max_batch) {
        const Running& w = *waiting_.front();
        const int64_t need = int64_t(w.params.prompt.size()) + w.max_new;
        if (opt_.max_kv_tokens > 0 && held + need > opt_.max_kv_tokens && !(batch.empty() && fresh.empty())) break;
        held += need;
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
    batch.erase(std::remove_if(batch.begin(), batch.end(), [](const auto& r) { return r->handle->finished_; }),
                batch.end());
    publish(batch);
    if (batch.empty()) continue;
    // One step: every decoding request feeds its pending token (and its draft, when it has one);
    // prefilling requests feed their next prompt chunk, within prefill_chunk prompt tokens per
    // step in all (the oldest first, and at least one chunk per step), so a long prompt never
    // stalls the others for more than a chunk's worth of work. One ragged forward pass runs them.
    std::vector<std::vector<int32_t>> tokens;
    std::vector<KvCache*> caches;
    std::vector<Running*> rows;
    std::vector<int64_t> want;  // rows of each sequence whose logits (and hidden states) come back
    int64_t budget = opt_.prefill_chunk;
    for (auto& r : batch) {
      const int64_t n = int64_t(r->params.prompt.size());
      if (r->prefilled < n) {
        if (budget <= 0) continue;
        const int64_t take = std::min(n - r->prefilled, budget);
        budget -= take;
        tokens.emplace_back(r->params.prompt.begin() + r->prefilled, r->params.prompt.begin() + r->prefilled + take);
        want.push_back(r->spec ? take : 1);  // the MTP module needs every position's hidden state
      } else if (r->draft >= 0 && r->cache->length() + 2 <= r->cache->capacity()) {
        tokens.push_back({r->pending, r->draft});
        want.push_back(2);
      } else {
        tokens.push_back({r->pending});
        want.push_back(1);
      }
      caches.push_back(&*r->cache);
      rows.push_back(r.get());
    }
    try {
      step(rows, tokens, caches, want);
    } catch (const std::exception& e) {
      for (Running* r : rows) finish(*r, "error", e.what());
    }
    batch.erase(std::remove_if(batch.begin(), batch.end(), [](const auto& r) { return r->handle->finished_; }),
                batch.end());
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++stats_.steps;
    }
    publish(batch);
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
