// DeepSeekMoE on the GPU: routing (moe_gate) and the routed experts (moe_experts), the CUDA
// counterparts of CpuOps::moe_gate / moe_experts. Expert ids never leave the device, so a MoE
// layer needs no host synchronization (and can be captured in a CUDA graph).
//
// moe_gate: one block per token, one thread per expert. Scores, biased choice values, group
// ranks and the top-k are computed by ranking (the rank of an element is the number of
// elements that beat it: larger, or equal with a lower index), which reproduces the CPU's
// partial_sort order with ties going to the lower index.
//
// moe_experts, gather path (every batch size; the right one for decode): the (token, slot)
// pairs each run their expert as GEMVs (gemv.cuh):
//   1. expert_gate_up_kernel, one block per R rows of a pair (a flat grid, the shared expert's
//      rows first): h[pair] = silu(x[t] · Wgᵀ) * (x[t] · Wuᵀ), the gate and up rows of a block
//      streamed together;
//   2. expert_down_kernel, grid (hidden / R, tokens): out[t] = Σ_k weights[t, k] · (h[t, k] · Wdᵀ),
//      the slots of a token summed in order inside one block (deterministic, no atomics).
// Each pair reads its expert's weights, so from 64 pairs on (experts repeat) the
// launcher hands the batch to the grouped path instead (moe_grouped.cu: pairs sorted by expert
// on the device, each expert's weights read once per tile; the shared expert then runs as a
// dense SwiGLU).
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>
#include <type_traits>

#include "core/error.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/gemv.cuh"
#include "ops/cuda/mma_kernels.cuh"
#include "ops/cuda/moe_grouped.cuh"
#include "ops/cuda/small_ops.cuh"

namespace fathom::cuda {
namespace {

constexpr int kMaxExperts = 1024;
constexpr int kExpertThreads = 128;
// Weight rows per block of the per-pair expert kernels (gate + up: 2 x R): 8 for 16-bit weights,
// 4 for FP8 and F32. Measured on an H200 (v3-4.9b batch-1 decode, two runs each, bench/RESULTS.md):
// bf16 1,047–1,062 tokens/s at 4 and 4 (gate+up, down), 1,081–1,082 at 8 and 4, 1,082–1,086 at 4
// and 8, 1,109–1,115 at 8 and 8; FP8 1,089–1,098 at 4 and 4, 984–985 at 8 and 8 (its decode
// where it is used holds more registers a row).
template <DType D>
constexpr int kExpertRows = D == DType::BF16 || D == DType::F16 ? 8 : 4;
constexpr int kDownThreads = 256;  // expert_down_kernel: 8 warps, one slot each
// From this many (token, slot) pairs (a batch of ~11 tokens at top-6), moe_grouped.cu sorts
// them by expert so that each expert's weights are read once per tile, not once per pair — and
// from two tokens on where its tensor-core tiles take the experts (moe_grouped_on_tensor_cores):
// one token's experts stay with the per-pair GEMVs. Measured on an H200 (v3-4.9b, whole decode
// steps, bench/RESULTS.md): the tensor-core tiles against the per-pair GEMVs, bf16 1,399 / 2,029
// / 2,793 against 1,387 / 1,861 / 2,300 tok/s at batch 2 / 4 / 8, FP8 1,385 / 2,122 / 2,816
// against 1,329 / 1,711 / 2,051; at batch 1 897 against 1,019 (bf16), 903 against 1,011 (FP8).
// (The SIMT grouped kernels, in the 2026-11-29 measurement: at batch 8 the per-pair GEMVs were
// faster, 1,420 against 1,195 tokens/s; at batch 32 the sorted path was, 1,202 against 797.)
constexpr int64_t kGroupedMinPairs = 64;
// moe_router_gate_kernel (one block per token, each reading the whole router from L2) takes
// these many tokens and up to kRouterMaxBytes of router; longer inputs and larger routers
// (DeepSeek-V3's 256 x 7168: 3.7 MB a block) run as a matmul and moe_gate, and so do up to 8
// tokens, whose router is one GEMV launch with the norm inside (H200, v3-4.9b: the kernel takes
// ~13 us a call at 1 token as at 32, against ~8 us for a 1-token GEMV and moe_gate, and ~20 us
// for 32 tokens' norm, skinny matmul, slice sums and moe_gate).
constexpr int64_t kRouterMinTokens = 9, kRouterMaxTokens = 64;
constexpr int64_t kRouterMaxBytes = 512 * 1024;

__device__ inline double block_sum_double(double v, double* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double s = 0.0;
  for (int w = 0; w < int(blockDim.x / 32); ++w) s += scratch[w];
  return s;
}

__device__ inline float block_max(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float m = -INFINITY;
  for (int w = 0; w < int(blockDim.x / 32); ++w) m = fmaxf(m, scratch[w]);
  return m;
}

// Token t's choice by the block (blockDim >= n_experts): thread e holds expert e's logit l
// (-inf past n_experts); writes weights[t] and experts[t].
__device__ void gate_token(float* __restrict__ weights, int32_t* __restrict__ experts, float l,
                           const float* __restrict__ bias, const MoeGateParams& p, int64_t t) {
  __shared__ float score[kMaxExperts], choice[kMaxExperts], group_score[kMaxExperts];
  __shared__ int selected[kMaxExperts];
  __shared__ bool keep[kMaxExperts];
  __shared__ double dscratch[32];
  __shared__ float fscratch[32];
  const int E = p.n_experts, K = p.top_k, e = threadIdx.x;

  float sc = 0.f;
  if (p.scoring == ScoringFunc::Sigmoid) {
    sc = 1.0f / (1.0f + expf(-l));
  } else {
    // as the CPU: float exponentials, their sum in double, the quotient rounded to float
    const float mx = block_max(l, fscratch);
    const float ex = e < E ? expf(l - mx) : 0.f;
    const double sum = block_sum_double(double(ex), dscratch);
    sc = float(double(ex) / sum);
  }
  if (e < E) {
    score[e] = sc;
    choice[e] = sc + (bias ? bias[e] : 0.0f);
  }
  __syncthreads();

  if (p.n_group > 1 && p.topk_group < p.n_group) {
    const int per_group = E / p.n_group;
    if (e < p.n_group) {
      const float* c = choice + e * per_group;
      float a = -INFINITY, b = -INFINITY;
      for (int i = 0; i < per_group; ++i) {
        if (c[i] > a) {
          b = a;
          a = c[i];
        } else if (c[i] > b) {
          b = c[i];
        }
      }
      group_score[e] = p.group_by_top2_sum && per_group >= 2 ? a + b : a;
    }
    __syncthreads();
    if (e < p.n_group) {
      const float v = group_score[e];
      int rank = 0;
      for (int g = 0; g < p.n_group; ++g) rank += group_score[g] > v || (group_score[g] == v && g < e);
      keep[e] = rank < p.topk_group;
    }
    __syncthreads();
    if (e < E && !keep[e / per_group]) choice[e] = -INFINITY;
    __syncthreads();
  }

  if (e < E) {
    const float v = choice[e];
    int rank = 0;
#pragma unroll 8
    for (int i = 0; i < E; ++i) rank += choice[i] > v || (choice[i] == v && i < e);
    if (rank < K) selected[rank] = e;
  }
  __syncthreads();
  // the routing weights are the scores without bias; their sum in slot order (as the CPU), then
  // each slot's quotient by its own thread (double divisions are long instruction sequences)
  __shared__ double weight_sum;
  if (e == 0 && p.norm_topk_prob) {
    double sum = 0.0;
    for (int k = 0; k < K; ++k) sum += score[selected[k]];
    weight_sum = sum;
  }
  __syncthreads();
  for (int k = e; k < K; k += blockDim.x) {
    const int sel = selected[k];
    float w = score[sel];
    if (p.norm_topk_prob) w = float(double(w) / (weight_sum + 1e-20));
    experts[t * K + k] = sel;
    weights[t * K + k] = w * p.routed_scaling_factor;
  }
}

// grid (T), block round_up(n_experts, 32).
__global__ void moe_gate_kernel(float* __restrict__ weights, int32_t* __restrict__ experts,
                                const float* __restrict__ logits, const float* __restrict__ bias, MoeGateParams p) {
  pdl_wait();
  const int64_t t = blockIdx.x;
  gate_token(weights, experts, threadIdx.x < p.n_experts ? logits[t * p.n_experts + threadIdx.x] : -INFINITY, bias, p,
             t);
}

// moe_route for decode-sized batches, one block per token: the token's row RMS-normalised (g:
// the norm weight, or null for none) in shared memory (and to xn when it is set), the router's
// n_experts dot products with it — warp w takes experts w, w + warps, ..., its lanes eight
// columns a 16-byte load (BF16) or four (F32) — then gate_token. The router's bytes are asked
// of L2 before the wait (weights: no earlier kernel writes them), so the tokens' blocks, each
// reading all of it, find it there. grid (T), block kRouterThreads, dynamic shared memory
// hidden floats.
constexpr int kRouterThreads = 512;
template <DType W>
__global__ void __launch_bounds__(kRouterThreads)
    moe_router_gate_kernel(float* __restrict__ weights, int32_t* __restrict__ experts, float* __restrict__ xn,
                           const float* __restrict__ x, const void* __restrict__ router, const float* __restrict__ g,
                           float eps, int64_t D, const float* __restrict__ bias, MoeGateParams p, bool vec) {
  constexpr int ES = ElemSize<W>::value;
  const int E = p.n_experts, warps = int(blockDim.x / 32), warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) prefetch_l2(router, uint64_t(E) * uint64_t(D) * ES);  // one bulk request
  pdl_wait();
  extern __shared__ __align__(16) float xs[];  // (D): the token's normalised row
  __shared__ float logit[kMaxExperts];
  const int64_t t = blockIdx.x;
  const float* xr = x + t * D;
  // (the loops unrolled so that their loads are in flight together: x was just written by the
  // kernel before, each load an L2 round trip)
  float ss = 0.f;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const float v = xr[i];
    xs[i] = v;
    ss += v * v;
  }
  if (g) {
    const float inv = block_rms_inverse(ss, D, eps);  // ends synchronized
#pragma unroll 4
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
      const float v = xs[i] * inv * __ldg(g + i);  // as rmsnorm_kernel
      xs[i] = v;
      if (xn) xn[t * D + i] = v;
    }
  }
  __syncthreads();
  // two experts a warp at a time, the loads of kSteps column steps of both in flight together
  // (an L2 round trip each time, not one per load)
  constexpr int V = W == DType::BF16 ? 8 : 4;  // columns a 16-byte load
  constexpr int kSteps = 8;
  const int64_t step = 32 * V;
  for (int e0 = warp; e0 < E; e0 += 2 * warps) {
    const int e1 = e0 + warps;
    const uint8_t* r0 = static_cast<const uint8_t*>(router) + int64_t(e0) * D * ES;
    const uint8_t* r1 = static_cast<const uint8_t*>(router) + int64_t(min(e1, E - 1)) * D * ES;
    float a0 = 0.f, a1 = 0.f;
    if (vec) {
      for (int64_t base = lane * V; base < D; base += kSteps * step) {
        uint4 u0[kSteps], u1[kSteps];
#pragma unroll
        for (int j = 0; j < kSteps; ++j) {
          const int64_t k = base + j * step;
          const bool in = k < D;  // D % V == 0: a load is all in or all out
          u0[j] = in ? __ldg(reinterpret_cast<const uint4*>(r0 + k * ES)) : make_uint4(0, 0, 0, 0);
          u1[j] = in ? __ldg(reinterpret_cast<const uint4*>(r1 + k * ES)) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int j = 0; j < kSteps; ++j) {
          const int64_t k = base + j * step;
          if (k >= D) break;
          float xv[V], w0[V], w1[V];
#pragma unroll
          for (int q = 0; q < V / 4; ++q) {
            const float4 f = *reinterpret_cast<const float4*>(xs + k + 4 * q);
            xv[4 * q] = f.x, xv[4 * q + 1] = f.y, xv[4 * q + 2] = f.z, xv[4 * q + 3] = f.w;
          }
          const uint32_t c0[4] = {u0[j].x, u0[j].y, u0[j].z, u0[j].w}, c1[4] = {u1[j].x, u1[j].y, u1[j].z, u1[j].w};
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            if constexpr (W == DType::BF16) {
              w0[2 * q] = __uint_as_float(c0[q] << 16), w0[2 * q + 1] = __uint_as_float(c0[q] & 0xffff0000u);
              w1[2 * q] = __uint_as_float(c1[q] << 16), w1[2 * q + 1] = __uint_as_float(c1[q] & 0xffff0000u);
            } else {
              w0[q] = __uint_as_float(c0[q]), w1[q] = __uint_as_float(c1[q]);
            }
          }
#pragma unroll
          for (int q = 0; q < V; ++q) a0 = fmaf(w0[q], xv[q], a0), a1 = fmaf(w1[q], xv[q], a1);
        }
      }
    } else {
      for (int64_t k = lane; k < D; k += 32) {
        float w0, w1;
        if constexpr (W == DType::BF16) {
          w0 = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(r0)[k]);
          w1 = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(r1)[k]);
        } else {
          w0 = __ldg(reinterpret_cast<const float*>(r0) + k), w1 = __ldg(reinterpret_cast<const float*>(r1) + k);
        }
        a0 = fmaf(w0, xs[k], a0), a1 = fmaf(w1, xs[k], a1);
      }
    }
    a0 = warp_sum(a0), a1 = warp_sum(a1);
    if (lane == 0) {
      logit[e0] = a0;
      if (e1 < E) logit[e1] = a1;
    }
  }
  __syncthreads();
  gate_token(weights, experts, int(threadIdx.x) < E ? logit[threadIdx.x] : -INFINITY, bias, p, t);
}

// grid (T * top_k * ceil(inter / R) (+ T * ceil(shared_inter / R) with has_shared)), block
// kExpertThreads. h as in HiddenRow. NORM: x normalised on the fly (p.norm, gemv_accumulate).
template <DType D, int R, bool NORM>
__global__ void __launch_bounds__(kExpertThreads) expert_gate_up_kernel(MoeExpertsParams p, float* __restrict__ h,
                                                                         bool vec) {
  constexpr int E = ElemSize<D>::value;
  const GateUpUnit unit = gate_up_unit<R>(p, blockIdx.x);
  const HiddenRow hr = hidden_row(p, unit.pair);
  const int64_t n0 = unit.n0;
  // a dense SwiGLU's or the shared expert's rows are known before the wait: into L2
  if ((!p.experts || hr.shared) && threadIdx.x < 2) {
    const ExpertPointers& sp = hr.shared ? p.shared : p.table[0];
    const uint8_t* base = static_cast<const uint8_t*>(threadIdx.x == 0 ? sp.gate : sp.up);
    prefetch_l2(base + n0 * p.hidden * E, uint64_t(min(int64_t(R), hr.inter - n0) * p.hidden * E));
  }
  pdl_wait();
  __shared__ float scratch[kExpertThreads / 32 * 2 * R];
  __shared__ float result[2 * R];
  float* hp = h + hr.offset;
  const int e = hr.shared ? 0 : p.experts ? p.experts[unit.pair] : 0;
  if (e < 0 || e >= p.n_experts) {  // not a valid id (moe_gate never makes one): contributes nothing
    for (int r = threadIdx.x; r < R; r += blockDim.x)
      if (n0 + r < hr.inter) hp[n0 + r] = 0.f;
    return;
  }
  const ExpertPointers ep = hr.shared ? p.shared : p.table[e];
  GemvRow rows[2 * R];
  gate_up_rows<D, R>(rows, ep, n0, hr.inter, p.hidden, p.block);
  float acc[2 * R][1], ss[1][1] = {{0.f}};
#pragma unroll
  for (int r = 0; r < 2 * R; ++r) acc[r][0] = 0.f;
  gemv_accumulate<D, 1, 2 * R, NORM>(acc, rows, GemvX{p.x + hr.t * p.hidden, p.hidden}, 1, p.hidden, p.block, vec, 1.f,
                                     threadIdx.x, blockDim.x, p.norm, ss[0]);
  gemv_block_reduce<1, 2 * R>(acc, scratch, result);
  __shared__ float ss_total[1];
  if constexpr (NORM) gemv_block_reduce<1, 1>(ss, scratch, ss_total);
  const float sc = NORM ? norm_scale(ss_total[0], p.hidden, p.eps) : 1.f;
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    if (n0 + r >= hr.inter) continue;
    const float g = result[r] * sc, u = result[R + r] * sc;
    hp[n0 + r] = g / (1.f + expf(-g)) * u;
  }
}

// Token t's down rows n0 .. n0+n_rows-1 of each slot's expert (and the shared expert's) into L2,
// one thread per slot, before the caller's programmatic-launch wait.
template <DType D>
__device__ inline void prefetch_down_rows(const MoeExpertsParams& p, int64_t t, int64_t n0, int64_t n_rows) {
  constexpr int E = ElemSize<D>::value;
  if (threadIdx.x < p.top_k) {
    const int e = p.experts ? p.experts[t * p.top_k + threadIdx.x] : 0;
    if (e >= 0 && e < p.n_experts)
      prefetch_l2(static_cast<const uint8_t*>(p.table[e].down) + n0 * p.inter * E, uint64_t(n_rows * p.inter * E));
  } else if (p.has_shared && threadIdx.x == 32) {
    prefetch_l2(static_cast<const uint8_t*>(p.shared.down) + n0 * p.shared_inter * E,
                uint64_t(n_rows * p.shared_inter * E));
  }
}

// grid (ceil(hidden / R), T), block kDownThreads. vec: 16-byte loads of the routed down rows;
// vec_shared: of the shared expert's. The warps are dealt out by work: a routed slot is one unit
// (inter columns), the shared expert ceil(shared_inter / inter) units, and with no more units
// than warps each unit gets kWarps / units warps that split its K (a dense SwiGLU: all 8; top-6
// with a shared expert twice as wide: 6 + 2 — one warp per unit, none waiting on a longer
// one); with more units, warp w computes slots w, w + 8, ... whole. The loads of all slots are
// in flight at once, and the block reduction sums the slots in a fixed order (deterministic).
template <DType D, int R>
__global__ void __launch_bounds__(kDownThreads) expert_down_kernel(MoeExpertsParams p, const float* __restrict__ h,
                                                                    bool vec, bool vec_shared) {
  const int64_t t = blockIdx.y;
  const int64_t n0 = int64_t(blockIdx.x) * R;
  const int64_t n_rows = min(int64_t(R), p.hidden - n0);
  // Each slot's R down rows are contiguous: into L2 before the wait. The expert ids come from
  // moe_gate, which finished before expert_gate_up_kernel (the kernel this one waits for) got
  // past its own wait and let this one launch, so they are final here. Even if they were not,
  // a prefetch only warms the cache: the weights used are read after the wait.
  prefetch_down_rows<D>(p, t, n0, n_rows);
  pdl_wait();
  __shared__ float scratch[kDownThreads / 32 * R];
  __shared__ float result[R];
  constexpr int kWarps = kDownThreads / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float acc[R][1];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r][0] = 0.f;
  const int shared_units = p.has_shared ? int(ceil_div(p.shared_inter, p.inter)) : 0;
  const int units = p.top_k + shared_units;
  // one slot's share: slot k (top_k: the shared expert), K split over `parts` threads, this one `part`
  auto run_slot = [&](int k, int part, int parts) {
    const bool shared = k == p.top_k;
    const int64_t pair = shared ? p.n_tokens * p.top_k + t : t * p.top_k + k;
    const int e = shared ? 0 : p.experts ? p.experts[pair] : 0;
    if (e < 0 || e >= p.n_experts) return;
    const ExpertPointers& ep = shared ? p.shared : p.table[e];
    const HiddenRow hr = hidden_row(p, pair);
    GemvRow rows[R];
#pragma unroll
    for (int r = 0; r < R; ++r) rows[r] = gemv_row<D>(ep.down, ep.down_scale, min(n0 + r, p.hidden - 1), hr.inter, p.block);
    // the routing weight scales this slot's partial sums; one reduction serves all slots
    gemv_accumulate<D, 1, R>(acc, rows, GemvX{h + hr.offset, hr.inter}, 1, hr.inter, p.block, shared ? vec_shared : vec,
                             p.weights && !shared ? p.weights[pair] : 1.f, part, parts);
  };
  if (units <= kWarps) {
    const int rep = kWarps / units, unit = warp / rep;  // warps past units * rep idle
    if (unit < p.top_k) run_slot(unit, (warp % rep) * 32 + lane, 32 * rep);
    else if (unit < units) run_slot(p.top_k, ((unit - p.top_k) * rep + warp % rep) * 32 + lane, 32 * rep * shared_units);
  } else {
    for (int k = warp; k < p.top_k + (p.has_shared ? 1 : 0); k += kWarps) run_slot(k, lane, 32);
  }
  gemv_block_reduce<1, R>(acc, scratch, result);
  for (int r = threadIdx.x; r < R; r += blockDim.x)
    if (n0 + r < p.hidden) {
      float* o = p.out + t * p.hidden + n0 + r;
      *o = p.accumulate ? *o + result[r] : result[r];
    }
}

// The tensor-core forms of the two kernels (bodies in mma_kernels.cuh). Gate and up: grid of 8-row units
// (gate_up_unit<8>), a block's 16 rows the unit's 8 gate rows and 8 up rows, x the pair's token.
template <DType D, bool NORM>
__global__ void __launch_bounds__(kMmaThreads) mma_expert_gate_up_kernel(MoeExpertsParams p, float* __restrict__ h,
                                                                        int chunk, bool vec_x) {
  constexpr int E = ElemSize<D>::value;
  const GateUpUnit unit = gate_up_unit<8>(p, blockIdx.x);
  const HiddenRow hr = hidden_row(p, unit.pair);
  const int64_t n0 = unit.n0;
  if ((!p.experts || hr.shared) && threadIdx.x < 2) {
    const ExpertPointers& sp = hr.shared ? p.shared : p.table[0];
    const uint8_t* base = static_cast<const uint8_t*>(threadIdx.x == 0 ? sp.gate : sp.up);
    prefetch_l2(base + n0 * p.hidden * E, uint64_t(min(int64_t(8), hr.inter - n0) * p.hidden * E));
  }
  pdl_wait();
  FATHOM_MMA_SHARED(sh, chunk, 1);
  mma_expert_gate_up_block<D, NORM>(p, h, unit, chunk, vec_x, sh);
}

// Gate and up of one token's pairs on the tensor cores: grid of units of 8 * kMmaWarps / KS rows
// (gate_up_unit), a block's x (the token's, all of `hidden`) staged once for its warps, each
// 16-row MMA tile (8 gate rows and the 8 up rows beside them, gate_up_tile_rows) taken by KS
// warps, each over its 1/KS of the units, their sums added through shared memory at the end.
// Lanes 0, 4, .., 28 of a tile's first warp then hold the gate and up values of its rows (C
// fragment entries 0 and 2 of x row 0). Needs the whole row staged: mma_chunk(hidden, 1) >= hidden.
// KS 1 runs the grouped path's warp-tile loop (mma_warp_tile_product), KS 2 and 4 their own.
template <DType D, bool NORM, int KS>
__global__ void __launch_bounds__(kMmaThreads) mma_expert_gate_up_tiles_kernel(MoeExpertsParams p, float* __restrict__ h,
                                                                              int chunk, bool vec_x) {
  constexpr int kTiles = kMmaWarps / KS;
  const GateUpUnit unit = gate_up_unit<8 * kTiles>(p, blockIdx.x);
  const HiddenRow hr = hidden_row(p, unit.pair);
  pdl_wait();
  FATHOM_MMA_SHARED(sh, chunk, 1);
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int tile = warp % kTiles, part = warp / kTiles;
  float* hp = h + hr.offset;
  const int e = hr.shared ? 0 : p.experts ? p.experts[unit.pair] : 0;
  if (e < 0 || e >= p.n_experts) {  // not a valid id (moe_gate never makes one): contributes nothing
    if (threadIdx.x < 8 * kTiles && unit.n0 + threadIdx.x < hr.inter) hp[unit.n0 + threadIdx.x] = 0.f;
    return;
  }
  const int64_t n0 = unit.n0 + 8 * tile;
  const MmaRows rows = n0 < hr.inter ? gate_up_tile_rows<D>(hr.shared ? p.shared : p.table[e], n0, hr.inter, p) : MmaRows{};
  const float* x = p.x + hr.t * p.hidden;
  float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
  if constexpr (KS == 1) {  // (this form measured 3-4% faster than the loop below at KS 1)
    mma_warp_tile_product<D, 1, NORM>(acc, sh, rows, [&](int) { return x; }, 1, 0, p.hidden, p.block, chunk, vec_x,
                                       p.norm);
  } else {  // KS warps a tile, each over its share of the units
    const bool active = __any_sync(0xffffffffu, rows.a != nullptr);
    const int units = int(ceil_div(p.hidden, kMmaUnit)), per = int(ceil_div(units, KS));
    const int u0 = part * per, u1 = min(units, u0 + per);
    // the first unit's weights in flight while x is staged
    MmaUnitW<D> cur;
    float wsa = 1.f, wsb = 1.f;
    if (active && u0 < u1) {
      mma_load_unit<D>(cur, rows, int64_t(u0) * kMmaUnit, p.hidden);
      mma_row_scales<D>(rows, int64_t(u0) * kMmaUnit, p.block, wsa, wsb);
    }
    if (NORM)
      for (int i = threadIdx.x; i < kMmaWarps * kMmaSsRows; i += kMmaThreads) sh.ss[i] = 0.f;
    __syncthreads();
    mma_stage_x<D, NORM>(sh, [&](int) { return x; }, 1, 0, chunk, p.hidden, p.norm, vec_x);
    __syncthreads();
    if (active) {
      for (int u = u0; u < u1; ++u) {
        MmaUnitW<D> nxt;
        float nsa = 1.f, nsb = 1.f;
        if (u + 1 < u1) {
          mma_load_unit<D>(nxt, rows, int64_t(u + 1) * kMmaUnit, p.hidden);
          mma_row_scales<D>(rows, int64_t(u + 1) * kMmaUnit, p.block, nsa, nsb);
        }
        mma_unit_nt<D, 1>(acc, cur, sh, 1, -1, u, chunk, wsa, wsb);
        if (u + 1 < u1) cur = nxt;
        wsa = nsa, wsb = nsb;
      }
    }
  }
  // the parts' sums: parts 1.. into shared memory (sh.red: kMmaWarps * 16 * kMmaMaxRows floats),
  // part 0 adds them in order
  if constexpr (KS > 1) {
    if (part > 0 && lane % 4 == 0) {
      sh.red[((part - 1) * kTiles + tile) * 16 + lane / 4] = acc[0][0];
      sh.red[((part - 1) * kTiles + tile) * 16 + 8 + lane / 4] = acc[0][2];
    }
  }
  __syncthreads();
  if (part > 0) return;
  if constexpr (KS > 1) {
    if (lane % 4 == 0)
      for (int q = 1; q < KS; ++q) {
        acc[0][0] += sh.red[((q - 1) * kTiles + tile) * 16 + lane / 4];
        acc[0][2] += sh.red[((q - 1) * kTiles + tile) * 16 + 8 + lane / 4];
      }
  }
  float sc = 1.f;
  if constexpr (NORM) {
    float ss = 0.f;
    for (int w = 0; w < kMmaWarps; ++w) ss += sh.ss[w * kMmaSsRows];
    sc = norm_scale(ss, p.hidden, p.eps);
  }
  const int64_t n = n0 + lane / 4;
  if (lane % 4 == 0 && n < hr.inter) {
    const float g = acc[0][0] * sc, u = acc[0][2] * sc;
    hp[n] = g / (1.f + expf(-g)) * u;
  }
}

// Down: grid (ceil(hidden / 16), T). A block's jobs are the token's slots, each the 16 down rows
// of its expert on its own h row (x row j for slot j), the shared expert split into pieces of
// inter columns; the slots' sums are weighted and added in slot order (deterministic).
template <DType D>
__global__ void __launch_bounds__(kMmaThreads) mma_expert_down_kernel(MoeExpertsParams p, const float* __restrict__ h,
                                                                     int chunk) {
  const int64_t t = blockIdx.y, n0 = int64_t(blockIdx.x) * 16;
  const int64_t n_rows = min(int64_t(16), p.hidden - n0);
  prefetch_down_rows<D>(p, t, n0, n_rows);
  pdl_wait();
  const int jobs = p.top_k + int(shared_pieces(p));
  FATHOM_MMA_SHARED(sh, chunk, jobs);
  mma_expert_down_block<D>(p, h, t, n0, chunk, sh);
}

// Whether the tensor-core kernels take p: 16-bit or FP8 weights of whole aligned 16-byte pieces,
// and a token's slots (the shared expert in pieces of inter columns) no more than the MMA's 8 x
// rows.
template <DType D>
bool mma_experts_take(const MoeExpertsParams& p) {
  if (!mma_gemv_on(MmaSite::TokenExperts) || !p.aligned16) return false;
  if (!mma_gemv_fits(D, p.hidden, p.block) || !mma_gemv_fits(D, p.inter, p.block)) return false;
  if (!p.has_shared) return p.top_k <= kMmaMaxRows;
  const bool whole = p.shared_inter % p.inter == 0 && (D != DType::F8_E4M3 || p.inter % p.block == 0);
  return whole && p.top_k + p.shared_inter / p.inter <= kMmaMaxRows;
}

// Blocks of a gate+up launch over one flat list of units of `rows` rows (gate_up_unit): every
// routed pair's inter rows, then every token's shared_inter rows.
int64_t gate_up_units(const MoeExpertsParams& p, int64_t rows) {
  const int64_t routed = p.n_tokens * p.top_k, shared = p.has_shared ? p.n_tokens : 0;
  const int64_t units = routed * ceil_div(p.inter, rows) + shared * ceil_div(p.shared_inter, rows);
  FATHOM_CHECK(units < (int64_t(1) << 31), "moe_experts: ", units, " blocks of ", rows, " rows exceed one launch.");
  return units;
}

template <DType D>
void run_mma_experts(const MoeExpertsParams& p, cudaStream_t s) {
  const int64_t routed = p.n_tokens * p.top_k, shared = p.has_shared ? p.n_tokens : 0;
  StreamScratch h(size_t(routed * p.inter + shared * p.shared_inter) * sizeof(float), s, "moe_experts");
  const int64_t units = gate_up_units(p, 8);
  const int c_up = mma_chunk(p.hidden, 1);
  const bool vec_x = aligned16(p.x) && p.hidden % 4 == 0;
  if (p.norm)
    launch_kernel(mma_expert_gate_up_kernel<D, true>, unsigned(units), kMmaThreads, mma_smem_bytes(c_up, 1), s, p,
                  h.as<float>(), c_up, vec_x);
  else
    launch_kernel(mma_expert_gate_up_kernel<D, false>, unsigned(units), kMmaThreads, mma_smem_bytes(c_up, 1), s, p,
                  h.as<float>(), c_up, vec_x);
  check_launch("moe_experts (mma_expert_gate_up_kernel)");
  const int jobs = p.top_k + int(shared_pieces(p));
  const int c_down = mma_chunk(p.inter, jobs);
  launch_kernel(mma_expert_down_kernel<D>, dim3(unsigned(ceil_div(p.hidden, 16)), unsigned(p.n_tokens)), kMmaThreads,
                mma_smem_bytes(c_down, jobs), s, p, h.as<float>(), c_down);
  check_launch("moe_experts (mma_expert_down_kernel)");
}

std::atomic<int> g_token_expert_tiles{-1};

// How many warps split each tile's K in mma_expert_gate_up_tiles_kernel (0: the SIMT kernel) for
// one token's pairs of p: set_token_expert_tiles
// or FATHOM_EXPERT_TILES, else the most splits (more, smaller blocks: more weight bytes in flight
// a SM) whose blocks all fit on the GPU at once. The kernel holds ~110 registers a thread, two
// blocks a SM. Measured on an H200 (bench/RESULTS.md, FP8 batch-1 decode, tokens/s): v3-4.9b
// (6 + 2 pairs of 1,024 rows) 1,133–1,135 with the SIMT kernel, 1,151–1,155 / 1,190–1,197 at
// 1 / 2 splits (128 / 256 blocks), 1,149–1,151 at 4 (512 blocks, another call); v2-lite-16b
// (1,408 rows) 464 SIMT, 482–485 / 455 (176 / 352 blocks), 459–460 at 4.
int token_expert_splits(const MoeExpertsParams& p) {
  int set = g_token_expert_tiles.load(std::memory_order_relaxed);
  if (set < 0) {
    static const int from_env = [] {
      const char* v = std::getenv("FATHOM_EXPERT_TILES");
      if (!v || !*v) return -1;
      const int n = std::atoi(v);
      FATHOM_CHECK(std::string(v) == std::to_string(n) && (n == 0 || n == 1 || n == 2 || n == 4),
                   "FATHOM_EXPERT_TILES is '", v, "'; expected 0, 1, 2 or 4.");
      return n;
    }();
    set = from_env;
  }
  if (set >= 0) return set;
  static const int resident = [] {
    int per_sm = 0;
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
              &per_sm, mma_expert_gate_up_tiles_kernel<DType::F8_E4M3, true, 2>, kMmaThreads,
              mma_smem_bytes(mma_chunk(7168, 1), 1)),
          "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    return std::max(1, per_sm) * sm_count();
  }();
  for (int ks : {4, 2})
    if (gate_up_units(p, 8 * kMmaWarps / ks) <= resident) return ks;
  return 1;
}

template <DType D>
void run_experts(const MoeExpertsParams& p, cudaStream_t s) {
  if constexpr (D != DType::F32) {
    if (mma_experts_take<D>(p)) return run_mma_experts<D>(p, s);
  }
  constexpr int E = ElemSize<D>::value;
  const int64_t routed = p.n_tokens * p.top_k, shared = p.has_shared ? p.n_tokens : 0;
  StreamScratch h(size_t(routed * p.inter + shared * p.shared_inter) * sizeof(float), s, "moe_experts");
  const bool fp8_ok = D != DType::F8_E4M3 || p.block % 16 == 0;
  const bool vec_up = p.aligned16 && p.hidden * E % 16 == 0 && aligned16(p.x) && aligned16(p.norm) && fp8_ok;
  const bool vec_down = p.aligned16 && p.inter * E % 16 == 0 && fp8_ok;
  const bool vec_shared = p.aligned16 && p.shared_inter * E % 16 == 0 && fp8_ok;
  // FATHOM_EXPERT_ROWS=2|4|8 (gate+up) and FATHOM_EXPERT_DOWN_ROWS=2|4|8: rows a block, for
  // measurements (default kExpertRows<D>)
  auto rows_from = [](const char* name) {
    const char* e = std::getenv(name);
    const int r = e ? std::atoi(e) : 0;
    return r == 2 || r == 4 || r == 8 ? r : kExpertRows<D>;
  };
  static const int up_rows = rows_from("FATHOM_EXPERT_ROWS");
  static const int down_rows = rows_from("FATHOM_EXPERT_DOWN_ROWS");
  auto gate_up = [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    const int64_t units = gate_up_units(p, R);
    auto* kernel = p.norm ? expert_gate_up_kernel<D, R, true> : expert_gate_up_kernel<D, R, false>;
    launch_kernel(kernel, unsigned(units), kExpertThreads, 0, s, p, h.as<float>(), vec_up);
    check_launch("moe_experts (expert_gate_up_kernel)");
  };
  auto down = [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    launch_kernel(expert_down_kernel<D, R>, dim3(unsigned(ceil_div(p.hidden, R)), unsigned(p.n_tokens)), kDownThreads,
                  0, s, p, h.as<float>(), vec_down, vec_shared);
    check_launch("moe_experts (expert_down_kernel)");
  };
  auto with_rows = [](int r, auto&& launch) {  // r (2, 4 or 8) as a compile-time constant
    if (r == 2) launch(std::integral_constant<int, 2>{});
    else if (r == 8) launch(std::integral_constant<int, 8>{});
    else launch(std::integral_constant<int, 4>{});
  };
  if constexpr (D == DType::F8_E4M3) {
    const int chunk = mma_chunk(p.hidden, 1);
    if (p.n_tokens == 1 && gemv_kind() != GemvKind::Simt && p.aligned16 && mma_gemv_fits(D, p.hidden, p.block) &&
        chunk >= p.hidden) {
      const int splits = token_expert_splits(p);
      if (splits > 0) {
        const bool vec_x = aligned16(p.x) && p.hidden % 4 == 0;
        auto launch = [&](auto ks) {
          constexpr int KS = decltype(ks)::value;
          const int64_t units = gate_up_units(p, 8 * kMmaWarps / KS);
          auto* kernel = p.norm ? mma_expert_gate_up_tiles_kernel<D, true, KS> : mma_expert_gate_up_tiles_kernel<D, false, KS>;
          launch_kernel(kernel, unsigned(units), kMmaThreads, mma_smem_bytes(chunk, 1), s, p, h.as<float>(), chunk, vec_x);
        };
        if (splits == 1) launch(std::integral_constant<int, 1>{});
        else if (splits == 2) launch(std::integral_constant<int, 2>{});
        else launch(std::integral_constant<int, 4>{});
        check_launch("moe_experts (mma_expert_gate_up_tiles_kernel)");
        return with_rows(down_rows, down);
      }
    }
  }
  with_rows(up_rows, gate_up);
  with_rows(down_rows, down);
}

void dispatch_experts(const MoeExpertsParams& p, cudaStream_t s) {
  switch (p.dtype) {
    case DType::F32: return run_experts<DType::F32>(p, s);
    case DType::BF16: return run_experts<DType::BF16>(p, s);
    case DType::F16: return run_experts<DType::F16>(p, s);
    default: return run_experts<DType::F8_E4M3>(p, s);
  }
}

// The routed experts by the grouped kernels, with the shared expert in their launches where
// they take it, else after them as a dense SwiGLU added to their sum; p's x is plain (no norm),
// and out is not x when the shared expert runs apart (it reads x after the routed sum is written).
void run_grouped(const MoeExpertsParams& p, cudaStream_t s) {
  const bool joined = p.has_shared && moe_grouped_joins_shared(p);
  MoeExpertsParams routed = p;
  routed.has_shared = joined;
  moe_experts_grouped(routed, s);
  if (!p.has_shared || joined) return;
  MoeExpertsParams dense = p;
  dense.experts = nullptr;
  dense.weights = nullptr;
  dense.top_k = 1;
  dense.n_experts = 1;
  dense.has_shared = false;
  dense.accumulate = true;
  dense.inter = p.shared_inter;
  dense.table = p.shared_table;
  dispatch_experts(dense, s);
}

// The gate's parameters as gate_token takes them.
void check_gate(const MoeGateParams& p) {
  FATHOM_CHECK(p.n_experts > 0 && p.n_experts <= kMaxExperts, "moe_gate: ", p.n_experts,
               " experts; the CUDA router handles 1 to ", kMaxExperts, ".");
  FATHOM_CHECK(p.top_k > 0 && p.top_k <= p.n_experts, "moe_gate: top_k ", p.top_k, " must be between 1 and ",
               p.n_experts, ".");
  FATHOM_CHECK(p.n_group >= 1 && p.n_experts % p.n_group == 0 && p.topk_group >= 1 && p.topk_group <= p.n_group,
               "moe_gate: ", p.n_experts, " experts in ", p.n_group, " groups keeping ", p.topk_group,
               " do not divide evenly.");
}

}  // namespace

void moe_gate(float* weights, int32_t* experts, const float* logits, const float* bias, int64_t n_tokens,
              const MoeGateParams& p, Stream stream) {
  check_gate(p);
  if (n_tokens == 0) return;
  FATHOM_CHECK(n_tokens < (int64_t(1) << 31), "moe_gate: ", n_tokens, " tokens is too many for one launch.");
  FATHOM_ASSERT(weights && experts && logits, "moe_gate with a null pointer");
  const unsigned threads = unsigned((p.n_experts + 31) / 32 * 32);
  launch_kernel(moe_gate_kernel, unsigned(n_tokens), threads, 0, as_cuda(stream), weights, experts, logits, bias, p);
  check_launch("moe_gate");
}

bool moe_router_fits(int64_t n_tokens, int64_t hidden, DType router, int n_experts) {
  const int64_t bytes = hidden * int64_t(n_experts) * (router == DType::BF16 ? 2 : 4);
  return (router == DType::BF16 || router == DType::F32) && n_tokens >= kRouterMinTokens && n_tokens <= kRouterMaxTokens &&
         n_experts <= kRouterThreads && hidden * int64_t(sizeof(float)) <= 24 * 1024 && bytes <= kRouterMaxBytes;
}

void moe_router_gate(float* weights, int32_t* experts, float* xn, const float* x, const void* router, DType router_dtype,
                     const float* norm, float eps, int64_t n_tokens, int64_t hidden, const float* bias,
                     const MoeGateParams& p, Stream stream) {
  FATHOM_CHECK(moe_router_fits(n_tokens, hidden, router_dtype, p.n_experts), "moe_route: ", n_tokens, " tokens of ",
               hidden, " with a ", dtype_name(router_dtype), " router of ", p.n_experts,
               " experts do not fit the one-kernel form.");
  check_gate(p);
  FATHOM_ASSERT(weights && experts && x && router, "moe_route with a null pointer");
  const bool bf16 = router_dtype == DType::BF16;
  const bool vec = hidden % (bf16 ? 8 : 4) == 0 && aligned16(router) && aligned16(x);  // 16-byte loads of a row
  launch_kernel(bf16 ? moe_router_gate_kernel<DType::BF16> : moe_router_gate_kernel<DType::F32>, unsigned(n_tokens),
                kRouterThreads, size_t(hidden) * sizeof(float), as_cuda(stream), weights, experts, xn, x, router, norm,
                eps, hidden, bias, p, vec);
  check_launch("moe_route");
}

void set_token_expert_tiles(int splits) {
  FATHOM_CHECK(splits == -1 || splits == 0 || splits == 1 || splits == 2 || splits == 4,
               "set_token_expert_tiles: ", splits, " splits; expected -1, 0, 1, 2 or 4.");
  g_token_expert_tiles.store(splits, std::memory_order_relaxed);
}

void moe_experts(const MoeExpertsParams& p, Stream stream) {
  const DType d = p.dtype;
  FATHOM_CHECK(d == DType::F32 || d == DType::BF16 || d == DType::F16 || d == DType::F8_E4M3,
               "moe_experts: expert weights in ", dtype_name(d),
               " are not supported on CUDA; expected F32, BF16, F16 or F8_E4M3.");
  FATHOM_CHECK(p.top_k > 0 && p.n_experts > 0 && p.hidden > 0 && p.inter > 0, "moe_experts: invalid shape (top_k ",
               p.top_k, ", ", p.n_experts, " experts, hidden ", p.hidden, ", inter ", p.inter, ").");
  FATHOM_CHECK(p.hidden < (int64_t(1) << 31) && p.inter < (int64_t(1) << 31) &&
                   p.n_tokens * p.top_k < (int64_t(1) << 31),
               "moe_experts: ", p.n_tokens, " tokens x ", p.top_k, " experts of ", p.inter, " x ", p.hidden,
               " exceed what one launch handles.");
  FATHOM_CHECK(d != DType::F8_E4M3 || p.block > 0, "moe_experts: FP8 experts need a positive block size.");
  if (p.n_tokens == 0) return;
  FATHOM_ASSERT(p.out && p.x && p.table && (p.experts || (p.top_k == 1 && !p.weights)) && (!p.experts || p.weights),
                "moe_experts with a null pointer");
  FATHOM_ASSERT(!p.has_shared || (p.experts && p.shared_table && p.shared_inter > 0),
                "moe_experts: a shared expert joins routed ones");
  const cudaStream_t s = as_cuda(stream);
  // One token's experts are distinct, and the per-pair GEMVs have the lowest fixed cost; from
  // two tokens on the grouped tensor-core tiles stream each expert once at a higher pace (and
  // from a handful of tokens experts repeat, so sorting by expert pays for the SIMT tiles too).
  const int64_t pairs = p.n_tokens * p.top_k;
  if (p.experts && (pairs >= kGroupedMinPairs || (p.n_tokens >= 2 && moe_grouped_on_tensor_cores(p)))) {
    // The grouped kernels take a plain input (a normalised copy of x) and add to out in their
    // last kernel (x is read whole before); a shared expert run apart reads x after that, so
    // when out is x it goes to a separate sum, added or copied to out at the end.
    const size_t bytes = size_t(p.n_tokens * p.hidden) * sizeof(float);
    MoeExpertsParams q = p;
    std::optional<StreamScratch> xn, y;
    if (p.norm) {
      xn.emplace(bytes, s, "moe_experts (input norm)");
      rmsnorm(xn->as<float>(), p.x, p.norm, p.n_tokens, p.hidden, p.eps, stream);
      q.x = xn->as<float>();
      q.norm = nullptr;
    }
    if (q.has_shared && q.out == q.x && !moe_grouped_joins_shared(q)) {
      y.emplace(bytes, s, "moe_experts (sum)");
      q.out = y->as<float>();
      q.accumulate = false;
    }
    run_grouped(q, s);
    if (y && p.accumulate) add(p.out, q.out, p.n_tokens * p.hidden, stream);
    else if (y) check(cudaMemcpyAsync(p.out, q.out, bytes, cudaMemcpyDeviceToDevice, s), "moe_experts (copy)");
    return;
  }
  dispatch_experts(p, s);
}

}  // namespace fathom::cuda
