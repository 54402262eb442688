// fathom serve: the OpenAI-compatible HTTP server (src/serve/) over one model.
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <thread>

#include "commands.h"
#include "core/error.h"
#include "serve/engine.h"
#include "serve/http.h"
#include "serve/openai.h"
#include "text_common.h"

namespace fathom::cli {

namespace {
std::atomic<bool> g_stop{false};
extern "C" void on_signal(int) { g_stop.store(true); }
}  // namespace

Command add_serve(CLI::App& app) {
  struct Args {
    ModelArgs model;
    std::string tokenizer, host = "127.0.0.1", api_key, name;
    int port = 8080, max_batch = 8, max_queue = 64;
    bool speculative = false, no_prefix_caching = false;
    int kv_block_size = 16;
    int64_t max_tokens = 4096, prefill_chunk = 512, max_kv_tokens = 0;
    double max_body_mb = 1.0;
  };
  auto a = std::make_shared<Args>();
  CLI::App* cmd = app.add_subcommand("serve", "an OpenAI-compatible HTTP server (chat and text completions, streaming)");
  add_model_options(cmd, a->model);
  cmd->add_option("--tokenizer", a->tokenizer, "tokenizer directory or tokenizer.json (default: the model directory's)");
  cmd->add_option("--host", a->host, "address to listen on (127.0.0.1: this machine only)");
  cmd->add_option("--port", a->port, "port to listen on (0: any free port, printed)")->check(CLI::Range(0, 65535));
  cmd->add_option("--api-key", a->api_key,
                  "require 'Authorization: Bearer KEY' on /v1/ requests (default: $FATHOM_API_KEY when set)");
  cmd->add_option("--served-model-name", a->name, "the model id clients use (default: the model directory's name)");
  cmd->add_option("--max-batch", a->max_batch, "requests decoded together at most")->check(CLI::Range(1, 1024));
  cmd->add_option("--max-queue", a->max_queue, "requests waiting beyond the batch; more get HTTP 429")
      ->check(CLI::Range(0, 1000000));
  cmd->add_option("--prefill-chunk", a->prefill_chunk, "prompt tokens prefilled per step beside the decoding ones")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  cmd->add_option("--max-kv-tokens", a->max_kv_tokens,
                  "the paged KV cache's size in tokens, for all requests together (0: on a GPU what --gpu-memory "
                  "leaves, on the CPU --max-batch full contexts up to 1 GiB)")
      ->check(CLI::Range(int64_t(0), int64_t(1) << 40));
  cmd->add_option("--kv-block-size", a->kv_block_size, "tokens per KV-cache block")->check(CLI::Range(1, 4096));
  cmd->add_flag("--no-prefix-caching", a->no_prefix_caching,
                "recompute every prompt instead of reusing cached blocks of earlier prompts");
  cmd->add_flag("--speculative", a->speculative,
                "MTP self-speculative decoding: the model's MTP module drafts a token, the next step verifies it "
                "(the output stays plain decoding's)");
  cmd->add_option("--max-tokens-limit", a->max_tokens, "the largest max_tokens a request may ask for")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 24));
  cmd->add_option("--max-body-mb", a->max_body_mb, "the largest request body, in MiB (more: HTTP 413)")
      ->check(CLI::Range(0.001, 1024.0));
  return [a] {
    if (a->api_key.empty())
      if (const char* k = std::getenv("FATHOM_API_KEY")) a->api_key = k;
    auto tok = load_tokenizer(a->model.dir, a->tokenizer);
    auto model = open_model(a->model);
    check_tokenizer_fits(*tok, *model);
    serve::EngineOptions eo;
    eo.max_batch = a->max_batch;
    eo.max_queue = a->max_queue;
    eo.prefill_chunk = a->prefill_chunk;
    eo.max_kv_tokens = a->max_kv_tokens;
    eo.kv_block_size = a->kv_block_size;
    eo.prefix_caching = !a->no_prefix_caching;
    eo.speculative = a->speculative;
    FATHOM_CHECK(!a->speculative || model->has_mtp(), "--speculative: model ", a->model.dir,
                 " has no MTP module (num_nextn_predict_layers is 0)");
    serve::Engine engine(*model, *tok, eo);
    serve::ApiOptions ao;
    ao.model_name = !a->name.empty() ? a->name : std::filesystem::path(a->model.dir).lexically_normal().filename().string();
    if (ao.model_name.empty() || ao.model_name == ".") ao.model_name = "fathom";
    ao.api_key = a->api_key;
    ao.max_tokens_limit = a->max_tokens;
    ao.default_max_tokens = std::min<int64_t>(256, a->max_tokens);
    // a request's sampling defaults: OpenAI's (temperature 1), or the model's generation_config.json
    SamplingArgs g;
    g.temperature = 1.0;
    apply_generation_config(nullptr, a->model.dir, g);
    ao.defaults.temperature = float(g.temperature);
    ao.defaults.top_p = float(g.top_p);
    ao.defaults.top_k = g.top_k;
    ao.defaults.min_p = float(g.min_p);
    ao.defaults.repetition_penalty = float(g.repetition_penalty);
    ao.defaults.validate();
    serve::OpenAiApi api(engine, ao);
    serve::HttpServerOptions ho;
    ho.host = a->host;
    ho.port = a->port;
    ho.max_body_bytes = size_t(a->max_body_mb * 1024 * 1024);
    ho.error_body = [](int status, const std::string& message) { return serve::api_error_body(status, message); };
    serve::HttpServer server(ho, [&api](const serve::HttpRequest& r, serve::HttpResponseWriter& w) { api.handle(r, w); });
    server.start();
    std::signal(SIGINT, on_signal);
    std::signal(SIGTERM, on_signal);
    std::printf("fathom serve: model '%s' on http://%s:%d (OpenAI API under /v1; %s)\n", ao.model_name.c_str(),
                a->host.c_str(), server.port(), ao.api_key.empty() ? "no API key" : "API key required");
    std::printf("fathom serve: KV cache of %lld tokens in blocks of %d (%s), batches of up to %d on %s\n",
                static_cast<long long>(engine.stats().kv_capacity), a->kv_block_size,
                a->no_prefix_caching ? "no prefix caching" : "prefix caching", a->max_batch, model->backend_name());
    std::fflush(stdout);
    while (!g_stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    std::printf("fathom serve: stopping\n");
    server.stop();
  };
}

}  // namespace fathom::cli
