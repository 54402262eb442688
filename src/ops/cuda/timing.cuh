// Timing GPU work for the benchmarks' limits and comparisons: CUDA events around each run.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>

#include "core/error.h"

namespace fathom::cuda {

// The fastest of `reps` runs of work() (which enqueues on `stream`), in milliseconds between
// CUDA events recorded on that stream, after one warm-up run.
template <typename F>
float best_event_ms(int reps, cudaStream_t stream, F&& work) {
  auto ok = [](cudaError_t e, const char* what) {
    if (e != cudaSuccess) throw Error(cat("GPU timing: ", what, ": ", cudaGetErrorString(e)));
  };
  cudaEvent_t t0, t1;
  ok(cudaEventCreate(&t0), "cudaEventCreate");
  ok(cudaEventCreate(&t1), "cudaEventCreate");
  float best = 1e30f;
  for (int r = 0; r < std::max(reps, 1) + 1; ++r) {
    ok(cudaEventRecord(t0, stream), "cudaEventRecord");
    work();
    ok(cudaEventRecord(t1, stream), "cudaEventRecord");
    ok(cudaEventSynchronize(t1), "cudaEventSynchronize");
    float ms = 0;
    ok(cudaEventElapsedTime(&ms, t0, t1), "cudaEventElapsedTime");
    if (r > 0) best = std::min(best, ms);
  }
  cudaEventDestroy(t0);
  cudaEventDestroy(t1);
  return best;
}

}  // namespace fathom::cuda
