// The OpenAI-compatible API (see openai.h).
#include "serve/openai.h"

#include <atomic>
#include <chrono>
#include <ctime>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "engine/reasoning.h"
#include "serve/web_page.h"
#include "tokenizer/chat_template.h"

namespace fathom::serve {

using json = nlohmann::json;
using ojson = nlohmann::ordered_json;

namespace {

// A request that cannot be served as asked: answered with `status` and an OpenAI error body.
struct ApiError : std::runtime_error {
  ApiError(int s, const std::string& message, std::string p = "") : std::runtime_error(message), status(s), param(std::move(p)) {}
  int status;
  std::string param;
};

[[noreturn]] void fail(int status, const std::string& message, const std::string& param = "") {
  throw ApiError(status, message, param);
}

std::string error_type(int status) {
  switch (status) {
    case 401: return "authentication_error";
    case 404: return "not_found_error";
    case 429: return "rate_limit_error";
    default: return status >= 500 ? "server_error" : "invalid_request_error";
  }
}

const char* type_name(const json& v) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return "a boolean";
  if (v.is_number()) return "a number";
  if (v.is_string()) return "a string";
  if (v.is_array()) return "an array";
  return "an object";
}

// Optional fields of the request body, each checked for type and range; null counts as absent.
struct Fields {
  const json& j;
  bool has(const char* k) const { return j.contains(k) && !j.at(k).is_null(); }
  double number(const char* k, double fallback, double lo, double hi) const {
    if (!has(k)) return fallback;
    const json& v = j.at(k);
    if (!v.is_number()) fail(400, cat("'", k, "' must be a number, not ", type_name(v)), k);
    const double x = v.get<double>();
    if (!(x >= lo && x <= hi)) fail(400, cat("'", k, "' is ", x, "; it must be between ", lo, " and ", hi), k);
    return x;
  }
  int64_t integer(const char* k, int64_t fallback, int64_t lo, int64_t hi) const {
    if (!has(k)) return fallback;
    const json& v = j.at(k);
    if (!v.is_number_integer()) fail(400, cat("'", k, "' must be an integer, not ", type_name(v)), k);
    if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX))
      fail(400, cat("'", k, "' is out of range; it must be between ", lo, " and ", hi), k);
    const int64_t x = v.get<int64_t>();
    if (x < lo || x > hi) fail(400, cat("'", k, "' is ", x, "; it must be between ", lo, " and ", hi), k);
    return x;
  }
  bool boolean(const char* k, bool fallback) const {
    if (!has(k)) return fallback;
    if (!j.at(k).is_boolean()) fail(400, cat("'", k, "' must be true or false, not ", type_name(j.at(k))), k);
    return j.at(k).get<bool>();
  }
};

std::string new_id(const char* prefix) {
  static std::atomic<uint64_t> counter{0};
  static const uint64_t salt = std::random_device{}();
  char buf[40];
  std::snprintf(buf, sizeof buf, "%s-%016llx", prefix,
                (unsigned long long)(salt * 0x9E3779B97F4A7C15ull + counter.fetch_add(1)));
  return buf;
}

std::string piece_of(const Tokenizer& tok, int32_t id) { return utf8_sanitize(tok.decode({id}, false)); }

json bytes_of(const std::string& s) {
  json b = json::array();
  for (unsigned char c : s) b.push_back(int(c));
  return b;
}

// What one request asks to generate, parsed from its body.
struct Job {
  bool chat = false, stream = false, include_usage = false;
  int n = 1;
  RequestParams params;
  bool logprobs = false;
};

}  // namespace

std::string api_error_body(int status, const std::string& message, const std::string& param) {
  json e = {{"message", message}, {"type", error_type(status)}, {"code", status}};
  e["param"] = param.empty() ? json(nullptr) : json(param);
  return json{{"error", e}}.dump();
}

OpenAiApi::OpenAiApi(Engine& engine, ApiOptions options) : engine_(engine), opt_(std::move(options)) {
  const Tokenizer& tok = engine_.tokenizer();
  if (tok.config().chat_template.empty()) {
    template_error_ = "this model's tokenizer has no chat template: use /v1/completions";
    return;
  }
  template_options_.bos_token = tok.config().bos_token;
  template_options_.eos_token = tok.config().eos_token;
  template_options_.add_generation_prompt = true;
  try {
    template_ = std::make_shared<const ChatTemplate>(ChatTemplate::parse(tok.config().chat_template, "chat_template"));
  } catch (const Error& e) {
    template_error_ = cat("the chat template could not render these messages: ", e.what());
    return;
  }
  try {  // a template whose generation prompt opens "<think>": the answer starts inside reasoning
    std::string p = template_->render(ojson::array({{{"role", "user"}, {"content", "x"}}}), template_options_);
    while (!p.empty() && (p.back() == '\n' || p.back() == ' ')) p.pop_back();
    reasoning_model_ = p.size() >= 7 && p.compare(p.size() - 7, 7, "<think>") == 0;
  } catch (const std::exception&) {
    reasoning_model_ = false;  // a template that cannot render a user turn fails per request
  }
}

void OpenAiApi::handle(const HttpRequest& req, HttpResponseWriter& w) {
  const Tokenizer& tok = engine_.tokenizer();
  auto send_json = [&](int status, const json& body) { w.send(status, "application/json", body.dump()); };
  try {
    if (req.path == "/" || req.path == "/index.html") {
      if (req.method != "GET" && req.method != "HEAD") fail(405, "/ takes GET");
      return w.send(200, "text/html; charset=utf-8", chat_page_html());
    }
    if (req.path == "/health") {
      if (req.method != "GET") fail(405, "/health takes GET");
      return send_json(200, {{"status", "ok"}});
    }
    if (req.path == "/metrics") {
      if (req.method != "GET") fail(405, "/metrics takes GET");
      const EngineStats s = engine_.stats();
      std::string m;
      auto metric = [&](const char* name, const char* type, const char* help, int64_t v) {
        m += cat("# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n", name, " ", v, "\n");
      };
      metric("fathom_requests_waiting", "gauge", "Requests waiting for a place in the batch.", s.waiting);
      metric("fathom_requests_running", "gauge", "Requests in the running batch.", s.running);
      metric("fathom_kv_cache_tokens", "gauge", "KV-cache positions held by requests (their blocks).", s.kv_tokens);
      metric("fathom_kv_cache_capacity_tokens", "gauge", "KV-cache size in positions.", s.kv_capacity);
      metric("fathom_kv_cache_cached_tokens", "gauge", "Positions of published blocks nobody holds (prefix cache).",
             s.kv_cached_tokens);
      metric("fathom_prefix_cache_query_tokens_total", "counter", "Prompt tokens looked up in the prefix cache.",
             s.prefix_query_tokens);
      metric("fathom_prefix_cache_hit_tokens_total", "counter", "Prompt tokens found in the prefix cache.",
             s.prefix_hit_tokens);
      metric("fathom_forked_prompts_total", "counter", "Requests that forked another's prefilled prompt.",
             s.forked_prompts);
      metric("fathom_kv_cow_copies_total", "counter", "Shared KV blocks copied before a write.", s.cow_copies);
      metric("fathom_preemptions_total", "counter", "Requests sent back to the queue for lack of KV blocks.",
             s.preemptions);
      metric("fathom_requests_finished_total", "counter", "Requests finished, in any way.", s.requests_finished);
      metric("fathom_generated_tokens_total", "counter", "Tokens generated.", s.tokens_generated);
      metric("fathom_prompt_tokens_total", "counter", "Prompt tokens prefilled.", s.prompt_tokens);
      metric("fathom_decode_steps_total", "counter", "Batched decode steps run.", s.steps);
      metric("fathom_spec_drafts_total", "counter", "MTP drafts verified (speculative decoding).", s.spec_drafts);
      metric("fathom_spec_accepted_total", "counter", "MTP drafts accepted.", s.spec_accepted);
      if (s.spec_drafts > 0) {
        const double rate = double(s.spec_accepted) / double(s.spec_drafts);
        m += cat("# HELP fathom_spec_acceptance_rate MTP drafts accepted / verified.\n",
                 "# TYPE fathom_spec_acceptance_rate gauge\nfathom_spec_acceptance_rate ", rate, "\n",
                 "# HELP fathom_spec_tokens_per_step Tokens a verifying request gets per step of the main model.\n",
                 "# TYPE fathom_spec_tokens_per_step gauge\nfathom_spec_tokens_per_step ", 1.0 + rate, "\n");
      }
      m += cat("# HELP fathom_generation_tokens_per_second Tokens generated per second, over the last second or more.\n",
               "# TYPE fathom_generation_tokens_per_second gauge\nfathom_generation_tokens_per_second ",
               s.tokens_per_second, "\n");
      auto histogram = [&](const char* name, const char* help, const LatencyHistogram& h) {
        m += cat("# HELP ", name, " ", help, "\n# TYPE ", name, " histogram\n");
        int64_t cum = 0;
        for (size_t i = 0; i < LatencyHistogram::kBuckets; ++i) {
          cum += h.counts[i];
          m += cat(name, "_bucket{le=\"",
                   i + 1 < LatencyHistogram::kBuckets ? cat(LatencyHistogram::kBounds[i]) : std::string("+Inf"),
                   "\"} ", cum, "\n");
        }
        m += cat(name, "_sum ", h.sum, "\n", name, "_count ", h.count, "\n");
      };
      histogram("fathom_time_to_first_token_seconds", "Seconds from a request's arrival to its first token.", s.ttft);
      histogram("fathom_inter_token_latency_seconds", "Seconds between a request's consecutive tokens.",
                s.inter_token);
      return w.send(200, "text/plain; version=0.0.4", m);
    }
    const bool v1 = req.path.rfind("/v1/", 0) == 0;
    if (v1 && !opt_.api_key.empty()) {
      const std::string auth = req.header("authorization");
      if (auth.rfind("Bearer ", 0) != 0) fail(401, "this server needs an API key: send 'Authorization: Bearer <key>'");
      if (auth.substr(7) != opt_.api_key) fail(401, "the API key given is not this server's");
    }
    if (req.path == "/v1/models") {
      if (req.method != "GET") fail(405, "/v1/models takes GET");
      return send_json(200, {{"object", "list"},
                             {"data", json::array({{{"id", opt_.model_name},
                                                    {"object", "model"},
                                                    {"created", int64_t(std::time(nullptr))},
                                                    {"owned_by", "fathom"}}})}});
    }
    const bool chat = req.path == "/v1/chat/completions";
    if (!chat && req.path != "/v1/completions") fail(404, cat("no route for ", req.method, " ", req.path));
    if (req.method != "POST") fail(405, cat(req.path, " takes POST"));

    // ---- the body
    if (utf8_invalid_offset(req.body) != std::string::npos)
      fail(400, cat("the request body is not valid UTF-8 (at byte ", utf8_invalid_offset(req.body), ")"));
    json body = json::parse(req.body, nullptr, false);
    if (body.is_discarded()) fail(400, "the request body is not valid JSON");
    if (!body.is_object()) fail(400, cat("the request body must be a JSON object, not ", type_name(body)));
    Fields f{body};
    if (f.has("model")) {
      if (!body["model"].is_string()) fail(400, cat("'model' must be a string, not ", type_name(body["model"])), "model");
      if (body["model"].get<std::string>() != opt_.model_name)
        fail(404, cat("the model '", body["model"].get<std::string>(), "' does not exist here; this server serves '",
                      opt_.model_name, "'"),
             "model");
    }
    Job job;
    job.chat = chat;
    job.stream = f.boolean("stream", false);
    if (f.has("stream_options")) {
      if (!body["stream_options"].is_object()) fail(400, "'stream_options' must be an object", "stream_options");
      job.include_usage = Fields{body["stream_options"]}.boolean("include_usage", false);
    }
    job.n = int(f.integer("n", 1, 1, opt_.max_n));
    GenerateOptions& o = job.params.options;
    const char* max_key = chat && f.has("max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
    o.max_tokens = f.integer(max_key, opt_.default_max_tokens, 1, opt_.max_tokens_limit);
    o.ignore_eos = f.boolean("ignore_eos", false);  // vLLM's extension: keep going after EOS
    o.sampling = opt_.defaults;
    o.sampling.temperature = float(f.number("temperature", opt_.defaults.temperature, 0.0, 2.0));
    o.sampling.top_p = float(f.number("top_p", opt_.defaults.top_p, 0.0, 1.0));
    if (o.sampling.top_p <= 0.0f) fail(400, "'top_p' must be greater than 0", "top_p");
    o.sampling.top_k = int(f.integer("top_k", opt_.defaults.top_k, -1, 1 << 30));
    if (o.sampling.top_k < 0) o.sampling.top_k = 0;  // vLLM's -1: off
    o.sampling.min_p = float(f.number("min_p", opt_.defaults.min_p, 0.0, 1.0));
    o.sampling.repetition_penalty = float(f.number("repetition_penalty", opt_.defaults.repetition_penalty, 0.0, 10.0));
    if (o.sampling.repetition_penalty <= 0.0f) fail(400, "'repetition_penalty' must be greater than 0", "repetition_penalty");
    o.sampling.presence_penalty = float(f.number("presence_penalty", 0.0, -2.0, 2.0));
    o.sampling.frequency_penalty = float(f.number("frequency_penalty", 0.0, -2.0, 2.0));
    if (f.has("seed")) {
      o.sampling.seed = uint64_t(f.integer("seed", 0, INT64_MIN, INT64_MAX));
      o.sampling.has_seed = true;
    }
    if (f.has("stop")) {
      const json& s = body["stop"];
      if (s.is_string()) {
        o.stop.push_back(s.get<std::string>());
      } else if (s.is_array()) {
        for (const json& x : s) {
          if (!x.is_string()) fail(400, cat("'stop' must hold strings, not ", type_name(x)), "stop");
          o.stop.push_back(x.get<std::string>());
        }
      } else {
        fail(400, cat("'stop' must be a string or an array of strings, not ", type_name(s)), "stop");
      }
      if (o.stop.size() > 16) fail(400, cat("'stop' has ", o.stop.size(), " strings; at most 16 are allowed"), "stop");
      for (const auto& x : o.stop)
        if (x.empty()) fail(400, "'stop' holds an empty string", "stop");
    }
    if (chat) {
      job.logprobs = f.boolean("logprobs", false);
      const int64_t top = f.integer("top_logprobs", 0, 0, 20);
      if (f.has("top_logprobs") && !job.logprobs) fail(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs");
      job.params.top_logprobs = job.logprobs ? int(top) : -1;
    } else {
      const int64_t lp = f.integer("logprobs", -1, 0, 5);
      job.logprobs = lp >= 0;
      job.params.top_logprobs = int(lp);
    }

    // ---- the prompt
    if (chat) {
      if (!f.has("messages")) fail(400, "'messages' is missing", "messages");
      const json& msgs = body["messages"];
      if (!msgs.is_array()) fail(400, cat("'messages' must be an array, not ", type_name(msgs)), "messages");
      if (msgs.empty()) fail(400, "'messages' is empty: give at least one message", "messages");
      ojson conv = ojson::array();
      for (size_t i = 0; i < msgs.size(); ++i) {
        const json& m = msgs[i];
        const std::string where = cat("messages[", i, "]");
        if (!m.is_object()) fail(400, cat(where, " must be an object, not ", type_name(m)), "messages");
        if (!m.contains("role") || !m["role"].is_string()) fail(400, cat(where, ".role must be a string"), "messages");
        const std::string role = m["role"].get<std::string>();
        if (role != "system" && role != "user" && role != "assistant" && role != "developer" && role != "tool")
          fail(400, cat(where, ".role is '", role, "'; expected system, developer, user, assistant or tool"), "messages");
        std::string content;
        const json c = m.value("content", json(nullptr));
        if (c.is_string()) {
          content = c.get<std::string>();
        } else if (c.is_array()) {
          for (const json& part : c) {
            if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") || !part["text"].is_string())
              fail(400, cat(where, ".content holds a part that is not {\"type\": \"text\", \"text\": ...}; only text is supported"),
                   "messages");
            content += part["text"].get<std::string>();
          }
        } else if (!(c.is_null() && role == "assistant")) {
          fail(400, cat(where, ".content must be a string or an array of text parts, not ", type_name(c)), "messages");
        }
        conv.push_back({{"role", role == "developer" ? "system" : role}, {"content", content}});
      }
      if (!template_) fail(400, template_error_, tok.config().chat_template.empty() ? "" : "messages");
      std::string text;
      try {
        text = template_->render(conv, template_options_);
      } catch (const Error& e) {
        fail(400, cat("the chat template could not render these messages: ", e.what()), "messages");
      }
      job.params.prompt = tok.encode(text);
    } else {
      if (!f.has("prompt")) fail(400, "'prompt' is missing", "prompt");
      const json& p = body["prompt"];
      if (p.is_string()) {
        job.params.prompt = tok.encode(p.get<std::string>(), /*add_special=*/true);
      } else if (p.is_array() && p.size() == 1 && p[0].is_string()) {
        job.params.prompt = tok.encode(p[0].get<std::string>(), /*add_special=*/true);
      } else if (p.is_array() && !p.empty() && p[0].is_number()) {
        for (const json& x : p) {
          if (!x.is_number_integer()) fail(400, "'prompt' as token ids must hold integers only", "prompt");
          const int64_t id = x.get<int64_t>();
          if (id < 0 || id >= engine_.model().config().vocab_size)
            fail(400, cat("'prompt' holds the token id ", id, ", outside the vocabulary of ",
                          engine_.model().config().vocab_size), "prompt");
          job.params.prompt.push_back(int32_t(id));
        }
      } else if (p.is_array() && p.size() > 1) {
        fail(400, "'prompt' holds several prompts; send one prompt per request", "prompt");
      } else {
        fail(400, cat("'prompt' must be a string or an array of token ids, not ", type_name(p)), "prompt");
      }
      if (job.params.prompt.empty()) fail(400, "'prompt' is empty", "prompt");
    }
    const int64_t ctx = engine_.model().config().max_position_embeddings;
    if (int64_t(job.params.prompt.size()) >= ctx)
      fail(400, cat("the prompt has ", job.params.prompt.size(), " tokens; the model's context is ", ctx,
                    " tokens, and at least one must be left to generate"),
           chat ? "messages" : "prompt");

    // ---- generate: n requests of the same prompt (seeds seed, seed + 1, ...)
    std::vector<std::shared_ptr<RequestHandle>> hs;
    auto cancel_all = [&] {
      for (auto& h : hs) h->cancel();
    };
    try {
      for (int i = 0; i < job.n; ++i) {
        RequestParams p = job.params;
        if (p.options.sampling.has_seed) p.options.sampling.seed += uint64_t(i);
        hs.push_back(engine_.submit(std::move(p)));
      }
    } catch (const EngineBusy& e) {
      cancel_all();
      fail(429, e.what());
    } catch (const Error& e) {
      cancel_all();
      fail(400, e.what());
    }
    const std::string id = new_id(chat ? "chatcmpl" : "cmpl");
    const int64_t created = int64_t(std::time(nullptr));
    const int64_t prompt_tokens = int64_t(job.params.prompt.size());
    auto logprob_entry = [&](const TokenEvent& e) {
      json top = json::array();
      for (const TokenLogprob& t : e.logprobs->top) {
        const std::string s = piece_of(tok, t.id);
        top.push_back({{"token", s}, {"logprob", t.logprob}, {"bytes", bytes_of(s)}});
      }
      const std::string s = piece_of(tok, e.id);
      return json{{"token", s}, {"logprob", e.logprobs->chosen.logprob}, {"bytes", bytes_of(s)}, {"top_logprobs", top}};
    };

    if (!job.stream) {
      json choices = json::array();
      int64_t completion_tokens = 0;
      for (size_t i = 0; i < hs.size(); ++i) {
        // the events carry the logprobs; take them all, then the result
        std::vector<json> lps;
        for (;;) {
          TokenEvent e;
          bool got = false, done = false;
          if (!hs[i]->next(e, got, done, 200)) {
            if (w.client_gone()) return cancel_all();
            continue;
          }
          if (got && e.logprobs) lps.push_back(logprob_entry(e));
          if (done) break;
        }
        const RequestResult& r = hs[i]->result();
        if (r.finish_reason == "error") fail(500, cat("generation failed: ", r.error));
        completion_tokens += int64_t(r.ids.size());
        json choice = {{"index", i}, {"finish_reason", r.finish_reason}};
        json lp = nullptr;
        if (chat) {
          if (job.logprobs) lp = {{"content", lps}};
          const ReasoningDelta d = split_reasoning(r.text, reasoning_model_);
          json msg = {{"role", "assistant"}, {"content", d.content}};
          if (!d.reasoning.empty() || reasoning_model_) msg["reasoning_content"] = d.reasoning;
          choice["message"] = msg;
        } else {
          if (job.logprobs) {
            json tokens = json::array(), token_lps = json::array(), tops = json::array(), offsets = json::array();
            size_t offset = 0;
            for (const json& e : lps) {
              tokens.push_back(e["token"]);
              token_lps.push_back(e["logprob"]);
              json t = json::object();
              for (const json& a : e["top_logprobs"]) t[a["token"].get<std::string>()] = a["logprob"];
              tops.push_back(t);
              offsets.push_back(offset);
              offset += e["token"].get<std::string>().size();
            }
            lp = {{"tokens", tokens}, {"token_logprobs", token_lps}, {"top_logprobs", tops}, {"text_offset", offsets}};
          }
          choice["text"] = r.text;
        }
        choice["logprobs"] = lp;
        choices.push_back(choice);
      }
      return send_json(200, {{"id", id},
                             {"object", chat ? "chat.completion" : "text_completion"},
                             {"created", created},
                             {"model", opt_.model_name},
                             {"choices", choices},
                             {"usage",
                              {{"prompt_tokens", prompt_tokens},
                               {"completion_tokens", completion_tokens},
                               {"total_tokens", prompt_tokens + completion_tokens}}}});
    }

    // ---- streaming: Server-Sent Events, one chunk per piece of text, [DONE] last
    w.begin_stream(200, "text/event-stream");
    auto chunk = [&](const json& choice) {
      json c = {{"id", id},
                {"object", chat ? "chat.completion.chunk" : "text_completion"},
                {"created", created},
                {"model", opt_.model_name},
                {"choices", json::array({choice})}};
      return w.write("data: " + c.dump() + "\n\n");
    };
    std::vector<ReasoningParser> parsers(hs.size(), ReasoningParser(reasoning_model_));
    std::vector<bool> done(hs.size(), false);
    if (chat)
      for (size_t i = 0; i < hs.size(); ++i)
        if (!chunk({{"index", i}, {"delta", {{"role", "assistant"}, {"content", ""}}}, {"logprobs", nullptr},
                    {"finish_reason", nullptr}}))
          return cancel_all();
    auto text_chunk = [&](size_t i, const std::string& content, const std::string& reasoning, const json& lp) {
      if (content.empty() && reasoning.empty() && lp.is_null()) return true;
      json choice = {{"index", i}, {"finish_reason", nullptr}, {"logprobs", nullptr}};
      if (chat) {
        json delta = json::object();
        if (!reasoning.empty()) delta["reasoning_content"] = reasoning;
        if (!content.empty() || reasoning.empty()) delta["content"] = content;
        choice["delta"] = delta;
        if (!lp.is_null()) choice["logprobs"] = {{"content", json::array({lp})}};
      } else {
        choice["text"] = content;
        if (!lp.is_null())
          choice["logprobs"] = {{"tokens", {lp["token"]}}, {"token_logprobs", {lp["logprob"]}}};
      }
      return chunk(choice);
    };
    size_t left = hs.size();
    while (left > 0) {
      bool progressed = false;
      for (size_t i = 0; i < hs.size(); ++i) {
        if (done[i]) continue;
        TokenEvent e;
        bool got = false, fin = false;
        if (!hs[i]->next(e, got, fin, left == 1 ? 100 : 0)) continue;
        progressed = true;
        if (got) {
          const json lp = e.logprobs ? logprob_entry(e) : json(nullptr);
          ReasoningDelta d = chat ? parsers[i].push(e.text) : ReasoningDelta{"", e.text};
          if (!text_chunk(i, d.content, d.reasoning, lp)) return cancel_all();
        }
        if (fin) {
          const RequestResult& r = hs[i]->result();
          if (chat) {
            const ReasoningDelta d = parsers[i].flush();
            if (!text_chunk(i, d.content, d.reasoning, nullptr)) return cancel_all();
          }
          json last = {{"index", i}, {"logprobs", nullptr}};
          last["finish_reason"] = r.finish_reason == "error" ? json("error") : json(r.finish_reason);
          if (chat) last["delta"] = json::object();
          else last["text"] = "";
          if (!chunk(last)) return cancel_all();
          done[i] = true;
          --left;
        }
      }
      if (!progressed && w.client_gone()) return cancel_all();
      if (!progressed && left > 1) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    if (job.include_usage) {
      int64_t completion_tokens = 0;
      for (auto& h : hs) completion_tokens += int64_t(h->result().ids.size());
      json c = {{"id", id},
                {"object", chat ? "chat.completion.chunk" : "text_completion"},
                {"created", created},
                {"model", opt_.model_name},
                {"choices", json::array()},
                {"usage",
                 {{"prompt_tokens", prompt_tokens},
                  {"completion_tokens", completion_tokens},
                  {"total_tokens", prompt_tokens + completion_tokens}}}};
      if (!w.write("data: " + c.dump() + "\n\n")) return;
    }
    w.write("data: [DONE]\n\n");
    w.end();
  } catch (const ApiError& e) {
    if (!w.responded()) w.send(e.status, "application/json", api_error_body(e.status, e.what(), e.param));
  }
}

}  // namespace fathom::serve
