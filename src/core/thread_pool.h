// A small fork-join thread pool for the CPU kernels.
//
// parallel_for splits [0, n) into a few contiguous chunks per thread, which the caller and
// the workers claim from a shared counter. The caller waits only for chunks that a worker
// has actually claimed, never for a worker that has not woken up yet: on an oversubscribed
// machine (CI running tests in parallel, a busy desktop) a descheduled worker costs nothing,
// the caller simply does its share. Workers spin briefly before sleeping, so the many short
// parallel regions of a decode step (one per matmul) cost about a microsecond each instead
// of a futex round trip.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace fathom {

class ThreadPool {
 public:
  // n_threads <= 0: the number of hardware threads.
  explicit ThreadPool(int n_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Calls fn(begin, end, thread_index) over a partition of [0, n) into chunks that are
  // multiples of `grain` (except the last); thread_index < size() is unique among the calls
  // running at the same time (for per-thread scratch). Blocks until all chunks are done.
  // Not reentrant: call it from one thread at a time.
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn, int64_t grain = 1);

  // The process-wide pool used by the CPU backend (sized by FATHOM_THREADS or the hardware).
  static ThreadPool& global();

 private:
  struct Job {
    const std::function<void(int64_t, int64_t, int)>* fn;
    int64_t n, grain, units, chunks;
  };
  void worker(int index);
  // Claims and runs chunks of the current job until none is left.
  void run_chunks(const Job& job, int thread_index);

  int n_threads_;
  std::vector<std::thread> threads_;
  std::atomic<const Job*> job_{nullptr};
  std::atomic<bool> open_{false};          // the current job still accepts workers
  std::atomic<int64_t> next_chunk_{0};     // next unclaimed chunk
  std::atomic<int64_t> chunks_done_{0};
  std::atomic<int> in_job_{0};             // workers between joining and leaving the job
  std::atomic<uint64_t> generation_{0};    // bumped for every job (and at shutdown)
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
};

}  // namespace fathom
