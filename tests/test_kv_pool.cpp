// The paged KV cache (src/model/kv_pool.h, KvCache's paged mode): the block manager's
// accounting, and the model run over paged caches — in odd block sizes, forked with
// copy-on-write, started from the prefix cache — giving the logits of a contiguous cache.
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "fathom/model.h"
#include "model/config.h"
#include "model/kv_pool.h"
#include "ops/ops.h"
#include "test_util.h"

namespace fathom {
namespace {

std::unique_ptr<Model> load(MlaMode mode = MlaMode::Absorbed) {
  ModelOptions o;
  o.device = DeviceKind::Cpu;
  o.precision = Precision::Fp32;
  o.mla_mode = mode;
  return Model::load(test::fixture_dir("v3-tiny-mtp"), o);
}

std::vector<int32_t> random_ids(std::mt19937& rng, int64_t n, int64_t vocab) {
  std::uniform_int_distribution<int32_t> d(2, int32_t(vocab) - 1);
  std::vector<int32_t> ids;
  for (int64_t i = 0; i < n; ++i) ids.push_back(d(rng));
  return ids;
}

// The logits of the last token of ids, through a fresh contiguous cache.
std::vector<float> reference(Model& m, const std::vector<int32_t>& ids) {
  KvCache c = m.new_cache(int64_t(ids.size()));
  ForwardRequest req;
  req.last_logits_only = true;
  const Tensor l = m.forward(ids, c, req).logits;
  return std::vector<float>(l.ptr<float>(), l.ptr<float>() + l.numel());
}

std::vector<float> row(const Tensor& logits, int64_t r) {
  const int64_t V = logits.dim(1);
  return std::vector<float>(logits.ptr<float>() + r * V, logits.ptr<float>() + (r + 1) * V);
}

double rel(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  return test::rel_err(a.data(), b.data(), b.size());
}

TEST(KvPool, CountsBlocksAndRefusesWhenFull) {
  auto m = load();
  auto pool = m->new_block_pool(4 * 5, 5);  // 4 blocks of 5 tokens
  EXPECT_EQ(pool->n_blocks(), 4);
  EXPECT_EQ(pool->free_blocks(), 4);
  {
    KvCache a(pool);
    EXPECT_TRUE(a.paged());
    EXPECT_EQ(a.blocks_needed(7), 2);
    a.reserve(7);
    EXPECT_EQ(a.capacity(), 10);
    EXPECT_EQ(pool->used_blocks(), 2);
    a.advance(7);
    EXPECT_EQ(a.blocks_needed(3), 0);  // the second block has room for 3
    EXPECT_EQ(a.blocks_needed(4), 1);
    KvCache b(pool);
    b.reserve(10);
    EXPECT_EQ(pool->free_blocks(), 0);
    // full: nothing changes on a failed reserve
    EXPECT_THROW(a.reserve(4), KvCacheFull);
    EXPECT_EQ(a.capacity(), 10);
    EXPECT_EQ(pool->used_blocks(), 4);
    // truncating gives back the blocks past the kept tokens
    a.truncate(3);
    EXPECT_EQ(a.capacity(), 5);
    EXPECT_EQ(pool->free_blocks(), 1);
    a.reserve(4);  // 3 + 4 = 7: a second block again
    EXPECT_EQ(pool->free_blocks(), 0);
    // a sequence longer than the whole pool is an error of its own, not "full"
    KvCache c(pool);
    try {
      c.reserve(21);
      ADD_FAILURE() << "no error";
    } catch (const KvCacheFull&) {
      ADD_FAILURE() << "reported as full";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("holds 20 tokens"), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(pool->free_blocks(), 4);  // the caches died: every block back
  EXPECT_EQ(pool->used_blocks(), 0);
  // bad sizes
  EXPECT_THROW(m->new_block_pool(3, 5), Error);
  EXPECT_THROW(m->new_block_pool(100, 0), Error);
}

// Prompts and decode steps through paged caches of several block sizes (1, 3, 16, 64), several
// sequences in one batch whose blocks interleave in the pool: the logits of contiguous caches.
TEST(KvPool, PagedCachesGiveTheContiguousLogits) {
  for (MlaMode mode : {MlaMode::Absorbed, MlaMode::Naive}) {
    auto m = load(mode);
    const int64_t V = m->config().vocab_size;
    std::mt19937 rng(5);
    const std::vector<int32_t> a = random_ids(rng, 23, V), b = random_ids(rng, 9, V);
    for (int bs : {1, 3, 16, 64}) {
      SCOPED_TRACE(std::string(mla_mode_name(mode)) + ", block size " + std::to_string(bs));
      auto pool = m->new_block_pool(128 + 64, bs);
      KvCache ca(pool), cb(pool);
      // a's prompt in two chunks beside b's prompt, then each decodes its own next tokens
      const std::vector<int32_t> a1(a.begin(), a.begin() + 10), a2(a.begin() + 10, a.begin() + 20);
      Tensor l = m->forward_batch({a1, std::vector<int32_t>(b.begin(), b.begin() + 6)}, {&ca, &cb});
      EXPECT_LT(rel(row(l, 0), reference(*m, a1)), 1e-5);
      l = m->forward_batch({a2, std::vector<int32_t>(b.begin() + 6, b.end())}, {&ca, &cb});
      EXPECT_LT(rel(row(l, 0), reference(*m, std::vector<int32_t>(a.begin(), a.begin() + 20))), 1e-5);
      EXPECT_LT(rel(row(l, 1), reference(*m, b)), 1e-5);
      for (int64_t i = 20; i < 23; ++i) {
        l = m->forward_batch({{a[size_t(i)]}, {a[size_t(i)]}}, {&ca, &cb});
        std::vector<int32_t> bb = b;
        bb.insert(bb.end(), a.begin() + 20, a.begin() + i + 1);
        EXPECT_LT(rel(row(l, 0), reference(*m, std::vector<int32_t>(a.begin(), a.begin() + i + 1))), 1e-5);
        EXPECT_LT(rel(row(l, 1), reference(*m, bb)), 1e-5);
      }
      // forward() over a paged cache too
      KvCache cc(pool);
      ForwardRequest req;
      req.last_logits_only = true;
      EXPECT_LT(rel(row(m->forward(b, cc, req).logits, 0), reference(*m, b)), 1e-5);
      EXPECT_EQ(ca.length(), 23);
      EXPECT_EQ(ca.capacity(), (23 + bs - 1) / bs * bs);
    }
  }
}

// Two sequences forked from one prompt share its blocks; each writes its own next tokens into
// the shared, partly filled last block, which is copied once (copy-on-write) — and neither
// sees the other's tokens.
TEST(KvPool, ForkSharesBlocksAndCopiesOnWrite) {
  auto m = load();
  const int64_t V = m->config().vocab_size;
  std::mt19937 rng(9);
  const std::vector<int32_t> prompt = random_ids(rng, 11, V);  // blocks of 4: 2 full, 1 with 3 tokens
  auto pool = m->new_block_pool(64, 4);
  KvCache a(pool);
  m->forward_batch({prompt}, {&a});
  EXPECT_EQ(pool->used_blocks(), 3);
  KvCache b = a.fork();
  EXPECT_EQ(b.length(), 11);
  EXPECT_EQ(pool->used_blocks(), 3);  // shared, not copied
  EXPECT_EQ(b.block_table(), a.block_table());
  EXPECT_EQ(b.blocks_needed(1), 1);  // writing position 11 into the shared block copies it
  const int32_t ta = 100, tb = 200;
  Tensor l = m->forward_batch({{ta}, {tb}}, {&a, &b});
  EXPECT_EQ(pool->stats().cow_copies, 1);  // one copy: the second writer holds the block alone by then
  EXPECT_EQ(pool->used_blocks(), 4);
  EXPECT_NE(a.block_table()[2], b.block_table()[2]);
  EXPECT_EQ(a.block_table()[0], b.block_table()[0]);
  std::vector<int32_t> pa = prompt, pb = prompt;
  pa.push_back(ta);
  pb.push_back(tb);
  EXPECT_LT(rel(row(l, 0), reference(*m, pa)), 1e-5);
  EXPECT_LT(rel(row(l, 1), reference(*m, pb)), 1e-5);
  // and on: a's next block is its own
  l = m->forward_batch({{7, 8, 9}, {9}}, {&a, &b});
  pa.insert(pa.end(), {7, 8, 9});
  pb.push_back(9);
  EXPECT_LT(rel(row(l, 0), reference(*m, pa)), 1e-5);
  EXPECT_LT(rel(row(l, 1), reference(*m, pb)), 1e-5);
  // a contiguous cache forks by copying
  KvCache c = m->new_cache(16);
  m->forward_batch({prompt}, {&c});
  KvCache d = c.fork();
  l = m->forward_batch({{ta}, {tb}}, {&c, &d});
  EXPECT_LT(rel(row(l, 0), reference(*m, std::vector<int32_t>(pa.begin(), pa.begin() + 12))), 1e-5);
  EXPECT_LT(rel(row(l, 1), reference(*m, std::vector<int32_t>(pb.begin(), pb.begin() + 12))), 1e-5);
}

// A published prefix is taken by a later sequence instead of being recomputed: the same logits,
// fewer blocks, the hits counted. Keys are exact: the same tokens after a different prefix miss.
TEST(KvPool, PrefixCacheReusesPublishedBlocks) {
  auto m = load();
  const int64_t V = m->config().vocab_size;
  std::mt19937 rng(13);
  const std::vector<int32_t> shared = random_ids(rng, 12, V);  // 3 blocks of 4
  std::vector<int32_t> p1 = shared, p2 = shared;
  for (int32_t t : random_ids(rng, 5, V)) p1.push_back(t);
  for (int32_t t : random_ids(rng, 6, V)) p2.push_back(t);
  auto pool = m->new_block_pool(64, 4);
  {
    KvCache a(pool);
    m->forward_batch({p1}, {&a});
    a.publish(p1);  // 17 tokens: 4 full blocks published
    KvCache b(pool);
    const int64_t hit = b.attach_prefix(p2, int64_t(p2.size()) - 1);
    EXPECT_EQ(hit, 12);  // the shared 3 blocks; p1's 4th block holds other tokens
    EXPECT_EQ(b.block_table(), std::vector<int32_t>(a.block_table().begin(), a.block_table().begin() + 3));
    const Tensor l = m->forward_batch({std::vector<int32_t>(p2.begin() + 12, p2.end())}, {&b});
    EXPECT_LT(rel(row(l, 0), reference(*m, p2)), 1e-5);
    EXPECT_EQ(pool->stats().prefix_hit_tokens, 12);
    EXPECT_EQ(pool->stats().prefix_query_tokens, int64_t(p2.size()) - 1);
    EXPECT_EQ(pool->stats().cow_copies, 0);  // b wrote into blocks of its own
  }
  // both gone: their published blocks stay cached, nobody holds them
  EXPECT_EQ(pool->used_blocks(), 0);
  EXPECT_EQ(pool->cached_blocks(), 4);
  {
    KvCache c(pool);
    EXPECT_EQ(c.attach_prefix(p1, int64_t(p1.size()) - 1), 16);  // all 4 of p1's full blocks
    const Tensor l = m->forward_batch({{p1.back()}}, {&c});
    EXPECT_LT(rel(row(l, 0), reference(*m, p1)), 1e-5);
    // the same 4 tokens as shared's second block, but after other tokens: no hit
    std::vector<int32_t> moved(shared.begin() + 4, shared.begin() + 8);
    moved.insert(moved.end(), shared.begin() + 4, shared.begin() + 9);
    KvCache d(pool);
    EXPECT_EQ(d.attach_prefix(moved, 8), 0);
  }
  // eviction: a pool of 5 blocks, 4 of them cached; a sequence needing 5 evicts them all
  auto small = m->new_block_pool(20, 4);
  {
    KvCache a(small);
    m->forward_batch({p1}, {&a});
    a.publish(p1);
  }
  EXPECT_EQ(small->cached_blocks(), 4);
  EXPECT_EQ(small->free_blocks(), 5);
  {
    KvCache e(small);
    m->forward_batch({random_ids(rng, 20, V)}, {&e});
    EXPECT_EQ(small->stats().evictions, 4);
  }
  KvCache f(small);
  EXPECT_EQ(f.attach_prefix(p1, 16), 0);  // evicted: recomputed
}

// Writing into a published block that one sequence holds alone takes it out of the prefix
// cache first (truncate, then new tokens where published ones were): no stale hit afterwards.
TEST(KvPool, ABlockRewrittenIsNoLongerPublished) {
  auto m = load();
  const int64_t V = m->config().vocab_size;
  std::mt19937 rng(17);
  const std::vector<int32_t> p = random_ids(rng, 8, V);
  auto pool = m->new_block_pool(32, 4);
  KvCache a(pool);
  m->forward_batch({p}, {&a});
  a.publish(p);
  EXPECT_TRUE(pool->published(a.block_table()[1]));
  a.truncate(6);
  m->forward_batch({{3, 4}}, {&a});  // positions 6, 7 rewritten
  EXPECT_FALSE(pool->published(a.block_table()[1]));
  EXPECT_TRUE(pool->published(a.block_table()[0]));
  KvCache b(pool);
  EXPECT_EQ(b.attach_prefix(p, 8), 4);  // only the first block still holds p's tokens
}

// The block manager under random use, without a model: caches are created (taking prefix hits),
// appended to, forked, truncated, published and dropped in random order on a pool too small for
// all of them. Every position written holds a value derived from the tokens up to it, so any
// block handed to the wrong sequence, overwritten while shared or attached under a stale key
// shows up as a wrong value; reference counts and free counts are checked after every operation.
TEST(KvPool, RandomOperationsKeepEveryCachesContent) {
  auto ops = make_cpu_ops();
  const ModelConfig c = load_config(test::fixture_dir("v3-tiny") + "/config.json");
  const int bs = 4;
  auto pool = std::make_shared<KvBlockPool>(*ops, c, 1, MlaMode::Absorbed, DType::F32, bs, 16);
  const int64_t width = c.kv_lora_rank + c.qk_rope_head_dim;
  float* storage = pool->layer(0).latent.f32();
  // the value position p of a sequence holds: its tokens up to p, hashed
  auto value = [](const std::vector<int32_t>& t, int64_t p) {
    uint64_t h = 1469598103934665603ull;
    for (int64_t i = 0; i <= p; ++i) h = (h ^ uint64_t(t[size_t(i)] + 1)) * 1099511628211ull;
    return float(h >> 40);  // 24 bits: exact in a float
  };
  struct Seq {
    KvCache cache;
    std::vector<int32_t> tokens;  // the tokens whose values the cache holds (tokens.size() == length)
  };
  std::vector<std::unique_ptr<Seq>> seqs;
  std::mt19937 rng(123);
  auto pick = [&](int n) { return std::uniform_int_distribution<int>(0, n - 1)(rng); };
  auto append = [&](Seq& s, int64_t n) {
    std::vector<int32_t> more;
    for (int64_t i = 0; i < n; ++i) more.push_back(pick(2));  // 2 token values: prefixes repeat
    try {
      s.cache.reserve(n);
    } catch (const KvCacheFull&) {
      return;  // nothing changed (checked below)
    }
    for (int64_t i = 0; i < n; ++i) {
      s.tokens.push_back(more[size_t(i)]);
      storage[s.cache.row(s.cache.length()) * width] = value(s.tokens, int64_t(s.tokens.size()) - 1);
      s.cache.advance(1);
    }
  };
  int hits = 0, copies = 0, full = 0;
  for (int step = 0; step < 3000; ++step) {
    const int op = pick(6);
    if (op == 0 && seqs.size() < 6) {  // a new sequence, from the prefix cache where it can
      auto s = std::make_unique<Seq>(Seq{KvCache(pool), {}});
      std::vector<int32_t> want;
      for (int i = 0; i < 12; ++i) want.push_back(pick(2));
      const int64_t hit = s->cache.attach_prefix(want, int64_t(want.size()) - 1);
      hits += hit > 0;
      s->tokens.assign(want.begin(), want.begin() + hit);
      seqs.push_back(std::move(s));
    } else if (seqs.empty()) {
      continue;
    } else {
      Seq& s = *seqs[size_t(pick(int(seqs.size())))];
      if (op == 1 || op == 2) {
        const int64_t before = pool->stats().cow_copies, cap = s.cache.capacity();
        const int64_t free_before = pool->free_blocks(), len = s.cache.length();
        const int64_t n = 1 + pick(6);
        append(s, n);
        if (s.cache.length() == len) {  // full: nothing moved
          ++full;
          EXPECT_EQ(s.cache.capacity(), cap);
          EXPECT_EQ(pool->free_blocks(), free_before);
        }
        copies += pool->stats().cow_copies > before;
      } else if (op == 3 && seqs.size() < 6) {
        seqs.push_back(std::make_unique<Seq>(Seq{s.cache.fork(), s.tokens}));
      } else if (op == 4) {
        const int64_t n = pick(int(s.tokens.size()) + 1);
        s.cache.truncate(n);
        s.tokens.resize(size_t(n));
      } else {
        s.cache.publish(s.tokens);
        if (pick(2) == 0) seqs.erase(seqs.begin() + pick(int(seqs.size())));
      }
    }
    // invariants: every held block counted, counts add up, every position holds its value
    std::map<int32_t, int> held;
    for (const auto& q : seqs)
      for (int32_t b : q->cache.block_table()) ++held[b];
    for (const auto& [b, n] : held) ASSERT_EQ(pool->refs(b), n) << "step " << step << " block " << b;
    ASSERT_EQ(pool->used_blocks(), int64_t(held.size())) << "step " << step;
    ASSERT_EQ(pool->free_blocks() + pool->used_blocks(), pool->n_blocks());
    for (const auto& q : seqs) {
      ASSERT_EQ(q->cache.length(), int64_t(q->tokens.size()));
      for (int64_t pos = 0; pos < q->cache.length(); ++pos)
        ASSERT_EQ(storage[q->cache.row(pos) * width], value(q->tokens, pos)) << "step " << step << " position " << pos;
    }
  }
  EXPECT_GT(hits, 10);    // the prefix cache was used ...
  EXPECT_GT(copies, 10);  // ... shared blocks were copied before writes ...
  EXPECT_GT(full, 10);    // ... and the pool ran out now and then
  seqs.clear();
  EXPECT_EQ(pool->used_blocks(), 0);
}

}  // namespace
}  // namespace fathom
