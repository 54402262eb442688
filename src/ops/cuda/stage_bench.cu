// The question a persistent decode kernel answers, measured on its own: a chain of dependent
// GEMV stages shaped like a DeepSeek decode step (per layer the q_a+kv_a, q_b, W_UK, W_UV,
// o_proj and router projections, then an expert gate+up and down of the active experts' size),
// run (a) as one kernel per stage, launched with programmatic dependent launch inside a CUDA
// graph — how the decode step runs today —, (b) the same with a few one-warp blocks on a
// parallel graph branch that ask L2 for the weights of the stages ahead (paced by a progress
// word the stage kernels write), and (c) as one persistent kernel whose blocks move from stage
// to stage through a grid barrier, asking L2 for the next stage's weights before they compute
// the current one, and (d) as one kernel per stage again, each block owning a contiguous slice of
// the stage's rows that the copy engine brings into a ring of shared-memory slots — the first
// slots asked for before the programmatic-launch wait, so that a stage's weights stream in
// while the stage before it computes — and the dot products read from shared memory, and (e) as
// (d) with the weights held in registers instead (bench/RESULTS.md: (a) wins). (a)–(c) use the
// decode GEMV's inner loop (gemv.cuh), so the differences are the kernel boundaries and the
// look-ahead. See bench/bench_cuda_sync.cpp.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "core/error.h"
#include "ops/cuda/bandwidth.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/gemv.cuh"
#include "ops/cuda/hopper.cuh"
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

// (d): grid (G), block kStagedThreads, dynamic shared memory slots * slot_bytes + K floats.
// Block b owns rows [N b / G, N (b + 1) / G), which the copy engine brings in, rows_per_slot rows
// a slot, `slots` slots ahead; the first ones before pdl_wait().
constexpr int kStagedThreads = 256;
__global__ void __launch_bounds__(kStagedThreads) staged_kernel(const Stage* stages, int i, int slots,
                                                                  uint32_t slot_bytes) {
#ifdef FATHOM_SM90A
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ __align__(8) uint64_t bars[8];
  const Stage s = stages[i];
  const int G = gridDim.x;
  const int r0 = int(int64_t(s.N) * blockIdx.x / G), r1 = int(int64_t(s.N) * (blockIdx.x + 1) / G);
  const uint32_t row_bytes = uint32_t(s.K) * 2;
  const int per_slot = max(1, int(slot_bytes / row_bytes));
  const int chunks = (r1 - r0 + per_slot - 1) / per_slot;
  const uint32_t base = smem_u32(smem), bar0 = smem_u32(bars);
  auto issue = [&](int c) {
    const int a = r0 + c * per_slot, n = min(per_slot, r1 - a);
    const uint32_t bar = bar0 + 8 * (c % slots);
    mbar_expect_tx(bar, uint32_t(n) * row_bytes);
    bulk_load(base + uint32_t(c % slots) * slot_bytes, s.w + int64_t(a) * s.K, uint32_t(n) * row_bytes, bar);
  };
  if (threadIdx.x == 0) {
    for (int j = 0; j < slots; ++j) mbar_init(bar0 + 8 * j, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    for (int c = 0; c < min(chunks, slots); ++c) issue(c);
  }
  pdl_wait();
  float* xs = reinterpret_cast<float*>(smem + size_t(slots) * slot_bytes);
  for (int k = threadIdx.x * 4; k < s.K; k += kStagedThreads * 4)
    *reinterpret_cast<float4*>(xs + k) = __ldg(reinterpret_cast<const float4*>(s.x + k));
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int c = 0; c < chunks; ++c) {
    mbar_wait(bar0 + 8 * (c % slots), uint32_t(c / slots) & 1);
    const int a = r0 + c * per_slot, n = min(per_slot, r1 - a);
    const uint8_t* slot = smem + size_t(c % slots) * slot_bytes;
    for (int r = warp; r < n; r += kStagedThreads / 32) {
      const uint8_t* row = slot + size_t(r) * row_bytes;
      float acc = 0.f;
      for (int k = lane * 8; k < s.K; k += 256) {
        const uint4 raw = *reinterpret_cast<const uint4*>(row + k * 2);
        float w[8];
        convert16<DType::BF16>(raw, w);
        const float4 x0 = *reinterpret_cast<const float4*>(xs + k), x1 = *reinterpret_cast<const float4*>(xs + k + 4);
        acc += w[0] * x0.x + w[1] * x0.y + w[2] * x0.z + w[3] * x0.w + w[4] * x1.x + w[5] * x1.y + w[6] * x1.z +
               w[7] * x1.w;
      }
      acc = warp_sum(acc);
      if (lane == 0) s.y[a + r] = acc;
    }
    __syncthreads();  // the slot is read: refill it
    if (threadIdx.x == 0 && c + slots < chunks) issue(c + slots);
  }
#else
  (void)stages, (void)i, (void)slots, (void)slot_bytes;
#endif
}

// (e): grid (G), block kRegThreads. Block b owns rows [N b / G, N (b + 1) / G); its warps take them
// in turn, lpr lanes a row (each lane ppl 16-byte pieces of it). A lane's work is the sequence of
// (row, piece) items, row by row, cut into groups of P: the first group is loaded before the
// programmatic-launch wait and each next one while the one before is multiplied (two register
// buffers); a row's sum is finished (shuffles over its lpr lanes) when its last item is done.
constexpr int kRegThreads = 256;
struct RegLane {
  int lpr, ppl, stride, l, first, items;
};
__device__ inline RegLane reg_lane(const Stage& s, int r0, int r1) {
  RegLane L;
  const int pieces = s.K / 8, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  L.lpr = min(32, pieces);
  const int rpw = 32 / L.lpr;
  L.ppl = (pieces + L.lpr - 1) / L.lpr;
  L.stride = (kRegThreads / 32) * rpw;
  L.l = lane % L.lpr;
  L.first = r0 + warp * rpw + lane / L.lpr;
  // every lane of a warp walks as many items (rows past r1 load nothing and write nothing), so
  // that the shuffles stay convergent
  const int warp_first = r0 + warp * rpw;
  const int rows = warp_first < r1 ? (r1 - warp_first + L.stride - 1) / L.stride : 0;
  L.items = rows * L.ppl;
  return L;
}
template <int P>
__device__ inline void reg_load(uint4 (&w)[P], const Stage& s, const RegLane& L, int it0, int r1) {
#pragma unroll
  for (int idx = 0; idx < P; ++idx) {
    const int it = it0 + idx, row = L.first + (it / L.ppl) * L.stride, piece = L.l + (it % L.ppl) * L.lpr;
    const bool ok = it < L.items && row < r1 && piece < s.K / 8;
    w[idx] = ok ? load16_stream(reinterpret_cast<const uint8_t*>(s.w + int64_t(row) * s.K + piece * 8))
                : make_uint4(0, 0, 0, 0);
  }
}
template <int P>
__device__ inline void reg_compute(const uint4 (&w)[P], const Stage& s, const RegLane& L, int it0, int r1,
                                   float& acc) {
#pragma unroll
  for (int idx = 0; idx < P; ++idx) {
    const int it = it0 + idx;
    if (it >= L.items) break;
    const int piece = L.l + (it % L.ppl) * L.lpr;
    if (piece < s.K / 8) {
      float f[8];
      convert16<DType::BF16>(w[idx], f);
      const float4 x0 = __ldg(reinterpret_cast<const float4*>(s.x + piece * 8));
      const float4 x1 = __ldg(reinterpret_cast<const float4*>(s.x + piece * 8 + 4));
      acc += f[0] * x0.x + f[1] * x0.y + f[2] * x0.z + f[3] * x0.w + f[4] * x1.x + f[5] * x1.y + f[6] * x1.z +
             f[7] * x1.w;
    }
    if (it % L.ppl == L.ppl - 1) {  // the row's last item
      for (int off = L.lpr / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(kFullMask, acc, off);
      const int row = L.first + (it / L.ppl) * L.stride;
      if (L.l == 0 && row < r1) s.y[row] = acc;
      acc = 0.f;
    }
  }
}
template <int P>
__global__ void __launch_bounds__(kRegThreads, 2) regstaged_kernel(const Stage* stages, int i) {
  const Stage s = stages[i];
  const int G = gridDim.x;
  const int r0 = int(int64_t(s.N) * blockIdx.x / G), r1 = int(int64_t(s.N) * (blockIdx.x + 1) / G);
  const RegLane L = reg_lane(s, r0, r1);
  uint4 wa[P], wb[P];
  reg_load(wa, s, L, 0, r1);
  pdl_wait();
  float acc = 0.f;
  for (int it = 0; it < L.items;) {  // two groups a pass: wa's while wb's load, then the other way round
    if (it + P < L.items) reg_load(wb, s, L, it + P, r1);
    reg_compute(wa, s, L, it, r1, acc);
    it += P;
    if (it >= L.items) break;
    if (it + P < L.items) reg_load(wa, s, L, it + P, r1);
    reg_compute(wb, s, L, it, r1, acc);
    it += P;
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

std::vector<StageBenchRow> stage_chain_bench(int layers, bool tiny, int reps, bool quick, bool small) {
  FATHOM_CHECK(layers >= 1 && layers <= 64, "stage benchmark: layers must be 1..64, not ", layers);
  // (N, K) of one layer's stages: q_a+kv_a, q_b, W_UK (16 heads), W_UV, o_proj, router,
  // gate+up of 8 active experts of 1,024, down of the same
  std::vector<std::pair<int, int>> shape = {{1344, 2048}, {3072, 768}, {8192, 128}, {2048, 512},
                                            {2048, 2048}, {64, 2048},  {16384, 2048}, {16384, 1024}};
  if (tiny) shape = {{64, 64}, {64, 64}, {64, 64}, {64, 64}, {64, 64}, {64, 64}, {64, 64}, {64, 64}};
  if (small) shape.resize(6);  // the attention side's stages alone (no experts)
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
  if (sm90a_available()) {
    size_t max_k = 0;
    for (const auto& sh : shape) max_k = std::max(max_k, size_t(sh.second));
    for (const auto& v : {std::tuple{1, 3, 32}, std::tuple{1, 4, 24}, std::tuple{1, 2, 48}, std::tuple{2, 3, 16},
                          std::tuple{1, 6, 16}}) {
      const int bps = std::get<0>(v), slots = std::get<1>(v), slot_kb = std::get<2>(v);
      const uint32_t slot_bytes = uint32_t(slot_kb) << 10;
      const size_t smem = size_t(slots) * slot_bytes + max_k * 4;
      ok(cudaFuncSetAttribute(staged_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), "smem attribute");
      const unsigned grid = unsigned(sm_count() * bps);
      run(cat("staged, ", bps, " block/SM, ", slots, " x ", slot_kb, " KiB"), [&] {
        for (int i = 0; i < n; ++i)
          launch_kernel(staged_kernel, dim3(grid), dim3(kStagedThreads), smem, st, static_cast<const Stage*>(dev), i,
                        slots, slot_bytes);
      });
    }
    for (int bps : {1, 2, 3}) {
      const unsigned grid = unsigned(sm_count() * bps);
      if (bps < 3)
        run(cat("registers, ", bps, " block/SM, 8 + 8 pieces"), [&] {
          for (int i = 0; i < n; ++i)
            launch_kernel(regstaged_kernel<8>, dim3(grid), dim3(kRegThreads), 0, st, static_cast<const Stage*>(dev), i);
        });
      run(cat("registers, ", bps, " block/SM, 4 + 4 pieces"), [&] {
        for (int i = 0; i < n; ++i)
          launch_kernel(regstaged_kernel<4>, dim3(grid), dim3(kRegThreads), 0, st, static_cast<const Stage*>(dev), i);
      });
    }
    // the staged kernel's first stage against the chain kernel's, x = 1, random-ish weights
    if (!tiny) {
      const Stage s0 = host[0];
      std::vector<uint16_t> hw(size_t(s0.N) * s0.K);
      for (size_t j = 0; j < hw.size(); ++j) hw[j] = uint16_t(0x3c00 + (j * 2654435761u >> 20) % 0x200);
      ok(cudaMemcpy(const_cast<uint16_t*>(s0.w), hw.data(), hw.size() * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
      std::vector<float> ones(max_n, 1.f), a(size_t(s0.N)), b(size_t(s0.N));
      ok(cudaMemcpy(act, ones.data(), max_n * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
      launch_kernel(chain_kernel, dim3(unsigned((s0.N + kRows - 1) / kRows)), dim3(kThreads), 0, st,
                    static_cast<const Stage*>(dev), 0);
      ok(cudaMemcpyAsync(a.data(), act + max_n, a.size() * 4, cudaMemcpyDeviceToHost, st), "cudaMemcpy");
      ok(cudaMemsetAsync(act + max_n, 0, a.size() * 4, st), "cudaMemset");
      const size_t smem = 3 * (32 << 10) + max_k * 4;
      launch_kernel(staged_kernel, dim3(unsigned(sm_count())), dim3(kStagedThreads), smem, st,
                    static_cast<const Stage*>(dev), 0, 3, uint32_t(32 << 10));
      ok(cudaMemcpyAsync(b.data(), act + max_n, b.size() * 4, cudaMemcpyDeviceToHost, st), "cudaMemcpy");
      ok(cudaMemsetAsync(act + max_n, 0, a.size() * 4, st), "cudaMemset");
      std::vector<float> c(size_t(s0.N));
      launch_kernel(regstaged_kernel<4>, dim3(unsigned(sm_count())), dim3(kRegThreads), 0, st,
                    static_cast<const Stage*>(dev), 0);
      ok(cudaMemcpyAsync(c.data(), act + max_n, c.size() * 4, cudaMemcpyDeviceToHost, st), "cudaMemcpy");
      ok(cudaStreamSynchronize(st), "check");
      double worst = 0, worst_reg = 0;
      for (size_t j = 0; j < a.size(); ++j) {
        worst = std::max(worst, double(std::abs(a[j] - b[j])) / (std::abs(a[j]) + 1e-3));
        worst_reg = std::max(worst_reg, double(std::abs(a[j] - c[j])) / (std::abs(a[j]) + 1e-3));
      }
      FATHOM_CHECK(worst < 1e-4, "stage benchmark: the staged kernel's stage 0 differs from the chain kernel's by ",
                   worst);
      FATHOM_CHECK(worst_reg < 1e-4,
                   "stage benchmark: the register kernel's stage 0 differs from the chain kernel's by ", worst_reg);
      ok(cudaMemset(act, 0, 2 * max_n * sizeof(float)), "cudaMemset");
    }
  }
  if (!quick) {  // (b) and (c)
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
