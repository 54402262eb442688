// The serving engine (src/serve/engine.h) and the OpenAI-compatible API over HTTP
// (src/serve/openai.h, src/serve/http.h), on the shipped fathom-mini model on the CPU: continuous
// batching gives each request the tokens it gets alone; stop strings, max_tokens, cancellation
// (its KV cache freed), a full queue; and the API's answers and its errors, through real sockets.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "engine/generator.h"
#include "fathom/model.h"
#include "fathom/tokenizer.h"
#include "serve/engine.h"
#include "serve/http.h"
#include "serve/openai.h"

namespace fathom::serve {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
const std::string kModel = std::string(FATHOM_SOURCE_DIR) + "/models/fathom-mini";

class Serve : public testing::Test {
 protected:
  static void SetUpTestSuite() {
    ModelOptions o;
    o.device = DeviceKind::Cpu;
    o.precision = Precision::Fp32;
    model_ = Model::load(kModel, o).release();
    tok_ = Tokenizer::load(kModel).release();
  }
  static void TearDownTestSuite() {
    delete model_;
    delete tok_;
  }
  static RequestParams greedy(const std::string& text, int64_t max_tokens) {
    RequestParams p;
    p.prompt = tok_->encode(text, true);
    p.options.max_tokens = max_tokens;
    p.options.sampling.temperature = 0.0f;
    return p;
  }
  // Waits (up to 10 s) for the engine to hold no request and no KV-cache position.
  static bool drains(const Engine& e) {
    const auto deadline = Clock::now() + std::chrono::seconds(10);
    while (Clock::now() < deadline) {
      const EngineStats s = e.stats();
      if (s.running == 0 && s.waiting == 0 && s.kv_tokens == 0) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return false;
  }
  // Waits (up to 10 s) for the request's first token.
  static bool first_token(RequestHandle& h) {
    const auto deadline = Clock::now() + std::chrono::seconds(10);
    TokenEvent e;
    bool got = false, done = false;
    while (!got && !done && Clock::now() < deadline) h.next(e, got, done, 100);
    return got;
  }
  static Model* model_;
  static Tokenizer* tok_;

 public:
  static Model* model() { return model_; }
  static Tokenizer* tokenizer() { return tok_; }
};
Model* Serve::model_ = nullptr;
Tokenizer* Serve::tok_ = nullptr;

const char* kPrompts[] = {"The list type in Python", "To create a new branch in Git,", "The Linux kernel",
                          "A dictionary maps keys", "The tar command", "In Python, a generator"};

// Each of kPrompts alone, greedy for n tokens past any EOS, through the plain one-sequence
// generator: what the engine must give each of them in a batch.
std::vector<std::vector<int32_t>> alone_greedy(int64_t n) {
  std::vector<std::vector<int32_t>> out;
  for (const char* p : kPrompts) {
    Generator g(*Serve::model(), *Serve::tokenizer());
    GenerateOptions o;
    o.max_tokens = n;
    o.sampling.temperature = 0.0f;
    o.ignore_eos = true;
    out.push_back(g.generate(Serve::tokenizer()->encode(p, true), o).ids);
  }
  return out;
}

// Every one of kPrompts, greedy for n tokens past any EOS, submitted to the engine at once.
std::vector<std::shared_ptr<RequestHandle>> submit_all(Engine& engine, int64_t n) {
  std::vector<std::shared_ptr<RequestHandle>> hs;
  for (const char* p : kPrompts) {
    RequestParams rp;
    rp.prompt = Serve::tokenizer()->encode(p, true);
    rp.options.max_tokens = n;
    rp.options.sampling.temperature = 0.0f;
    rp.options.ignore_eos = true;
    hs.push_back(engine.submit(rp));
  }
  return hs;
}

TEST_F(Serve, ConcurrentRequestsGetTheirSequentialTokens) {
  const std::vector<std::vector<int32_t>> alone = alone_greedy(16);
  // all together: 6 requests, batches of 4, so two join later as others leave
  Engine engine(*model_, *tok_, EngineOptions{4, 16});
  std::vector<std::shared_ptr<RequestHandle>> hs;
  for (size_t i = 0; i < std::size(kPrompts); ++i) {
    RequestParams p = greedy(kPrompts[i], 8 + int64_t(i));  // different lengths: they leave at different steps
    p.options.ignore_eos = true;
    hs.push_back(engine.submit(p));
  }
  for (size_t i = 0; i < hs.size(); ++i) {
    const RequestResult r = hs[i]->wait();
    EXPECT_EQ(r.finish_reason, "length") << i;
    const std::vector<int32_t> want(alone[i].begin(), alone[i].begin() + 8 + int64_t(i));
    EXPECT_EQ(r.ids, want) << kPrompts[i];
    EXPECT_EQ(r.prompt_tokens, int64_t(tok_->encode(kPrompts[i], true).size()));
  }
  EXPECT_TRUE(drains(engine));
  EXPECT_EQ(engine.stats().requests_finished, 6);
  EXPECT_GT(engine.stats().steps, 0);
}

// Prompts prefilled a few tokens per step beside others' decoding (chunked prefill), with the
// default KV cache and with one of 40 positions (3 blocks of 16, so requests wait for blocks):
// the same tokens as each prompt alone, nothing stuck.
TEST_F(Serve, ChunkedPrefillAndAKvBudgetKeepTheTokens) {
  const std::vector<std::vector<int32_t>> alone = alone_greedy(10);
  for (int64_t budget : {int64_t(0), int64_t(40)}) {
    SCOPED_TRACE(budget ? "a KV cache of 40 positions" : "the default KV cache");
    EngineOptions eo;
    eo.max_batch = 4;
    eo.prefill_chunk = 3;
    eo.max_kv_tokens = budget;
    Engine engine(*model_, *tok_, eo);
    const std::vector<std::shared_ptr<RequestHandle>> hs = submit_all(engine, 10);
    for (size_t i = 0; i < hs.size(); ++i) EXPECT_EQ(hs[i]->wait().ids, alone[i]) << kPrompts[i];
    EXPECT_GT(engine.stats().steps, 6);  // prompts of 4+ tokens took more than one step each
    EXPECT_TRUE(drains(engine));
  }
}

// A KV cache too small for every request at once (blocks of 4 tokens, 8 blocks; each request
// grows to 5 or 6 blocks): the scheduler preempts the newest request when a step lacks blocks;
// re-admitted, it recomputes its tokens and goes on — every request gets its tokens alone.
TEST_F(Serve, PreemptionLosesNoRequestAndChangesNoToken) {
  const std::vector<std::vector<int32_t>> alone = alone_greedy(16);
  for (bool prefix : {true, false}) {
    SCOPED_TRACE(prefix ? "prefix caching" : "no prefix caching");
    EngineOptions eo;
    eo.max_batch = 4;
    eo.kv_block_size = 4;
    eo.max_kv_tokens = 32;
    eo.prefix_caching = prefix;
    Engine engine(*model_, *tok_, eo);
    const std::vector<std::shared_ptr<RequestHandle>> hs = submit_all(engine, 16);
    for (size_t i = 0; i < hs.size(); ++i) {
      const RequestResult r = hs[i]->wait();
      EXPECT_EQ(r.finish_reason, "length") << kPrompts[i];
      EXPECT_EQ(r.ids, alone[i]) << kPrompts[i];
    }
    EXPECT_GT(engine.stats().preemptions, 0);
    EXPECT_EQ(engine.stats().kv_capacity, 32);
    EXPECT_TRUE(drains(engine));
  }
}

// A request that outgrows the whole KV cache alone ends with "length" where the cache ends; a
// prompt longer than the cache is refused when submitted.
TEST_F(Serve, ARequestOutgrowingTheWholeCacheEndsThere) {
  EngineOptions eo;
  eo.kv_block_size = 8;
  eo.max_kv_tokens = 13;  // rounded up to 2 blocks: 16 tokens
  Engine engine(*model_, *tok_, eo);
  EXPECT_EQ(engine.stats().kv_capacity, 16);
  RequestParams p = greedy("The Linux kernel", 40);
  p.options.ignore_eos = true;
  const RequestResult r = engine.submit(p)->wait();
  EXPECT_EQ(r.finish_reason, "length");
  // the prompt's positions and every generated token but the last fill the 16 positions
  EXPECT_EQ(int64_t(r.ids.size()), 16 - r.prompt_tokens + 1);
  RequestParams big = greedy("x", 4);
  big.prompt.assign(17, big.prompt[0]);
  try {
    engine.submit(big);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("KV cache holds 16 tokens"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(drains(engine));
}

// A prompt sent again (with another ending) reuses the blocks the first request published: the
// hit is counted and the tokens are those of an engine without prefix caching.
TEST_F(Serve, PrefixCacheReusesAnEarlierPromptsBlocks) {
  const std::string shared =
      "The Linux kernel is the core of the operating system. It manages memory, processes and devices, and";
  RequestParams a = greedy(shared + " it", 12), b = greedy(shared + " the", 12);
  a.options.ignore_eos = b.options.ignore_eos = true;
  EngineOptions off;
  off.prefix_caching = false;
  std::vector<int32_t> want_b;
  {
    Engine plain(*model_, *tok_, off);
    want_b = plain.submit(b)->wait().ids;
    EXPECT_EQ(plain.stats().prefix_hit_tokens, 0);
  }
  EngineOptions on;
  on.kv_block_size = 8;
  Engine engine(*model_, *tok_, on);
  engine.submit(a)->wait();
  ASSERT_TRUE(drains(engine));  // the stats after the last step
  const EngineStats before = engine.stats();
  EXPECT_EQ(before.prefix_hit_tokens, 0);
  EXPECT_GT(before.kv_cached_tokens, 0);  // a's published blocks, kept after it finished
  EXPECT_EQ(engine.submit(b)->wait().ids, want_b);
  ASSERT_TRUE(drains(engine));
  const EngineStats after = engine.stats();
  const int64_t common = int64_t(tok_->encode(shared, true).size()) - 1;  // the last token may merge
  EXPECT_GE(after.prefix_hit_tokens, common / 8 * 8 - 8);
  EXPECT_GT(after.prefix_hit_tokens, 0);
  // only the tokens that missed were run
  EXPECT_EQ(after.prompt_tokens - before.prompt_tokens, int64_t(b.prompt.size()) - after.prefix_hit_tokens);
  EXPECT_TRUE(drains(engine));
}

// The same prompt from several requests at once (the n choices of one API request) is prefilled
// once: the others wait for it and fork its cache, then each draws its own tokens — those it gets
// alone — writing into its own copy of the shared last block.
TEST_F(Serve, SharedPromptsArePrefilledOnce) {
  auto request = [&](uint64_t seed) {
    RequestParams p = greedy("In Python, a generator is a function that", 10);
    p.options.ignore_eos = true;
    p.options.sampling.temperature = 0.8f;
    p.options.sampling.seed = seed;
    p.options.sampling.has_seed = true;
    return p;
  };
  std::vector<std::vector<int32_t>> alone;
  for (uint64_t seed : {1, 2, 3, 4}) {
    Engine e(*model_, *tok_);
    alone.push_back(e.submit(request(seed))->wait().ids);
  }
  EngineOptions eo;
  eo.prefill_chunk = 1;  // a prefill of several steps: the others are admitted while it runs
  eo.kv_block_size = 4;
  Engine engine(*model_, *tok_, eo);
  std::vector<std::shared_ptr<RequestHandle>> hs;
  for (uint64_t seed : {1, 2, 3, 4}) hs.push_back(engine.submit(request(seed)));
  for (size_t i = 0; i < hs.size(); ++i) EXPECT_EQ(hs[i]->wait().ids, alone[i]) << "seed " << i + 1;
  ASSERT_TRUE(drains(engine));
  const EngineStats s = engine.stats();
  const int64_t n = int64_t(request(1).prompt.size());
  EXPECT_EQ(s.forked_prompts, 3);
  EXPECT_EQ(s.prompt_tokens, n);  // once, not four times
  if (n % 4 != 0) {
    EXPECT_EQ(s.cow_copies, 3);  // the partly filled last block, copied by three of its four writers
  }
}

// Decode steps whose requests want only tokens sample where the logits are
// (Model::forward_batch_sample); a request asking for logprobs keeps the logits on the host and
// its sampler. The same seeded request gives the same tokens either way.
TEST_F(Serve, SamplingWhereTheLogitsAreEqualsTheHostSampler) {
  auto request = [&](uint64_t seed, int top_logprobs) {
    RequestParams p = greedy("In Python, a generator is a function that", 12);
    p.options.ignore_eos = true;
    p.options.sampling.temperature = 0.9f;
    p.options.sampling.top_k = 40;
    p.options.sampling.top_p = 0.95f;
    p.options.sampling.seed = seed;
    p.options.sampling.has_seed = true;
    p.top_logprobs = top_logprobs;
    return p;
  };
  for (uint64_t seed : {7, 8}) {
    Engine on_device(*model_, *tok_), on_host(*model_, *tok_);
    const std::vector<int32_t> a = on_device.submit(request(seed, -1))->wait().ids;
    const std::vector<int32_t> b = on_host.submit(request(seed, 0))->wait().ids;
    EXPECT_EQ(a, b) << "seed " << seed;
    ASSERT_TRUE(drains(on_device));
    ASSERT_TRUE(drains(on_host));
    EXPECT_EQ(on_device.stats().device_sampled, int64_t(a.size()) - 1);  // all but the prefill's token
    EXPECT_EQ(on_host.stats().device_sampled, 0);
  }
}

TEST_F(Serve, StopStringsAndLengthEndRequests) {
  Engine engine(*model_, *tok_);
  // the greedy continuation, then a stop string taken from inside it
  RequestParams p = greedy("The list type in Python", 24);
  p.options.ignore_eos = true;
  const RequestResult full = engine.submit(p)->wait();
  ASSERT_EQ(full.finish_reason, "length");
  ASSERT_EQ(full.ids.size(), 24u);
  ASSERT_GT(full.text.size(), 12u);
  const std::string stop = full.text.substr(full.text.size() / 2, 3);
  p.options.stop = {stop};
  const RequestResult cut = engine.submit(p)->wait();
  EXPECT_EQ(cut.finish_reason, "stop");
  EXPECT_EQ(cut.text, full.text.substr(0, full.text.find(stop)));
  EXPECT_LT(cut.ids.size(), full.ids.size());
}

// Decoding steps chained (Engine::decode_chain: the next step runs while the host hands out the
// tokens of the one before): a request that a stop string ends mid-chain stops where the string
// starts, the token its cache got in the step running then is dropped, and the others get every
// token they get alone; the blocks all come back.
TEST_F(Serve, ChainedStepsStopOneRequestAndKeepTheOthers) {
  const std::vector<std::vector<int32_t>> alone = alone_greedy(20);
  Engine first(*model_, *tok_);
  RequestParams p = greedy(kPrompts[0], 20);
  p.options.ignore_eos = true;
  const RequestResult full = first.submit(p)->wait();
  ASSERT_EQ(full.ids, alone[0]);
  ASSERT_GT(full.text.size(), 12u);
  const std::string stop = full.text.substr(full.text.size() / 2, 3);

  Engine engine(*model_, *tok_);
  std::vector<std::shared_ptr<RequestHandle>> hs;
  for (size_t i = 0; i < std::size(kPrompts); ++i) {
    RequestParams q = greedy(kPrompts[i], 20);
    q.options.ignore_eos = true;
    if (i == 0) q.options.stop = {stop};
    hs.push_back(engine.submit(q));
  }
  const RequestResult cut = hs[0]->wait();
  EXPECT_EQ(cut.finish_reason, "stop");
  EXPECT_EQ(cut.text, full.text.substr(0, full.text.find(stop)));
  // its tokens: the greedy ones up to the first whose text completes the stop string, no more
  size_t n = 1;
  while (n < full.ids.size() &&
         tok_->decode(std::vector<int32_t>(full.ids.begin(), full.ids.begin() + int64_t(n)), true).find(stop) ==
             std::string::npos)
    ++n;
  EXPECT_EQ(cut.ids, std::vector<int32_t>(full.ids.begin(), full.ids.begin() + int64_t(n)));
  for (size_t i = 1; i < hs.size(); ++i) {
    const RequestResult r = hs[i]->wait();
    EXPECT_EQ(r.finish_reason, "length") << kPrompts[i];
    EXPECT_EQ(r.ids, alone[i]) << kPrompts[i];
  }
  EXPECT_TRUE(drains(engine)) << "kv_tokens " << engine.stats().kv_tokens;
  EXPECT_GT(engine.stats().chained_steps, 0);
}

TEST_F(Serve, StepTraceKeepsTheLastChainedSteps) {
  EngineOptions o;
  o.trace_steps = 5;
  Engine engine(*model_, *tok_, o);
  RequestParams p = greedy(kPrompts[0], 12);
  p.options.ignore_eos = true;
  ASSERT_EQ(engine.submit(p)->wait().ids.size(), 12u);
  // 11 chained decode steps after the prompt's step (the scheduler counts the last one just after
  // handing out its token); the last 5 kept, oldest first
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while (engine.stats().decode_steps < 11 && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(engine.stats().decode_steps, 11);
  const std::vector<StepRecord> tr = engine.step_trace();
  ASSERT_EQ(tr.size(), 5u);
  for (size_t i = 0; i < tr.size(); ++i) {
    EXPECT_EQ(tr[i].batch, 1);
    EXPECT_GE(tr[i].back, tr[i].launched);
    EXPECT_GE(tr[i].launch_seconds, 0.0);
    EXPECT_GE(tr[i].wait_seconds, 0.0);
    if (i > 0) {
      EXPECT_GE(tr[i].launched, tr[i - 1].back) << "step " << i << " launched before the one before came back";
    }
  }
  Engine quiet(*model_, *tok_);  // trace_steps 0: no records
  ASSERT_EQ(quiet.submit(p)->wait().ids.size(), 12u);
  EXPECT_TRUE(quiet.step_trace().empty());
  o.trace_steps = -1;
  EXPECT_THROW(Engine(*model_, *tok_, o), Error);
}

TEST_F(Serve, CancellingFreesTheCache) {
  Engine engine(*model_, *tok_, EngineOptions{2, 4});
  RequestParams p = greedy("The Linux kernel", 3000);
  p.options.ignore_eos = true;
  auto h = engine.submit(p);
  ASSERT_TRUE(first_token(*h));
  // the scheduler publishes its batch's cache use after the step that made the token
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while (engine.stats().kv_tokens == 0 && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_GT(engine.stats().kv_tokens, 0);
  h->cancel();
  const RequestResult r = h->wait();
  EXPECT_EQ(r.finish_reason, "cancelled");
  EXPECT_LT(r.ids.size(), 3000u);
  EXPECT_TRUE(drains(engine)) << "kv_tokens " << engine.stats().kv_tokens;
}

TEST_F(Serve, AFullQueueIsBusyAndBadRequestsAreErrors) {
  Engine engine(*model_, *tok_, EngineOptions{1, 1});
  RequestParams p = greedy("The Linux kernel", 3000);
  p.options.ignore_eos = true;
  auto running = engine.submit(p);
  ASSERT_TRUE(first_token(*running));  // now it holds the one batch place
  auto waiting = engine.submit(p);                   // the one queue place
  EXPECT_THROW(engine.submit(p), EngineBusy);
  running->cancel();
  waiting->cancel();
  EXPECT_EQ(running->wait().finish_reason, "cancelled");
  EXPECT_EQ(waiting->wait().finish_reason, "cancelled");
  // bad requests never reach the queue
  RequestParams bad = greedy("x", 4);
  bad.prompt.clear();
  EXPECT_THROW(engine.submit(bad), Error);
  bad.prompt = {int32_t(model_->config().vocab_size)};
  EXPECT_THROW(engine.submit(bad), Error);
  bad.prompt.assign(size_t(model_->config().max_position_embeddings), 1);
  EXPECT_THROW(engine.submit(bad), Error);
  bad = greedy("x", 0);
  EXPECT_THROW(engine.submit(bad), Error);
  EXPECT_TRUE(drains(engine));
}

// ---- the HTTP API, through sockets

struct Reply {
  int status = 0;
  std::string headers, body;
};

// One request on a fresh connection ("Connection: close"), the reply read to its end; a chunked
// body is decoded. `close_after` > 0: the connection is closed after that many body bytes.
Reply http(int port, const std::string& method, const std::string& path, const std::string& body = "",
           const std::string& extra_headers = "", size_t close_after = 0) {
  Reply r;
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  timeval tv{30, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(uint16_t(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return r;
  }
  std::string req = method + " " + path + " HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + extra_headers;
  if (!body.empty() || method == "POST") req += "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n";
  req += "\r\n" + body;
  ::send(fd, req.data(), req.size(), MSG_NOSIGNAL);
  std::string raw;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    raw.append(buf, size_t(n));
    const size_t head_end = raw.find("\r\n\r\n");
    if (close_after && head_end != std::string::npos && raw.size() - head_end - 4 >= close_after) break;
  }
  ::close(fd);
  const size_t head_end = raw.find("\r\n\r\n");
  if (raw.size() < 12 || head_end == std::string::npos) return r;
  r.status = std::stoi(raw.substr(9, 3));
  r.headers = raw.substr(0, head_end);
  std::string rest = raw.substr(head_end + 4);
  if (r.headers.find("Transfer-Encoding: chunked") == std::string::npos) {
    r.body = rest;
    return r;
  }
  size_t i = 0;
  while (i < rest.size()) {
    const size_t eol = rest.find("\r\n", i);
    if (eol == std::string::npos) break;
    const size_t len = std::stoul(rest.substr(i, eol - i), nullptr, 16);
    if (len == 0 || eol + 2 + len > rest.size()) break;
    r.body += rest.substr(eol + 2, len);
    i = eol + 2 + len + 2;
  }
  return r;
}

// The "data: {...}" events of an SSE body, [DONE] left out; `done` tells whether it came.
std::vector<json> sse_events(const std::string& body, bool* done) {
  std::vector<json> out;
  *done = false;
  size_t i = 0;
  while ((i = body.find("data: ", i)) != std::string::npos) {
    const size_t end = body.find("\n\n", i);
    const std::string data = body.substr(i + 6, end == std::string::npos ? std::string::npos : end - i - 6);
    if (data == "[DONE]") *done = true;
    else out.push_back(json::parse(data));
    if (end == std::string::npos) break;
    i = end + 2;
  }
  return out;
}

class ServeHttp : public Serve {
 protected:
  void start(const std::string& api_key = "", const SamplingParams& defaults = {}, bool speculative = false) {
    EngineOptions eo{4, 8};
    eo.speculative = speculative;
    engine_ = std::make_unique<Engine>(*model_, *tok_, eo);
    ApiOptions ao;
    ao.model_name = "fathom-mini";
    ao.api_key = api_key;
    ao.max_tokens_limit = 1024;
    ao.defaults = defaults;
    api_ = std::make_unique<OpenAiApi>(*engine_, ao);
    HttpServerOptions ho;
    ho.port = 0;
    ho.max_body_bytes = 64 << 10;
    ho.error_body = [](int status, const std::string& m) { return api_error_body(status, m); };
    server_ = std::make_unique<HttpServer>(ho, [this](const HttpRequest& r, HttpResponseWriter& w) { api_->handle(r, w); });
    server_->start();
    port_ = server_->port();
  }
  void TearDown() override {
    if (server_) server_->stop();
    server_.reset();
    api_.reset();
    engine_.reset();
  }
  Reply post(const std::string& path, const json& body, const std::string& headers = "") {
    return http(port_, "POST", path, body.dump(), headers);
  }
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<OpenAiApi> api_;
  std::unique_ptr<HttpServer> server_;
  int port_ = 0;
};

TEST_F(ServeHttp, ModelsHealthAndMetrics) {
  start();
  Reply r = http(port_, "GET", "/health");
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(json::parse(r.body)["status"], "ok");
  r = http(port_, "GET", "/v1/models");
  ASSERT_EQ(r.status, 200);
  EXPECT_EQ(json::parse(r.body)["data"][0]["id"], "fathom-mini");
  r = http(port_, "GET", "/metrics");
  ASSERT_EQ(r.status, 200);
  EXPECT_NE(r.body.find("fathom_requests_running 0"), std::string::npos);
  EXPECT_NE(r.body.find("# TYPE fathom_generated_tokens_total counter"), std::string::npos);
  EXPECT_NE(r.body.find("fathom_time_to_first_token_seconds_count 0"), std::string::npos);
  EXPECT_EQ(http(port_, "GET", "/nowhere").status, 404);
  // one request of 5 tokens: one time to first token, 4 inter-token gaps, in the histograms
  const Reply c = post("/v1/completions", {{"model", "fathom-mini"}, {"prompt", "The tar command"}, {"max_tokens", 5},
                                           {"temperature", 0}, {"ignore_eos", true}});
  ASSERT_EQ(c.status, 200) << c.body;
  r = http(port_, "GET", "/metrics");
  EXPECT_NE(r.body.find("# TYPE fathom_time_to_first_token_seconds histogram"), std::string::npos) << r.body;
  EXPECT_NE(r.body.find("fathom_time_to_first_token_seconds_bucket{le=\"+Inf\"} 1\n"), std::string::npos) << r.body;
  EXPECT_NE(r.body.find("fathom_time_to_first_token_seconds_count 1\n"), std::string::npos) << r.body;
  EXPECT_NE(r.body.find("fathom_inter_token_latency_seconds_bucket{le=\"+Inf\"} 4\n"), std::string::npos) << r.body;
  EXPECT_NE(r.body.find("fathom_inter_token_latency_seconds_count 4\n"), std::string::npos) << r.body;
  EXPECT_NE(r.body.find("fathom_generated_tokens_total 5\n"), std::string::npos) << r.body;
  EXPECT_NE(r.body.find("fathom_kv_cache_capacity_tokens "), std::string::npos) << r.body;
  EXPECT_NE(r.body.find("fathom_prefix_cache_hit_tokens_total "), std::string::npos) << r.body;
}

// With MTP drafting, /metrics reports the drafts, the acceptance rate and the tokens a verifying
// request gets per step, consistent with the engine's counts.
TEST_F(ServeHttp, MetricsReportSpeculativeDecoding) {
  start("", {}, /*speculative=*/true);
  const Reply c = post("/v1/completions", {{"model", "fathom-mini"}, {"prompt", "The Linux kernel"}, {"max_tokens", 24},
                                           {"temperature", 0}, {"ignore_eos", true}});
  ASSERT_EQ(c.status, 200) << c.body;
  ASSERT_TRUE(drains(*engine_));
  const EngineStats st = engine_->stats();
  ASSERT_GT(st.spec_drafts, 0);
  const Reply r = http(port_, "GET", "/metrics");
  EXPECT_NE(r.body.find(cat("fathom_spec_drafts_total ", st.spec_drafts, "\n")), std::string::npos) << r.body;
  const double rate = double(st.spec_accepted) / double(st.spec_drafts);
  EXPECT_NE(r.body.find(cat("fathom_spec_acceptance_rate ", rate, "\n")), std::string::npos) << r.body;
  EXPECT_NE(r.body.find(cat("fathom_spec_tokens_per_step ", 1.0 + rate, "\n")), std::string::npos) << r.body;
  EXPECT_GT(rate, 0.3);  // fathom-mini's trained module: most greedy drafts stand
}

TEST_F(ServeHttp, ChatCompletionStreamedAndNot) {
  start();
  const json req = {{"model", "fathom-mini"},
                    {"messages", {{{"role", "user"}, {"content", "What does str.split do?"}}}},
                    {"max_tokens", 16},
                    {"temperature", 0}};
  const Reply r = post("/v1/chat/completions", req);
  ASSERT_EQ(r.status, 200) << r.body;
  const json j = json::parse(r.body);
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["choices"][0]["message"]["role"], "assistant");
  const std::string text = j["choices"][0]["message"]["content"];
  EXPECT_FALSE(text.empty());
  const int64_t completion = j["usage"]["completion_tokens"];
  EXPECT_GT(completion, 0);
  EXPECT_LE(completion, 16);
  EXPECT_EQ(j["usage"]["total_tokens"].get<int64_t>(), j["usage"]["prompt_tokens"].get<int64_t>() + completion);
  // the same request streamed: the deltas add up to the same greedy text
  json sreq = req;
  sreq["stream"] = true;
  sreq["stream_options"] = {{"include_usage", true}};
  const Reply s = post("/v1/chat/completions", sreq);
  ASSERT_EQ(s.status, 200);
  EXPECT_NE(s.headers.find("text/event-stream"), std::string::npos);
  bool done = false;
  const std::vector<json> events = sse_events(s.body, &done);
  EXPECT_TRUE(done);
  ASSERT_GE(events.size(), 3u);
  EXPECT_EQ(events[0]["choices"][0]["delta"]["role"], "assistant");
  std::string streamed;
  std::string finish;
  for (const json& e : events) {
    if (e["choices"].empty()) {  // the usage chunk
      EXPECT_EQ(e["usage"]["completion_tokens"].get<int64_t>(), completion);
      continue;
    }
    const json& c = e["choices"][0];
    EXPECT_EQ(e["object"], "chat.completion.chunk");
    if (c["delta"].contains("content")) streamed += c["delta"]["content"].get<std::string>();
    if (!c["finish_reason"].is_null()) finish = c["finish_reason"];
  }
  EXPECT_EQ(streamed, text);
  EXPECT_EQ(finish, j["choices"][0]["finish_reason"].get<std::string>());
}

TEST_F(ServeHttp, CompletionsWithNStopAndLogprobs) {
  start();
  const json req = {{"prompt", "The list type in Python"}, {"max_tokens", 12}, {"temperature", 0.8},
                    {"seed", 7},  {"n", 3},         {"logprobs", 2}};
  const Reply r = post("/v1/completions", req);
  ASSERT_EQ(r.status, 200) << r.body;
  const json j = json::parse(r.body);
  EXPECT_EQ(j["object"], "text_completion");
  ASSERT_EQ(j["choices"].size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(j["choices"][i]["index"], i);
    const json& lp = j["choices"][i]["logprobs"];
    ASSERT_FALSE(lp.is_null());
    EXPECT_EQ(lp["tokens"].size(), lp["token_logprobs"].size());
    for (const json& x : lp["token_logprobs"]) EXPECT_LE(x.get<double>(), 0.0);
    for (const json& t : lp["top_logprobs"]) EXPECT_LE(t.size(), 2u);
  }
  // a seed makes it repeatable
  const json again = json::parse(post("/v1/completions", req).body);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(again["choices"][i]["text"], j["choices"][i]["text"]);
  // a stop string cuts the text before it
  json greedy_req = {{"prompt", "The list type in Python"}, {"max_tokens", 24}, {"temperature", 0}};
  const std::string full = json::parse(post("/v1/completions", greedy_req).body)["choices"][0]["text"];
  ASSERT_GT(full.size(), 10u);
  greedy_req["stop"] = json::array({full.substr(full.size() / 2, 3)});
  const json cut = json::parse(post("/v1/completions", greedy_req).body);
  EXPECT_EQ(cut["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(cut["choices"][0]["text"].get<std::string>(), full.substr(0, full.find(full.substr(full.size() / 2, 3))));
}

TEST_F(ServeHttp, BadRequestsAre4xxAndTheServerKeepsServing) {
  start();
  auto error_of = [&](const Reply& r) {
    const json j = json::parse(r.body, nullptr, false);
    return j.is_object() && j.contains("error") ? j["error"]["message"].get<std::string>() : std::string("(no error body)");
  };
  const json ok = {{"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"max_tokens", 2}};
  struct Case {
    const char* what;
    std::string body;
    int status;
    const char* mentions;
  };
  auto with = [&](const char* key, const json& v) {
    json b = ok;
    b[key] = v;
    return b.dump();
  };
  const Case cases[] = {
      {"malformed JSON", "{\"messages\": [", 400, "not valid JSON"},
      {"not an object", "[1, 2]", 400, "JSON object"},
      {"invalid UTF-8", std::string("{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}"), 400, "UTF-8"},
      {"wrong type", with("temperature", "hot"), 400, "temperature"},
      {"temperature out of range", with("temperature", 7), 400, "temperature"},
      {"unknown model", with("model", "gpt-9"), 404, "gpt-9"},
      {"empty messages", with("messages", json::array()), 400, "empty"},
      {"messages not an array", with("messages", "hi"), 400, "messages"},
      {"a message without role", with("messages", json::array({{{"content", "x"}}})), 400, "role"},
      {"negative max_tokens", with("max_tokens", -1), 400, "max_tokens"},
      {"huge max_tokens", with("max_tokens", int64_t(1) << 40), 400, "max_tokens"},
      {"n too big", with("n", 1000), 400, "'n'"},
      {"stop of the wrong type", with("stop", 5), 400, "stop"},
      {"top_logprobs without logprobs", with("top_logprobs", 3), 400, "logprobs"},
      {"repetition_penalty 0", with("repetition_penalty", 0), 400, "repetition_penalty"},
      {"top_k not an integer", with("top_k", 2.5), 400, "top_k"},
  };
  for (const Case& c : cases) {
    const Reply r = http(port_, "POST", "/v1/chat/completions", c.body);
    EXPECT_EQ(r.status, c.status) << c.what << ": " << r.body;
    EXPECT_NE(error_of(r).find(c.mentions), std::string::npos) << c.what << ": " << r.body;
  }
  EXPECT_EQ(http(port_, "GET", "/v1/chat/completions").status, 405);
  // a prompt longer than the context
  const std::string longp(200000, 'a');
  EXPECT_EQ(post("/v1/completions", {{"prompt", std::vector<int>(5000, 5)}, {"max_tokens", 2}}).status, 400);
  // a body over the limit
  EXPECT_EQ(http(port_, "POST", "/v1/completions", json{{"prompt", longp}}.dump()).status, 413);
  // and it still answers
  EXPECT_EQ(post("/v1/chat/completions", ok).status, 200);
}

// A request that gives no sampling field gets the server's defaults (fathom serve: the model's
// generation_config.json): here greedy, so it equals an explicit temperature 0; the vLLM-style
// top_k and repetition_penalty are taken too.
TEST_F(ServeHttp, UnsetFieldsTakeTheServersDefaults) {
  SamplingParams d;
  d.temperature = 0.0f;
  start("", d);
  const json base = {{"prompt", "The tar command"}, {"max_tokens", 10}};
  json explicit_greedy = base;
  explicit_greedy["temperature"] = 0;
  const std::string a = json::parse(post("/v1/completions", base).body)["choices"][0]["text"];
  const std::string b = json::parse(post("/v1/completions", explicit_greedy).body)["choices"][0]["text"];
  EXPECT_EQ(a, b);
  json extras = base;
  extras["top_k"] = 1;  // with temperature 1, top-1 is greedy too
  extras["temperature"] = 1;
  extras["repetition_penalty"] = 1.0;
  EXPECT_EQ(json::parse(post("/v1/completions", extras).body)["choices"][0]["text"], a);
}

TEST_F(ServeHttp, AnApiKeyIsRequiredWhenSet) {
  start("sekret");
  const json ok = {{"prompt", "hi"}, {"max_tokens", 2}};
  EXPECT_EQ(post("/v1/completions", ok).status, 401);
  EXPECT_EQ(post("/v1/completions", ok, "Authorization: Bearer wrong\r\n").status, 401);
  EXPECT_EQ(post("/v1/completions", ok, "Authorization: Bearer sekret\r\n").status, 200);
  EXPECT_EQ(http(port_, "GET", "/health").status, 200);  // health stays open
}

TEST_F(ServeHttp, AClientThatLeavesMidStreamFreesItsPlace) {
  start();
  const json req = {{"prompt", "The Linux kernel"}, {"max_tokens", 1000}, {"stream", true}, {"temperature", 0}};
  const Reply r = http(port_, "POST", "/v1/completions", req.dump(), "", 200);  // leaves after 200 bytes
  EXPECT_EQ(r.status, 200);
  EXPECT_TRUE(drains(*engine_)) << "running " << engine_->stats().running << ", kv " << engine_->stats().kv_tokens;
  EXPECT_LT(engine_->stats().tokens_generated, 1000);
}

}  // namespace
}  // namespace fathom::serve
