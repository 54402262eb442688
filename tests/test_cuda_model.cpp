// The whole model on CUDA against the whole model on the CPU, and the CUDA backend's user
// errors. Fixture comparisons with the HF reference live in test_fixtures.cpp; here random
// models of shapes the fixtures do not cover (many experts, groups, long prompts) run on both
// backends with bit-identical random weights (Ops::fill_random), and the CLI's --device,
// --precision and --gpu-memory are checked. GPU cases skip without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "core/error.h"
#include "core/random_fill.h"
#include "fathom/model.h"
#include "fathom/tokenizer.h"
#include "model/config.h"
#include "model/kv_pool.h"
#include "ops/cpu/sample.h"
#include "ops/ops.h"
#ifdef FATHOM_HAVE_CUDA
#include "ops/cuda/cuda_ops.h"
#endif
#include "serve/engine.h"
#include "test_util.h"

using namespace fathom;
using namespace fathom::test;

namespace {

// V3-shaped and small: 2 layers (first dense), 16 experts in 4 groups (keep 2), top-4, 1 shared.
ModelConfig small_v3() {
  ModelConfig c = load_config(fixture_dir("v3-tiny") + "/config.json");
  c.vocab_size = 1000;
  c.hidden_size = 256;
  c.num_hidden_layers = 3;
  c.first_k_dense_replace = 1;
  c.intermediate_size = 384;
  c.moe_intermediate_size = 96;
  c.n_routed_experts = 16;
  c.num_experts_per_tok = 4;
  c.n_group = 4;
  c.topk_group = 2;
  c.n_shared_experts = 1;
  c.num_nextn_predict_layers = 0;
  c.max_position_embeddings = 4096;
  return c;
}

std::vector<int32_t> some_ids(int64_t n, int64_t vocab) {
  std::vector<int32_t> ids;
  for (int64_t i = 0; i < n; ++i) ids.push_back(int32_t((i * 7919 + 13) % vocab));
  return ids;
}

}  // namespace

TEST(RandomModel, FillRandomIsTheDocumentedHash) {
  auto ops = make_cpu_ops();
  Tensor t = Tensor::empty({3, 5});
  ops->fill_random(t, 42, 0.5f);
  for (int i = 0; i < 15; ++i) {
    EXPECT_EQ(t.f32()[i], 0.5f * random_uniform(42, uint64_t(i)));
    EXPECT_LE(std::fabs(t.f32()[i]), 0.5f);
  }
  Tensor b = Tensor::empty({15}, DType::BF16);
  ops->fill_random(b, 42, 0.5f);
  Tensor bf = to_f32(b);
  for (int i = 0; i < 15; ++i) EXPECT_NEAR(bf.f32()[i], t.f32()[i], 4e-3);
}

TEST(RandomModel, RunsOnTheCpu) {
  ModelOptions o;
  auto m = Model::random(small_v3(), o, DType::BF16, 7);
  auto ids = some_ids(9, 1000);
  KvCache cache = m->new_cache();
  ForwardOutput out = m->forward(ids, cache);
  ASSERT_EQ(out.logits.shape(), (Shape{9, 1000}));
  for (int64_t i = 0; i < out.logits.numel(); ++i) ASSERT_TRUE(std::isfinite(out.logits.f32()[i]));
}

// Batched decode gives each sequence what decoding it alone gives.
void expect_batch_equals_single(DeviceKind dev) {
  ModelOptions o;
  o.device = dev;
  o.precision = Precision::Fp32;
  auto m = Model::random(small_v3(), o, DType::F32, 5);
  const int B = 4;
  std::vector<KvCache> solo, batch;
  for (int b = 0; b < B; ++b) {
    solo.push_back(m->new_cache());
    batch.push_back(m->new_cache());
  }
  std::vector<std::vector<int32_t>> prompts;
  for (int b = 0; b < B; ++b) prompts.push_back(some_ids(3 + 5 * b, 1000 - b));  // ragged lengths
  std::vector<KvCache*> ptrs;
  for (auto& k : batch) ptrs.push_back(&k);
  Tensor first = m->forward_batch(prompts, ptrs);  // a ragged prefill
  for (int step = 0; step < 3; ++step) {
    std::vector<std::vector<int32_t>> next;
    for (int b = 0; b < B; ++b) next.push_back({int32_t(17 * b + step)});
    Tensor got = m->forward_batch(next, ptrs);
    for (int b = 0; b < B; ++b) {
      if (step == 0) {
        ForwardRequest r;
        r.last_logits_only = true;
        ForwardOutput p = m->forward(prompts[size_t(b)], solo[size_t(b)], r);
        ASSERT_LE(rel_err(first.f32() + b * 1000, p.logits.f32(), 1000), 1e-5) << "prefill of sequence " << b;
      }
      ForwardOutput want = m->forward(next[size_t(b)], solo[size_t(b)]);
      ASSERT_LE(rel_err(got.f32() + b * 1000, want.logits.f32(), 1000), 1e-5) << "step " << step << " sequence " << b;
    }
  }
}

TEST(RandomModel, BatchedDecodeEqualsSingleSequences) { expect_batch_equals_single(DeviceKind::Cpu); }

// The graph-replayed greedy step (device positions, device argmax) against eager forward_batch,
// across a cache that grows (a new capture) and a batch that changes.
void expect_decode_greedy_equals_forward(DeviceKind dev, MlaMode mode) {
  ModelOptions o;
  o.device = dev;
  o.mla_mode = mode;
  o.precision = Precision::Fp32;
  auto m = Model::random(small_v3(), o, DType::F32, 9);
  for (int B : {1, 3}) {
    std::vector<KvCache> a, b;
    for (int i = 0; i < B; ++i) {
      a.push_back(m->new_cache(4));  // small: grows during the test
      b.push_back(m->new_cache(4));
    }
    std::vector<KvCache*> pa, pb;
    for (int i = 0; i < B; ++i) {
      pa.push_back(&a[size_t(i)]);
      pb.push_back(&b[size_t(i)]);
    }
    std::vector<std::vector<int32_t>> prompts;
    for (int i = 0; i < B; ++i) prompts.push_back(some_ids(2 + i, 1000 - i));
    Tensor la = m->forward_batch(prompts, pa), lb = m->forward_batch(prompts, pb);
    std::vector<int32_t> ta, tb;
    for (int i = 0; i < B; ++i) {
      ta.push_back(int32_t(std::max_element(la.f32() + i * 1000, la.f32() + (i + 1) * 1000) - (la.f32() + i * 1000)));
      tb.push_back(ta.back());
    }
    for (int step = 0; step < 10; ++step) {
      std::vector<std::vector<int32_t>> next;
      for (int32_t t : ta) next.push_back({t});
      Tensor l = m->forward_batch(next, pa);
      for (int i = 0; i < B; ++i)
        ta[size_t(i)] = int32_t(std::max_element(l.f32() + i * 1000, l.f32() + (i + 1) * 1000) - (l.f32() + i * 1000));
      tb = m->decode_greedy(tb, pb);
      ASSERT_EQ(tb, ta) << "step " << step << " batch " << B << " on " << device_kind_name(dev) << " "
                        << mla_mode_name(mode);
    }
    for (int i = 0; i < B; ++i) EXPECT_EQ(b[size_t(i)].length(), a[size_t(i)].length());
  }
}

TEST(RandomModel, DecodeGreedyEqualsForwardBatch) {
  expect_decode_greedy_equals_forward(DeviceKind::Cpu, MlaMode::Absorbed);
  expect_decode_greedy_equals_forward(DeviceKind::Cpu, MlaMode::Naive);
}

// The graph-replayed sampling step (Ops::sample on the device) against select_token on the logits
// of eager forward_batch, one mix of temperature / top-k / top-p / min-p per sequence; every
// fourth step is a greedy one on the same caches (the step graph is captured again for it). So is
// forward_batch_sample (the serving engine's decode steps) on a third set of caches. All sides get
// the same tokens. The logits of the two paths may differ by rounding on the GPU, so a
// token may differ where moving u by 1e-4 changes select_token's choice, once at most.
void expect_decode_sample_equals_forward(DeviceKind dev) {
  ModelOptions o;
  o.device = dev;
  o.precision = Precision::Fp32;
  auto m = Model::random(small_v3(), o, DType::F32, 9);
  const int64_t V = m->config().vocab_size;
  std::vector<SampleRow> rows = {{0.7f, 0, 1.0f, 0.0f, 0.0}, {1.0f, 20, 0.9f, 0.0f, 0.0},
                                 {0.0f, 0, 1.0f, 0.0f, 0.0}, {1.3f, 0, 0.8f, 0.05f, 0.0}};
  const size_t B = rows.size();
  std::vector<KvCache> a, b, c;
  for (size_t i = 0; i < B; ++i) {
    a.push_back(m->new_cache(4));  // small: grows during the test
    b.push_back(m->new_cache(4));
    c.push_back(m->new_cache(4));
  }
  std::vector<KvCache*> pa, pb, pc;
  for (size_t i = 0; i < B; ++i) {
    pa.push_back(&a[i]);
    pb.push_back(&b[i]);
    pc.push_back(&c[i]);
  }
  std::vector<std::vector<int32_t>> prompts;
  for (size_t i = 0; i < B; ++i) prompts.push_back(some_ids(3 + int(i), 1000 - int(i)));
  SelectScratch scratch;
  auto choose = [&](const Tensor& logits, size_t i, SampleRow r) {
    std::vector<float> row(logits.f32() + int64_t(i) * V, logits.f32() + int64_t(i + 1) * V);
    return select_token(row.data(), V, r, scratch);
  };
  std::mt19937_64 rng(5);
  Tensor la = m->forward_batch(prompts, pa);
  m->forward_batch(prompts, pb);
  m->forward_batch(prompts, pc);
  std::vector<int32_t> tokens;
  for (size_t i = 0; i < B; ++i) tokens.push_back(choose(la, i, rows[i]));
  int forgiven = 0;
  for (int step = 0; step < 12; ++step) {
    const bool greedy = step % 4 == 3;
    for (SampleRow& r : rows) r.u = double(rng() >> 11) * 0x1.0p-53;
    std::vector<std::vector<int32_t>> next;
    for (int32_t t : tokens) next.push_back({t});
    Tensor l = m->forward_batch(next, pa);
    std::vector<int32_t> got = greedy ? m->decode_greedy(tokens, pb) : m->decode_sample(tokens, pb, rows);
    std::vector<SampleRow> step_rows = rows;
    if (greedy)
      for (SampleRow& r : step_rows) r.temperature = 0.0f;
    const std::vector<int32_t> got_fbs = m->forward_batch_sample(next, pc, step_rows);
    for (size_t i = 0; i < B; ++i) {
      const SampleRow r = step_rows[i];
      const int32_t want = choose(l, i, r);
      for (int32_t g : {got[i], got_fbs[i]}) {
        if (g == want) continue;
        SampleRow lo = r, hi = r;
        lo.u = std::max(0.0, r.u - 1e-4);
        hi.u = std::min(std::nextafter(1.0, 0.0), r.u + 1e-4);
        EXPECT_TRUE(!greedy && choose(l, i, lo) != choose(l, i, hi))
            << "step " << step << " sequence " << i << ": " << g << " instead of " << want << " on "
            << device_kind_name(dev);
        ++forgiven;
      }
      tokens[i] = want;
    }
  }
  EXPECT_LE(forgiven, dev == DeviceKind::Cpu ? 0 : 2) << "on " << device_kind_name(dev);
  for (size_t i = 0; i < B; ++i) EXPECT_EQ(b[i].length(), a[i].length());
  for (size_t i = 0; i < B; ++i) EXPECT_EQ(c[i].length(), a[i].length());
  // a row out of range is an error before anything runs
  std::vector<SampleRow> bad = rows;
  bad[1].u = 1.0;
  std::vector<std::vector<int32_t>> next;
  for (int32_t t : tokens) next.push_back({t});
  EXPECT_THROW(m->forward_batch_sample(next, pc, bad), Error);
  bad.pop_back();
  EXPECT_THROW(m->forward_batch_sample(next, pc, bad), Error);
  for (size_t i = 0; i < B; ++i) EXPECT_EQ(c[i].length(), a[i].length());
}

TEST(RandomModel, DecodeSampleEqualsForwardBatch) { expect_decode_sample_equals_forward(DeviceKind::Cpu); }

// Paged caches (blocks of 5 and 16 tokens from one pool) against contiguous caches on the same
// backend: a ragged prefill in two chunks, a fork that copies its shared last block on write, a
// prefix taken from the pool's published blocks, then decode steps.
void expect_paged_equals_contiguous(DeviceKind dev, MlaMode mode, Precision precision) {
  ModelOptions o;
  o.device = dev;
  o.mla_mode = mode;
  o.precision = precision;
  auto m = Model::random(small_v3(), o, DType::F32, 21);
  const int64_t V = 1000;
  const double tol = precision == Precision::Bf16 ? 1e-3 : 1e-5;
  const std::vector<int32_t> a = some_ids(37, V), b = some_ids(12, V - 7);
  for (int bs : {5, 16}) {
    SCOPED_TRACE(std::string(mla_mode_name(mode)) + ", block size " + std::to_string(bs));
    auto pool = m->new_block_pool(40 * bs, bs);
    KvCache pa(pool), pb(pool);
    KvCache ca = m->new_cache(), cb = m->new_cache();
    auto both = [&](const std::vector<std::vector<int32_t>>& t, std::vector<KvCache*> paged,
                    std::vector<KvCache*> contiguous) {
      Tensor x = m->forward_batch(t, paged), y = m->forward_batch(t, contiguous);
      ASSERT_LE(rel_err(x.f32(), y.f32(), size_t(y.numel())), tol);
    };
    both({{a.begin(), a.begin() + 20}, {b.begin(), b.begin() + 5}}, {&pa, &pb}, {&ca, &cb});
    both({{a.begin() + 20, a.end()}, {b.begin() + 5, b.end()}}, {&pa, &pb}, {&ca, &cb});
    pa.publish(a);
    KvCache pf = pa.fork(), cf = ca.fork();  // shares a's blocks, copies the last on write
    KvCache pp(pool);                        // a's first 30 tokens from the prefix cache
    ASSERT_EQ(pp.attach_prefix(a, 30), 30 / bs * bs);
    KvCache cp = m->new_cache();
    m->forward_batch({{a.begin(), a.begin() + pp.length()}}, {&cp});
    both({{a.begin() + pp.length(), a.begin() + 33}}, {&pp}, {&cp});
    for (int step = 0; step < 4; ++step) {
      const int32_t t = int32_t(100 + 37 * step);
      both({{t}, {t + 1}, {t + 2}, {t + 3}}, {&pa, &pb, &pf, &pp}, {&ca, &cb, &cf, &cp});
    }
    ASSERT_GE(pool->stats().cow_copies, 1);
  }
}

TEST(RandomModel, PagedCachesEqualContiguousCaches) {
  expect_paged_equals_contiguous(DeviceKind::Cpu, MlaMode::Absorbed, Precision::Fp32);
  expect_paged_equals_contiguous(DeviceKind::Cpu, MlaMode::Naive, Precision::Fp32);
}

class CudaModel : public testing::Test {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU (or a build without CUDA): CUDA model tests skipped";
  }
};

// The same random weights on both backends (fp32 precision: F32 weights), prefill then decode;
// the decode steps with the SIMT and with the tensor-core GEMV (mma_gemv.cuh).
TEST_F(CudaModel, RandomModelMatchesTheCpu) {
#ifdef FATHOM_HAVE_CUDA
  const cuda::GemvKind before = cuda::gemv_kind();
  for (bool tensor_cores : {false, true}) {
    cuda::set_gemv_kind(tensor_cores ? cuda::GemvKind::TensorCores : cuda::GemvKind::Simt);
    SCOPED_TRACE(tensor_cores ? "tensor-core GEMV" : "SIMT GEMV");
#endif
  for (DType dt : {DType::F32, DType::BF16, DType::F8_E4M3})
    for (MlaMode mode : {MlaMode::Absorbed, MlaMode::Naive}) {
      ModelOptions o;
      o.mla_mode = mode;
      o.precision = Precision::Fp32;
      auto cpu = Model::random(small_v3(), o, dt, 11);
      o.device = DeviceKind::Cuda;
      auto gpu = Model::random(small_v3(), o, dt, 11);
      ASSERT_STREQ(gpu->backend_name(), "cuda");
      auto ids = some_ids(40, 1000);
      KvCache cc = cpu->new_cache(), gc = gpu->new_cache();
      ForwardOutput a = cpu->forward(ids, cc), b = gpu->forward(ids, gc);
      EXPECT_LE(rel_err(b.logits.f32(), a.logits.f32(), size_t(a.logits.numel())), 1e-4)
          << dtype_name(dt) << " " << mla_mode_name(mode);
      for (int step = 0; step < 5; ++step) {
        std::vector<int32_t> next = {int32_t((step * 31 + 5) % 1000)};
        ForwardOutput sa = cpu->forward(next, cc), sb = gpu->forward(next, gc);
        ASSERT_LE(rel_err(sb.logits.f32(), sa.logits.f32(), 1000), 1e-4)
            << "decode step " << step << " " << dtype_name(dt) << " " << mla_mode_name(mode);
      }
    }
#ifdef FATHOM_HAVE_CUDA
  }
  cuda::set_gemv_kind(before);
#endif
}

TEST_F(CudaModel, BatchedDecodeEqualsSingleSequences) { expect_batch_equals_single(DeviceKind::Cuda); }

TEST_F(CudaModel, PagedCachesEqualContiguousCaches) {
  for (MlaMode mode : {MlaMode::Absorbed, MlaMode::Naive})
    for (Precision p : {Precision::Fp32, Precision::Bf16}) expect_paged_equals_contiguous(DeviceKind::Cuda, mode, p);
}

// The serving engine on the GPU (fp32) gives fathom-mini's greedy tokens of the CPU engine, with
// a cache small enough to preempt, prefix caching and a shared prompt.
TEST_F(CudaModel, ServingEngineMatchesTheCpu) {
  const std::string dir = std::string(FATHOM_SOURCE_DIR) + "/models/fathom-mini";
  auto tok = Tokenizer::load(dir);
  const std::vector<std::string> prompts = {"The list type in Python", "To create a new branch in Git,",
                                            "The Linux kernel", "The list type in Python", "A dictionary maps keys"};
  auto run = [&](DeviceKind dev) {
    ModelOptions o;
    o.device = dev;
    o.precision = Precision::Fp32;
    auto m = Model::load(dir, o);
    serve::EngineOptions eo;
    eo.max_batch = 4;
    eo.kv_block_size = 4;
    eo.max_kv_tokens = 48;
    serve::Engine engine(*m, *tok, eo);
    std::vector<std::shared_ptr<serve::RequestHandle>> hs;
    for (const auto& p : prompts) {
      serve::RequestParams r;
      r.prompt = tok->encode(p, true);
      r.options.max_tokens = 16;
      r.options.sampling.temperature = 0;
      r.options.ignore_eos = true;
      hs.push_back(engine.submit(r));
    }
    std::vector<std::vector<int32_t>> out;
    for (auto& h : hs) out.push_back(h->wait().ids);
    return std::make_pair(out, engine.stats());
  };
  const auto [cpu, cpu_stats] = run(DeviceKind::Cpu);
  const auto [gpu, gpu_stats] = run(DeviceKind::Cuda);
  EXPECT_EQ(gpu, cpu);
  EXPECT_GT(gpu_stats.preemptions, 0);
}

TEST_F(CudaModel, GraphDecodeEqualsEagerDecode) {
  expect_decode_greedy_equals_forward(DeviceKind::Cuda, MlaMode::Absorbed);
  expect_decode_greedy_equals_forward(DeviceKind::Cuda, MlaMode::Naive);
}

TEST_F(CudaModel, GraphSampleStepEqualsEagerDecode) { expect_decode_sample_equals_forward(DeviceKind::Cuda); }

// The serving engine's decode steps (forward_batch_sample, one token per sequence of one pool)
// replay a graph over the pool, the block tables, storage rows and key counts copied in; against
// eager forward_batch on a second pool, greedy: the same tokens, as a sequence leaves and comes
// back (B 3 -> 2 -> 3: a graph per B, the first reused) and as the tables pass 16 blocks (a graph
// of twice the width). `latent`: the dims of DeepSeek's latent cache (kv_lora 512, rope 64) in
// bf16, so that attention runs the latent kernel's uniform batch; where bf16 rounding may part
// the two paths, a different token is forgiven when its eager logit is within 1e-3 of the best.
void expect_paged_graph_equals_eager(bool latent) {
  ModelConfig cfg = small_v3();
  ModelOptions o;
  o.device = DeviceKind::Cuda;
  o.precision = latent ? Precision::Bf16 : Precision::Fp32;
  if (latent) {
    cfg.kv_lora_rank = 512;
    cfg.qk_rope_head_dim = 64;
    cfg.num_attention_heads = 16;
  }
  auto m = Model::random(cfg, o, latent ? DType::BF16 : DType::F32, 13);
  const int64_t V = m->config().vocab_size;
  const int bs = 5;
  auto pool_g = m->new_block_pool(80 * bs, bs), pool_e = m->new_block_pool(80 * bs, bs);
  std::vector<KvCache> g, e;
  for (int i = 0; i < 3; ++i) {
    g.emplace_back(pool_g);
    e.emplace_back(pool_e);
  }
  const std::vector<std::vector<int32_t>> prompts = {some_ids(60, V), some_ids(7, V - 3), some_ids(33, V - 9)};
  auto argmax = [&](const Tensor& l, size_t i) {
    const float* r = l.f32() + int64_t(i) * V;
    return int32_t(std::max_element(r, r + V) - r);
  };
  Tensor first = m->forward_batch(prompts, {&g[0], &g[1], &g[2]});
  m->forward_batch(prompts, {&e[0], &e[1], &e[2]});
  std::vector<int32_t> tokens = {argmax(first, 0), argmax(first, 1), argmax(first, 2)};
  int forgiven = 0;
  for (int step = 0; step < 40; ++step) {
    std::vector<size_t> active = {0, 1, 2};
    if (step >= 10 && step < 20) active = {0, 2};
    std::vector<std::vector<int32_t>> next;
    std::vector<KvCache*> pg, pe;
    std::vector<SampleRow> rows;
    for (size_t i : active) {
      next.push_back({tokens[i]});
      pg.push_back(&g[i]);
      pe.push_back(&e[i]);
      rows.push_back({0.0f, 0, 1.0f, 0.0f, 0.0});
    }
    const std::vector<int32_t> got = m->forward_batch_sample(next, pg, rows);
    const Tensor l = m->forward_batch(next, pe);
    for (size_t j = 0; j < active.size(); ++j) {
      const int32_t want = argmax(l, j);
      if (got[j] != want) {
        const float* r = l.f32() + int64_t(j) * V;
        EXPECT_TRUE(latent && r[want] - r[got[j]] <= 1e-3f * std::fabs(r[want]))
            << "step " << step << " sequence " << active[j] << ": " << got[j] << " instead of " << want;
        ++forgiven;
      }
      tokens[active[j]] = want;
    }
  }
  EXPECT_LE(forgiven, 2);
  for (size_t i = 0; i < g.size(); ++i) EXPECT_EQ(g[i].length(), e[i].length());
  EXPECT_GT(int64_t(g[0].block_table().size()), 16);  // the width grew past the first graph's
}

TEST_F(CudaModel, PagedGraphStepEqualsEagerStep) {
  expect_paged_graph_equals_eager(false);
  expect_paged_graph_equals_eager(true);
}

TEST_F(CudaModel, GreedyGenerationMatchesTheCpuOnALongPrompt) {
  ModelOptions o;
  o.precision = Precision::Fp32;
  auto cpu = Model::random(small_v3(), o, DType::F32, 3);
  o.device = DeviceKind::Cuda;
  auto gpu = Model::random(small_v3(), o, DType::F32, 3);
  auto prompt = some_ids(700, 1000);  // long enough for split-KV decode
  EXPECT_EQ(gpu->generate_greedy(prompt, 12), cpu->generate_greedy(prompt, 12));
}

TEST_F(CudaModel, MemoryBudgetErrors) {
  ModelOptions o;
  o.device = DeviceKind::Cuda;
  o.gpu_memory = 1 << 20;  // 1 MiB: the weights do not fit
  try {
    Model::load(fixture_dir("v3-realdims-fp8"), o);
    FAIL() << "a model larger than --gpu-memory loaded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("GiB of GPU memory for its weights"), std::string::npos) << e.what();
  }
  // a budget of the weights plus a little: the KV cache holds a few tokens, a longer sequence is refused
  o.gpu_memory = 0;
  auto m = Model::load(fixture_dir("v3-tiny"), o);
  o.gpu_memory = m->gpu_weight_bytes() + (int64_t(256) << 20) + (int64_t(100) << 10);  // ~100 tokens of KV
  auto small = Model::load(fixture_dir("v3-tiny"), o);
  ASSERT_GT(small->max_cache_tokens(), 0);
  ASSERT_LT(small->max_cache_tokens(), small->config().max_position_embeddings);
  EXPECT_THROW(small->new_cache(small->max_cache_tokens() + 1), Error);
  KvCache cache = small->new_cache();
  std::vector<int32_t> too_long = some_ids(small->max_cache_tokens() + 1, small->config().vocab_size);
  try {
    small->forward(too_long, cache);
    FAIL() << "a sequence longer than the KV budget ran";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("KV cache is full"), std::string::npos) << e.what();
  }
}

TEST(CudaCli, DeviceChoiceErrors) {
  TempDir tmp;
  const std::string model = fixture_dir("v3-tiny");
  CliRun bad = run_fathom({"info", "--model", model, "--device", "tpu"}, tmp);
  EXPECT_TRUE(is_user_error(bad, {"--device must be auto, cpu or cuda"}));
  CliRun size = run_fathom({"info", "--model", model, "--device", "cuda", "--gpu-memory", "lots"}, tmp);
  EXPECT_TRUE(is_user_error(size, {"--gpu-memory must be a size"}));
  CliRun unit = run_fathom({"info", "--model", model, "--device", "cuda", "--gpu-memory", "3Q"}, tmp);
  EXPECT_TRUE(is_user_error(unit, {"unknown unit"}));
  CliRun cpu_budget = run_fathom({"info", "--model", model, "--device", "cpu", "--gpu-memory", "1G"}, tmp);
  EXPECT_TRUE(is_user_error(cpu_budget, {"--gpu-memory applies to --device cuda"}));
  if (cuda_available()) {
    CliRun tiny = run_fathom({"info", "--model", model, "--device", "cuda", "--gpu-memory", "1K"}, tmp);
    EXPECT_TRUE(is_user_error(tiny, {"for its weights"}));
    CliRun ok = run_fathom({"info", "--model", model, "--device", "cuda"}, tmp);
    EXPECT_EQ(ok.status, 0) << ok.err;
    EXPECT_NE(ok.out.find("device       cuda, bf16"), std::string::npos) << ok.out;
  } else {
    CliRun r = run_fathom({"info", "--model", model, "--device", "cuda"}, tmp);
    EXPECT_TRUE(is_user_error(r, {"--device cuda was requested"}));
    CliRun aut = run_fathom({"info", "--model", model, "--device", "auto"}, tmp);
    EXPECT_EQ(aut.status, 0) << aut.err;
    EXPECT_NE(aut.out.find("device       cpu, fp32"), std::string::npos) << aut.out;
  }
}

// `fathom generate --device cuda` gives the reference's greedy continuation (fp32 precision).
TEST(CudaCli, GenerateOnTheGpuMatchesTheReference) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU (or a build without CUDA)";
  TempDir tmp;
  const std::string ids = fixture_dir("v3-tiny") + "/reference.safetensors";
  const std::string out = tmp.file("gen.json");
  CliRun r = run_fathom({"generate", "--model", fixture_dir("v3-tiny"), "--input-ids", ids, "--max-new-tokens", "16",
                         "--temperature", "0", "--device", "cuda", "--precision", "fp32", "--out", out},
                        tmp);
  ASSERT_EQ(r.status, 0) << r.err;
  const std::string text = slurp(out);
  auto ref = SafetensorsFile::open(ids);
  Tensor gen = ref->tensor("generate_ids");
  const int64_t T = ref->tensor("input_ids").dim(1);
  std::string want;
  for (int64_t i = T; i < gen.dim(1); ++i) want += cat(i > T ? "," : "", gen.ptr<int64_t>()[i]);
  std::string got = text.substr(text.find('[') + 1);
  got = got.substr(0, got.find(']'));
  got.erase(std::remove_if(got.begin(), got.end(), [](char ch) { return std::isspace(static_cast<unsigned char>(ch)); }),
            got.end());
  EXPECT_EQ(got, want) << text;
}
