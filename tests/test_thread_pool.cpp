#include <gtest/gtest.h>

#include <atomic>
#include <vector>

#include "core/thread_pool.h"

using namespace fathom;

TEST(ThreadPool, EveryIndexExactlyOnceInGrainSizedChunks) {
  for (int threads : {1, 2, 3, 8}) {  // 8 oversubscribes this machine on purpose
    ThreadPool pool(threads);
    for (int64_t n : {1, 2, 7, 64, 1000, 4097})
      for (int64_t grain : {1, 3, 16}) {
        std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
        std::atomic<bool> bad_chunk{false}, bad_thread{false};
        pool.parallel_for(n, [&](int64_t b, int64_t e, int t) {
          if (b % grain != 0 || (e != n && e % grain != 0) || b >= e) bad_chunk = true;
          if (t < 0 || t >= pool.size()) bad_thread = true;
          for (int64_t i = b; i < e; ++i) hits[size_t(i)]++;
        }, grain);
        for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[size_t(i)].load(), 1) << "n " << n << " i " << i;
        EXPECT_FALSE(bad_chunk.load());
        EXPECT_FALSE(bad_thread.load());
      }
  }
}

TEST(ThreadPool, ThreadIndexIsExclusiveWhileRunning) {
  ThreadPool pool(4);
  std::vector<std::atomic<int>> busy(4);
  std::atomic<bool> clash{false};
  for (int rep = 0; rep < 200; ++rep)
    pool.parallel_for(64, [&](int64_t, int64_t, int t) {
      if (busy[size_t(t)].fetch_add(1) != 0) clash = true;
      volatile int spin = 0;
      for (int i = 0; i < 200; ++i) spin = spin + i;
      busy[size_t(t)].fetch_sub(1);
    });
  EXPECT_FALSE(clash.load());
}

TEST(ThreadPool, ManyShortRegionsBackToBack) {
  ThreadPool pool(2);
  int64_t total = 0;
  std::vector<int64_t> part(2);
  for (int rep = 0; rep < 20000; ++rep) {
    part[0] = part[1] = 0;
    pool.parallel_for(2, [&](int64_t b, int64_t e, int t) { part[size_t(t)] += e - b; });
    total += part[0] + part[1];
  }
  EXPECT_EQ(total, 40000);
}
