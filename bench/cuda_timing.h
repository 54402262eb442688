// Timing of GPU work for the benchmarks that call the CUDA launchers directly (bench_fp8_gemm,
// bench_flash_attention). Include after ops/cuda/cuda_ops.h, in a FATHOM_HAVE_CUDA build.
#pragma once
#include <chrono>

#include "ops/cuda/cuda_ops.h"

namespace fathom::bench {

// Seconds per call: calls repeated, doubling, until min_ms of work after a warm-up. (The
// launchers run on the legacy stream, an Ops backend's fills on its own: device-wide waits.)
template <class F>
double seconds_per_call(F&& call, double min_ms) {
  cuda::device_synchronize();
  call();
  cuda::device_synchronize();
  int n = 1;
  for (;;) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < n; ++i) call();
    cuda::device_synchronize();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s * 1e3 >= min_ms || n >= (1 << 20)) return s / n;
    n *= 2;
  }
}

}  // namespace fathom::bench
