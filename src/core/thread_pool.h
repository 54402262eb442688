// A small fork-join thread pool for the CPU kernels. parallel_for splits [0, n) into
// contiguous chunks, one per thread, and the caller's thread takes the first chunk; the
// workers spin briefly before sleeping, so the many short parallel regions of a decode step
// (one per matmul) cost about a microsecond each instead of a futex round trip.
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

  // Calls fn(begin, end, thread_index) over a partition of [0, n) with chunks that are
  // multiples of `grain` (except the last). Blocks until all chunks are done. Not reentrant.
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn, int64_t grain = 1);

  // Calls fn(thread_index) once on each thread.
  void run_on_all(const std::function<void(int)>& fn);

  // The process-wide pool used by the CPU backend (sized by FATHOM_THREADS or the hardware).
  static ThreadPool& global();

 private:
  void worker(int index);

  int n_threads_;
  std::vector<std::thread> threads_;
  const std::function<void(int)>* job_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
};

}  // namespace fathom
