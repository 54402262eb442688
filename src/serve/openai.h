// The OpenAI-compatible HTTP API of `fathom serve` over the serving engine (engine.h):
//
//   POST /v1/chat/completions   messages -> the model's chat template -> generation
//   POST /v1/completions        prompt (a string, or token ids) -> generation
//   GET  /v1/models             the one model served
//   GET  /                      the web chat page (web_page.h)
//   GET  /health                {"status": "ok"}
//   GET  /metrics               Prometheus text: queue depth, running requests, KV positions held,
//                               tokens and requests counted, MTP drafts verified and accepted
//
// Both generation endpoints take model, max_tokens (max_completion_tokens for chat), temperature,
// top_p, n, stop, seed, presence_penalty, frequency_penalty, logprobs (+ top_logprobs for chat),
// and, as vLLM does, top_k, min_p, repetition_penalty and ignore_eos;
// stream (Server-Sent Events, "data: [DONE]" last; stream_options.include_usage), and return
// usage. For a model whose chat template opens a reasoning block (DeepSeek-R1's "<think>"), chat
// answers carry the reasoning as message.reasoning_content (delta.reasoning_content when
// streaming) and the rest as content.
//
// Every request error is an OpenAI-style JSON body {"error": {"message", "type", "param",
// "code"}} with a 4xx status: malformed JSON or invalid UTF-8, a field of the wrong type or out of
// range (named), an unknown model (404), empty messages, a prompt that does not fit the context,
// a missing or wrong API key (401), a full queue (429). A client that disconnects mid-stream
// cancels its request at once (its KV cache is freed at the engine's next step).
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "serve/engine.h"
#include "serve/http.h"
#include "tokenizer/chat_template.h"

namespace fathom::serve {

struct ApiOptions {
  std::string model_name = "fathom";  // the id /v1/models lists and requests must name (or omit)
  std::string api_key;                // non-empty: every /v1/ request needs "Authorization: Bearer <key>"
  int64_t max_tokens_limit = 4096;    // the largest max_tokens a request may ask for
  int64_t default_max_tokens = 256;   // when a request gives none
  int max_n = 16;                     // the largest n
  // What a request that does not say gets: OpenAI's temperature 1 and top_p 1, or the model's
  // generation_config.json sampling defaults (fathom serve reads them, as vLLM does).
  SamplingParams defaults;
};

class OpenAiApi {
 public:
  OpenAiApi(Engine& engine, ApiOptions options);
  // The HTTP handler: routes, validates, generates, answers.
  void handle(const HttpRequest& req, HttpResponseWriter& w);

 private:
  Engine& engine_;
  ApiOptions opt_;
  bool reasoning_model_ = false;  // the chat template ends its generation prompt inside "<think>"
  // The tokenizer's chat template, parsed once here (rendered by every chat request, from any
  // thread: rendering is const); null when there is none or it does not parse (template_error_).
  std::shared_ptr<const ChatTemplate> template_;
  ChatTemplateOptions template_options_;
  std::string template_error_;
};

// The JSON body of an OpenAI-style error.
std::string api_error_body(int status, const std::string& message, const std::string& param = "");

}  // namespace fathom::serve
