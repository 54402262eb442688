// Batch-1 decode and prefill speed of the CPU backend on a random-weight DeepSeek-V3-shaped
// model (~134M parameters, 57M active: the shape of ../shared/tools/gen_bench_v3_135m.py),
// against the memory-bandwidth roofline measured in the same run.
//
// Decode reads, per token, every active weight once (attention, dense/shared/4 routed
// experts, router, LM head) plus the KV cache; the roofline is
//     tokens/s ≤ read bandwidth / (active weight bytes + KV bytes read per token).
//
// usage: bench_decode [--model DIR] [--tokens N] [--prompt N] [--prefill N] [--mla absorbed|naive]
// Without --model, the checkpoint is generated (bf16, seed 1234) into bench-models/v3-135m.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/files.h"
#include "core/thread_pool.h"
#include "fathom/model.h"
#include "model/random_init.h"
#include "ops/cpu/membw.h"

using namespace fathom;
using Clock = std::chrono::steady_clock;

namespace {
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }
}  // namespace

int main(int argc, char** argv) {
  std::string model_dir, mla = "absorbed";
  int64_t n_decode = 128, n_prompt = 16, n_prefill = 512;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "bench_decode: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--model") model_dir = next();
    else if (a == "--tokens") n_decode = std::atol(next().c_str());
    else if (a == "--prompt") n_prompt = std::atol(next().c_str());
    else if (a == "--prefill") n_prefill = std::atol(next().c_str());
    else if (a == "--mla") mla = next();
    else {
      std::fprintf(stderr, "usage: bench_decode [--model DIR] [--tokens N] [--prompt N] [--prefill N] [--mla absorbed|naive]\n");
      return 2;
    }
  }
  try {
    if (model_dir.empty()) {
      model_dir = "bench-models/v3-135m";
      if (!std::filesystem::exists(model_dir + "/model.safetensors")) {
        std::string cfg = std::string(FATHOM_SOURCE_DIR) + "/bench/configs/v3-135m.json";
        std::fprintf(stderr, "generating %s from %s ...\n", model_dir.c_str(), cfg.c_str());
        RandomInitOptions o;
        write_random_checkpoint(read_file(cfg), model_dir, o, cfg);
      }
    }
    ModelOptions mo;
    mo.mla_mode = mla == "naive" ? MlaMode::Naive : MlaMode::Absorbed;
    auto model = Model::load(model_dir, mo);
    const ModelConfig& c = model->config();
    ParamCounts pc = model->param_counts();
    ThreadPool& pool = ThreadPool::global();

    // Token ids: a fixed pseudo-random prompt.
    std::vector<int32_t> prompt;
    for (int64_t i = 0; i < std::max(n_prompt, n_prefill); ++i) prompt.push_back(int32_t((i * 7919 + 13) % c.vocab_size));

    const double bw = cpu::measure_read_bandwidth(pool);  // GB/s, before and after: take the best
    // ---- decode
    KvCache cache = model->new_cache(n_prompt + n_decode + 1);
    ForwardRequest last;
    last.last_logits_only = true;
    ForwardOutput o = model->forward(std::vector<int32_t>(prompt.begin(), prompt.begin() + n_prompt), cache, last);
    int32_t tok = int32_t(std::max_element(o.logits.f32(), o.logits.f32() + c.vocab_size) - o.logits.f32());
    // warm-up steps (page in the weights that the first tokens' experts did not touch)
    for (int i = 0; i < 8; ++i) {
      o = model->forward({tok}, cache, last);
      tok = int32_t(std::max_element(o.logits.f32(), o.logits.f32() + c.vocab_size) - o.logits.f32());
    }
    const int64_t ctx0 = cache.length();
    auto t0 = Clock::now();
    for (int64_t i = 0; i < n_decode; ++i) {
      o = model->forward({tok}, cache, last);
      tok = int32_t(std::max_element(o.logits.f32(), o.logits.f32() + c.vocab_size) - o.logits.f32());
    }
    const double t_decode = seconds_since(t0);
    const double decode_tps = double(n_decode) / t_decode;
    const double bw2 = cpu::measure_read_bandwidth(pool);
    const double bw_best = std::max(bw, bw2);

    // bytes per decoded token: weights + the KV cache rows attended (average context)
    const double avg_ctx = double(ctx0) + double(n_decode) / 2.0;
    const double kv_bytes = avg_ctx * double(KvCache::bytes_per_token_per_layer(c, mo.mla_mode, 4)) * c.num_hidden_layers;
    const double bytes_per_token = double(pc.active_weight_bytes) + kv_bytes;
    const double roofline_tps = bw_best * 1e9 / bytes_per_token;

    // ---- prefill
    KvCache pcache = model->new_cache(n_prefill);
    auto t1 = Clock::now();
    model->forward(std::vector<int32_t>(prompt.begin(), prompt.begin() + n_prefill), pcache, last);
    const double prefill_tps = double(n_prefill) / seconds_since(t1);

    std::printf("model: %s  (%.1fM params, %.1fM active/token, MLA %s, %d threads)\n", model_dir.c_str(),
                pc.total / 1e6, pc.active_per_token / 1e6, mla_mode_name(mo.mla_mode), pool.size());
    std::printf("read bandwidth (best of 2 measurements): %.2f GB/s (%.2f, %.2f)\n", bw_best, bw, bw2);
    std::printf("bytes per decoded token: %.2f MB weights + %.3f MB KV cache\n", pc.active_weight_bytes / 1e6,
                kv_bytes / 1e6);
    std::printf("\n| metric | value |\n|---|---|\n");
    std::printf("| decode tokens/s (batch 1, %ld tokens after %ld) | %.1f |\n", long(n_decode), long(ctx0), decode_tps);
    std::printf("| decode roofline tokens/s | %.1f |\n", roofline_tps);
    std::printf("| decode / roofline | %.1f%% |\n", 100.0 * decode_tps / roofline_tps);
    std::printf("| effective bandwidth GB/s | %.2f |\n", decode_tps * bytes_per_token / 1e9);
    std::printf("| prefill tokens/s (%ld tokens) | %.1f |\n", long(n_prefill), prefill_tps);
  } catch (const Error& e) {
    std::fprintf(stderr, "bench_decode: error: %s\n", e.what());
    return 2;
  }
  return 0;
}
