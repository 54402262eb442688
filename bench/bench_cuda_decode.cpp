// Decode and prefill speed of the CUDA backend on random-weight DeepSeek models made on the GPU
// (Model::random: no files), against the memory-bandwidth roofline measured in the same run.
//
//   (a) v3-4.9b:      V3-shaped, 4.89B parameters (bench/configs/v3-4.9b.json)
//   (b) v2-lite-16b:  V2-Lite-shaped, 15.7B parameters (bench/configs/v2-lite-16b.json)
// each with bf16 and with FP8 e4m3 (128x128 block scales) weights, absorbed MLA, bf16 latent cache.
//
// Batch-1 decode reads every active weight once per token (attention, the dense or shared +
// top-k routed experts, the router, the LM head) and the latent cache of the context:
//     roofline tokens/s = copy bandwidth / (active weight bytes + latent KV bytes per step).
// Decode steps are Model::decode_greedy (a CUDA graph per step, argmax on the GPU) over B
// sequences — batch 1 over a contiguous cache, larger batches over paged caches of one pool
// (blocks of 16 tokens), as the serving engine keeps them; batch 1 is also timed without the graph (forward_batch, host-launched ops, logits
// downloaded) to show what the graph saves, and with GPU sampling (temperature, top-k, top-p)
// instead of the argmax. Prefill runs one prompt.
//
// usage: bench_cuda_decode [--models v3-4.9b,v2-lite-16b] [--dtypes bf16,fp8] [--prompt 128]
//                          [--decode 64] [--prefill 2048] [--batches 1,8,32] [--repeat]
//                          [--fp8-prefill weight-only,fp8] [--mla absorbed|naive]
// --fp8-prefill: FP8 models' prefill once per mode: weight-only FP8 (the default) and/or the
// FP8 x FP8 product with activations quantized 1x128 (ModelOptions::fp8_activations).
// --mla naive: the per-head K/V cache and attention (ModelOptions::mla_mode), whose bf16 prefill
// runs on the flash attention kernel on Hopper (FATHOM_FLASH_PREFILL=0: on the general kernel).
// --repeat: also the batch-1 step with each kind of op (the GEMVs, the attention, the routing,
// the experts) launched twice, and the time that adds: what that kind costs inside the step.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "fathom/model.h"
#include "ops/ops.h"
#ifdef FATHOM_HAVE_CUDA
#include "ops/cuda/bandwidth.h"
#include "ops/cuda/cuda_ops.h"
#endif

using namespace fathom;
using Clock = std::chrono::steady_clock;

#ifdef FATHOM_HAVE_CUDA
namespace {

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, ',');)
    if (!x.empty()) out.push_back(x);
  return out;
}

std::vector<int32_t> prompt_ids(int64_t n, int64_t vocab, int64_t salt) {
  std::vector<int32_t> ids;
  for (int64_t i = 0; i < n; ++i) ids.push_back(int32_t((i * 7919 + salt * 104729 + 11) % vocab));
  return ids;
}

int32_t argmax(const float* l, int64_t n) { return int32_t(std::max_element(l, l + n) - l); }

struct Row {
  std::string model, dtype, what;
  double tokens_per_s = 0, roofline = 0;  // roofline tokens/s (batch 1 only)
  double added_us = 0;                     // --repeat rows: the time the doubled ops add per step
};

}  // namespace
#endif

int main(int argc, char** argv) {
  std::string models = "v3-4.9b,v2-lite-16b", dtypes = "bf16,fp8", batches = "1,8,32";
  int64_t n_prompt = 128, n_decode = 64, n_prefill = 2048;
  std::string fp8_prefill = "weight-only", mla = "absorbed";
  bool repeat = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "bench_cuda_decode: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--models") models = next();
    else if (a == "--dtypes") dtypes = next();
    else if (a == "--batches") batches = next();
    else if (a == "--prompt") n_prompt = std::atol(next().c_str());
    else if (a == "--decode") n_decode = std::atol(next().c_str());
    else if (a == "--prefill") n_prefill = std::atol(next().c_str());
    else if (a == "--fp8-prefill") fp8_prefill = next();
    else if (a == "--mla") mla = next();
    else if (a == "--repeat") repeat = true;
    else {
      std::fprintf(stderr, "usage: bench_cuda_decode [--models LIST] [--dtypes bf16,fp8] [--batches 1,8,32] "
                           "[--prompt N] [--decode N] [--prefill N] [--fp8-prefill LIST] [--mla absorbed|naive]\n");
      return 2;
    }
  }
#ifndef FATHOM_HAVE_CUDA
  (void)n_prompt, (void)n_decode, (void)n_prefill;
  std::fprintf(stderr, "bench_cuda_decode: this build has no CUDA backend (nvcc was not found at configure time)\n");
  return 1;
#else
  try {
    if (!cuda_available()) {
      std::fprintf(stderr, "bench_cuda_decode: no CUDA GPU on this machine\n");
      return 1;
    }
    const double bw = cuda::copy_bandwidth(size_t(2) << 30, 5);
    std::printf("device copy bandwidth: %.3f TB/s (2 GiB cudaMemcpy D2D, read + write bytes, best of 5)\n", bw / 1e12);
    std::vector<Row> rows;
    for (const std::string& name : split(models)) {
      const ModelConfig c = load_config(std::string(FATHOM_SOURCE_DIR) + "/bench/configs/" + name + ".json");
      double bf16_tps1 = 0;
      for (const std::string& dt : split(dtypes)) {
        FATHOM_CHECK(dt == "bf16" || dt == "fp8", "--dtypes takes bf16 and fp8, not ", dt);
        ModelOptions o;
        o.device = DeviceKind::Cuda;
        o.precision = Precision::Bf16;
        FATHOM_CHECK(mla == "absorbed" || mla == "naive", "--mla takes absorbed or naive, not ", mla);
        o.mla_mode = mla == "naive" ? MlaMode::Naive : MlaMode::Absorbed;
        o.progress = false;
        auto t0 = Clock::now();
        auto m = Model::random(c, o, dt == "fp8" ? DType::F8_E4M3 : DType::BF16, 1234);
        const ParamCounts p = m->param_counts();
        std::printf("\n%s %s: %.2fB parameters (%.2fB active), %.2f GB of active weights per token, made on the GPU "
                    "in %.1f s; KV room for %ld tokens\n",
                    name.c_str(), dt.c_str(), p.total / 1e9, p.active_per_token / 1e9, p.active_weight_bytes / 1e9,
                    since(t0), long(m->max_cache_tokens()));
        const int64_t V = c.vocab_size;
        const int64_t kv_row = (c.kv_lora_rank + c.qk_rope_head_dim) * 2 * c.num_hidden_layers;  // bf16 latent bytes/token
        // prefill (FP8 models: once per --fp8-prefill mode)
        for (const std::string& mode : dt == "fp8" ? split(fp8_prefill) : std::vector<std::string>{"weight-only"}) {
          FATHOM_CHECK(mode == "weight-only" || mode == "fp8", "--fp8-prefill takes weight-only and fp8, not ", mode);
          m->set_fp8_activations(mode == "fp8");
          KvCache warm = m->new_cache(256);
          ForwardRequest r;
          r.last_logits_only = true;
          m->forward(prompt_ids(256, V, 0), warm, r);
          KvCache cache = m->new_cache(n_prefill);
          t0 = Clock::now();
          m->forward(prompt_ids(n_prefill, V, 1), cache, r);
          const double s = since(t0);
          const std::string what = "prefill " + std::to_string(n_prefill) + (dt == "fp8" ? " " + mode : "");
          rows.push_back({name, dt, what, n_prefill / s, 0});
          std::printf("  %s tokens: %.3f s, %.0f tokens/s\n", what.c_str(), s, n_prefill / s);
        }
        m->set_fp8_activations(false);
        for (const std::string& bs : split(batches)) {
          const int64_t B = std::atol(bs.c_str());
          FATHOM_CHECK(B >= 1 && B <= 1024, "batch size ", bs, " is out of range");
          const int64_t per_seq = n_prompt + n_decode + 4, block = 16;
          std::vector<KvCache> caches;
          std::shared_ptr<KvBlockPool> pool;
          if (B > 1) pool = m->new_block_pool(B * (per_seq + block), int(block));
          for (int64_t b = 0; b < B; ++b) {
            if (pool) caches.emplace_back(pool);
            else caches.push_back(m->new_cache(per_seq));
          }
          std::vector<KvCache*> ptrs;
          for (auto& k : caches) ptrs.push_back(&k);
          std::vector<std::vector<int32_t>> step;
          for (int64_t b = 0; b < B; ++b) step.push_back(prompt_ids(n_prompt, V, b + 2));
          if (!pool)
            for (auto& k : caches) k.reserve(per_seq);
          Tensor logits = m->forward_batch(step, ptrs);  // the prompts (untimed)
          std::vector<int32_t> next;
          for (int64_t b = 0; b < B; ++b) next.push_back(argmax(logits.f32() + b * V, V));
          for (int w = 0; w < 2; ++w) next = m->decode_greedy(next, ptrs);  // capture + warm-up
          cuda::profiler_start();  // a profiler run with --profile-from-start off sees the timed steps only
          t0 = Clock::now();
          for (int64_t i = 0; i < n_decode; ++i) next = m->decode_greedy(next, ptrs);
          const double s = since(t0);
          cuda::profiler_stop();
          const double tps = double(B * n_decode) / s;
          double roof = 0;
          if (B == 1) {
            const double ctx = double(n_prompt + 2) + double(n_decode) / 2;  // mean context of the timed steps
            roof = bw / (double(p.active_weight_bytes) + ctx * double(kv_row));
            if (dt == "bf16") bf16_tps1 = tps;
            // the same steps without the graph: every op launched from the host, logits downloaded
            std::vector<std::vector<int32_t>> one = {{next[0]}};
            auto e0 = Clock::now();
            for (int64_t i = 0; i < n_decode / 4; ++i) {
              logits = m->forward_batch(one, ptrs);
              one[0] = {argmax(logits.f32(), V)};
            }
            const double es = since(e0);
            rows.push_back({name, dt, "decode 1, no graph", double(n_decode / 4) / es, 0});
            // the same steps sampling on the GPU (temperature 0.7, top-k 50, top-p 0.9: Ops::sample
            // over the logits instead of the argmax, in the step's graph)
            // from a fresh cache of the same size and the same prompt: the same context lengths
            std::vector<SampleRow> sr(1);
            sr[0].temperature = 0.7f, sr[0].top_k = 50, sr[0].top_p = 0.9f;
            KvCache scache = m->new_cache(n_prompt + n_decode + 4);
            scache.reserve(n_prompt + n_decode + 4);
            std::vector<KvCache*> sptr = {&scache};
            Tensor sl = m->forward_batch({prompt_ids(n_prompt, V, 2)}, sptr);
            std::vector<int32_t> sn = {argmax(sl.f32(), V)};
            for (int w = 0; w < 2; ++w) sn = m->decode_sample(sn, sptr, sr);  // capture + warm-up
            auto s0 = Clock::now();
            for (int64_t i = 0; i < n_decode; ++i) {
              sr[0].u = double(i % 97) / 97.0;
              sn = m->decode_sample(sn, sptr, sr);
            }
            const double ss = since(s0);
            rows.push_back({name, dt, "decode 1, sampled", double(n_decode) / ss, 0});
            std::printf("  decode batch 1 sampled (T 0.7, top-k 50, top-p 0.9): %.1f tokens/s, %.2fx greedy\n",
                        double(n_decode) / ss, double(n_decode) / ss / tps);
          }
          rows.push_back({name, dt, "decode batch " + bs, tps, roof});
#ifdef FATHOM_HAVE_CUDA
          if (B == 1 && repeat) {
            // each kind of op twice: the added time per step is what that kind costs in it
            const std::pair<const char*, int> kinds[] = {{"gemv", cuda::kRepeatGemv},
                                                         {"attention", cuda::kRepeatAttention},
                                                         {"routing", cuda::kRepeatGate},
                                                         {"experts", cuda::kRepeatExperts}};
            // a cache per variant, all kept: a new cache (address and storage) makes the model
            // capture a new step graph, with the kind doubled
            std::vector<std::unique_ptr<KvCache>> keep;
            for (const auto& [kname, mask] : kinds) {
              cuda::set_repeat(mask);
              keep.push_back(std::make_unique<KvCache>(m->new_cache(n_prompt + n_decode + 4)));
              KvCache& rc = *keep.back();
              rc.reserve(n_prompt + n_decode + 4);
              std::vector<KvCache*> rp = {&rc};
              Tensor rl = m->forward_batch({prompt_ids(n_prompt, V, 2)}, rp);
              std::vector<int32_t> rn = {argmax(rl.f32(), V)};
              for (int w = 0; w < 2; ++w) rn = m->decode_greedy(rn, rp);  // capture + warm-up
              auto r0 = Clock::now();
              for (int64_t i = 0; i < n_decode; ++i) rn = m->decode_greedy(rn, rp);
              const double rs = since(r0) / double(n_decode);
              cuda::set_repeat(0);
              std::printf("  decode batch 1 with every %s op twice: %.1f us/step, +%.1f us (%.1f%% of the step)\n",
                          kname, 1e6 * rs, 1e6 * (rs - 1 / tps), 100 * (rs - 1 / tps) * tps);
              rows.push_back({name, dt, cat("b1 ", kname, " twice"), 1 / rs, 0, 1e6 * (rs - 1 / tps)});
            }
          }
#endif
          std::printf("  decode batch %ld: %.2f ms/step, %.1f tokens/s", long(B), 1e3 * s / double(n_decode), tps);
          if (B == 1) std::printf(" (roofline %.0f tokens/s: %.1f%%)", roof, 100 * tps / roof);
          if (B == 1 && dt == "fp8" && bf16_tps1 > 0) std::printf(", %.2fx bf16", tps / bf16_tps1);
          std::printf("\n");
        }
      }
    }
    std::printf("\n%-12s %-5s %-18s %12s %12s %8s\n", "model", "dtype", "run", "tokens/s", "roofline", "ratio");
    for (const Row& r : rows) {
      std::printf("%-12s %-5s %-18s %12.1f", r.model.c_str(), r.dtype.c_str(), r.what.c_str(), r.tokens_per_s);
      if (r.roofline > 0)
        std::printf(" %12.0f %7.1f%%\n", r.roofline, 100 * r.tokens_per_s / r.roofline);
      else if (r.added_us != 0)
        std::printf(" %9.1f us added\n", r.added_us);
      else
        std::printf(" %12s %8s\n", "-", "-");
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_decode: %s\n", e.what());
    return 2;
  }
#endif
}
