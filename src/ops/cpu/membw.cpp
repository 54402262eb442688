#include "ops/cpu/membw.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "core/error.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fathom::cpu {

namespace {

// Sums [p, p + n) as 64-bit words, n a multiple of 128 bytes. Four independent integer
// accumulators: additions are cheap and never the bottleneck, and the result depends on every
// byte, so the loads stay.
uint64_t sum_bytes(const uint8_t* p, size_t n) {
#if defined(__AVX2__)
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i < n; i += 128) {
    a0 = _mm256_add_epi64(a0, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  __m256i s = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), s);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
#else
  uint64_t a[4] = {0, 0, 0, 0};
  for (size_t i = 0; i < n; i += 32)
    for (int j = 0; j < 4; ++j) {
      uint64_t v;
      std::memcpy(&v, p + i + 8 * j, 8);
      a[j] += v;
    }
  return a[0] + a[1] + a[2] + a[3];
#endif
}

}  // namespace

double measure_read_bandwidth(ThreadPool& pool, size_t bytes_per_pass, int passes) {
  constexpr size_t kLine = 128;  // unit of sum_bytes and of the split between threads
  const size_t lines = std::max<size_t>(1, bytes_per_pass / kLine);
  const size_t bytes = lines * kLine;
  void* raw = std::aligned_alloc(4096, bytes);
  if (!raw) throw Error(cat("measure_read_bandwidth: cannot allocate ", bytes, " bytes."));
  std::unique_ptr<uint8_t, decltype(&std::free)> buffer(static_cast<uint8_t*>(raw), &std::free);
  uint8_t* data = buffer.get();

  // Write every page (by the thread that will read it) so the passes read real memory, not
  // the shared zero page.
  const int64_t n_lines = int64_t(lines);
  pool.parallel_for(n_lines, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) std::memset(data + size_t(i) * kLine, int(i & 0xff), kLine);
  }, 1024);

  std::vector<uint64_t> sums(size_t(pool.size()), 0);
  double best = 0.0;
  for (int pass = 0; pass < std::max(1, passes); ++pass) {
    const auto t0 = std::chrono::steady_clock::now();
    pool.parallel_for(n_lines, [&](int64_t b, int64_t e, int t) {
      sums[size_t(t)] += sum_bytes(data + size_t(b) * kLine, size_t(e - b) * kLine);
    }, 1024);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, double(bytes) / seconds / 1e9);
  }
  // Publish the sums through a volatile so the reads above are observable.
  volatile uint64_t sink = 0;
  for (uint64_t s : sums) sink = sink + s;
  (void)sink;
  return best;
}

}  // namespace fathom::cpu
