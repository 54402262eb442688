// The serving engine's throughput (src/serve/engine.h: continuous batching over the paged KV
// cache, optionally MTP speculative decoding) at several numbers of concurrent requests, against
// the memory-bandwidth roofline of a decode step of that batch, measured in the same run.
//
// Each run submits C requests at once, each a different prompt of --prompt tokens and
// --gen greedy tokens (EOS ignored), through one Engine with max_batch C. Reported:
//   output tok/s     all generated tokens / (first submit -> last finish): prefill included
//   decode tok/s     the pace while all C requests were decoding (from the moment the last one
//                    got its first token until the first one finished): C tokens a step over
//                    the time between the steps' tokens coming back (the engine's step records,
//                    EngineOptions::trace_steps), or — with no such steps (MTP drafting) — the
//                    tokens the readers got in that window over its length. (The readers' count
//                    is also printed: it misses most of the window's last step, whose tokens
//                    reach the other readers after the first one to finish: ~1 step in 47.)
//                    Before the clock a warm-up runs a step of the measured shape, so that its
//                    CUDA graph is recorded once, as a running server would have it (--cold: not)
//   roofline tok/s   (CUDA) C / (bytes one decode step of the batch must read / copy bandwidth):
//                    every non-expert weight once, the routed experts the batch touches
//                    (E·(1 − (1 − k/E)^C) per MoE layer, routing taken as uniform), and every
//                    sequence's latent cache (prompt + gen/2 tokens)
//   accepted         MTP drafts accepted / verified (with --speculative)
//
// The model is random (--config NAME: bench/configs/NAME.json, weights made where they live;
// --mtp adds one random MTP module, whose drafts are then meaningless) or a checkpoint
// (--model DIR). Prompts: random ids, or (--text FILE) windows of that file's tokens.
//
// usage: bench_serve_engine (--config NAME | --model DIR) [--dtype bf16|fp8] [--device cuda|cpu]
//          [--tokenizer PATH] [--concurrency 1,8,32,128] [--prompt 1024] [--gen 64]
//          [--speculative] [--mtp] [--text FILE] [--prefill-chunk 2048] [--repeat] [--graph on|off]
// --graph off: the decode steps (one token per request) run eagerly instead of as a replayed
// CUDA graph (Model::set_graph_steps), for a same-run comparison.
// "host": the scheduler's time a step of plain decoding (every request one token, sampled on the
// device) outside the model's calls — planning, detokenizing, stop strings, handing the tokens
// to the requests (EngineStats::decode_*).
// --repeat (CUDA): the last concurrency again with each kind of op (matmuls, attention, routing,
// experts) launched twice; the decode step's added milliseconds are what that kind costs in it.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "fathom/model.h"
#include "fathom/tokenizer.h"
#include "ops/ops.h"
#include "serve/engine.h"
#ifdef FATHOM_HAVE_CUDA
#include "ops/cuda/bandwidth.h"
#include "ops/cuda/cuda_ops.h"
#endif

using namespace fathom;
using Clock = std::chrono::steady_clock;

namespace {

std::vector<int64_t> split_ints(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, ',');)
    if (!x.empty()) out.push_back(std::atol(x.c_str()));
  return out;
}

double seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// Bytes one routed expert's three projections occupy as placed.
double expert_bytes(const ModelConfig& c, bool fp8) {
  const double n = 3.0 * double(c.moe_intermediate_size) * double(c.hidden_size);
  if (!fp8) return 2 * n;
  const double blocks = 3.0 * std::ceil(c.moe_intermediate_size / 128.0) * std::ceil(c.hidden_size / 128.0);
  return n + 4 * blocks;
}

struct Result {
  int64_t concurrency = 0;
  double output_tps = 0, decode_tps = 0, roofline = 0, ttft_p50 = 0, accepted = -1;
  double host_us = 0, model_us = 0;  // the scheduler's time a plain decode step outside / in the model's calls
  // the window's chained steps (EngineOptions::trace_steps): how many, the time between their
  // tokens coming back, and in it the decode_launch call, the decode_wait call, and the time from
  // the step before coming back to this one's launch
  int64_t window_steps = 0;
  double period_us = 0, launch_us = 0, wait_us = 0, gap_us = 0;
  double readers_tps = 0;  // decode tok/s by the readers' clocks (tokens counted as they arrived)
};

}  // namespace

int main(int argc, char** argv) {
  std::string config, model_dir, dtype = "bf16", device = "cuda", tokenizer, text, graph = "on";
  std::string conc = "1,8,32,128";
  int64_t n_prompt = 1024, n_gen = 64, chunk = 2048;
  bool speculative = false, mtp = false, repeat = false, cold = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "bench_serve_engine: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--config") config = next();
    else if (a == "--model") model_dir = next();
    else if (a == "--dtype") dtype = next();
    else if (a == "--device") device = next();
    else if (a == "--tokenizer") tokenizer = next();
    else if (a == "--concurrency") conc = next();
    else if (a == "--prompt") n_prompt = std::atol(next().c_str());
    else if (a == "--gen") n_gen = std::atol(next().c_str());
    else if (a == "--prefill-chunk") chunk = std::atol(next().c_str());
    else if (a == "--text") text = next();
    else if (a == "--speculative") speculative = true;
    else if (a == "--mtp") mtp = true;
    else if (a == "--repeat") repeat = true;
    else if (a == "--cold") cold = true;
    else if (a == "--graph") graph = next();
    else {
      std::fprintf(stderr, "usage: bench_serve_engine (--config NAME | --model DIR) [--dtype bf16|fp8] "
                           "[--device cuda|cpu] [--tokenizer PATH] [--concurrency 1,8,32,128] [--prompt N] [--gen N] "
                           "[--speculative] [--mtp] [--text FILE] [--prefill-chunk N] [--repeat] [--graph on|off] [--cold]\n");
      return 2;
    }
  }
  try {
    FATHOM_CHECK(config.empty() != model_dir.empty(), "give --config NAME or --model DIR");
    FATHOM_CHECK(dtype == "bf16" || dtype == "fp8", "--dtype takes bf16 or fp8, not ", dtype);
    FATHOM_CHECK(device == "cuda" || device == "cpu", "--device takes cuda or cpu, not ", device);
    FATHOM_CHECK(graph == "on" || graph == "off", "--graph takes on or off, not ", graph);
    FATHOM_CHECK(n_prompt >= 1 && n_gen >= 2, "--prompt must be >= 1 and --gen >= 2");
    const bool cuda = device == "cuda";
    if (cuda) FATHOM_CHECK(cuda_available(), "no CUDA GPU on this machine (or a build without CUDA): use --device cpu");
    ModelOptions o;
    o.device = cuda ? DeviceKind::Cuda : DeviceKind::Cpu;
    o.precision = cuda ? Precision::Bf16 : Precision::Fp32;
    o.progress = false;
    std::unique_ptr<Model> m;
    auto t0 = Clock::now();
    if (!config.empty()) {
      ModelConfig c = load_config(std::string(FATHOM_SOURCE_DIR) + "/bench/configs/" + config + ".json");
      if (mtp) c.num_nextn_predict_layers = 1;
      m = Model::random(c, o, dtype == "fp8" ? DType::F8_E4M3 : DType::BF16, 1234);
      FATHOM_CHECK(!tokenizer.empty(), "--config needs --tokenizer PATH (a tokenizer.json whose ids cover the vocabulary, "
                                       "e.g. ../shared/data/deepseek-v3-tokenizer)");
    } else {
      m = Model::load(model_dir, o);
      if (tokenizer.empty()) tokenizer = model_dir;
    }
    m->set_graph_steps(graph == "on");  // off: the decode steps eagerly, as before graphs
    auto tok = Tokenizer::load(tokenizer);
    const ModelConfig& c = m->config();
    const ParamCounts pc = m->param_counts();
    std::printf("bench_serve_engine: %s%s on %s (%s), %.2fB parameters, %.2f GB of active weights per token; made "
                "in %.1f s\n",
                config.empty() ? model_dir.c_str() : config.c_str(), config.empty() ? "" : (" " + dtype).c_str(),
                m->backend_name(), precision_name(m->precision()), pc.total / 1e9, pc.active_weight_bytes / 1e9,
                seconds(t0, Clock::now()));
    FATHOM_CHECK(!speculative || m->has_mtp(), "--speculative: the model has no MTP module (add --mtp for a random one)");
    double bw = 0;
#ifdef FATHOM_HAVE_CUDA
    if (cuda) {
      bw = cuda::copy_bandwidth(size_t(2) << 30, 5);
      std::printf("device copy bandwidth: %.3f TB/s\n", bw / 1e12);
    }
#endif
    // prompts: random ids (every one different), or windows of a text's tokens
    std::vector<int32_t> source;
    if (!text.empty()) {
      std::ifstream f(text, std::ios::binary);
      FATHOM_CHECK(f.good(), "cannot read --text ", text);
      std::stringstream ss;
      ss << f.rdbuf();
      source = tok->encode(ss.str(), false);
      FATHOM_CHECK(int64_t(source.size()) > n_prompt, "--text ", text, " has ", source.size(), " tokens, fewer than --prompt");
    }
    auto prompt = [&](int64_t i) {
      std::vector<int32_t> p;
      if (!source.empty()) {
        const int64_t span = int64_t(source.size()) - n_prompt;
        const int64_t at = (i * 7919) % (span + 1);
        p.assign(source.begin() + at, source.begin() + at + n_prompt);
      } else {
        uint64_t s = 0x9E3779B97F4A7C15ull * uint64_t(i + 1);
        for (int64_t t = 0; t < n_prompt; ++t) {
          s = s * 6364136223846793005ull + 1442695040888963407ull;
          p.push_back(int32_t(2 + (s >> 33) % uint64_t(c.vocab_size - 2)));
        }
      }
      return p;
    };
    const int n_moe = std::max(0, c.num_hidden_layers - c.first_k_dense_replace);
    const double kv_row = double(c.kv_lora_rank + c.qk_rope_head_dim) * 2 * c.num_hidden_layers;  // bf16 latent
    std::vector<Result> results;
    auto measure = [&](int64_t C) {
      FATHOM_CHECK(C >= 1 && C <= 1024, "concurrency ", C, " is out of range (1 to 1024)");
      serve::EngineOptions eo;
      eo.max_batch = int(C);
      eo.max_queue = int(C);
      eo.prefill_chunk = chunk;
      eo.speculative = speculative;
      eo.prefix_caching = false;  // every prompt differs; nothing to hit
      eo.trace_steps = 100000;      // the chained steps' times, for the window's breakdown
      serve::Engine engine(*m, *tok, eo);
      {  // warm-up: one short request (first launches, cuBLAS handles, graph-free paths)
        serve::RequestParams w;
        w.prompt = prompt(1000 + C);
        w.prompt.resize(16);
        w.options.max_tokens = 4;
        w.options.sampling.temperature = 0;
        w.options.ignore_eos = true;
        engine.submit(w)->wait();
      }
      if (!cold) {
        // warm-up: a decode step of the measured shape — C requests, the longest context of the
        // window (its block-table width) — so that the step's CUDA graph is recorded before the
        // clock: once per batch size and table width in a server's life (~3 ms at 32 requests of
        // v3-4.9b, first a step run eagerly), that recording otherwise fell in the window
        std::vector<std::shared_ptr<serve::RequestHandle>> ws;
        for (int64_t i = 0; i < C; ++i) {
          serve::RequestParams w;
          w.prompt = prompt(2000 + C + i);
          if (i == 0) {  // as long as the window's last steps' contexts, less its 4 tokens
            const std::vector<int32_t> more = prompt(3000 + C);
            w.prompt.insert(w.prompt.end(), more.begin(), more.end());
            w.prompt.resize(size_t(std::max<int64_t>(n_prompt, n_prompt + n_gen - 4)));
          } else {
            w.prompt.resize(size_t(std::min<int64_t>(16, n_prompt)));
          }
          w.options.max_tokens = 4;
          w.options.sampling.temperature = 0;
          w.options.ignore_eos = true;
          ws.push_back(engine.submit(w));
        }
        for (auto& w : ws) w->wait();
      }
      const serve::EngineStats s0 = engine.stats();
      const size_t trace0 = engine.step_trace().size();
      std::vector<std::shared_ptr<serve::RequestHandle>> hs;
      std::vector<std::vector<Clock::time_point>> stamps(static_cast<size_t>(C));
      const auto start = Clock::now();
      for (int64_t i = 0; i < C; ++i) {
        serve::RequestParams p;
        p.prompt = prompt(i);
        p.options.max_tokens = n_gen;
        p.options.sampling.temperature = 0;
        p.options.ignore_eos = true;
        hs.push_back(engine.submit(p));
      }
      std::vector<std::thread> readers;
      for (int64_t i = 0; i < C; ++i)
        readers.emplace_back([&, i] {
          serve::TokenEvent e;
          bool got = false, done = false;
          while (!done) {
            hs[size_t(i)]->next(e, got, done, 1000);
            if (got && e.id >= 0) stamps[size_t(i)].push_back(Clock::now());
          }
        });
      for (auto& t : readers) t.join();
      const auto end = Clock::now();
      int64_t total = 0;
      Clock::time_point all_started = start, first_done = end;
      std::vector<double> ttft;
      for (int64_t i = 0; i < C; ++i) {
        const serve::RequestResult& r = hs[size_t(i)]->result();
        FATHOM_CHECK(r.finish_reason == "length" && int64_t(r.ids.size()) == n_gen, "request ", i, " ended '",
                     r.finish_reason, "' after ", r.ids.size(), " tokens: ", r.error);
        total += int64_t(r.ids.size());
        const auto& st = stamps[size_t(i)];
        all_started = std::max(all_started, st.front());
        first_done = std::min(first_done, st.back());
        ttft.push_back(r.ttft_seconds);
      }
      int64_t in_window = 0;  // tokens streamed while every request was decoding
      for (const auto& st : stamps)
        for (const auto& t : st) in_window += t > all_started && t <= first_done;
      std::sort(ttft.begin(), ttft.end());
      Result res;
      res.concurrency = C;
      res.output_tps = double(total) / seconds(start, end);
      res.readers_tps = first_done > all_started ? double(in_window) / seconds(all_started, first_done) : 0;
      res.decode_tps = res.readers_tps;
      res.ttft_p50 = ttft[ttft.size() / 2];
      const serve::EngineStats s1 = engine.stats();
      if (s1.decode_steps > s0.decode_steps) {
        const double steps = double(s1.decode_steps - s0.decode_steps);
        const double model = s1.decode_model_seconds - s0.decode_model_seconds;
        res.model_us = 1e6 * model / steps;
        res.host_us = 1e6 * ((s1.decode_step_seconds - s0.decode_step_seconds) - model) / steps;
      }
      {  // the chained decode steps whose tokens came back inside the window (all C requests in them)
        const std::vector<serve::StepRecord> tr = engine.step_trace();
        double period = 0, launch = 0, wait = 0, gap = 0;
        int64_t n = 0;
        for (size_t i = trace0 + 1; i < tr.size(); ++i) {
          const serve::StepRecord &a = tr[i - 1], &b = tr[i];
          if (b.batch != C || a.batch != C || a.back <= all_started || b.back > first_done) continue;
          period += seconds(a.back, b.back), launch += b.launch_seconds, wait += b.wait_seconds;
          gap += seconds(a.back, b.launched);
          ++n;
        }
        if (n > 0) {
          res.window_steps = n;
          res.period_us = 1e6 * period / double(n), res.launch_us = 1e6 * launch / double(n);
          res.wait_us = 1e6 * wait / double(n), res.gap_us = 1e6 * gap / double(n);
          res.decode_tps = double(C) * double(n) / period;
        }
      }
      if (speculative && s1.spec_drafts > s0.spec_drafts)
        res.accepted = double(s1.spec_accepted - s0.spec_accepted) / double(s1.spec_drafts - s0.spec_drafts);
      if (bw > 0) {
        const double E = c.n_routed_experts, k = c.num_experts_per_tok;
        const double touched = E * (1 - std::pow(1 - k / E, double(C)));
        const double bytes = double(pc.active_weight_bytes) + n_moe * (touched - k) * expert_bytes(c, dtype == "fp8") +
                             double(C) * double(n_prompt + n_gen / 2) * kv_row;
        res.roofline = double(C) * bw / bytes;
      }
      std::printf("  %4ld concurrent: output %.1f tok/s, decode %.1f tok/s%s, TTFT p50 %.3f s%s; a decode step %.0f us in the model, %.0f on the host\n",
                  long(C),
                  res.output_tps, res.decode_tps,
                  res.roofline > 0 ? (" (" + std::to_string(int(100 * res.decode_tps / res.roofline + 0.5)) +
                                      "% of roofline " + std::to_string(int64_t(res.roofline)) + ")").c_str()
                                   : "",
                  res.ttft_p50,
                  res.accepted >= 0 ? (", accepted " + std::to_string(int(100 * res.accepted + 0.5)) + "%").c_str() : "",
                  res.model_us, res.host_us);
      if (res.window_steps > 0)
        std::printf("        the window's %ld decode steps: one every %.0f us (the readers' clocks: %.1f tok/s); a "
                    "step's launch call %.0f us, %.0f us after the step before came back; its wait call %.0f us\n",
                    long(res.window_steps), res.period_us, res.readers_tps, res.launch_us, res.gap_us, res.wait_us);
      std::fflush(stdout);
      return res;
    };
    for (int64_t C : split_ints(conc)) results.push_back(measure(C));
#ifdef FATHOM_HAVE_CUDA
    // --repeat: the last concurrency again with each kind of op launched twice (the second launch
    // redoing the first's work): the decode step's added time is what that kind costs in it
    struct Added {
      const char* kind;
      double ms;
    };
    std::vector<Added> added;
    if (repeat && cuda && !results.empty()) {
      const Result base = results.back();
      const std::pair<const char*, int> kinds[] = {{"matmuls", cuda::kRepeatGemv},
                                                   {"attention", cuda::kRepeatAttention},
                                                   {"routing", cuda::kRepeatGate},
                                                   {"experts", cuda::kRepeatExperts}};
      for (const auto& [kind, mask] : kinds) {
        cuda::set_repeat(mask);
        m->drop_graphs();  // graphs recorded before would replay the steps without the repeats
        const Result r = measure(base.concurrency);
        cuda::set_repeat(0);
        m->drop_graphs();
        if (r.decode_tps > 0 && base.decode_tps > 0)
          added.push_back({kind, 1e3 * double(base.concurrency) * (1 / r.decode_tps - 1 / base.decode_tps)});
      }
    }
#endif
    std::string name = config;
    if (name.empty()) {
      name = model_dir;
      while (!name.empty() && name.back() == '/') name.pop_back();
      name = name.substr(name.find_last_of('/') + 1);
    }
    std::printf("\n%-11s %-6s %-5s %6s %12s %12s %12s %7s %9s %9s\n", "model", "dtype", "mtp", "conc", "output tok/s",
                "decode tok/s", "roofline", "ratio", "TTFT p50", "accepted");
    for (const Result& r : results) {
      std::printf("%-11s %-6s %-5s %6ld %12.1f", name.c_str(), config.empty() ? "stored" : dtype.c_str(),
                  speculative ? "yes" : "no", long(r.concurrency), r.output_tps);
      if (r.decode_tps <= 0) {  // no moment when all were decoding: see --gen
        std::printf(" %12s %12.0f %7s", "-", r.roofline, "-");
      } else if (r.roofline > 0)
        std::printf(" %12.1f %12.0f %6.1f%%", r.decode_tps, r.roofline, 100 * r.decode_tps / r.roofline);
      else
        std::printf(" %12.1f %12s %7s", r.decode_tps, "-", "-");
      std::printf(" %8.3fs", r.ttft_p50);
      if (r.accepted >= 0)
        std::printf(" %8.1f%%\n", 100 * r.accepted);
      else
        std::printf(" %9s\n", "-");
    }
#ifdef FATHOM_HAVE_CUDA
    if (!added.empty()) {
      const Result& base = results.back();
      std::printf("\n%s at %ld concurrent: a decode step takes %.2f ms; each kind of op twice adds\n", name.c_str(),
                  long(base.concurrency), 1e3 * double(base.concurrency) / base.decode_tps);
      for (const Added& a : added) std::printf("  %-10s %+8.2f ms\n", a.kind, a.ms);
    }
#endif
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_serve_engine: %s\n", e.what());
    return 1;
  }
}
