// CPU emulation of the absorbed-MLA decode kernel (src/ops/cuda/attention_mla.cu, included as it
// is with FATHOM_KERNEL_EMU: the kernel without its host code and inline assembly) for checking
// it without a GPU: blocks of 256 std::threads (emu_runtime.h: barriers that report a hang or
// threads meeting at different call sites, shared memory that starts as NaN), ldmatrix.x4
// (.trans too) and mma.sync m16n8k16 bf16 emulated as the warp collectives they are (emu_mma.h),
// cp.async as an immediate copy. Each case is compared with the CPU's attention (cpu::attention,
// built in) on the same BF16 cache widened to F32: a paged cache, several 64-key tiles a block,
// key chunks merged as attention.cu's merge kernel does, two tokens' heads in one row tile,
// causal prefill rows, the one-stage form, and a uniform batch (key counts read per sequence on
// the "device", the chunk chosen there, the blocks past a sequence's keys leaving at once).
// Build and run: bash scripts/kernel-emu/run.sh mla [TIMEOUT_S [SEED]]; ctest runs it as
// KernelEmu.MlaAttention.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/thread_pool.h"
#include "emu_mma.h"
#include "emu_runtime.h"
#include "ops/cpu/attention.h"
#include "ops/ops.h"

// ---- CUDA spellings and the device helpers attention_mla.cu uses
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static  // one copy for the block's threads (blocks run one after another)
#define __syncthreads() ::emu::syncthreads(__LINE__)
#define __shfl_xor_sync(mask, v, off) ::emu::shfl_xor_any(__LINE__, mask, v, off)
#define FATHOM_KERNEL_EMU 1

using cudaStream_t = struct CUstream_st*;
struct uint2 { uint32_t x, y; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct int4 { int x, y, z, w; };
inline uint2 make_uint2(uint32_t a, uint32_t b) { return {a, b}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float __ldg(const float* p) { return *p; }
inline float4 __ldg(const float4* p) { return *p; }
struct __nv_bfloat162 { uint16_t x, y; };  // x the low half
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {fathom::f32_to_bf16(a), fathom::f32_to_bf16(b)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {fathom::bf16_to_f32(h.x), fathom::bf16_to_f32(h.y)}; }

namespace emu {
// __shfl_xor_sync of any value of up to 8 bytes (the kernel's floats, uniform_chunk's int64_t),
// through the warp's exchange space between two warp barriers.
template <class T>
T shfl_xor_any(int line, unsigned mask, T v, int off) {
  static_assert(sizeof(T) <= 2 * sizeof(uint32_t), "a shuffled value fits two exchange registers");
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  syncwarp(line, mask);
  std::memcpy(tl_block->xslot[w][lane], &v, sizeof v);
  syncwarp(line, mask);
  T r;
  std::memcpy(&r, tl_block->xslot[w][lane ^ off], sizeof r);
  return r;
}
}  // namespace emu

namespace fathom::cuda {
using emu::blockIdx;
using emu::threadIdx;
using std::max;
using std::min;
constexpr unsigned kFullMask = 0xffffffffu;
inline void pdl_wait() {}
inline unsigned char* emu_smem() { return reinterpret_cast<unsigned char*>(emu::emu_sm); }
// shared-memory addresses: byte offsets into the block's emulated shared memory
inline uint32_t smem_u32(const void* p) { return uint32_t(static_cast<const unsigned char*>(p) - emu_smem()); }
inline void cp_async16(uint32_t dst, const void* src, bool valid) {
  if (valid) std::memcpy(emu_smem() + dst, src, 16);
  else std::memset(emu_smem() + dst, 0, 16);
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}
inline void prefetch_l2(const void*, uint64_t) {}
inline void ldsm_x4(uint32_t (&r)[4], uint32_t addr) { emu::ldmatrix_x4(r, addr, emu_smem(), false); }
inline void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) { emu::ldmatrix_x4(r, addr, emu_smem(), true); }
inline void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::mma_16816(c, a[0], a[1], a[2], a[3], b0, b1, true);
}
}  // namespace fathom::cuda

#include "ops/cuda/attention_mla.cu"

using fathom::AttentionParams;
using fathom::DType;
using fathom::cuda::MlaLaunch;

namespace {

constexpr int kDqk = 576, kDv = 512;
bool all_ok = true;

// A latent cache of `rows` physical rows (BF16 bits) and its F32 widening, and fresh queries.
struct Inputs {
  std::vector<uint16_t> k16;
  std::vector<float> k32, q;
  std::vector<int32_t> table;
};

Inputs make_inputs(int64_t rows, int64_t q_floats, int64_t pages, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  Inputs in;
  in.k16.resize(size_t(rows * kDqk));
  in.k32.resize(in.k16.size());
  for (size_t i = 0; i < in.k16.size(); ++i) {
    in.k16[i] = fathom::f32_to_bf16(nd(rng));
    in.k32[i] = fathom::bf16_to_f32(in.k16[i]);
  }
  in.q.resize(size_t(q_floats));
  for (float& v : in.q) v = nd(rng);
  in.table.resize(size_t(pages));
  for (int64_t i = 0; i < pages; ++i) in.table[size_t(i)] = int32_t(i);
  std::shuffle(in.table.begin(), in.table.end(), rng);  // pages scattered over the pool
  return in;
}

// out (n_q, heads, 512) from a launch's partials: attention.cu's merge, chunk by chunk.
void merge(float* out, const float* part_o, const float* part_ml, int n_chunks, int64_t n_q, int heads) {
  for (int64_t t = 0; t < n_q; ++t)
    for (int h = 0; h < heads; ++h) {
      const int64_t row = t * heads + h, per = n_q * heads;
      double mx = -INFINITY;
      for (int c = 0; c < n_chunks; ++c) mx = std::max(mx, double(part_ml[2 * (c * per + row)]));
      double l = 0;
      std::vector<double> o(kDv, 0.0);
      for (int c = 0; c < n_chunks; ++c) {
        const double m = part_ml[2 * (c * per + row)];
        if (m == -INFINITY) continue;
        const double w = std::exp(m - mx);
        l += w * part_ml[2 * (c * per + row) + 1];
        for (int d = 0; d < kDv; ++d) o[size_t(d)] += w * part_o[(c * per + row) * kDv + d];
      }
      for (int d = 0; d < kDv; ++d) out[row * kDv + d] = l > 0 ? float(o[size_t(d)] / l) : 0.f;
    }
}

double max_err(const float* got, const float* want, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = std::fabs(double(got[i]) - want[i]) / (std::fabs(want[i]) + 1.0);
    if (!(d <= m)) m = std::isnan(d) ? INFINITY : d;
  }
  return m;
}

void report(const std::string& what, double err) {
  const bool ok = err < 1e-4;
  all_ok = all_ok && ok;
  std::printf("%-72s %s max rel err %.3g\n", what.c_str(), ok ? "OK  " : "FAIL", err);
}

template <int STAGES>
void run_kernel(const MlaLaunch& a, emu::Dim3 grid) {
  emu::run_grid("mla_attention", grid, fathom::cuda::MlaSmem<STAGES>::bytes,
                [&] { fathom::cuda::mla_attention_kernel<STAGES>(a); });
}

// One sequence: n_q queries x heads (one KV head), n_kv keys (paged when block_size > 0) cut
// into n_chunks chunks of `chunk` keys, against the CPU.
template <int STAGES>
double run_one(int64_t n_q, int heads, int64_t n_kv, int block_size, int n_chunks, int64_t chunk, bool causal,
               std::mt19937& rng, fathom::ThreadPool& pool) {
  const int64_t pages = block_size ? (n_kv + block_size - 1) / block_size + 2 : 0;
  const int64_t rows = block_size ? pages * block_size : n_kv;
  Inputs in = make_inputs(rows, n_q * heads * kDqk, pages, rng);
  AttentionParams p;
  p.q_token_stride = heads * kDqk, p.q_head_stride = kDqk;
  p.k_token_stride = kDqk, p.k_head_stride = 0, p.v_token_stride = kDqk, p.v_head_stride = 0;
  p.block_table = block_size ? in.table.data() : nullptr, p.block_size = block_size;
  p.out_token_stride = heads * kDv, p.out_head_stride = kDv;
  p.n_q = n_q, p.n_kv = n_kv, p.q_pos0 = n_kv - n_q;
  p.n_q_heads = heads, p.n_kv_heads = 1, p.d_qk = kDqk, p.d_v = kDv;
  p.scale = 1.0f / std::sqrt(float(kDqk)), p.causal = causal;
  p.q = in.q.data();
  std::vector<float> want(size_t(n_q * heads * kDv)), got(want.size(), NAN);
  p.k = in.k32.data(), p.v = in.k32.data(), p.kv_dtype = DType::F32, p.out = want.data();
  fathom::cpu::attention(p, pool);

  p.k = in.k16.data(), p.v = in.k16.data(), p.kv_dtype = DType::BF16, p.out = got.data();
  MlaLaunch a;
  a.p = p;
  a.group = heads, a.rows = n_q * heads, a.chunk = chunk, a.n_chunks = n_chunks, a.vec_q = true;
  std::vector<float> part_o, part_ml;
  if (n_chunks > 1) {
    part_o.assign(size_t(n_chunks * n_q * heads * kDv), NAN);
    part_ml.assign(size_t(2 * n_chunks * n_q * heads), NAN);
    a.part_o = part_o.data(), a.part_ml = part_ml.data();
  }
  run_kernel<STAGES>(a, {unsigned((a.rows + 15) / 16), 1, unsigned(n_chunks)});
  if (n_chunks > 1) merge(got.data(), part_o.data(), part_ml.data(), n_chunks, n_q, heads);
  return max_err(got.data(), want.data(), want.size());
}

// A uniform batch (a graph-replayed decode step): B sequences of one query x 16 heads over one
// paged pool, key counts read by the kernel (kv_len), the launch sized for `bound` keys in
// n_chunks chunks and the chunk chosen for the longest sequence so that the blocks fill `wave`.
double run_uniform(const std::vector<int32_t>& lens, int64_t bound, int n_chunks, int wave, std::mt19937& rng,
                   fathom::ThreadPool& pool) {
  const int heads = 16, bs = 16;
  const int64_t B = int64_t(lens.size()), width = bound / bs;  // table entries per sequence
  const int64_t pages = B * width;
  Inputs in = make_inputs(pages * bs, B * heads * kDqk, pages, rng);
  std::vector<float> want(size_t(B * heads * kDv)), got(want.size(), NAN);
  AttentionParams p;
  p.q_token_stride = heads * kDqk, p.q_head_stride = kDqk;
  p.k_token_stride = kDqk, p.k_head_stride = 0, p.v_token_stride = kDqk, p.v_head_stride = 0;
  p.block_size = bs;
  p.out_token_stride = heads * kDv, p.out_head_stride = kDv;
  p.n_q = 1, p.n_q_heads = heads, p.n_kv_heads = 1, p.d_qk = kDqk, p.d_v = kDv;
  p.scale = 1.0f / std::sqrt(float(kDqk)), p.causal = true;
  for (int64_t b = 0; b < B; ++b) {  // the CPU, one sequence at a time
    AttentionParams s = p;
    s.q = in.q.data() + b * heads * kDqk, s.out = want.data() + b * heads * kDv;
    s.k = in.k32.data(), s.v = in.k32.data(), s.kv_dtype = DType::F32;
    s.block_table = in.table.data() + b * width, s.n_kv = lens[size_t(b)], s.q_pos0 = lens[size_t(b)] - 1;
    fathom::cpu::attention(s, pool);
  }
  p.q = in.q.data(), p.out = got.data(), p.k = in.k16.data(), p.v = in.k16.data(), p.kv_dtype = DType::BF16;
  p.block_table = in.table.data(), p.n_kv = bound, p.kv_len = lens.data();
  MlaLaunch a;
  a.p = p;
  a.group = heads, a.rows = heads, a.vec_q = true;
  a.n_chunks = n_chunks, a.chunk = (bound / n_chunks + 63) / 64 * 64;
  a.u.n_seqs = int(B), a.u.row_tiles = 1;
  a.u.q = heads * kDqk, a.u.out = heads * kDv, a.u.table = width;
  a.u.part_o = int64_t(n_chunks) * heads * kDv, a.u.part_ml = int64_t(n_chunks) * heads * 2;
  a.u.wave = wave;
  std::vector<float> part_o(size_t(B * a.u.part_o), 0.f), part_ml(size_t(B * a.u.part_ml));
  for (size_t i = 0; i < part_ml.size(); i += 2) part_ml[i] = -INFINITY, part_ml[i + 1] = 0.f;  // chunks that do not run
  a.part_o = part_o.data(), a.part_ml = part_ml.data();
  run_kernel<2>(a, {unsigned(B * n_chunks), 1, 1});
  // the merge as attention.cu's: a sequence whose keys all fell in chunk 0 (of the chunk
  // uniform_chunk chose: the longest sequence's tiles over as many chunks as fill the wave) was
  // written directly
  int64_t longest = 0;
  for (const int32_t n : lens) longest = std::max<int64_t>(longest, std::min<int64_t>(n, bound));
  const int64_t per = std::max<int64_t>(1, std::min<int64_t>(n_chunks, wave / B));
  const int64_t chunk = ((std::max<int64_t>(1, (longest + 63) / 64) + per - 1) / per) * 64;
  for (int64_t b = 0; b < B; ++b)
    if (lens[size_t(b)] > chunk)
      merge(got.data() + b * heads * kDv, part_o.data() + b * a.u.part_o, part_ml.data() + b * a.u.part_ml, n_chunks,
            1, heads);
  return max_err(got.data(), want.data(), want.size());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) emu::g_timeout_s = std::atof(argv[1]);
  std::mt19937 rng(argc > 2 ? unsigned(std::atoi(argv[2])) : std::random_device{}());
  fathom::ThreadPool pool(2);
  // sizes kept small: 256 emulated threads a block meet at every barrier
  report("decode 16 heads, 200 keys paged (4 tiles, the last partial), one block",
         run_one<2>(1, 16, 200, 16, 1, 256, true, rng, pool));
  report("decode 16 heads, 150 keys in 3 chunks of 64, merged", run_one<2>(1, 16, 150, 0, 3, 64, true, rng, pool));
  report("2 tokens x 8 heads in one row tile, 130 keys paged, causal", run_one<2>(2, 8, 130, 16, 1, 192, true, rng, pool));
  report("prefill 3 queries x 16 heads, 40 keys, causal, 2 chunks", run_one<2>(3, 16, 40, 0, 2, 64, true, rng, pool));
  report("not causal, 70 keys, the one-stage form", run_one<1>(2, 8, 70, 0, 1, 128, false, rng, pool));
  // key counts 5 (alone in chunk 0), 200 and 129 (merged), a bound of 256 keys in 4 chunks
  std::uniform_int_distribution<int> extra(0, 20);
  const std::vector<int32_t> lens = {5, 180 + extra(rng), 129};
  report("uniform batch: key counts " + std::to_string(lens[0]) + ", " + std::to_string(lens[1]) + ", " +
             std::to_string(lens[2]) + " of a 256-key bound, chunks chosen for a wave of 6",
         run_uniform(lens, 256, 4, 6, rng, pool));
  const bool ok = all_ok && !emu::g_problem;
  std::printf(ok ? "ALL OK\n" : "SOME FAILED\n");
  return ok ? 0 : 1;
}
