// CPU emulation of attention_backward_{rows,keys}_tiled_kernel (src/ops/cuda/attention_backward.cu)
// for checking them without a GPU: 256 std::threads per block; __syncthreads, __syncwarp and
// __shfl_xor_sync emulated with timed barriers that check that every thread meets at the same call
// site (a hang is reported with where the threads wait); shared memory starts as NaN; outputs are
// compared with the CPU reference (cpu::attention_backward, built in) on the cases of
// CudaBackward.Attention (tests/attention_backward_cases.h). It found the skipped shuffle that
// hung the kernels on the H200 (2026-11-30). Build and run with scripts/kernel-emu/run.sh [TIMEOUT_S [CASE]];
// ctest runs it as KernelEmu.AttentionBackward (CMake cuts the kernels out at build time).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "attention_backward_cases.h"  // tests/: the cases CudaBackward.Attention checks
#include "ops/cpu/backward.h"
#include "ops/ops.h"

#include "emu_runtime.h"

// ---- CUDA spellings
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __syncthreads() ::emu::syncthreads(__LINE__)
#define __syncwarp(...) ::emu::syncwarp(__LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_xor_sync(mask, v, off) ::emu::shfl_xor(__LINE__, mask, v, off)

namespace fathom::cuda {
namespace {
using emu::blockDim;
using emu::blockIdx;
using emu::emu_sm;
using emu::threadIdx;
using std::max;
using std::min;
constexpr unsigned kFullMask = 0xffffffffu;
inline void pdl_wait() {}
#ifndef KERNELS_FILE
#define KERNELS_FILE "kernels.inc"  // written by run.sh from src/ops/cuda/attention_backward.cu
#endif
#include KERNELS_FILE
}  // namespace
}  // namespace fathom::cuda

using fathom::AttentionParams;
using fathom::cuda::AttnBwd;

// ---- launching
template <typename K>
void launch(const char* name, K kernel, emu::Dim3 grid, size_t smem_bytes, const AttnBwd& a) {
  emu::run_grid(name, grid, smem_bytes, [&] { kernel(a); });
}

// ---- the CPU reference: src/ops/cpu/backward.cpp itself, one sequence
void ref_attention_backward(float* dq, float* dk, float* dv, const float* dout, const AttentionParams& p) {
  fathom::cpu::attention_backward(dq, dk, dv, dout, p);
}

// max |a-b|/(|b|+1) over the elements the reference writes (the emulated outputs start as NaN);
// also counts the elements the reference writes and the kernel left untouched (still NaN) and the
// padding elements the kernel overwrote.
struct Err { double max = 0; int64_t missing = 0, stray = 0; };
Err compare(const std::vector<float>& got, const std::vector<float>& want, const std::vector<char>& written) {
  Err e;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!written[i]) {
      if (!std::isnan(got[i])) ++e.stray;
      continue;
    }
    const double d = std::fabs(double(got[i]) - want[i]) / (std::fabs(want[i]) + 1.0);
    if (std::isnan(got[i])) ++e.missing;
    if (!(d <= e.max)) e.max = std::isnan(d) ? INFINITY : d;
  }
  return e;
}

int main(int argc, char** argv) {
  if (argc > 1) emu::g_timeout_s = std::atof(argv[1]);
  const int only = argc > 2 ? std::atoi(argv[2]) : -1;
  std::mt19937 rng(12345);
  bool all_ok = true;
  int idx = -1;
  for (const fathom::test::AttentionBackwardCase& c : fathom::test::kAttentionBackwardCases) {
    ++idx;
    if (only >= 0 && idx != only) continue;
    const int64_t q_hs = c.dqk, q_ts = c.hq * q_hs + 3, k_hs = c.dqk, k_ts = c.hkv * k_hs + 1;
    const int64_t v_hs = c.dv, v_ts = c.hkv * v_hs + 2, o_hs = c.dv, o_ts = c.hq * o_hs;
    auto randn = [&](int64_t n) {
      std::vector<float> t(static_cast<size_t>(n));
      std::normal_distribution<float> d(0.f, 1.f);
      for (auto& x : t) x = d(rng);
      return t;
    };
    const auto q = randn(c.n_seq * c.n_q * q_ts), k = randn(c.n_seq * c.n_kv * k_ts), v = randn(c.n_seq * c.n_kv * v_ts);
    const auto dout = randn(c.n_seq * c.n_q * o_ts);
    AttentionParams p;
    p.q_token_stride = q_ts, p.q_head_stride = q_hs, p.k_token_stride = k_ts, p.k_head_stride = k_hs;
    p.v_token_stride = v_ts, p.v_head_stride = v_hs, p.out_token_stride = o_ts, p.out_head_stride = o_hs;
    p.n_q = c.n_q, p.n_kv = c.n_kv, p.q_pos0 = c.q_pos0, p.n_q_heads = c.hq, p.n_kv_heads = c.hkv;
    p.d_qk = c.dqk, p.d_v = c.dv, p.scale = 1.0f / std::sqrt(float(c.dqk)), p.causal = c.causal;
    p.q = q.data(), p.k = k.data(), p.v = v.data();
    // reference, sequence by sequence (cpu_ops.cpp's loop)
    std::vector<float> rq(q.size(), 0.f), rk(k.size(), 0.f), rv(v.size(), 0.f);
    for (int64_t b = 0; b < c.n_seq; ++b) {
      AttentionParams ps = p;
      ps.q += b * p.n_q * p.q_token_stride;
      ps.k = k.data() + b * p.n_kv * p.k_token_stride;
      ps.v = v.data() + b * p.n_kv * p.v_token_stride;
      ref_attention_backward(rq.data() + b * p.n_q * q_ts, rk.data() + b * p.n_kv * k_ts, rv.data() + b * p.n_kv * v_ts,
                             dout.data() + b * p.n_q * o_ts, ps);
    }
    // which elements the reference writes: mark by running it on a NaN-free "written" mask
    auto mask = [&](int64_t nrows, int64_t ts, int64_t hs, int heads, int d) {
      std::vector<char> w(size_t(c.n_seq * nrows * ts), 0);
      for (int64_t r = 0; r < c.n_seq * nrows; ++r)
        for (int h = 0; h < heads; ++h)
          for (int e = 0; e < d; ++e) w[size_t(r * ts + h * hs + e)] = 1;
      return w;
    };
    const auto wq = mask(c.n_q, q_ts, q_hs, c.hq, c.dqk), wk = mask(c.n_kv, k_ts, k_hs, c.hkv, c.dqk),
               wv = mask(c.n_kv, v_ts, v_hs, c.hkv, c.dv);
    // emulated launcher
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::vector<float> gq(q.size(), nan), gk(k.size(), nan), gv(v.size(), nan);
    const int64_t rows = p.n_q * p.n_q_heads;
    std::vector<float> stats(size_t(std::max<int64_t>(rows * c.n_seq, 1)) * 2, nan);
    float* lse = stats.data();
    float* delta = lse + rows * c.n_seq;
    const AttnBwd a{p, dout.data(), gq.data(), gk.data(), gv.data(), lse, delta};
    using namespace fathom::cuda;
    const auto t0 = std::chrono::steady_clock::now();
    launch("rows_tiled", attention_backward_rows_tiled_kernel,
           {unsigned((p.n_q + kTile - 1) / kTile), unsigned(p.n_q_heads), unsigned(c.n_seq)}, rows_tiled_smem(p), a);
    launch("keys_tiled", attention_backward_keys_tiled_kernel,
           {unsigned((p.n_kv + kTile - 1) / kTile), unsigned(p.n_kv_heads), unsigned(c.n_seq)}, keys_tiled_smem(p), a);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const Err eq = compare(gq, rq, wq), ek = compare(gk, rk, wk), ev = compare(gv, rv, wv);
    int64_t lse_nan = 0;
    for (float x : stats) lse_nan += std::isnan(x);
    const bool ok = eq.max <= 1e-4 && ek.max <= 1e-4 && ev.max <= 1e-4 && !eq.stray && !ek.stray && !ev.stray &&
                    !lse_nan && !emu::g_problem;
    all_ok &= ok;
    std::printf("%-58s %s  dq %.3g dk %.3g dv %.3g  (missing %lld/%lld/%lld, stray %lld/%lld/%lld, lse/D NaN %lld) "
                "smem %zu/%zu B, %.1fs\n",
                c.what, ok ? "OK  " : "FAIL", eq.max, ek.max, ev.max, (long long)eq.missing, (long long)ek.missing,
                (long long)ev.missing, (long long)eq.stray, (long long)ek.stray, (long long)ev.stray,
                (long long)lse_nan, rows_tiled_smem(p), keys_tiled_smem(p), secs);
    std::fflush(stdout);
  }
  std::printf(all_ok ? "ALL OK\n" : "SOME FAILED\n");
  return all_ok ? 0 : 1;
}
