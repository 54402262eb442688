// What a persistent decode kernel would gain, measured before building one: a chain of
// dependent GEMV stages shaped like DeepSeek decode layers (src/ops/cuda/stage_bench.cu), run
// as one kernel per stage with programmatic dependent launch in a CUDA graph (the decode step
// today) and as persistent kernels with a grid barrier between stages and L2 look-ahead. Each
// row reports the time per chain, the weight bytes streamed per second and the ratio to the
// device copy bandwidth of the same run; the "tiny" chain (64×64 stages) shows the cost of a
// stage boundary alone.
//
// --streams: instead, the expert kernels' weight-read pattern and variants of it
// (src/ops/cuda/stream_bench.cu): GB/s of each against the copy bandwidth.
//
// --quick: only the kernel-per-stage chain and the staged variants (d).
//
// usage: bench_cuda_sync [--layers 12] [--reps 20] [--streams] [--quick]
#include <cstdio>
#include <cstdlib>
#include <string>

#include "core/error.h"
#include "ops/ops.h"
#ifdef FATHOM_HAVE_CUDA
#include "ops/cuda/bandwidth.h"
#endif

using namespace fathom;

int main(int argc, char** argv) {
  int layers = 12, reps = 20;
  bool streams = false, quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--streams") {
      streams = true;
    } else if (a == "--quick") {
      quick = true;
    } else if ((a == "--layers" || a == "--reps") && i + 1 < argc) {
      (a == "--layers" ? layers : reps) = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: bench_cuda_sync [--layers N] [--reps N] [--streams] [--quick]\n");
      return 2;
    }
  }
#ifndef FATHOM_HAVE_CUDA
  (void)layers, (void)reps, (void)streams, (void)quick;
  std::fprintf(stderr, "bench_cuda_sync: this build has no CUDA backend (nvcc was not found at configure time)\n");
  return 1;
#else
  try {
    if (!cuda_available()) {
      std::fprintf(stderr, "bench_cuda_sync: no CUDA GPU on this machine\n");
      return 1;
    }
    const double bw = cuda::copy_bandwidth(size_t(2) << 30, 5);
    std::printf("device copy bandwidth: %.3f TB/s\n\n", bw / 1e12);
    if (streams) {
      std::printf("%-58s %9s %9s %8s\n", "read pattern", "us", "TB/s", "of copy");
      for (const auto& r : cuda::stream_pattern_bench(reps)) {
        const double tbs = r.weight_bytes / r.seconds / 1e12;
        std::printf("%-58s %9.1f %9.3f %7.1f%%\n", r.variant.c_str(), r.seconds * 1e6, tbs, 100 * tbs * 1e12 / bw);
      }
      return 0;
    }
    std::printf("%-50s %6s %10s %10s %9s %8s\n", "variant", "stages", "us/chain", "us/stage", "TB/s", "of copy");
    for (int kind : {0, 1, 2}) {  // tiny, the attention side alone (--quick), whole layers
      if (kind == 1 && !quick) continue;
      const bool tiny = kind == 0;
      const char* tag = kind == 0 ? "tiny: " : kind == 1 ? "attention side: " : "";
      for (const auto& r : cuda::stage_chain_bench(layers, tiny, reps, quick, kind == 1)) {
        const double tbs = r.weight_bytes / r.seconds / 1e12;
        std::printf("%-50s %6d %10.1f %10.2f %9.3f %7.1f%%\n", (tag + r.variant).c_str(), r.stages,
                    r.seconds * 1e6, r.seconds * 1e6 / r.stages, tbs, 100 * tbs * 1e12 / bw);
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_sync: %s\n", e.what());
    return 1;
  }
  return 0;
#endif
}
