// The GPU's memory bandwidth as benchmarks measure it in the same run as their own figures:
// a device-to-device cudaMemcpy of `bytes`, counting the bytes read and written, best of `reps`.
#pragma once
#include <cstddef>

namespace fathom::cuda {

double copy_bandwidth(size_t bytes, int reps);  // bytes per second
// The dense bf16 matrix rate (cuBLAS GEMM, n × n × n, F32 accumulation), best of `reps`: FLOP/s,
// the peak a training benchmark's MFU is taken against.
double bf16_gemm_flops(int n, int reps);

// Marks the region a profiler started with `--profile-from-start off` (ncu, nsys) records;
// no effect otherwise.
void profiler_start();
void profiler_stop();

}  // namespace fathom::cuda

#include <string>
#include <vector>
namespace fathom::cuda {
// stage_bench.cu: a chain of dependent GEMV stages shaped like `layers` DeepSeek decode layers
// (tiny: 64×64 stages, the synchronisation cost alone), as one kernel per stage (PDL, graph)
// and as persistent kernels with a grid barrier between stages and L2 look-ahead. Seconds per
// chain, best of `reps`.
struct StageBenchRow {
  std::string variant;
  double seconds = 0;
  double weight_bytes = 0;
  int stages = 0;
};
std::vector<StageBenchRow> stage_chain_bench(int layers, bool tiny, int reps, bool quick = false, bool small = false);
// stream_bench.cu: 1 GiB read in the expert kernels' weight-tile pattern and variants of it
// (steps in flight, bytes per row step, a tiled layout, cp.async rings). Seconds per read of
// weight_bytes, best of `reps`.
std::vector<StageBenchRow> stream_pattern_bench(int reps);
// wgmma_bench.cu: the e4m3 wgmma rate of the FP8 GEMM's candidate patterns (operands resident in
// shared memory; raw, waited for each K tile, promoted, two slices). weight_bytes holds the FLOPs
// of a run, seconds its time, best of `reps`.
std::vector<StageBenchRow> wgmma_rate_bench(int reps);
}  // namespace fathom::cuda
