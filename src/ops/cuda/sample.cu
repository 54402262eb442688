// Token sampling on the GPU (Ops::sample): for the same logits and u, the token select_token
// (src/ops/cpu/sample.cpp) chooses, so a decode step downloads B ids instead of B rows of logits.
// Three kernels per call, none synchronizing the host (a decode graph captures them):
//   row_max   grid (B): each row's largest logit and its first index
//   scale     grid (blocks, B): l = (logit - max) / temperature in float with the CPU's rounding,
//             and w = exp(l) in double, into work space (spread over every SM: the exponentials
//             are most of the arithmetic)
//   select    grid (B), 1024 threads: the kept set and the draw
//
// Ranks are 64-bit keys: the order-preserving bits of l above the bit-inverted id, so a larger
// key ranks first and no two tokens share a key (ties go to the lower id, as on the CPU). "The
// best n tokens" is then "every key >= floor". select finds the floor of the top-k set by counts
// and that of the top-p set by mass, narrowing an interval of keys 2048 bins at a time (six
// rounds at most for 64 bits, usually two or three): a shared-memory histogram of the
// interval's keys picks the bin where the count or the mass crosses, and the next round bins only
// that bin. Bin masses are float atomics, good enough to pick a bin; the pick is then checked with
// sums in double and moved to a neighbour when rounding misled it. Tokens whose weight underflows
// to 0 rank below all others and can never be drawn, so the intervals start at the lowest key of
// a token with w > 0. The draw walks the kept tokens in ascending id order like the CPU: each
// thread sums a contiguous run of ids in double, a block scan gives each run its starting mass,
// and the runs walk again to the first token whose cumulative mass exceeds u * total.
// tests/test_cuda_ops.cpp (CudaOps.Sample) compares the ids with the CPU's.
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "core/error.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/device_util.cuh"

namespace fathom::cuda {
namespace {

using Key = unsigned long long;

constexpr int kThreads = 1024;  // row_max and select: one block per row
constexpr int kWarps = kThreads / 32;
constexpr int kBinBits = 11;
constexpr int kBins = 1 << kBinBits;  // per narrowing round
constexpr int kBinsPerThread = kBins / kThreads;
constexpr int kScaleThreads = 256;
constexpr int kScalePerThread = 4;  // elements per thread of the scale kernel (grid-stride)

struct RowMax {
  float max;       // the largest logit; -inf (or NaN) when the row has no finite value
  int32_t argmax;  // its first index
};

// Larger key = ranked first: l's bits made monotone as unsigned (negatives inverted, the sign
// bit set on the rest) above ~id, so that the lower id of equal l ranks first. l is never -0
// (scale adds +0), so equal values have equal bits.
__device__ inline Key rank_key(float l, int64_t id) {
  const uint32_t b = __float_as_uint(l);
  const uint32_t ordered = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (Key(ordered) << 32) | Key(~uint32_t(id));
}

struct Sum {
  template <typename T> __device__ T operator()(T a, T b) const { return a + b; }
};
struct Min {
  template <typename T> __device__ T operator()(T a, T b) const { return a < b ? a : b; }
};
struct Max {
  template <typename T> __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};

// The reduction of v over the block (kThreads threads), returned to every thread in the same
// order of operations (so every thread takes the same decisions from it). red: kWarps entries of
// shared memory; the barrier in front lets consecutive calls share it.
template <typename T, typename Op>
__device__ T block_reduce(T v, T* red, Op op) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, off));
  __syncthreads();
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  T r = red[0];
  for (int i = 1; i < kWarps; ++i) r = op(r, red[i]);
  return r;
}

// The sum of v over the threads before this one (thread order), and in *total over all.
template <typename T>
__device__ T block_exclusive_sum(T v, T* red, T* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  T inclusive = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const T o = __shfl_up_sync(kFullMask, inclusive, off);
    if (lane >= off) inclusive += o;
  }
  T exclusive = __shfl_up_sync(kFullMask, inclusive, 1);
  if (lane == 0) exclusive = T(0);
  __syncthreads();
  if (lane == 31) red[warp] = inclusive;
  __syncthreads();
  T before = T(0), all = T(0);
  for (int i = 0; i < kWarps; ++i) {
    if (i == warp) before = all;
    all += red[i];
  }
  *total = all;
  return before + exclusive;
}

// The smallest shift that puts a span of keys (hi - lo) into kBins bins.
__device__ inline int bin_shift(Key span) {
  const int bits = span == 0 ? 0 : 64 - __clzll(static_cast<long long>(span));
  return bits > kBinBits ? bits - kBinBits : 0;
}

struct SelectShared {
  int count[kBins];   // tokens per bin of the current interval
  float mass[kBins];  // their mass (float atomics: only to pick a bin)
  double red_d[kWarps];
  Key red_k[kWarps];
  int red_i[kWarps];
  int pick, pick_above;
};

// Counts (and with w, float masses) of the keys in [lo, hi] per bin (key - lo) >> shift.
__device__ void histogram(SelectShared& s, const float* l, const double* w, int64_t V, Key lo, Key hi, int shift) {
  for (int d = threadIdx.x; d < kBins; d += kThreads) {
    s.count[d] = 0;
    s.mass[d] = 0.0f;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    const Key key = rank_key(l[i], i);
    if (key < lo || key > hi) continue;
    const int d = int((key - lo) >> shift);
    atomicAdd(&s.count[d], 1);
    if (w) atomicAdd(&s.mass[d], float(w[i]));
  }
  __syncthreads();
}

// Thread t owns bins kBins-1-t*kBinsPerThread ... downwards: thread order is rank order.
__device__ inline int owned_bin(int j) { return kBins - 1 - (int(threadIdx.x) * kBinsPerThread + j); }

// The floor of the `need` highest keys among the (live) keys in [lo, hi], which hold more.
__device__ Key top_k_floor(SelectShared& s, const float* l, int64_t V, Key lo, Key hi, int need) {
  for (;;) {
    const int shift = bin_shift(hi - lo);
    histogram(s, l, nullptr, V, lo, hi, shift);
    int mine = 0;
    for (int j = 0; j < kBinsPerThread; ++j) mine += s.count[owned_bin(j)];
    int all = 0;
    int above = block_exclusive_sum(mine, s.red_i, &all);
    // The bin where the count from the top reaches need: exactly one thread finds it.
    for (int j = 0; j < kBinsPerThread; ++j) {
      const int d = owned_bin(j);
      if (above < need && above + s.count[d] >= need) {
        s.pick = d;
        s.pick_above = above;
      }
      above += s.count[d];
    }
    __syncthreads();
    const int d = s.pick;
    need -= s.pick_above;
    const int in_bin = s.count[d];
    __syncthreads();  // everyone has read pick and count before the next round writes them
    const Key bin_lo = lo + (Key(d) << shift);
    if (in_bin == need) return bin_lo;  // the whole bin is in (always so for one key per bin)
    lo = bin_lo;
    hi = min(hi, bin_lo + ((Key(1) << shift) - 1));
  }
}

// The floor of the top-p set among the live keys in [lo, hi] (the candidates after top-k):
// the key of the first token, in rank order, at which the mass from the top reaches target;
// the lowest key when rounding leaves the sum short of it everywhere (every candidate kept).
__device__ Key top_p_floor(SelectShared& s, const float* l, const double* w, int64_t V, Key lo, Key hi,
                           double target) {
  double above = 0.0;  // mass of the candidates ranked above the interval (exact: double sums)
  for (;;) {
    const int shift = bin_shift(hi - lo);
    histogram(s, l, w, V, lo, hi, shift);
    // A first pick from the float masses: the highest non-empty bin where the mass from the
    // top reaches target, else the lowest non-empty bin.
    double mine = 0.0;
    for (int j = 0; j < kBinsPerThread; ++j) mine += double(s.mass[owned_bin(j)]);
    double all = 0.0;
    double run = above + block_exclusive_sum(mine, s.red_d, &all);
    int crossing = -1, lowest = kBins;
    for (int j = 0; j < kBinsPerThread; ++j) {
      const int d = owned_bin(j);
      if (s.count[d] == 0) continue;
      run += double(s.mass[d]);
      if (crossing < 0 && run >= target) crossing = d;
      lowest = d;
    }
    crossing = block_reduce(crossing, s.red_i, Max());
    lowest = block_reduce(lowest, s.red_i, Min());
    int pick = crossing >= 0 ? crossing : lowest;
    // Checked with double sums: `a` is the mass of the bins above the pick, `m` the pick's.
    // Every thread gets the same sums, so all move the pick alike; moves go one way only.
    double a = 0.0;
    int direction = 0;
    for (;;) {
      double a_mine = 0.0, m_mine = 0.0;
      for (int64_t i = threadIdx.x; i < V; i += kThreads) {
        const Key key = rank_key(l[i], i);
        if (key < lo || key > hi) continue;
        const int d = int((key - lo) >> shift);
        if (d > pick) a_mine += w[i];
        else if (d == pick) m_mine += w[i];
      }
      a = block_reduce(a_mine, s.red_d, Sum());
      const double m = block_reduce(m_mine, s.red_d, Sum());
      int move = 0;
      if (above + a >= target) move = 1;           // the crossing is in a bin above
      else if (above + a + m < target) move = -1;  // ... or below
      if (move == 0 || (direction != 0 && move != direction)) break;
      int next = pick + move;
      while (next >= 0 && next < kBins && s.count[next] == 0) next += move;
      if (next < 0 || next >= kBins) break;  // no bin that way: this one stays
      direction = move;
      pick = next;
    }
    above += a;
    const int in_bin = s.count[pick];
    __syncthreads();  // everyone has read count before the next round clears it
    const Key bin_lo = lo + (Key(pick) << shift);
    if (in_bin == 1) return bin_lo;
    lo = bin_lo;
    hi = min(hi, bin_lo + ((Key(1) << shift) - 1));
  }
}

// grid (B), block kThreads: the largest value of each row and its first index (the argmax
// kernel's order: a larger value wins, an equal one only with a lower index).
__global__ void __launch_bounds__(kThreads) row_max_kernel(RowMax* __restrict__ out, const float* __restrict__ logits,
                                                           int64_t V) {
  pdl_wait();
  const float* x = logits + blockIdx.x * V;
  float best = -INFINITY;
  int64_t at = V;  // past the end: loses to any element
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    const float v = x[i];
    if (v > best || at == V) best = v, at = i;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float v = __shfl_xor_sync(kFullMask, best, off);
    const int64_t i = __shfl_xor_sync(kFullMask, at, off);
    if (v > best || (v == best && i < at) || at == V) best = v, at = i;
  }
  __shared__ float warp_best[kWarps];
  __shared__ int64_t warp_at[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_best[warp] = best, warp_at[warp] = at;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < kWarps; ++i)
      if (warp_best[i] > best || (warp_best[i] == best && warp_at[i] < at) || at == V) best = warp_best[i], at = warp_at[i];
    out[blockIdx.x] = RowMax{best, int32_t(at < V ? at : 0)};
  }
}

// grid (blocks, B), block kScaleThreads: l = (logit - max) / temperature (+0: no -0), w = exp(l)
// in double. Rows that select answers with the argmax are skipped.
__global__ void scale_kernel(float* __restrict__ l, double* __restrict__ w, const float* __restrict__ logits,
                             const RowMax* __restrict__ maxes, const SampleRow* __restrict__ rows, int64_t V) {
  pdl_wait();
  const int64_t b = blockIdx.y;
  const float t = rows[b].temperature, mx = maxes[b].max;
  if (!(t > 0.0f) || !(mx > -INFINITY)) return;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < V; i += step) {
    // explicit round-to-nearest operations: nothing may be contracted or reordered
    const float s = __fadd_rn(__fdiv_rn(__fsub_rn(logits[b * V + i], mx), t), 0.0f);
    l[b * V + i] = s;
    w[b * V + i] = exp(double(s));
  }
}

// grid (B), block kThreads: the token of each row (see the top of the file).
__global__ void __launch_bounds__(kThreads) select_kernel(int32_t* __restrict__ ids, const float* __restrict__ l_rows,
                                                          const double* __restrict__ w_rows,
                                                          const RowMax* __restrict__ maxes,
                                                          const SampleRow* __restrict__ rows, int64_t V) {
  pdl_wait();
  __shared__ SelectShared s;
  const int64_t b = blockIdx.x;
  const SampleRow row = rows[b];
  const RowMax m = maxes[b];
  if (!(row.temperature > 0.0f) || !(m.max > -INFINITY)) {  // greedy, or no finite logit
    if (threadIdx.x == 0) ids[b] = m.argmax;
    return;
  }
  const float* l = l_rows + b * V;
  const double* w = w_rows + b * V;
  const Key top = rank_key(0.0f, m.argmax);  // the best token: l = 0, the largest key

  // The live tokens (w > 0): how many, the lowest key, the total mass.
  int n_live = 0;
  Key lowest = ~Key(0);
  double total = 0.0;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    const double wi = w[i];
    if (!(wi > 0.0)) continue;
    ++n_live;
    lowest = min(lowest, rank_key(l[i], i));
    total += wi;
  }
  n_live = block_reduce(n_live, s.red_i, Sum());
  lowest = block_reduce(lowest, s.red_k, Min());
  total = block_reduce(total, s.red_d, Sum());

  Key floor = lowest;  // kept so far: the keys >= floor
  if (row.top_k > 0 && row.top_k < n_live) {
    floor = top_k_floor(s, l, V, lowest, top, row.top_k);
    if (row.top_p < 1.0f) {  // top-p's total is the mass of the top-k set
      double mine = 0.0;
      for (int64_t i = threadIdx.x; i < V; i += kThreads)
        if (rank_key(l[i], i) >= floor) mine += w[i];
      total = block_reduce(mine, s.red_d, Sum());
    }
  }
  if (row.top_p < 1.0f) floor = top_p_floor(s, l, w, V, floor, top, double(row.top_p) * total);

  // The draw: candidates are keys >= floor with w >= min_p (the best token weighs 1), in id
  // order; thread t walks ids [t * per, (t + 1) * per).
  const double min_w = double(row.min_p);
  const int64_t per = (V + kThreads - 1) / kThreads;
  const int64_t begin = min(V, int64_t(threadIdx.x) * per), end = min(V, begin + per);
  double run = 0.0;
  for (int64_t i = begin; i < end; ++i) {
    if (rank_key(l[i], i) < floor) continue;
    const double wi = w[i];
    if (wi > 0.0 && wi >= min_w) run += wi;
  }
  double kept = 0.0;
  double cum = block_exclusive_sum(run, s.red_d, &kept);
  const double at = row.u * kept;
  int found = std::numeric_limits<int>::max(), last = -1;
  for (int64_t i = begin; i < end; ++i) {
    if (rank_key(l[i], i) < floor) continue;
    const double wi = w[i];
    if (!(wi > 0.0 && wi >= min_w)) continue;
    cum += wi;
    last = int(i);
    if (at < cum) {
      found = int(i);
      break;
    }
  }
  found = block_reduce(found, s.red_i, Min());
  last = block_reduce(last, s.red_i, Max());
  if (threadIdx.x == 0)
    ids[b] = found != std::numeric_limits<int>::max() ? found : last >= 0 ? last : m.argmax;  // rounding: the top
}

}  // namespace

void sample(int32_t* ids, const float* logits, const SampleRow* rows, int64_t B, int64_t V, Stream stream) {
  if (B == 0) return;
  FATHOM_CHECK(V > 0 && V <= std::numeric_limits<int32_t>::max(), "sample: rows of ", V,
               " logits; expected 1 to 2^31-1.");
  FATHOM_CHECK(B <= 65535, "sample: ", B, " rows is too many for one launch (at most 65535).");
  FATHOM_ASSERT(ids && logits && rows, "sample with a null pointer");
  const cudaStream_t s = as_cuda(stream);
  // work space: w (B, V) F64, l (B, V) F32, then one RowMax per row
  const size_t n = size_t(B) * size_t(V);
  StreamScratch work(n * (sizeof(double) + sizeof(float)) + sizeof(float) + size_t(B) * sizeof(RowMax), s, "sample");
  double* w = work.as<double>();
  float* l = reinterpret_cast<float*>(w + n);
  RowMax* maxes = reinterpret_cast<RowMax*>(l + n + (n & 1));  // 8-byte aligned
  launch_kernel(row_max_kernel, unsigned(B), kThreads, 0, s, maxes, logits, V);
  check_launch("sample (row_max)");
  const int64_t blocks = ceil_div(V, int64_t(kScaleThreads) * kScalePerThread);
  launch_kernel(scale_kernel, dim3(unsigned(blocks), unsigned(B)), kScaleThreads, 0, s, l, w, logits,
                static_cast<const RowMax*>(maxes), rows, V);
  check_launch("sample (scale)");
  launch_kernel(select_kernel, unsigned(B), kThreads, 0, s, ids, static_cast<const float*>(l),
                static_cast<const double*>(w), static_cast<const RowMax*>(maxes), rows, V);
  check_launch("sample (select)");
}

}  // namespace fathom::cuda
