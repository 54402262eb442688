// What the FP8 GEMM's tensor cores can do with nothing else in the way, measured before choosing
// its next tile shape (bench/RESULTS.md, bench_fp8_gemm, fourth measurement): blocks of two or
// three warpgroups issue e4m3 wgmmas (m64nNk32, both operands from shared memory) on tiles that
// stay in shared memory — no TMA, no global loads — in the patterns the GEMM kernel could use:
//   - raw: batches back to back on one accumulator, one batch waited for behind the next
//     (the tensor cores' rate with an operand width N),
//   - wait: each K tile's batch waited for before the next is issued (what the promotion needs),
//   - promote: that, plus the promotion's FFMAs into fp32 totals (DeepSeek-V3's recipe),
//   - slices: a warpgroup computes two 64-row slices a K tile (the 256-row tile: B read twice),
//   - ordered: promote, with the warpgroups taking turns to issue (named barriers: warpgroup w
//     issues its batch, then lets w + 1 issue), so that one promotes while the tensor cores run
//     the other's batch instead of all waiting for batches that were issued together,
//   - with copies: one more warpgroup's thread copies 48 KB a K tile (a 256 x 128 tile's A and B)
//     from L2 into other shared memory by the copy engine, paced at kPace cycles a K tile, as the
//     GEMM's TMA does — what the copies' writes cost the wgmmas' reads.
// One block per SM; TFLOP/s over the grid. See bench/bench_fp8_gemm.cpp --wgmma.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <vector>

#include "core/error.h"
#include "ops/cuda/bandwidth.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/hopper.cuh"
#include "ops/cuda/timing.cuh"
#include "ops/cuda/wgmma_e4m3.cuh"

namespace fathom::cuda {
namespace {

enum Mode { kRaw, kWait, kPromote, kOrdered };

// kWGs warpgroups x kSlices slices of 64 rows, against one B tile of kN rows; `iters` K tiles of
// 128 (four k32 wgmmas a slice each).
constexpr int kCopyBytes = 48 * 1024, kCopySlots = 3;
template <int kN, int kWGs, int kSlices, int kMode, int kPace = 0>
__global__ void __launch_bounds__(128 * (kWGs + (kPace > 0)), 1)
    wgmma_rate_kernel(int iters, float scale, float* sink, const uint8_t* src, int64_t src_chunks) {
#ifdef FATHOM_SM90A
  extern __shared__ uint8_t raw[];
  constexpr int kABytes = kWGs * kSlices * 64 * 128, kBBytes = kN * 128;
  const uint32_t base = (smem_u32(raw) + 1023u) & ~1023u;
  uint8_t* tiles = raw + (base - smem_u32(raw));
  for (int i = int(threadIdx.x); i < kABytes + kBBytes; i += int(blockDim.x))
    tiles[i] = uint8_t(0x30 + (i * 7) % 13);  // small positive e4m3 codes (no NaN, no overflow)
  // (with copies: kCopySlots slots of kCopyBytes after the tiles, then their barriers)
  const uint32_t slots = base + uint32_t(kABytes + kBBytes), bars = slots + kCopySlots * kCopyBytes;
  // (set by the consumers when they are done: the copies stop there, so that the time is theirs)
  __shared__ int done;
  if (kPace > 0 && threadIdx.x == 0) {
    for (int i = 0; i < kCopySlots; ++i) mbar_init(bars + 8 * i, 1);
    done = 0;
  }
  __syncthreads();
  const int wg = int(threadIdx.x / 128);
  // (with copies, the copying warpgroup's registers go to the others, as in the GEMM: 40 / 232)
  if constexpr (kPace > 0) {
    constexpr int kProducerRegs = 40, kConsumerRegs = 232;
    static_assert(setmaxnreg_fits(kProducerRegs, kConsumerRegs, kWGs), "setmaxnreg over the launch's registers");
    if (wg == kWGs) setmaxnreg_dec<kProducerRegs>();
    else setmaxnreg_inc<kConsumerRegs>();
  }
  if (kPace > 0 && wg == kWGs) {
    if (threadIdx.x % 128 == 0) {
      const long long t0 = clock64();
      int it = 0;
      for (; it < iters && !*static_cast<volatile int*>(&done); ++it) {
        while (clock64() - t0 < (long long)it * kPace && !*static_cast<volatile int*>(&done)) {
        }
        if (*static_cast<volatile int*>(&done)) break;
        const int slot = it % kCopySlots;
        if (it >= kCopySlots) mbar_wait(bars + 8 * slot, uint32_t((it / kCopySlots - 1) & 1));
        mbar_expect_tx(bars + 8 * slot, kCopyBytes);
        const uint8_t* from = src + ((int64_t(blockIdx.x) * iters + it) % src_chunks) * kCopyBytes;
        for (int c = 0; c < 3; ++c)
          bulk_load(slots + uint32_t(slot * kCopyBytes + c * 16384), from + c * 16384, 16384, bars + 8 * slot);
      }
      for (int j = std::max(0, it - kCopySlots); j < it; ++j)
        mbar_wait(bars + 8 * (j % kCopySlots), uint32_t((j / kCopySlots) & 1));
    }
    return;
  }
  const uint64_t db = sw128_desc(base + kABytes);
  float acc[kN / 2];
#pragma unroll
  for (int i = 0; i < kN / 2; ++i) acc[i] = 0.f;
  constexpr bool kTotals = kMode == kPromote || kMode == kOrdered;
  float total[kTotals ? kSlices : 1][kTotals ? kN / 2 : 1];
#pragma unroll
  for (int s = 0; s < (kTotals ? kSlices : 1); ++s)
#pragma unroll
    for (int i = 0; i < (kTotals ? kN / 2 : 1); ++i) total[s][i] = 0.f;
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int s = 0; s < kSlices; ++s) {
      const uint64_t da = sw128_desc(base + uint32_t((wg * kSlices + s) * 64 * 128));
      // (ordered: barrier 1 + w is warpgroup w's turn; the first batch of warpgroup 0 goes at once)
      if (kMode == kOrdered && (it > 0 || s > 0 || wg > 0)) named_bar_sync(1 + wg, 256);
      wgmma_fence();
#pragma unroll
      // (raw and wait accumulate over every K tile, promote starts each batch afresh: every
      // wgmma's result is used, so that ptxas keeps them all — a first version overwrote the
      // accumulator in the wait mode and left the second slice's totals unread, and measured
      // 2.9x and 1.4x the tensor cores' peak)
      for (int k = 0; k < 4; ++k) wgmma_e4m3<kN>(acc, da + 2 * k, db + 2 * k, !kTotals || k != 0 ? 1 : 0);
      wgmma_commit();
      if (kMode == kOrdered) named_bar_arrive(1 + (wg + 1) % kWGs, 256);
      if constexpr (kMode == kRaw) {
        wgmma_wait<1>();
      } else {
        wgmma_wait<0>();
        fence_regs(acc);
        if constexpr (kTotals) {
#pragma unroll
          for (int i = 0; i < kN / 2; ++i) total[s][i] += acc[i] * scale;
        }
      }
    }
  }
  wgmma_wait<0>();
  fence_regs(acc);
  if (kMode == kOrdered && wg == 0) named_bar_sync(1, 256);  // the last warpgroup's last turn given back
  if (kPace > 0 && threadIdx.x == 0) atomicExch(&done, 1);
  float keep = 0.f;
#pragma unroll
  for (int i = 0; i < kN / 2; ++i)
#pragma unroll
    for (int t = 0; t < (kTotals ? kSlices : 1); ++t) keep += kTotals ? total[t][i] : acc[i];
  if (keep == 12345.f) sink[threadIdx.x] = keep;  // (never true: keeps the work)
#else
  (void)iters, (void)scale, (void)sink, (void)src, (void)src_chunks;
  __trap();
#endif
}

void ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(cat("wgmma rate bench: ", what, ": ", cudaGetErrorString(e)));
}

template <int kN, int kWGs, int kSlices, int kMode, int kPace = 0>
StageBenchRow run(const char* name, int reps, float* sink, const uint8_t* src = nullptr, int64_t chunks = 1) {
  auto kernel = wgmma_rate_kernel<kN, kWGs, kSlices, kMode, kPace>;
  const int smem = kWGs * kSlices * 64 * 128 + kN * 128 + 1024 + (kPace > 0 ? kCopySlots * (kCopyBytes + 8) : 0);
  ok(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), "cudaFuncSetAttribute");
  const int blocks = sm_count(), iters = 4096;
  const float ms = best_event_ms(reps, nullptr, [&] {
    kernel<<<blocks, 128 * (kWGs + (kPace > 0)), smem>>>(iters, 0.5f, sink, src, chunks);
    ok(cudaGetLastError(), name);
  });
  StageBenchRow r;
  r.variant = name;
  r.seconds = ms / 1e3;
  r.weight_bytes = 2.0 * blocks * double(iters) * (kWGs * kSlices * 64) * kN * 128;  // FLOPs
  return r;
}

}  // namespace

std::vector<StageBenchRow> wgmma_rate_bench(int reps) {
  FATHOM_CHECK(sm90a_available(), "the wgmma rate bench needs an sm_90a GPU and kernel image");
  float* sink = nullptr;
  ok(cudaMalloc(&sink, 512 * sizeof(float)), "cudaMalloc");
  // the copies' source: 24 MB, which stays in L2 as the GEMM's panels mostly do
  constexpr int64_t kChunks = 512;
  uint8_t* src = nullptr;
  if (cudaMalloc(&src, size_t(kChunks * kCopyBytes)) != cudaSuccess) {
    cudaFree(sink);
    throw Error("wgmma rate bench: cudaMalloc of the copies' source failed");
  }
  ok(cudaMemset(src, 0x31, size_t(kChunks * kCopyBytes)), "cudaMemset");
  std::vector<StageBenchRow> rows;
  try {
    rows.push_back(run<128, 2, 1, kRaw>("n128 raw, 2 warpgroups", reps, sink));
    rows.push_back(run<192, 2, 1, kRaw>("n192 raw, 2 warpgroups", reps, sink));
    rows.push_back(run<256, 2, 1, kRaw>("n256 raw, 2 warpgroups", reps, sink));
    rows.push_back(run<128, 2, 1, kWait>("n128 wait each K tile (128x128 tile)", reps, sink));
    rows.push_back(run<256, 2, 1, kWait>("n256 wait each K tile (128x256 tile)", reps, sink));
    rows.push_back(run<128, 2, 1, kPromote>("n128 promote (128x128 tile)", reps, sink));
    rows.push_back(run<192, 2, 1, kPromote>("n192 promote (128x192 tile)", reps, sink));
    rows.push_back(run<128, 2, 2, kPromote>("n128 promote, 2 slices (256x128 tile)", reps, sink));
    rows.push_back(run<128, 3, 1, kPromote>("n128 promote, 3 warpgroups (192x128 tile)", reps, sink));
    rows.push_back(run<128, 2, 1, kOrdered>("n128 promote, turns (128x128 tile)", reps, sink));
    rows.push_back(run<128, 2, 2, kOrdered>("n128 promote, 2 slices, turns (256x128 tile)", reps, sink));
    rows.push_back(run<128, 3, 1, kOrdered>("n128 promote, 3 warpgroups, turns (192x128 tile)", reps, sink));
    // 48 KB a K tile at 1,100 cycles (a 256 x 128 K tile at ~93% of the peak) and at 1,500 (68%)
    rows.push_back(run<128, 2, 2, kOrdered, (1 << 30)>("2 slices, turns, setmaxnreg, no copies", reps, sink, src, kChunks));
    rows.push_back(run<128, 2, 2, kPromote, 1100>("2 slices + copies/1100 cycles", reps, sink, src, kChunks));
    rows.push_back(run<128, 2, 2, kOrdered, 1100>("2 slices, turns + copies/1100 cycles", reps, sink, src, kChunks));
    rows.push_back(run<128, 2, 2, kOrdered, 1500>("2 slices, turns + copies/1500 cycles", reps, sink, src, kChunks));
  } catch (...) {
    cudaFree(sink);
    cudaFree(src);
    throw;
  }
  cudaFree(sink);
  cudaFree(src);
  return rows;
}

}  // namespace fathom::cuda
