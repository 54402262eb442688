#include "core/thread_pool.h"

#include <algorithm>
#include <cstdlib>
#include <string>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fathom {

namespace {
inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}
// Spin briefly, then give the core away: whoever we wait for may need it.
inline void backoff(int& spins) {
  if (++spins < 2000)
    cpu_relax();
  else
    std::this_thread::yield();
}
}  // namespace

ThreadPool::ThreadPool(int n_threads) {
  if (n_threads <= 0) n_threads = int(std::max(1u, std::thread::hardware_concurrency()));
  n_threads_ = n_threads;
  for (int i = 1; i < n_threads_; ++i) threads_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_.store(true);
    generation_.fetch_add(1);
  }
  wake_.notify_all();
  for (auto& t : threads_) t.join();
}

void ThreadPool::run_chunks(const Job& job, int thread_index) {
  for (;;) {
    int64_t c = next_chunk_.fetch_add(1);
    if (c >= job.chunks) return;
    int64_t u0 = job.units * c / job.chunks, u1 = job.units * (c + 1) / job.chunks;
    int64_t b = u0 * job.grain, e = std::min(job.n, u1 * job.grain);
    if (b < e) (*job.fn)(b, e, thread_index);
    chunks_done_.fetch_add(1);
  }
}

void ThreadPool::worker(int index) {
  uint64_t seen = 0;
  for (;;) {
    // Spin for a while (a decode step issues parallel regions back to back), then sleep.
    int spins = 0;
    while (generation_.load() == seen && spins < 4000) {
      cpu_relax();
      ++spins;
    }
    if (generation_.load() == seen) {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return generation_.load() != seen; });
    }
    seen = generation_.load();
    if (stop_.load()) return;
    // Join only a job that is still open; the caller does not return (and destroy the job)
    // while in_job_ > 0, and it closes the job before waiting for in_job_ to drain.
    in_job_.fetch_add(1);
    if (open_.load()) {
      const Job* job = job_.load();
      run_chunks(*job, index);
    }
    in_job_.fetch_sub(1);
  }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn, int64_t grain) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t units = (n + grain - 1) / grain;
  if (units <= 1 || n_threads_ == 1) {
    fn(0, n, 0);
    return;
  }
  // A few chunks per thread: enough to rebalance when a thread is late, few enough that
  // claiming them costs nothing next to the work.
  Job job{&fn, n, grain, units, std::min<int64_t>(units, int64_t(n_threads_) * 4)};
  job_.store(&job);
  next_chunk_.store(0);
  chunks_done_.store(0);
  open_.store(true);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    generation_.fetch_add(1);
  }
  wake_.notify_all();
  run_chunks(job, 0);
  // Every chunk is claimed; wait for the ones workers are still running.
  for (int spins = 0; chunks_done_.load() < job.chunks;) backoff(spins);
  open_.store(false);
  for (int spins = 0; in_job_.load() != 0;) backoff(spins);
  job_.store(nullptr);
}

ThreadPool& ThreadPool::global() {
  static ThreadPool pool([] {
    const char* env = std::getenv("FATHOM_THREADS");
    return env ? std::atoi(env) : 0;
  }());
  return pool;
}

}  // namespace fathom
