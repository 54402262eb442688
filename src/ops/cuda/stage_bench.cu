// The question a persistent decode kernel answers, measured on its own: a chain of dependent
// GEMV stages shaped like a DeepSeek decode step (per layer the q_a+kv_a, q_b, W_UK, W_UV,
// o_proj and router projections, then an expert gate+up and down of the active experts' size),
// run (a) as one kernel per stage, launched with programmatic dependent launch inside a CUDA
// graph — how the decode step runs today —, (b) the same with a few one-warp blocks on a
// parallel graph branch that ask L2 for the weights of the stages ahead (paced by a progress
// word the stage kernels write), and (c) as one persistent kernel whose blocks move from stage
// to stage through a grid barrier, asking L2 for the next stage's weights before they compute
// the current one. All use the decode GEMV's inner loop (gemv.cuh), so the differences are the
// kernel boundaries and the look-ahead. See bench/bench_cuda_sync.cpp.
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "core/error.h"
#include "ops/cuda/bandwidth.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/gemv.cuh"
#include "ops/cuda/timing.cuh"

namespace fathom::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kRows = 4;

struct Stage {
  const uint16_t* w = nullptr;  // (N, K) BF16
  const float* x = nullptr;     // (K)
  float* y = nullptr;           // (N)
  int N = 0, K = 0;
};

__device__ inline int stage_units(const Stage& s) { return (s.N + kRows - 1) / kRows; }

__device__ inline void prefetch_unit(const Stage& s, int u) {
  const int n0 = u * kRows;
  prefetch_l2(s.w + int64_t(n0) * s.K, uint64_t(min(kRows, s.N - n0)) * s.K * 2);
}

// Rows 4u .. 4u+3 of y = W x (the decode GEMV's loop and block reduction).
__device__ inline void stage_unit(const Stage& s, int u, float* scratch, float* result) {
  GemvRow rows[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) rows[r] = gemv_row<DType::BF16>(s.w, nullptr, min(u * kRows + r, s.N - 1), s.K, 128);
  float acc[kRows][1] = {};
  gemv_accumulate<DType::BF16, 1, kRows>(acc, rows, GemvX{s.x, s.K}, 1, s.K, 128, true, 1.f);
  gemv_block_reduce<1, kRows>(acc, scratch, result);
  if (threadIdx.x < kRows && u * kRows + int(threadIdx.x) < s.N) s.y[u * kRows + threadIdx.x] = result[threadIdx.x];
}

__global__ void __launch_bounds__(kThreads) chain_kernel(const Stage* stages, int i) {
  const Stage s = stages[i];
  if (threadIdx.x == 0) prefetch_unit(s, blockIdx.x);
  pdl_wait();
  __shared__ float scratch[kThreads / 32 * kRows];
  __shared__ float result[kRows];
  stage_unit(s, blockIdx.x, scratch, result);
}

// The chain kernel that also publishes its start: stages before i are done once it runs.
__global__ void __launch_bounds__(kThreads) chain_kernel_marked(const Stage* stages, int i, unsigned* progress) {
  const Stage s = stages[i];
  if (threadIdx.x == 0) prefetch_unit(s, blockIdx.x);
  pdl_wait();
  if (blockIdx.x == 0 && threadIdx.x == 0)
    asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(progress), "r"(unsigned(i + 1)) : "memory");
  __shared__ float scratch[kThreads / 32 * kRows];
  __shared__ float result[kRows];
  stage_unit(s, blockIdx.x, scratch, result);
}

// One-warp blocks beside the chain, on their own graph branch: ask L2 for stage t's weights
// once stage t - look has started, in 32 KiB pieces dealt over every lane of every block.
__global__ void prefetcher_kernel(const Stage* stages, int n, const unsigned* progress, int look) {
  for (int t = 0; t < n; ++t) {
    if (t > look) {
      unsigned v = 0;
      while (true) {
        asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(progress) : "memory");
        if (int(v) >= t - look) break;
        __nanosleep(64);
      }
    }
    const Stage s = stages[t];
    const uint64_t bytes = uint64_t(s.N) * uint64_t(s.K) * 2;
    constexpr uint64_t kPiece = 32 << 10;
    const uint64_t first = (uint64_t(blockIdx.x) * 32 + threadIdx.x) * kPiece, stride = uint64_t(gridDim.x) * 32 * kPiece;
    for (uint64_t o = first; o < bytes; o += stride)
      prefetch_l2(reinterpret_cast<const uint8_t*>(s.w) + o, min(kPiece, bytes - o));
  }
}

// All blocks arrive (release) and wait until `target` arrivals are seen (acquire).
__device__ inline void grid_barrier(unsigned* counter, unsigned target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
    unsigned v = 0;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(counter) : "memory");
    } while (v < target);
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads) persistent_kernel(const Stage* stages, int n, unsigned* counter,
                                                             int lookahead) {
  __shared__ float scratch[kThreads / 32 * kRows];
  __shared__ float result[kRows];
  for (int i = 0; i < n; ++i) {
    if (threadIdx.x == 0) {
      for (int t = i == 0 ? 0 : i + lookahead; t <= i + lookahead && t < n; ++t) {
        const Stage& s = stages[t];
        for (int u = blockIdx.x; u < stage_units(s); u += gridDim.x) prefetch_unit(s, u);
      }
    }
    const Stage s = stages[i];
    for (int u = blockIdx.x; u < stage_units(s); u += gridDim.x) stage_unit(s, u, scratch, result);
    grid_barrier(counter, unsigned(i + 1) * gridDim.x);
  }
}

void ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(cat("stage benchmark: ", what, ": ", cudaGetErrorString(e)));
}

}  // namespace

std::vector<StageBenchRow> stage_chain_bench(int layers, bool tiny, int reps) {
  FATHOM_CHECK(layers >= 1 && layers <= 64, "stage benchmark: layers must be 1..64, not ", layers);
  // (N, K) of one layer's stages: q_a+kv_a, q_b, W_UK (16 heads), W_UV, o_proj, router,
  // gate+up of 8 active experts of 1,024, down of the same
  std::vector<std::pair<int, int>> shape = {{1344, 2048}, {3072, 768}, {8192, 128}, {2048, 512},
                                            {2048, 2048}, {64, 2048},  {16384, 2048}, {16384, 1024}};
  if (tiny) shape = {{64, 64}, {64, 64}, {64, 64}, {64, 64}, {64, 64}, {64, 64}, {64, 64}, {64, 64}};
  const int n = layers * int(shape.size());
  std::vector<Stage> host(static_cast<size_t>(n));
  size_t weight_elems = 0, max_n = 0;
  for (int i = 0; i < n; ++i) {
    weight_elems += size_t(shape[size_t(i) % shape.size()].first) * size_t(shape[size_t(i) % shape.size()].second);
    max_n = std::max(max_n, size_t(shape[size_t(i) % shape.size()].first));
  }
  max_n = std::max<size_t>(max_n, 16384);
  uint16_t* w = nullptr;
  float* act = nullptr;
  Stage* dev = nullptr;
  unsigned* counter = nullptr;
  ok(cudaMalloc(&w, weight_elems * 2), "cudaMalloc");
  ok(cudaMalloc(&act, 2 * max_n * sizeof(float)), "cudaMalloc");
  ok(cudaMalloc(&dev, sizeof(Stage) * size_t(n)), "cudaMalloc");
  ok(cudaMalloc(&counter, sizeof(unsigned)), "cudaMalloc");
  ok(cudaMemset(w, 0x3c, weight_elems * 2), "cudaMemset");  // bf16 0x3c3c: small and finite
  ok(cudaMemset(act, 0, 2 * max_n * sizeof(float)), "cudaMemset");
  size_t off = 0;
  for (int i = 0; i < n; ++i) {
    Stage& s = host[size_t(i)];
    s.N = shape[size_t(i) % shape.size()].first;
    s.K = shape[size_t(i) % shape.size()].second;
    s.w = w + off;
    off += size_t(s.N) * size_t(s.K);
    s.x = act + size_t(i % 2) * max_n;  // the previous stage's output
    s.y = act + size_t((i + 1) % 2) * max_n;
  }
  ok(cudaMemcpy(dev, host.data(), sizeof(Stage) * size_t(n), cudaMemcpyHostToDevice), "cudaMemcpy");
  cudaStream_t st;
  ok(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "cudaStreamCreate");
  std::vector<StageBenchRow> rows;
  const double bytes = double(weight_elems) * 2;
  auto run = [&](const std::string& name, auto&& enqueue) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    ok(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    enqueue();
    ok(cudaStreamEndCapture(st, &g), "cudaStreamEndCapture");
    ok(cudaGraphInstantiate(&ge, g, 0), "cudaGraphInstantiate");
    const double s = 1e-3 * best_event_ms(reps, st, [&] { ok(cudaGraphLaunch(ge, st), "cudaGraphLaunch"); });
    rows.push_back({name, s, bytes, n});
    cudaGraphExecDestroy(ge);
    cudaGraphDestroy(g);
  };
  run("kernel per stage (PDL, graph)", [&] {
    for (int i = 0; i < n; ++i) {
      const int units = (host[size_t(i)].N + kRows - 1) / kRows;
      launch_kernel(chain_kernel, dim3(unsigned(units)), dim3(kThreads), 0, st, static_cast<const Stage*>(dev), i);
    }
  });
  unsigned* progress = nullptr;
  ok(cudaMalloc(&progress, sizeof(unsigned)), "cudaMalloc");
  cudaStream_t side;
  ok(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking), "cudaStreamCreate");
  cudaEvent_t fork, join;
  ok(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming), "cudaEventCreate");
  ok(cudaEventCreateWithFlags(&join, cudaEventDisableTiming), "cudaEventCreate");
  for (int pb : {8, 16, 32, 64})
  for (int look : {1, 2}) {
    run(cat("chain + ", pb, "-SM prefetcher, look-ahead ", look), [&] {
      ok(cudaMemsetAsync(progress, 0, sizeof(unsigned), st), "cudaMemsetAsync");
      ok(cudaEventRecord(fork, st), "cudaEventRecord");
      ok(cudaStreamWaitEvent(side, fork, 0), "cudaStreamWaitEvent");
      prefetcher_kernel<<<pb, 32, 0, side>>>(dev, n, progress, look);
      for (int i = 0; i < n; ++i) {
        const int units = (host[size_t(i)].N + kRows - 1) / kRows;
        launch_kernel(chain_kernel_marked, dim3(unsigned(units)), dim3(kThreads), 0, st,
                      static_cast<const Stage*>(dev), i, progress);
      }
      ok(cudaEventRecord(join, side), "cudaEventRecord");
      ok(cudaStreamWaitEvent(st, join, 0), "cudaStreamWaitEvent");
    });
  }
  cudaEventDestroy(fork);
  cudaEventDestroy(join);
  cudaStreamDestroy(side);
  cudaFree(progress);
  int per_sm = 0;
  ok(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, persistent_kernel, kThreads, 0), "occupancy");
  for (int bps : {1, 2, 4, 8}) {
    if (bps > per_sm) break;
    for (int look : {0, 1, 2}) {
      const unsigned grid = unsigned(sm_count() * bps);
      run(cat("persistent, ", bps, " blocks/SM, look-ahead ", look), [&] {
        ok(cudaMemsetAsync(counter, 0, sizeof(unsigned), st), "cudaMemsetAsync");
        cudaLaunchConfig_t c{};
        c.gridDim = dim3(grid);
        c.blockDim = dim3(kThreads);
        c.stream = st;
        cudaLaunchAttribute a[1];
        a[0].id = cudaLaunchAttributeCooperative;  // every block resident at once
        a[0].val.cooperative = 1;
        c.attrs = a;
        c.numAttrs = 1;
        ok(cudaLaunchKernelEx(&c, persistent_kernel, static_cast<const Stage*>(dev), n, counter, look),
           "cudaLaunchKernelEx (cooperative)");
      });
    }
  }
  ok(cudaStreamSynchronize(st), "cudaStreamSynchronize");
  cudaStreamDestroy(st);
  cudaFree(w);
  cudaFree(act);
  cudaFree(dev);
  cudaFree(counter);
  return rows;
}

}  // namespace fathom::cuda
