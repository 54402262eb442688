// How the expert kernels' weight streams could reach more of the memory bandwidth, measured on
// their own before changing the kernels: warps read 16-row tiles of 4 KB rows (a bf16 expert
// row of hidden 2048) the way the grouped experts' warp tiles do — lane (g, tig) takes 16-byte
// pieces of rows g and g + 8, a step of 256 bytes per row (one 128-column unit) — and variants
// change one thing each:
//   - depth: steps in flight per warp (register buffers; the kernels keep 2: the next unit is
//     requested before the current one is used),
//   - per-row step: 512 bytes per row instead of 256 (longer runs in each DRAM page),
//   - layout: "tiled" puts each warp step's bytes side by side (a weight stored in the order
//     the warps read it: every load instruction one contiguous 512 bytes),
//   - cp.async: each thread's pieces land in its own shared-memory ring (no registers held
//     while they are in flight), so more steps can be in flight per warp.
// Every variant reads the same bytes once per run; warps take whole tiles (an equal count each,
// no tail). See bench/bench_cuda_sync.cpp --streams.
#include <cuda_runtime.h>

#include <algorithm>

#include "core/error.h"
#include "ops/cuda/bandwidth.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/timing.cuh"

namespace fathom::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kRowBytes = 4096;
constexpr int64_t kTileBytes = 16 * kRowBytes;

void ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(cat("stream pattern bench: ", what, ": ", cudaGetErrorString(e)));
}

// Byte offset in a tile of piece q (0 .. 2P-1: rows g then g + 8, P pieces each) of step s for
// this lane.
template <int P, bool TILED>
__device__ inline int64_t piece_offset(int s, int q, int lane) {
  if constexpr (TILED) {
    return int64_t(s) * (16 * 64 * P) + int64_t(q) * 512 + lane * 16;
  } else {
    const int g = lane / 4, tig = lane % 4, row = q < P ? g : g + 8, i = q % P;
    return int64_t(row) * kRowBytes + int64_t(s) * 64 * P + i * 64 + tig * 16;
  }
}

__device__ inline uint32_t fold(const uint4& v) { return v.x ^ v.y ^ v.z ^ v.w; }

// This warp's t-th tile: the grid's warps take tiles round-robin.
__device__ inline const uint8_t* warp_tile(const uint8_t* w, int t) {
  const int64_t warp = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int64_t warps = int64_t(gridDim.x) * kThreads / 32;
  return w + (warp + t * warps) * kTileBytes;
}

// DEPTH steps of 2P pieces in registers: step s is used while steps s+1 .. s+DEPTH-1 are in
// flight, then step s + DEPTH is requested into its buffer.
template <int P, int DEPTH, bool TILED>
__global__ void __launch_bounds__(kThreads) stream_regs_kernel(const uint8_t* w, int tiles_per_warp, uint32_t* sink) {
  constexpr int steps = int(kRowBytes / (64 * P));
  static_assert(steps % DEPTH == 0, "whole rounds of DEPTH steps");
  const int lane = threadIdx.x % 32;
  uint32_t acc = 0;
  for (int t = 0; t < tiles_per_warp; ++t) {
    const uint8_t* tile = warp_tile(w, t);
    uint4 buf[DEPTH][2 * P];
#pragma unroll
    for (int d = 0; d < DEPTH; ++d)
#pragma unroll
      for (int q = 0; q < 2 * P; ++q) buf[d][q] = load16_stream(tile + piece_offset<P, TILED>(d, q, lane));
    for (int s0 = 0; s0 < steps; s0 += DEPTH) {
#pragma unroll
      for (int d = 0; d < DEPTH; ++d) {
#pragma unroll
        for (int q = 0; q < 2 * P; ++q) acc ^= fold(buf[d][q]);
        const int next = s0 + d + DEPTH;
        if (next < steps)
#pragma unroll
          for (int q = 0; q < 2 * P; ++q) buf[d][q] = load16_stream(tile + piece_offset<P, TILED>(next, q, lane));
      }
    }
  }
  sink[int64_t(blockIdx.x) * kThreads + threadIdx.x] = acc;
}

// A ring of DEPTH steps per thread in shared memory, filled by cp.async: step s is read back
// (each thread its own pieces: no barrier) while steps s+1 .. s+DEPTH-1 are in flight.
template <int P, int DEPTH, bool TILED>
__global__ void __launch_bounds__(kThreads) stream_async_kernel(const uint8_t* w, int tiles_per_warp, uint32_t* sink) {
  constexpr int steps = int(kRowBytes / (64 * P));
  extern __shared__ __align__(16) uint4 ring[];  // [DEPTH][2P][kThreads]
  const int lane = threadIdx.x % 32;
  uint32_t acc = 0;
  for (int t = 0; t < tiles_per_warp; ++t) {
    const uint8_t* tile = warp_tile(w, t);
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
#pragma unroll
      for (int q = 0; q < 2 * P; ++q)
        cp_async16(smem_u32(&ring[(d * 2 * P + q) * kThreads + threadIdx.x]), tile + piece_offset<P, TILED>(d, q, lane),
                   true);
      cp_async_commit();
    }
    for (int s = 0; s < steps; ++s) {
      const int d = s % DEPTH;
      cp_async_wait<DEPTH - 1>();
#pragma unroll
      for (int q = 0; q < 2 * P; ++q) acc ^= fold(ring[(d * 2 * P + q) * kThreads + threadIdx.x]);
      if (s + DEPTH < steps)
#pragma unroll
        for (int q = 0; q < 2 * P; ++q)
          cp_async16(smem_u32(&ring[(d * 2 * P + q) * kThreads + threadIdx.x]),
                     tile + piece_offset<P, TILED>(s + DEPTH, q, lane), true);
      cp_async_commit();  // (empty past the last step: the group count stays even)
    }
    cp_async_wait<0>();
  }
  sink[int64_t(blockIdx.x) * kThreads + threadIdx.x] = acc;
}

}  // namespace

std::vector<StageBenchRow> stream_pattern_bench(int reps) {
  const int sms = sm_count();
  const size_t max_bytes = size_t(1) << 30;
  uint8_t* w = nullptr;
  uint32_t* sink = nullptr;
  ok(cudaMalloc(&w, max_bytes), "cudaMalloc");
  ok(cudaMalloc(&sink, size_t(sms) * 8 * kThreads * sizeof(uint32_t)), "cudaMalloc");
  ok(cudaMemset(w, 0x3c, max_bytes), "cudaMemset");
  std::vector<StageBenchRow> rows;
  // kernel at `per_sm` blocks per SM (shared memory sized so that no more fit), `ring` bytes of
  // it its own
  auto run = [&](const std::string& name, auto kernel, int per_sm, size_t ring) {
    const size_t smem = std::max(ring, size_t(233472 / per_sm - 1024 - 1024));
    ok(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), "cudaFuncSetAttribute");
    int fit = 0;
    ok(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, kernel, kThreads, smem), "occupancy");
    if (fit < 1) return;
    const int64_t warps = int64_t(sms) * fit * kThreads / 32;
    const int per_warp = int(int64_t(max_bytes) / (warps * kTileBytes));
    const double bytes = double(warps) * per_warp * kTileBytes;
    const double s = 1e-3 * best_event_ms(reps, nullptr, [&] {
      kernel<<<unsigned(sms * fit), kThreads, smem>>>(w, per_warp, sink);
      ok(cudaGetLastError(), "launch");
    });
    rows.push_back({cat(name, ", ", fit, " blocks/SM"), s, bytes, 1});
  };
  run("rows 256 B/step, 2 in flight (the kernels' form)", stream_regs_kernel<4, 2, false>, 2, 0);
  run("rows 256 B/step, 1 in flight", stream_regs_kernel<4, 1, false>, 2, 0);
  run("rows 256 B/step, 4 in flight", stream_regs_kernel<4, 4, false>, 2, 0);
  run("rows 512 B/step, 1 in flight", stream_regs_kernel<8, 1, false>, 2, 0);
  run("rows 512 B/step, 2 in flight", stream_regs_kernel<8, 2, false>, 2, 0);
  run("tiled 4 KB/step, 2 in flight", stream_regs_kernel<4, 2, true>, 2, 0);
  run("tiled 4 KB/step, 4 in flight", stream_regs_kernel<4, 4, true>, 2, 0);
  run("rows 256 B/step, 2 in flight", stream_regs_kernel<4, 2, false>, 4, 0);
  constexpr size_t step_ring = 8 * 16 * kThreads;  // one step of 8 pieces per thread
  run("rows, cp.async ring of 2", stream_async_kernel<4, 2, false>, 2, 2 * step_ring);
  run("rows, cp.async ring of 3", stream_async_kernel<4, 3, false>, 2, 3 * step_ring);
  run("rows, cp.async ring of 4", stream_async_kernel<4, 4, false>, 1, 4 * step_ring);
  run("rows, cp.async ring of 6", stream_async_kernel<4, 6, false>, 1, 6 * step_ring);
  run("rows, cp.async ring of 2", stream_async_kernel<4, 2, false>, 3, 2 * step_ring);
  run("tiled, cp.async ring of 3", stream_async_kernel<4, 3, true>, 2, 3 * step_ring);
  cudaFree(w);
  cudaFree(sink);
  return rows;
}

}  // namespace fathom::cuda
