// What the FP8 GEMM's tensor cores can do with nothing else in the way, measured before choosing
// its next tile shape (bench/RESULTS.md, bench_fp8_gemm, fourth measurement): blocks of two or
// three warpgroups issue e4m3 wgmmas (m64nNk32, both operands from shared memory) on tiles that
// stay in shared memory — no TMA, no global loads — in the patterns the GEMM kernel could use:
//   - raw: batches back to back on one accumulator, one batch waited for behind the next
//     (the tensor cores' rate with an operand width N),
//   - wait: each K tile's batch waited for before the next is issued (what the promotion needs),
//   - promote: that, plus the promotion's FFMAs into fp32 totals (DeepSeek-V3's recipe),
//   - slices: a warpgroup computes two 64-row slices a K tile (the 256-row tile: B read twice).
// One block per SM; TFLOP/s over the grid. See bench/bench_fp8_gemm.cpp --wgmma.
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "core/error.h"
#include "ops/cuda/bandwidth.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/hopper.cuh"
#include "ops/cuda/timing.cuh"

namespace fathom::cuda {
namespace {

#ifdef FATHOM_SM90A
// d (64 x 128 f32 over the warpgroup: 64 registers a thread) (+)= A (64 x 32) · B (128 x 32)ᵀ, e4m3 from
// shared memory; scale_d = 0 overwrites d.
__device__ inline void wgmma_m64n128k32(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1;\n}\n"
      :
        "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}
// d (64 x 192 f32 over the warpgroup: 96 registers a thread) (+)= A (64 x 32) · B (192 x 32)ᵀ, e4m3 from
// shared memory; scale_d = 0 overwrites d.
__device__ inline void wgmma_m64n192k32(float (&d)[96], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n192k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
      "}, %96, %97, p, 1, 1;\n}\n"
      :
        "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}
// d (64 x 256 f32 over the warpgroup: 128 registers a thread) (+)= A (64 x 32) · B (256 x 32)ᵀ, e4m3 from
// shared memory; scale_d = 0 overwrites d.
__device__ inline void wgmma_m64n256k32(float (&d)[128], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, p, 1, 1;\n}\n"
      :
        "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

template <int kN>
__device__ inline void wgmma_e4m3(float (&d)[kN / 2], uint64_t da, uint64_t db, int scale_d) {
  if constexpr (kN == 128) wgmma_m64n128k32(d, da, db, scale_d);
  else if constexpr (kN == 192) wgmma_m64n192k32(d, da, db, scale_d);
  else wgmma_m64n256k32(d, da, db, scale_d);
}
#endif

enum Mode { kRaw, kWait, kPromote };

// kWGs warpgroups x kSlices slices of 64 rows, against one B tile of kN rows; `iters` K tiles of
// 128 (four k32 wgmmas a slice each).
template <int kN, int kWGs, int kSlices, int kMode>
__global__ void __launch_bounds__(128 * kWGs, 1) wgmma_rate_kernel(int iters, float scale, float* sink) {
#ifdef FATHOM_SM90A
  extern __shared__ uint8_t raw[];
  constexpr int kABytes = kWGs * kSlices * 64 * 128, kBBytes = kN * 128;
  const uint32_t base = (smem_u32(raw) + 1023u) & ~1023u;
  uint8_t* tiles = raw + (base - smem_u32(raw));
  for (int i = int(threadIdx.x); i < kABytes + kBBytes; i += int(blockDim.x))
    tiles[i] = uint8_t(0x30 + (i * 7) % 13);  // small positive e4m3 codes (no NaN, no overflow)
  __syncthreads();
  const int wg = int(threadIdx.x / 128);
  const uint64_t db = sw128_desc(base + kABytes);
  float acc[kN / 2];
#pragma unroll
  for (int i = 0; i < kN / 2; ++i) acc[i] = 0.f;
  float total[kMode == kPromote ? kSlices : 1][kMode == kPromote ? kN / 2 : 1];
#pragma unroll
  for (int s = 0; s < (kMode == kPromote ? kSlices : 1); ++s)
#pragma unroll
    for (int i = 0; i < (kMode == kPromote ? kN / 2 : 1); ++i) total[s][i] = 0.f;
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int s = 0; s < kSlices; ++s) {
      const uint64_t da = sw128_desc(base + uint32_t((wg * kSlices + s) * 64 * 128));
      wgmma_fence();
#pragma unroll
      // (raw and wait accumulate over every K tile, promote starts each batch afresh: every
      // wgmma's result is used, so that ptxas keeps them all — a first version overwrote the
      // accumulator in the wait mode and left the second slice's totals unread, and measured
      // 2.9x and 1.4x the tensor cores' peak)
      for (int k = 0; k < 4; ++k) wgmma_e4m3<kN>(acc, da + 2 * k, db + 2 * k, kMode != kPromote || k != 0 ? 1 : 0);
      wgmma_commit();
      if constexpr (kMode == kRaw) {
        wgmma_wait<1>();
      } else {
        wgmma_wait<0>();
        fence_regs(acc);
        if constexpr (kMode == kPromote) {
#pragma unroll
          for (int i = 0; i < kN / 2; ++i) total[s][i] += acc[i] * scale;
        }
      }
    }
  }
  wgmma_wait<0>();
  fence_regs(acc);
  float keep = 0.f;
#pragma unroll
  for (int i = 0; i < kN / 2; ++i)
#pragma unroll
    for (int t = 0; t < (kMode == kPromote ? kSlices : 1); ++t) keep += kMode == kPromote ? total[t][i] : acc[i];
  if (keep == 12345.f) sink[threadIdx.x] = keep;  // (never true: keeps the work)
#else
  (void)iters, (void)scale, (void)sink;
  __trap();
#endif
}

void ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(cat("wgmma rate bench: ", what, ": ", cudaGetErrorString(e)));
}

template <int kN, int kWGs, int kSlices, int kMode>
StageBenchRow run(const char* name, int reps, float* sink) {
  auto kernel = wgmma_rate_kernel<kN, kWGs, kSlices, kMode>;
  const int smem = kWGs * kSlices * 64 * 128 + kN * 128 + 1024;
  ok(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), "cudaFuncSetAttribute");
  const int blocks = sm_count(), iters = 4096;
  const float ms = best_event_ms(reps, nullptr, [&] {
    kernel<<<blocks, 128 * kWGs, smem>>>(iters, 0.5f, sink);
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
  } catch (...) {
    cudaFree(sink);
    throw;
  }
  cudaFree(sink);
  return rows;
}

}  // namespace fathom::cuda
