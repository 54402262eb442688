// CPU emulation of the tensor-core GEMV core (src/ops/cuda/mma_gemv.cuh, included as it is) for
// checking it without a GPU: blocks of 256 std::threads (emu_runtime.h: barriers that report a
// hang or threads meeting at different call sites, shuffles), mma.sync m16n8k16 emulated as the
// warp-collective it is (each lane hands in its A/B fragment registers; each lane's C fragment is
// computed from all 32 lanes' registers by the PTX fragment layout), cvt.rn.f16x2.e4m3x2 by the
// e4m3 and f16 conversions of src/core/dtype.h. Two kernels drive the core as the CUDA kernels do:
// a dense one (mma_gemv_kernel's use: one job, all x rows, optional RMSNorm) and one of column
// jobs (mma_expert_down_kernel's use: each job its own weight on its own x row, weighted sums).
// The kernels' own bodies (src/ops/cuda/mma_kernels.cuh) run too: the dense GEMV, the per-token
// experts (gate+up units, down over a token's slots with the shared expert in pieces, an invalid
// expert id) and the grouped experts' 8-row tiles (routing done on the host as the route kernel
// does). Results are compared with a double-precision reference on the dequantized weights, BF16, F16
// and FP8 (every code but NaN, subnormals included, random block scales), shapes with a partial
// last unit, two staging chunks, x rows of very different magnitudes.
// Build and run: bash scripts/kernel-emu/run.sh mma [TIMEOUT_S [SEED]]; ctest runs it as KernelEmu.MmaGemv.
#include <cmath>
#include <cstring>
#include <random>

#include "core/dtype.h"
#include "emu_mma.h"
#include "emu_runtime.h"

// ---- CUDA spellings and the device helpers mma_gemv.cuh uses
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __restrict__ __restrict
#define __syncthreads() ::emu::syncthreads(__LINE__)
#define __shfl_xor_sync(mask, v, off) ::emu::shfl_xor(__LINE__, mask, v, off)
#define __any_sync(mask, pred) ::emu::any_sync(__LINE__, mask, pred)
#define FATHOM_KERNEL_EMU 1

struct uint4 { uint32_t x, y, z, w; };
struct uint2 { uint32_t x, y; };
struct float4 { float x, y, z, w; };
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return {a, b, c, d}; }
inline uint2 make_uint2(uint32_t a, uint32_t b) { return {a, b}; }
inline float __ldg(const float* p) { return *p; }
inline float4 __ldg(const float4* p) { return *p; }
inline float __ldcg(const float* p) { return *p; }
inline uint32_t __float_as_uint(float f) { return fathom::bits_from_f32(f); }
inline float __uint_as_float(uint32_t u) { return fathom::f32_from_bits(u); }
struct __nv_bfloat16 { uint16_t x; };
struct __half { uint16_t x; };
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {fathom::f32_to_bf16(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return fathom::bf16_to_f32(h.x); }
inline __half __float2half_rn(float f) { return {fathom::f32_to_f16(f)}; }
inline float __half2float(__half h) { return fathom::f16_to_f32(h.x); }

namespace fathom::cuda {
using emu::threadIdx;
using emu::blockIdx;
using std::max;
using std::min;
constexpr unsigned kFullMask = 0xffffffffu;
template <DType D> struct ElemSize;
template <> struct ElemSize<DType::F32> { static constexpr int value = 4; };
template <> struct ElemSize<DType::BF16> { static constexpr int value = 2; };
template <> struct ElemSize<DType::F16> { static constexpr int value = 2; };
template <> struct ElemSize<DType::F8_E4M3> { static constexpr int value = 1; };
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline uint4 load16_stream(const uint8_t* p) {
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
}
inline float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}
inline float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = std::fmax(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}
inline float norm_scale(float sumsq, int64_t K, float eps) { return 1.0f / std::sqrt(sumsq / float(K) + eps); }

using emu::mma_16816;  // emu_mma.h

// cvt.rn.f16x2.e4m3x2: the low byte to the low half.
uint32_t e4m3x2_to_f16x2(uint32_t v) {
  const uint16_t lo = f32_to_f16(fp8e4m3_to_f32(uint8_t(v))), hi = f32_to_f16(fp8e4m3_to_f32(uint8_t(v >> 8)));
  return uint32_t(lo) | uint32_t(hi) << 16;
}
}  // namespace fathom::cuda

#include "ops/cuda/mma_gemv.cuh"
#include "ops/cuda/mma_kernels.cuh"

namespace {
using namespace fathom;
using namespace fathom::cuda;

// A weight (N, K) in D with its dequantized values (FP8: times the block scale).
struct Weight {
  DType d;
  int64_t N, K, block;
  std::vector<uint8_t> bytes;
  std::vector<float> scale;  // FP8: (ceil(N/block), ceil(K/block))
  std::vector<double> deq;
};
Weight make_weight(DType d, int64_t N, int64_t K, int64_t block, std::mt19937& rng) {
  Weight w{d, N, K, block, {}, {}, std::vector<double>(size_t(N * K))};
  const int E = d == DType::F8_E4M3 ? 1 : 2;
  w.bytes.resize(size_t(N * K * E));
  std::normal_distribution<float> nd(0.f, 1.f / std::sqrt(float(K)));
  std::uniform_int_distribution<int> code(0, 255);
  // random codes have an rms of ~130: scales that make the weights ~1/sqrt(K), as real ones are
  std::uniform_real_distribution<float> sd(0.5f / (130.f * std::sqrt(float(K))), 1.5f / (130.f * std::sqrt(float(K))));
  if (d == DType::F8_E4M3) {
    w.scale.resize(size_t(ceil_div(N, block) * ceil_div(K, block)));
    for (float& s : w.scale) s = sd(rng);
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const size_t i = size_t(n * K + k);
      if (d == DType::F8_E4M3) {
        uint8_t c;
        do c = uint8_t(code(rng)); while ((c & 0x7f) == 0x7f);  // every code but NaN
        w.bytes[i] = c;
        w.deq[i] = double(fp8e4m3_to_f32(c)) * w.scale[size_t((n / block) * ceil_div(K, block) + k / block)];
      } else {
        const float v = nd(rng);
        const uint16_t b = d == DType::BF16 ? f32_to_bf16(v) : f32_to_f16(v);
        std::memcpy(&w.bytes[i * 2], &b, 2);
        w.deq[i] = d == DType::BF16 ? bf16_to_f32(b) : f16_to_f32(b);
      }
    }
  return w;
}
MmaRows rows_of(const Weight& w, int64_t n0) {
  const int E = w.d == DType::F8_E4M3 ? 1 : 2, g = int(threadIdx.x % 32) / 4;
  const int64_t kb = ceil_div(w.K, w.block);
  MmaRows r;
  if (n0 + g < w.N) {
    r.a = w.bytes.data() + (n0 + g) * w.K * E;
    if (w.d == DType::F8_E4M3) r.sa = w.scale.data() + (n0 + g) / w.block * kb;
  }
  if (n0 + g + 8 < w.N) {
    r.b = w.bytes.data() + (n0 + g + 8) * w.K * E;
    if (w.d == DType::F8_E4M3) r.sb = w.scale.data() + (n0 + g + 8) / w.block * kb;
  }
  return r;
}
// The block's shared state: the dynamic part (x staging) is the emulated shared memory, exactly
// the launch's size, so that a sanitizer build sees an access past it; the static arrays apart.
std::vector<float> g_ss(kMmaWarps * kMmaSsRows), g_red(kMmaWarps * 16 * kMmaMaxRows);
MmaShared shared_of(int chunk, int M) {
  uint8_t* base = reinterpret_cast<uint8_t*>(emu::emu_sm);
  return MmaShared{reinterpret_cast<uint16_t*>(base), reinterpret_cast<float*>(base + size_t(M) * 2 * (chunk + kMmaPad) * 2),
                   g_ss.data(), g_red.data()};
}
size_t smem_of(int chunk, int M) { return mma_smem_bytes(chunk, M); }

double rel(double got, double want) { return std::fabs(got - want) / (std::fabs(want) + 1.0); }

// Dense (matmul.cu's mma_gemv_kernel body, mma_dense_block): out (M, N) (+)= x (M, K) · Wᵀ, with
// NORM the rows of x RMS-normalised times g first.
// skinny_slice > 0: instead matmul.cu's 9-to-128-row form (mma_skinny_kernel's body,
// mma_skinny_block, in warp tiles) over slices of K of that many units, their partial sums added
// up in slice order as skinny_reduce_kernel does (x staged at most stage_bytes at a time).
template <DType D, int NT, bool NORM>
void skinny_grid(const MatmulParams& p, int64_t slice, int64_t stage_bytes) {
  SkinnySlices sl;
  sl.slices = int(ceil_div(p.K, slice));
  sl.slice = slice;
  const int staged = 8 * NT;  // the skinny form stages whole tiles of x rows
  const int chunk = mma_chunk(std::min(slice, ceil_div(p.K, kMmaUnit) * kMmaUnit), staged, stage_bytes);
  std::vector<float> part(static_cast<size_t>(sl.slices * p.M * p.N + sl.slices * p.M), NAN);
  sl.part = part.data(), sl.part_ss = part.data() + sl.slices * p.M * p.N;
  emu::run_grid("skinny", {unsigned(ceil_div(p.N, kSkinnyRows)), unsigned(sl.slices), 1}, smem_of(chunk, staged), [&] {
    mma_skinny_block<D, NT, NORM>(p, 0, int(blockIdx.x), int(blockIdx.y), chunk, true, sl, shared_of(chunk, staged));
  });
  if (sl.slices > 1)  // skinny_reduce_kernel
    for (int64_t i = 0; i < p.M * p.N; ++i) skinny_reduce_one<NORM>(p, sl, sl.part + i, p.M * p.N, i);
}

template <DType D, bool NORM>
double run_dense(int64_t N, int64_t K, int M, int64_t block, std::mt19937& rng, bool accumulate = false,
                 int skinny_slice = 0, int64_t stage_bytes = kMmaSmemBytes) {
  const Weight w = make_weight(D, N, K, block, rng);
  std::vector<float> x(static_cast<size_t>(M * K)), g(static_cast<size_t>(K)), out(static_cast<size_t>(M * N));
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int m = 0; m < M; ++m) {
    const float mag = std::pow(10.f, float(m % 5) * 2.f - 4.f);  // rows of 1e-4 .. 1e4
    for (int64_t k = 0; k < K; ++k) x[size_t(m * K + k)] = nd(rng) * mag;
  }
  for (float& v : g) v = nd(rng);
  for (float& v : out) v = accumulate ? nd(rng) : NAN;
  const std::vector<float> base = out;
  MatmulParams p;
  p.out = out.data(), p.ldo = N, p.x = x.data(), p.ldx = K, p.w = w.bytes.data(), p.w_dtype = D;
  p.scale_inv = w.scale.data(), p.block = block, p.M = M, p.N = N, p.K = K, p.accumulate = accumulate;
  if (NORM) p.norm = g.data(), p.eps = 1e-6f;
  if (skinny_slice > 0) {
    const int64_t slice = int64_t(skinny_slice) * kMmaUnit;
    switch (ceil_div(M, 8)) {
      case 1: skinny_grid<D, 1, NORM>(p, slice, stage_bytes); break;
      case 2: skinny_grid<D, 2, NORM>(p, slice, stage_bytes); break;
      case 3: skinny_grid<D, 3, NORM>(p, slice, stage_bytes); break;
      default: skinny_grid<D, 4, NORM>(p, slice, stage_bytes);
    }
  } else {
    const int chunk = mma_chunk(K, M);
    emu::run_grid("dense", {unsigned(ceil_div(N, 16)), 1, 1}, smem_of(chunk, M), [&] {
      mma_dense_block<D, NORM>(p, w.bytes.data(), 0, int64_t(blockIdx.x) * 16, M, chunk, true, shared_of(chunk, M));
    });
  }
  double worst = 0;
  for (int m = 0; m < M; ++m) {
    double ss = 0, scale = 1;
    for (int64_t k = 0; k < K; ++k) ss += double(x[size_t(m * K + k)]) * x[size_t(m * K + k)];
    if (NORM) scale = 1.0 / std::sqrt(ss / double(K) + 1e-6);
    double mag = 0;  // errors relative to the row's size, as the op tests' bound is for unit rows
    std::vector<double> want(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k)
        s += w.deq[size_t(n * K + k)] * x[size_t(m * K + k)] * (NORM ? double(g[size_t(k)]) : 1.0);
      want[size_t(n)] = s * scale;
      mag = std::max(mag, std::fabs(want[size_t(n)]));
    }
    for (int64_t n = 0; n < N; ++n) {
      const double got = out[size_t(m * N + n)];
      // out = base + v: against base + want as the op tests compare (the sum's rounding is base's)
      // (the error against the row's size in both cases: a sum that cancels is not held to a
      // relative bound)
      const double ref = accumulate ? base[size_t(m * N + n)] + want[size_t(n)] : want[size_t(n)];
      const double e = std::fabs(got - ref) / (std::fabs(ref) + mag);
      worst = std::max(worst, std::isnan(got) ? INFINITY : e);
    }
  }
  return worst;
}

// An expert set of E experts (gate, up: (I, H); down: (H, I)) and a shared expert of width SI.
struct Experts {
  std::vector<Weight> gate, up, down;
  Weight sg, su, sd;
  std::vector<ExpertPointers> table;
  ExpertPointers shared;
};
Experts make_experts(DType d, int E, int64_t H, int64_t I, int64_t SI, int64_t block, std::mt19937& rng) {
  Experts x;
  for (int e = 0; e < E; ++e) {
    x.gate.push_back(make_weight(d, I, H, block, rng));
    x.up.push_back(make_weight(d, I, H, block, rng));
    x.down.push_back(make_weight(d, H, I, block, rng));
  }
  x.sg = make_weight(d, SI, H, block, rng), x.su = make_weight(d, SI, H, block, rng), x.sd = make_weight(d, H, SI, block, rng);
  auto ptrs = [](const Weight& g, const Weight& u, const Weight& dn) {
    return ExpertPointers{g.bytes.data(), u.bytes.data(), dn.bytes.data(), g.scale.data(), u.scale.data(), dn.scale.data()};
  };
  for (int e = 0; e < E; ++e) x.table.push_back(ptrs(x.gate[size_t(e)], x.up[size_t(e)], x.down[size_t(e)]));
  x.shared = ptrs(x.sg, x.su, x.sd);
  return x;
}
// One expert's SwiGLU of x in double.
std::vector<double> swiglu_ref(const Weight& g, const Weight& u, const Weight& d, const std::vector<double>& x) {
  const int64_t H = g.K, I = g.N;
  std::vector<double> h(static_cast<size_t>(I)), y(static_cast<size_t>(H), 0.0);
  for (int64_t i = 0; i < I; ++i) {
    double a = 0, b = 0;
    for (int64_t k = 0; k < H; ++k) a += g.deq[size_t(i * H + k)] * x[size_t(k)], b += u.deq[size_t(i * H + k)] * x[size_t(k)];
    h[size_t(i)] = a / (1.0 + std::exp(-a)) * b;
  }
  for (int64_t n = 0; n < H; ++n)
    for (int64_t i = 0; i < I; ++i) y[size_t(n)] += d.deq[size_t(n * I + i)] * h[size_t(i)];
  return y;
}

// The routed experts (and the shared one) of T tokens, top_k each, as moe.cu's per-token path
// (mma_expert_gate_up_block over every unit, then mma_expert_down_block) or, grouped, as
// moe_grouped.cu's small-tile path (pairs sorted by expert into tiles of up to 8 rows on the host,
// as moe_route_kernel does on the device, the shared expert's pieces as tiles after them;
// mma_grouped_gate_up_block, mma_grouped_down_block, moe_combine_one adding to a base). Slot 1 of
// token 0 has an invalid expert id in the per-token path.
template <DType D, bool NORM>
double run_experts(int T, int E, int top_k, int64_t H, int64_t I, int64_t block, bool grouped, std::mt19937& rng,
                   int64_t stage_bytes = kMmaSmemBytes, bool ahead = true) {
  const int64_t SI = 2 * I;
  const Experts ex = make_experts(D, E, H, I, SI, block, rng);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_real_distribution<float> ud(0.1f, 1.f);
  std::vector<float> x(static_cast<size_t>(T * H)), g(static_cast<size_t>(H)), wts(static_cast<size_t>(T * top_k));
  std::vector<int32_t> ids(static_cast<size_t>(T * top_k));
  for (float& v : x) v = nd(rng);
  for (float& v : g) v = nd(rng);
  for (float& v : wts) v = ud(rng);
  for (int t = 0; t < T; ++t) {
    std::vector<int> order(static_cast<size_t>(E));
    for (int e = 0; e < E; ++e) order[size_t(e)] = e;
    std::shuffle(order.begin(), order.end(), rng);
    for (int k = 0; k < top_k; ++k) ids[size_t(t * top_k + k)] = order[size_t(k)];
  }
  if (!grouped) ids[1] = -1;
  // grouped: out accumulates onto a base (the residual add in moe_combine_one)
  std::vector<float> out(static_cast<size_t>(T * H), NAN), base(static_cast<size_t>(T * H), 0.f);
  if (grouped)
    for (size_t i = 0; i < out.size(); ++i) out[i] = base[i] = nd(rng);
  MoeExpertsParams p;
  p.out = out.data(), p.x = x.data(), p.weights = wts.data(), p.experts = ids.data(), p.table = ex.table.data();
  p.n_tokens = T, p.hidden = H, p.inter = I, p.block = block, p.n_experts = E, p.top_k = top_k, p.dtype = D;
  p.aligned16 = true;
  p.has_shared = true, p.shared = ex.shared, p.shared_inter = SI;
  if (!grouped) {
    if (NORM) p.norm = g.data(), p.eps = 1e-6f;
    const int64_t routed = int64_t(T) * top_k;
    std::vector<float> h(static_cast<size_t>(routed * I + T * SI), NAN);
    const int64_t units = routed * ceil_div(I, 8) + T * ceil_div(SI, 8);
    const int c_up = mma_chunk(H, 1);
    emu::run_grid("expert_gate_up", {unsigned(units), 1, 1}, smem_of(c_up, 1), [&] {
      mma_expert_gate_up_block<D, NORM>(p, h.data(), gate_up_unit<8>(p, blockIdx.x), c_up, true, shared_of(c_up, 1));
    });
    const int jobs = top_k + int(SI / I), c_down = mma_chunk(I, jobs);
    emu::run_grid("expert_down", {unsigned(ceil_div(H, 16)), unsigned(T), 1}, smem_of(c_down, jobs), [&] {
      mma_expert_down_block<D>(p, h.data(), blockIdx.y, int64_t(blockIdx.x) * 16, c_down, shared_of(c_down, jobs));
    });
  } else {
    // routing as moe_route_kernel: rows sorted by expert, tiles of up to 8 rows of one expert
    // and the shared expert's SI / I pieces (pseudo-experts E + k) over all tokens after them
    const int64_t pairs = int64_t(T) * top_k, pieces = SI / I, rows = pairs + pieces * T;
    std::vector<int32_t> token_of_row(static_cast<size_t>(rows)), row_of_pair(static_cast<size_t>(pairs));
    std::vector<int32_t> tile_expert, tile_begin, tile_end;
    int row = 0;
    for (int e = 0; e < E; ++e) {
      const int first = row;
      for (int64_t i = 0; i < pairs; ++i)
        if (ids[size_t(i)] == e) token_of_row[size_t(row)] = int32_t(i / top_k), row_of_pair[size_t(i)] = row++;
      for (int b = first; b < row; b += 8) tile_expert.push_back(e), tile_begin.push_back(b), tile_end.push_back(row);
    }
    for (int64_t k = 0; k < pieces; ++k) {
      const int32_t first = int32_t(pairs + k * T);
      for (int b = 0; b < T; b += 8)
        tile_expert.push_back(E + int32_t(k)), tile_begin.push_back(first + b), tile_end.push_back(first + T);
      for (int t = 0; t < T; ++t) token_of_row[size_t(first + t)] = t;
    }
    int32_t n_tiles = int32_t(tile_expert.size());
    const ExpertRouting r{token_of_row.data(), row_of_pair.data(), tile_expert.data(), tile_begin.data(),
                          tile_end.data(), &n_tiles};
    std::vector<float> xn = x;  // the grouped path takes x normalised beforehand (rmsnorm)
    if (NORM)
      for (int t = 0; t < T; ++t) {
        double ss = 0;
        for (int64_t k = 0; k < H; ++k) ss += double(x[size_t(t * H + k)]) * x[size_t(t * H + k)];
        const double sc = 1.0 / std::sqrt(ss / double(H) + 1e-6);
        for (int64_t k = 0; k < H; ++k) xn[size_t(t * H + k)] = float(x[size_t(t * H + k)] * sc * g[size_t(k)]);
      }
    p.x = xn.data();
    std::vector<float> h(static_cast<size_t>(rows * I), NAN), y(static_cast<size_t>(rows * H), NAN);
    // warp tiles: a block takes 8 rows (gate_up) or 16 (down) per warp
    const int c_up = mma_chunk(H, kMmaMaxRows, stage_bytes), c_down = mma_chunk(I, kMmaMaxRows, stage_bytes);
    emu::run_grid("grouped_gate_up", {unsigned(ceil_div(I, 8 * kMmaWarps)), unsigned(n_tiles), 1},
                  smem_of(c_up, kMmaMaxRows), [&] {
                    const int64_t n0 = int64_t(blockIdx.x) * 8 * kMmaWarps;
                    // the three-block form (one unit a warp at a time) or the next unit ahead
                    if (ahead)
                      mma_grouped_gate_up_block<D, true>(p, r, h.data(), blockIdx.y, n0, c_up, true,
                                                         shared_of(c_up, kMmaMaxRows));
                    else
                      mma_grouped_gate_up_block<D, false>(p, r, h.data(), blockIdx.y, n0, c_up, true,
                                                          shared_of(c_up, kMmaMaxRows));
                  });
    emu::run_grid("grouped_down", {unsigned(ceil_div(H, 16 * kMmaWarps)), unsigned(n_tiles), 1},
                  smem_of(c_down, kMmaMaxRows), [&] {
                    const int64_t n0 = int64_t(blockIdx.x) * 16 * kMmaWarps;
                    if (ahead)
                      mma_grouped_down_block<D, true>(p, r, h.data(), y.data(), blockIdx.y, n0, c_down,
                                                      shared_of(c_down, kMmaMaxRows));
                    else
                      mma_grouped_down_block<D, false>(p, r, h.data(), y.data(), blockIdx.y, n0, c_down,
                                                       shared_of(c_down, kMmaMaxRows));
                  });
    p.accumulate = true;
    for (int t = 0; t < T; ++t) {  // moe_combine_kernel: four columns a thread (even tokens), or one
      if (t % 2 == 0 && H % 4 == 0)
        for (int64_t d = 0; d < H; d += 4) moe_combine_one<4>(p, r, y.data(), t, d);
      else
        for (int64_t d = 0; d < H; ++d) moe_combine_one<1>(p, r, y.data(), t, d);
    }
  }
  double worst = 0;
  for (int t = 0; t < T; ++t) {
    std::vector<double> xt(static_cast<size_t>(H));
    double ss = 0;
    for (int64_t k = 0; k < H; ++k) ss += double(x[size_t(t * H + k)]) * x[size_t(t * H + k)];
    const double sc = NORM ? 1.0 / std::sqrt(ss / double(H) + 1e-6) : 1.0;
    for (int64_t k = 0; k < H; ++k) xt[size_t(k)] = x[size_t(t * H + k)] * (NORM ? sc * g[size_t(k)] : 1.0);
    std::vector<double> want(static_cast<size_t>(H), 0.0);
    for (int k = 0; k < top_k; ++k) {
      const int e = ids[size_t(t * top_k + k)];
      if (e < 0) continue;
      const auto y = swiglu_ref(ex.gate[size_t(e)], ex.up[size_t(e)], ex.down[size_t(e)], xt);
      for (int64_t d = 0; d < H; ++d) want[size_t(d)] += wts[size_t(t * top_k + k)] * y[size_t(d)];
    }
    const auto ys = swiglu_ref(ex.sg, ex.su, ex.sd, xt);
    for (int64_t d = 0; d < H; ++d) want[size_t(d)] += ys[size_t(d)] + base[size_t(t * H + d)];
    for (int64_t d = 0; d < H; ++d) {
      const double got = out[size_t(t * H + d)];
      worst = std::max(worst, std::isnan(got) ? INFINITY : rel(got, want[size_t(d)]));
    }
  }
  return worst;
}

// Column jobs: out (N) = Σ_j wt_j · (W_j · x_j) over J jobs, each its own weight and x row.
template <DType D>
double run_jobs(int64_t N, int64_t K, int J, int64_t block, std::mt19937& rng) {
  std::vector<Weight> ws;
  for (int j = 0; j < J; ++j) ws.push_back(make_weight(D, N, K, block, rng));
  std::vector<float> x(static_cast<size_t>(J * K)), wt(static_cast<size_t>(J)), out(static_cast<size_t>(N), NAN);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_real_distribution<float> ud(0.1f, 1.f);
  for (float& v : x) v = nd(rng);
  for (float& v : wt) v = ud(rng);
  const int chunk = mma_chunk(K, J);
  emu::run_grid("jobs", {unsigned(ceil_div(N, 16)), 1, 1}, smem_of(chunk, J), [&] {
    const MmaShared sh = shared_of(chunk, J);
    const int64_t n0 = int64_t(blockIdx.x) * 16;
    float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
    mma_rows_product<D, false>(
        acc, sh, [&](int j) { return rows_of(ws[size_t(j)], n0); }, [](int j) { return j; }, J,
        [&](int j) { return x.data() + j * K; }, J, K, block, chunk, nullptr, true);
    mma_block_reduce<false>(acc, sh);
    const int r = threadIdx.x;
    if (r < 16 && n0 + r < N) {
      float v = 0.f;
      for (int j = 0; j < J; ++j) v += wt[size_t(j)] * sh.red[r * kMmaMaxRows + j];
      out[size_t(n0 + r)] = v;
    }
  });
  double worst = 0;
  for (int64_t n = 0; n < N; ++n) {
    double want = 0;
    for (int j = 0; j < J; ++j) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += ws[size_t(j)].deq[size_t(n * K + k)] * x[size_t(j * K + k)];
      want += wt[size_t(j)] * s;
    }
    worst = std::max(worst, std::isnan(out[size_t(n)]) ? INFINITY : rel(out[size_t(n)], want));
  }
  return worst;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) emu::g_timeout_s = std::atof(argv[1]);
  // fresh inputs each run; the seed is printed so that a failure can be repeated
  const unsigned seed = argc > 2 ? unsigned(std::strtoul(argv[2], nullptr, 10)) : std::random_device{}();
  std::printf("mma_gemv_emu: seed %u (rerun with: TIMEOUT_S %u)\n", seed, seed);
  std::mt19937 rng(seed);
  bool all_ok = true;
  auto t0 = std::chrono::steady_clock::now();
  auto report = [&](const char* what, double err) {
    const bool ok = err <= 1e-4 && !emu::g_problem;
    all_ok &= ok;
    const auto t1 = std::chrono::steady_clock::now();
    std::printf("%-58s %s  max rel err %.3g  (%.1f s)\n", what, ok ? "OK  " : "FAIL", err,
                std::chrono::duration<double>(t1 - t0).count());
    std::fflush(stdout);
    t0 = t1;
  };
  report("bf16  N 40 K 1040 M 1 (last unit of 16 columns)", run_dense<DType::BF16, false>(40, 1040, 1, 128, rng));
  report("bf16  N 33 K 2048 M 8 norm (two chunks)", run_dense<DType::BF16, true>(33, 2048, 8, 128, rng));
  report("f16   N 20 K 272 M 5", run_dense<DType::F16, false>(20, 272, 5, 128, rng));
  report("fp8   N 40 K 144 M 1", run_dense<DType::F8_E4M3, false>(40, 144, 1, 128, rng));
  report("fp8   N 45 K 512 M 3 norm", run_dense<DType::F8_E4M3, true>(45, 512, 3, 128, rng));
  report("fp8   N 20 K 400 M 5 block 256", run_dense<DType::F8_E4M3, false>(20, 400, 5, 256, rng));
  report("fp8   N 17 K 1280 M 8 (two chunks)", run_dense<DType::F8_E4M3, false>(17, 1280, 8, 128, rng));
  report("fp8   N 24 K 64 M 2 norm (K below a unit)", run_dense<DType::F8_E4M3, true>(24, 64, 2, 128, rng));
  report("bf16  N 45 K 1040 M 3 accumulate", run_dense<DType::BF16, false>(45, 1040, 3, 128, rng, true));
  report("fp8   N 30 K 256 M 4 norm accumulate", run_dense<DType::F8_E4M3, true>(30, 256, 4, 128, rng, true));
  report("skinny bf16 N 150 K 1040 M 32, slices of 3 units", run_dense<DType::BF16, false>(150, 1040, 32, 128, rng, false, 3));
  report("skinny fp8  N 136 K 768 M 17 accumulate, one slice, x a unit at a time",
         run_dense<DType::F8_E4M3, false>(136, 768, 17, 128, rng, true, 6, int64_t(mma_smem_bytes(kMmaUnit, 24))));  // 24 rows staged
  report("skinny f16  N 40 K 400 M 9, slices of 1 unit", run_dense<DType::F16, false>(40, 400, 9, 128, rng, false, 1));
  report("skinny bf16 N 140 K 1024 M 32 norm, slices of 3", run_dense<DType::BF16, true>(140, 1024, 32, 128, rng, false, 3));
  report("skinny fp8  N 50 K 640 M 13 norm accumulate, one slice", run_dense<DType::F8_E4M3, true>(50, 640, 13, 128, rng, true, 5));
  report("skinny fp8  N 130 K 512 M 24 block 256, slices of 2", run_dense<DType::F8_E4M3, false>(130, 512, 24, 256, rng, false, 2));
  // the few-row batches the skinny form takes since skinny_min_rows (FP8 from 2 rows, 16-bit from 3)
  report("skinny fp8  N 70 K 640 M 2, slices of 2", run_dense<DType::F8_E4M3, false>(70, 640, 2, 128, rng, false, 2));
  report("skinny bf16 N 150 K 512 M 3 norm, one slice", run_dense<DType::BF16, true>(150, 512, 3, 128, rng, false, 4));
  report("skinny f16  N 33 K 272 M 8 accumulate, slices of 1", run_dense<DType::F16, false>(33, 272, 8, 128, rng, true, 1));
  report("jobs bf16 N 40 K 256 J 8", run_jobs<DType::BF16>(40, 256, 8, 128, rng));
  report("jobs fp8  N 20 K 384 J 5", run_jobs<DType::F8_E4M3>(20, 384, 5, 128, rng));
  // sizes kept small: 256 emulated threads per block meet at every barrier (~50 ms a block here)
  report("experts bf16 T 1 top 2 of 3, H 128 I 64 + shared, norm", run_experts<DType::BF16, true>(1, 3, 2, 128, 64, 128, false, rng));
  report("experts fp8  T 1 top 2 of 4, H 256 I 128 + shared", run_experts<DType::F8_E4M3, false>(1, 4, 2, 256, 128, 128, false, rng));
  report("experts f16  T 2 top 3 of 3, H 128 I 64 + shared, norm", run_experts<DType::F16, true>(2, 3, 3, 128, 64, 128, false, rng));
  // two tokens: the fewest the grouped tiles take since moe.cu's policy (one row a tile)
  report("grouped fp8  T 2 top 3 of 5, H 128 I 128 + shared, norm", run_experts<DType::F8_E4M3, true>(2, 5, 3, 128, 128, 128, true, rng));
  report("grouped bf16 T 12 top 2 of 2 (two tiles each), H 128 I 64 + shared", run_experts<DType::BF16, false>(12, 2, 2, 128, 64, 128, true, rng));
  report("grouped fp8  T 10 top 2 of 3, H 128 I 128 + shared, norm", run_experts<DType::F8_E4M3, true>(10, 3, 2, 128, 128, 128, true, rng));
  report("grouped bf16 T 12 top 2 of 3, H 208 I 80 (idle warps)", run_experts<DType::BF16, false>(12, 3, 2, 208, 80, 128, true, rng));
  report("grouped fp8  T 9 top 2 of 3, H 384 I 256, x staged a unit at a time",
         run_experts<DType::F8_E4M3, false>(9, 3, 2, 384, 256, 128, true, rng, int64_t(mma_smem_bytes(kMmaUnit, 8))));
  // the three-block form of moe_grouped.cu (one weight unit a warp at a time), x in chunks
  report("grouped bf16 T 12 top 2 of 3, H 384 I 256, one unit at a time, x in chunks of 2 units",
         run_experts<DType::BF16, false>(12, 3, 2, 384, 256, 128, true, rng, int64_t(mma_smem_bytes(2 * kMmaUnit, 8)), false));
  report("grouped fp8  T 10 top 2 of 3, H 256 I 128 + norm, one unit at a time",
         run_experts<DType::F8_E4M3, true>(10, 3, 2, 256, 128, 128, true, rng, kMmaSmemBytes, false));
  std::printf(all_ok ? "ALL OK\n" : "SOME FAILED\n");
  return all_ok ? 0 : 1;
}
