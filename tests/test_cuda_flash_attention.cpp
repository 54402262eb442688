// Flash attention on the GPU (src/ops/cuda/flash_attention.cu) against the CPU reference
// (src/ops/cpu/flash_attention.cpp: scores and softmax in double), on fresh random inputs each
// run (the seed is printed with a failure), for each kernel (SIMT; wgmma on an sm_90a device):
//   out (bf16)  |gpu - ref| <= 1e-2 + 1e-2 |ref| per element: the output's own bf16 rounding
//               (2^-9 relative) and, in the wgmma kernel, P rounded to bf16 before P V
//   lse (fp32)  |gpu - ref| <= 1e-3: scores are exact products of bf16 values summed in fp32
// over packed ragged batches (lengths 1, 17, 128, 130, 300 and more: tails of every tile size),
// causal and not, self-attention and chunked prefill (more keys than queries), GQA and MQA, head
// dims 64/64, 128/128, 192/128 and an odd one (SIMT only), strided layouts. Outputs start as NaN
// (0xFF bytes): an unwritten element fails, and a NaN never passes a bound. Skips without a GPU.
// The model's attention op (cuda::attention) hands bf16 prefills to the flash kernel: checked
// against cpu::attention on a chunk after a cached prefix, contiguous and paged keys, with the
// bounds of the output above.
// The backward (dq, dk, dv from the GPU forward's out and lse) against cpu::flash_attention_backward:
//   |gpu - ref| <= 1e-2 max|ref| + 2e-2 |ref| per element of each gradient: P and dS enter the
//   tensor-core products rounded to bf16 (2^-9 relative), D = Σ dout · out uses the bf16 output
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/tensor.h"
#include "core/thread_pool.h"
#include "ops/cpu/attention.h"
#include "ops/cpu/flash_attention.h"
#include "ops/ops.h"

#ifdef FATHOM_HAVE_CUDA
#include <cuda_runtime.h>

#include <functional>

#include "ops/cuda/cuda_ops.h"
#endif

namespace fathom {
namespace {

#ifndef FATHOM_HAVE_CUDA

TEST(CudaFlashAttention, Skipped) { GTEST_SKIP() << "built without CUDA (nvcc was not found at configure time)"; }

#else

using cuda::FlashKernel;

// One packed batch: lengths per sequence, heads, dims, and the layout's extra row padding.
struct Case {
  std::vector<int> lq, lk;
  int heads, kv_heads, d_qk, d_v;
  bool causal;
  int pad = 0;  // extra elements per token row of q, k, v and out (strided layouts)
};

class CudaFlashAttention : public testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device on this machine: flash attention tests skipped";
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    trace_ = std::make_unique<testing::ScopedTrace>(__FILE__, __LINE__, cat("random seed ", seed_));
    gpu_ = make_cuda_ops(0);
    cuda::flash_attention_setup();
  }
  void TearDown() override { trace_.reset(); }

  std::vector<uint16_t> randn_bf16(int64_t n, float sd) {
    std::normal_distribution<float> d(0.f, sd);
    std::vector<uint16_t> v(static_cast<size_t>(n));
    for (auto& x : v) x = f32_to_bf16(d(rng_));
    return v;
  }
  Tensor up(const void* p, int64_t bytes) {
    Tensor t = Tensor::empty({bytes}, DType::U8);
    std::memcpy(t.data(), p, size_t(bytes));
    return gpu_->upload(t);
  }
  Tensor poison(int64_t bytes) {
    Tensor t = Tensor::empty({bytes}, DType::U8);
    std::memset(t.data(), 0xFF, size_t(bytes));
    return gpu_->upload(t);
  }
  template <typename T>
  std::vector<T> down(const Tensor& t, int64_t n) {
    std::vector<T> v(static_cast<size_t>(n));
    Tensor h = Tensor::empty(t.shape(), t.dtype());
    gpu_->download(h.data(), t);
    std::memcpy(v.data(), h.data(), v.size() * sizeof(T));
    return v;
  }

  // The case's shapes and strides (pointers unset), its sequence table in cu_q / cu_k.
  static FlashAttentionParams layout(const Case& c, float scale_mul, std::vector<int32_t>& cu_q,
                                     std::vector<int32_t>& cu_k) {
    FlashAttentionParams p;
    cu_q = {0}, cu_k = {0};
    for (size_t b = 0; b < c.lq.size(); ++b) {
      cu_q.push_back(cu_q.back() + c.lq[b]);
      cu_k.push_back(cu_k.back() + c.lk[b]);
      p.max_seqlen_q = std::max(p.max_seqlen_q, c.lq[b]);
      p.max_seqlen_k = std::max(p.max_seqlen_k, c.lk[b]);
    }
    p.batch = int(c.lq.size()), p.total_q = cu_q.back(), p.total_k = cu_k.back();
    p.n_heads = c.heads, p.n_kv_heads = c.kv_heads, p.d_qk = c.d_qk, p.d_v = c.d_v, p.causal = c.causal;
    p.scale = scale_mul / std::sqrt(float(c.d_qk));
    p.q_head_stride = p.k_head_stride = c.d_qk, p.v_head_stride = p.out_head_stride = c.d_v;
    p.q_token_stride = int64_t(c.heads) * c.d_qk + c.pad, p.k_token_stride = int64_t(c.kv_heads) * c.d_qk + c.pad;
    p.v_token_stride = int64_t(c.kv_heads) * c.d_v + c.pad, p.out_token_stride = int64_t(c.heads) * c.d_v + c.pad;
    return p;
  }

  // Runs the case on the CPU and with `kernel` on the GPU; returns the worst error ratios
  // (error / bound) of out and lse, failing the test past 1.
  // run: launches the forward on the GPU's arguments (default: flash_attention_forward on the
  // default stream).
  void check(const Case& c, FlashKernel kernel, float scale_mul = 1.0f,
             const std::function<void(const FlashAttentionParams&)>& run = {}) {
    std::vector<int32_t> cu_q, cu_k;
    const FlashAttentionParams p = layout(c, scale_mul, cu_q, cu_k);
    const int64_t tq = p.total_q, tk = p.total_k;
    const std::vector<uint16_t> q = randn_bf16(tq * p.q_token_stride, 1.0f), k = randn_bf16(tk * p.k_token_stride, 1.0f),
                                v = randn_bf16(tk * p.v_token_stride, 1.0f);
    // the reference
    std::vector<uint16_t> out_cpu(size_t(tq * p.out_token_stride));
    std::vector<float> ref(size_t(tq * c.heads * c.d_v)), lse_ref(size_t(tq * c.heads));
    {
      FlashAttentionParams r = p;
      r.q = q.data(), r.k = k.data(), r.v = v.data(), r.out = out_cpu.data(), r.lse = lse_ref.data();
      r.cu_seqlens_q = cu_q.data(), r.cu_seqlens_k = cu_k.data();
      cpu::flash_attention_forward(r, pool_, ref.data());
    }
    // the GPU
    const Tensor dq = up(q.data(), int64_t(q.size()) * 2), dk = up(k.data(), int64_t(k.size()) * 2),
                 dv = up(v.data(), int64_t(v.size()) * 2), dcq = up(cu_q.data(), int64_t(cu_q.size()) * 4),
                 dck = up(cu_k.data(), int64_t(cu_k.size()) * 4);
    Tensor dout = poison(tq * p.out_token_stride * 2), dlse = poison(tq * c.heads * 4);
    FlashAttentionParams g = p;
    g.q = static_cast<const uint16_t*>(dq.data()), g.k = static_cast<const uint16_t*>(dk.data());
    g.v = static_cast<const uint16_t*>(dv.data()), g.out = static_cast<uint16_t*>(dout.data());
    g.lse = static_cast<float*>(dlse.data());
    g.cu_seqlens_q = static_cast<const int32_t*>(dcq.data()), g.cu_seqlens_k = static_cast<const int32_t*>(dck.data());
    cuda::device_synchronize();
    if (run) run(g);
    else cuda::flash_attention_forward(g, nullptr, kernel);
    cuda::device_synchronize();
    const std::vector<uint16_t> out = down<uint16_t>(dout, tq * p.out_token_stride);
    const std::vector<float> lse = down<float>(dlse, tq * c.heads);
    double worst_out = 0, worst_lse = 0;
    int64_t bad = 0;
    for (int64_t t = 0; t < tq; ++t)
      for (int h = 0; h < c.heads; ++h) {
        const float lr = lse_ref[size_t(h * tq + t)], lg = lse[size_t(h * tq + t)];
        const double el = std::isinf(lr) ? (lg == lr ? 0.0 : 1e9) : std::fabs(double(lg) - lr) / 1e-3;
        if (!(el <= 1.0) && bad++ < 5) ADD_FAILURE() << "lse of token " << t << " head " << h << ": " << lg << " vs " << lr;
        worst_lse = std::max(worst_lse, std::isnan(el) ? 1e9 : el);
        for (int d = 0; d < c.d_v; ++d) {
          const float r = ref[size_t((t * c.heads + h) * c.d_v + d)];
          const float o = bf16_to_f32(out[size_t(t * p.out_token_stride + h * p.out_head_stride + d)]);
          const double e = std::fabs(double(o) - r) / (1e-2 + 1e-2 * std::fabs(r));
          if (!(e <= 1.0) && bad++ < 5)
            ADD_FAILURE() << "out of token " << t << " head " << h << " dim " << d << ": " << o << " vs " << r;
          worst_out = std::max(worst_out, std::isnan(e) ? 1e9 : e);
        }
      }
    std::printf("  %s qk %d v %d heads %d/%d %s pad %d: worst out %.3f, lse %.3f of the bound\n",
                kernel == FlashKernel::Wgmma ? "wgmma" : "simt ", c.d_qk, c.d_v, c.heads, c.kv_heads,
                c.causal ? "causal" : "full  ", c.pad, worst_out, worst_lse);
  }
  // The backward on the case (after the GPU forward with the same kernel), against the CPU's.
  void check_backward(const Case& c, FlashKernel kernel) {
    std::vector<int32_t> cu_q, cu_k;
    const FlashAttentionParams p = layout(c, 1.0f, cu_q, cu_k);
    const int64_t tq = p.total_q, tk = p.total_k;
    const std::vector<uint16_t> q = randn_bf16(tq * p.q_token_stride, 1.0f), k = randn_bf16(tk * p.k_token_stride, 1.0f),
                                v = randn_bf16(tk * p.v_token_stride, 1.0f),
                                dout = randn_bf16(tq * p.out_token_stride, 1.0f);
    const int64_t nq = tq * c.heads * c.d_qk, nk = tk * c.kv_heads * c.d_qk, nv = tk * c.kv_heads * c.d_v;
    std::vector<float> rq(static_cast<size_t>(nq)), rk(static_cast<size_t>(nk)), rv(static_cast<size_t>(nv));
    {
      std::vector<uint16_t> out(size_t(tq * p.out_token_stride));
      FlashAttentionParams r = p;
      r.q = q.data(), r.k = k.data(), r.v = v.data(), r.out = out.data();
      r.cu_seqlens_q = cu_q.data(), r.cu_seqlens_k = cu_k.data();
      FlashAttentionGrads rg;
      rg.dout = dout.data(), rg.dout_token_stride = p.out_token_stride, rg.dout_head_stride = p.out_head_stride;
      rg.dq = rq.data(), rg.dk = rk.data(), rg.dv = rv.data();
      cpu::flash_attention_backward(r, rg, pool_);
    }
    const Tensor dq = up(q.data(), int64_t(q.size()) * 2), dk = up(k.data(), int64_t(k.size()) * 2),
                 dv = up(v.data(), int64_t(v.size()) * 2), ddo = up(dout.data(), int64_t(dout.size()) * 2),
                 dcq = up(cu_q.data(), int64_t(cu_q.size()) * 4), dck = up(cu_k.data(), int64_t(cu_k.size()) * 4);
    Tensor dout_gpu = poison(tq * p.out_token_stride * 2), dlse = poison(tq * c.heads * 4);
    Tensor gq = poison(nq * 4), gk = poison(nk * 4), gv = poison(nv * 4);
    FlashAttentionParams g = p;
    g.q = static_cast<const uint16_t*>(dq.data()), g.k = static_cast<const uint16_t*>(dk.data());
    g.v = static_cast<const uint16_t*>(dv.data()), g.out = static_cast<uint16_t*>(dout_gpu.data());
    g.lse = static_cast<float*>(dlse.data());
    g.cu_seqlens_q = static_cast<const int32_t*>(dcq.data()), g.cu_seqlens_k = static_cast<const int32_t*>(dck.data());
    FlashAttentionGrads gg;
    gg.dout = static_cast<const uint16_t*>(ddo.data());
    gg.dout_token_stride = p.out_token_stride, gg.dout_head_stride = p.out_head_stride;
    gg.dq = static_cast<float*>(gq.data()), gg.dk = static_cast<float*>(gk.data()), gg.dv = static_cast<float*>(gv.data());
    cuda::device_synchronize();
    cuda::flash_attention_forward(g, nullptr, kernel);
    cuda::flash_attention_backward(g, gg, nullptr, kernel);
    cuda::device_synchronize();
    double worst[3] = {0, 0, 0};
    const char* names[3] = {"dq", "dk", "dv"};
    const std::vector<float>* refs[3] = {&rq, &rk, &rv};
    const Tensor* got[3] = {&gq, &gk, &gv};
    for (int x = 0; x < 3; ++x) {
      const std::vector<float>& ref = *refs[x];
      const std::vector<float> gpu = down<float>(*got[x], int64_t(ref.size()));
      double mx = 0;
      for (float r : ref) mx = std::max(mx, double(std::fabs(r)));
      int bad = 0;
      for (size_t i = 0; i < ref.size(); ++i) {
        const double e = std::fabs(double(gpu[i]) - ref[i]) / (1e-2 * mx + 2e-2 * std::fabs(ref[i]) + 1e-12);
        if (!(e <= 1.0) && bad++ < 5) ADD_FAILURE() << names[x] << "[" << i << "]: " << gpu[i] << " vs " << ref[i];
        worst[x] = std::max(worst[x], std::isnan(e) ? 1e9 : e);
      }
    }
    std::printf("  backward %s qk %d v %d heads %d/%d %s pad %d: worst dq %.3f, dk %.3f, dv %.3f of the bound\n",
                kernel == FlashKernel::Wgmma ? "wgmma" : "simt ", c.d_qk, c.d_v, c.heads, c.kv_heads,
                c.causal ? "causal" : "full  ", c.pad, worst[0], worst[1], worst[2]);
  }
  std::vector<FlashKernel> kernels(const Case& c) {
    std::vector<FlashKernel> ks{FlashKernel::Simt};
    FlashAttentionParams p;
    p.d_qk = c.d_qk, p.d_v = c.d_v, p.total_k = 1;
    const char* why = cuda::flash_wgmma_refusal(p);  // (null pointers are aligned)
    if (!why) ks.push_back(FlashKernel::Wgmma);
    else if (!warned_++) std::printf("  the wgmma kernel is not tested: %s\n", why);
    return ks;
  }

  uint32_t seed_ = 0;
  std::mt19937 rng_;
  std::unique_ptr<testing::ScopedTrace> trace_;
  std::unique_ptr<Ops> gpu_;
  ThreadPool pool_{4};
  int warned_ = 0;
};

TEST_F(CudaFlashAttention, RaggedSelfAttentionMatchesTheCpu) {
  for (const auto& [dqk, dv] : std::vector<std::pair<int, int>>{{64, 64}, {128, 128}, {192, 128}})
    for (const bool causal : {true, false}) {
      const Case c{{1, 17, 128, 130, 300, 255}, {1, 17, 128, 130, 300, 255}, 4, 4, dqk, dv, causal};
      for (const FlashKernel k : kernels(c)) check(c, k);
    }
}

TEST_F(CudaFlashAttention, ChunkedPrefillGqaAndMqa) {
  // more keys than queries (a chunk after a cached prefix: the causal diagonal moves right), and
  // fewer keys than queries (the first queries see nothing: zero output, lse -inf)
  for (const int kv : {2, 1}) {
    const Case c{{64, 129, 200, 7}, {300, 129, 460, 3}, 4, kv, 128, 128, true};
    for (const FlashKernel k : kernels(c)) check(c, k);
    const Case m{{192, 100}, {320, 40}, 6, kv, 192, 128, true};
    for (const FlashKernel k : kernels(m)) check(m, k);
  }
}

// Every forward schedule (flash_attention.cu: the serial kernel with 2 or 3 warpgroups, the
// warp-specialized pipelined one with 2 or 3 consumers, with and without ping-pong), chosen by
// FATHOM_FLASH_SCHEDULE, and their persistent forms (-p: the 40 ragged sequences make ~1,000 query
// blocks, several a block); a name a head-dim pair lacks falls back to its default. Includes blocks
// whose queries all see no key (300 causal queries after 20 keys).
TEST_F(CudaFlashAttention, EveryForwardScheduleMatchesTheCpu) {
  // many ragged sequences: blocks whose last consumers' queries lie past the sequence, or whose
  // diagonal tiles are wholly masked for some consumers and not for others (which skip them)
  std::vector<int> ragged;
  for (int i = 0; i < 40; ++i) ragged.push_back(1 + (i * 97) % 520);
  for (const char* schedule : {"serial2", "serial3", "ws", "pingpong", "ws3", "pingpong3", "ws-p", "pingpong3-p"}) {
    SCOPED_TRACE(schedule);
    ::setenv("FATHOM_FLASH_SCHEDULE", schedule, 1);
    for (const auto& [dqk, dv] : std::vector<std::pair<int, int>>{{64, 64}, {128, 128}, {192, 128}}) {
      const Case c{{1, 130, 300, 255}, {1, 130, 300, 255}, 4, 2, dqk, dv, true};
      const Case f{{17, 300}, {17, 300}, 2, 1, dqk, dv, false};
      const Case blind{{300, 64}, {20, 200}, 2, 2, dqk, dv, true};
      const Case many{ragged, ragged, 8, 2, dqk, dv, true};
      for (const Case* x : {&c, &f, &blind, &many})
        if (kernels(*x).size() > 1) check(*x, FlashKernel::Wgmma);
    }
  }
  ::unsetenv("FATHOM_FLASH_SCHEDULE");
}

// The persistent forward's counters (flash_sched_counters, one pair a stream) inside CUDA graphs:
// a stream's first forward inside a capture runs the grid form (no counters can be made there);
// once the stream has its counters, captured forwards use them, and each replay leaves them reset
// for the next — the second replay, into a poisoned output, must compute every query block again.
TEST_F(CudaFlashAttention, PersistentForwardInCapturedGraphs) {
  std::vector<int> ragged;
  for (int i = 0; i < 40; ++i) ragged.push_back(1 + (i * 97) % 520);
  const Case many{ragged, ragged, 8, 2, 128, 128, true};
  if (kernels(many).size() < 2) GTEST_SKIP() << "no sm_90a kernels on this GPU";
  for (const bool counters_first : {false, true}) {
    SCOPED_TRACE(counters_first ? "counters made before the capture" : "first use inside the capture");
    cudaStream_t st = nullptr;
    ASSERT_EQ(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
    check(many, FlashKernel::Wgmma, 1.0f, [&](const FlashAttentionParams& g) {
      if (counters_first) {
        cuda::flash_attention_forward(g, st, FlashKernel::Wgmma);
        ASSERT_EQ(cudaStreamSynchronize(st), cudaSuccess);
      }
      cudaGraph_t graph = nullptr;
      cudaGraphExec_t exec = nullptr;
      ASSERT_EQ(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal), cudaSuccess);
      cuda::flash_attention_forward(g, st, FlashKernel::Wgmma);
      ASSERT_EQ(cudaStreamEndCapture(st, &graph), cudaSuccess);
      ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
      const size_t out_bytes = size_t(g.total_q * g.out_token_stride) * 2;
      for (int replay = 0; replay < 2; ++replay) {
        ASSERT_EQ(cudaMemsetAsync(g.out, 0xFF, out_bytes, st), cudaSuccess);  // NaN: unwritten rows fail
        ASSERT_EQ(cudaGraphLaunch(exec, st), cudaSuccess);
        ASSERT_EQ(cudaStreamSynchronize(st), cudaSuccess);
      }
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);
    });
    cudaStreamDestroy(st);
  }
}

TEST_F(CudaFlashAttention, LongSequencesAndPeakedScores) {
  // many key tiles (the ring of stages wraps several times), scores sharp enough that a key
  // wrongly masked or let through moves the output
  const Case c{{1000, 777}, {1000, 777}, 2, 1, 128, 128, true};
  for (const FlashKernel k : kernels(c)) check(c, k, 4.0f);
  const Case d{{1100}, {1100}, 2, 2, 64, 64, false};
  for (const FlashKernel k : kernels(d)) check(d, k, 4.0f);
}

TEST_F(CudaFlashAttention, StridedLayouts) {
  // rows padded by 8 elements (16 bytes: still TMA-able) as when q, k and v sit in one buffer
  const Case c{{130, 61}, {130, 61}, 4, 2, 128, 128, true, 8};
  for (const FlashKernel k : kernels(c)) check(c, k);
  const Case odd{{33, 5}, {33, 9}, 3, 1, 40, 24, true, 3};  // odd dims and strides: SIMT only
  check(odd, FlashKernel::Simt);
}

TEST_F(CudaFlashAttention, BackwardMatchesTheCpu) {
  for (const auto& [dqk, dv] : std::vector<std::pair<int, int>>{{64, 64}, {128, 128}, {192, 128}})
    for (const bool causal : {true, false}) {
      const Case c{{1, 17, 130, 300}, {1, 17, 130, 300}, 4, 2, dqk, dv, causal};
      for (const FlashKernel k : kernels(c)) check_backward(c, k);
    }
  // chunked prefill (more keys than queries, and fewer: queries that see nothing), MQA, padding
  const Case m{{64, 200, 7}, {300, 460, 3}, 4, 1, 128, 128, true, 8};
  for (const FlashKernel k : kernels(m)) check_backward(m, k);
  const Case odd{{33, 5}, {33, 9}, 3, 1, 40, 24, true, 3};
  check_backward(odd, FlashKernel::Simt);
  // a sequence with keys but no queries: its keys' gradients are zero, and still written
  const Case none{{0, 40}, {9, 40}, 2, 1, 64, 64, false};
  for (const FlashKernel k : kernels(none)) check_backward(none, k);
}

// Every backward form (flash_attention_backward.cu: the serial kernels; the warp-specialized ones
// with the dK dV kernel taking its tiles in order; with the dQ kernel reading Q and dout from
// shared memory; the pipelined two kernels, deterministic; the one-pass kernel at qk 128,
// flash_attention_backward_onepass.cu), chosen by FATHOM_FLASH_BACKWARD.
TEST_F(CudaFlashAttention, EveryBackwardFormMatchesTheCpu) {
  // (many, for the default form: 40 ragged sequences, ~1,000 query blocks and ~300 key blocks,
  // several waves of them)
  std::vector<int> ragged;
  for (int i = 0; i < 40; ++i) ragged.push_back(1 + (i * 97) % 520);
  for (const char* form : {"serial", "ws-serial", "ws-ss", "ws", "onepass"}) {
    SCOPED_TRACE(form);
    ::setenv("FATHOM_FLASH_BACKWARD", form, 1);
    for (const auto& [dqk, dv] : std::vector<std::pair<int, int>>{{64, 64}, {128, 128}, {192, 128}}) {
      const Case c{{1, 130, 300}, {1, 130, 300}, 4, 2, dqk, dv, true};
      const Case m{{64, 200, 7}, {300, 460, 3}, 4, 1, dqk, dv, true, 8};
      const Case f{{17, 260}, {17, 260}, 2, 2, dqk, dv, false};
      const Case many{ragged, ragged, 8, 2, dqk, dv, true};
      for (const Case* x : {&c, &m, &f, &many})
        if (kernels(*x).size() > 1 && (x != &many || !std::strcmp(form, "ws") || !std::strcmp(form, "onepass")))
          check_backward(*x, FlashKernel::Wgmma);
    }
  }
  ::unsetenv("FATHOM_FLASH_BACKWARD");
}

// The deterministic backward has no atomics (every gradient has one owner): two runs on the same
// inputs give the same bits (the default at qk 128 sums dQ by atomics: the one-pass kernel).
TEST_F(CudaFlashAttention, BackwardRepeatsBitForBit) {
  // two runs on the same inputs (check_backward draws fresh ones each call)
  const int64_t T = 300, H = 4, G = 2, D = 128;
  std::vector<int32_t> cu{0, int32_t(T)};
  const std::vector<uint16_t> q = randn_bf16(T * H * D, 1.f), k = randn_bf16(T * G * D, 1.f),
                              v = randn_bf16(T * G * D, 1.f), dout = randn_bf16(T * H * D, 1.f);
  const Tensor gq = up(q.data(), int64_t(q.size()) * 2), gk = up(k.data(), int64_t(k.size()) * 2),
               gv = up(v.data(), int64_t(v.size()) * 2), gdo = up(dout.data(), int64_t(dout.size()) * 2),
               gcu = up(cu.data(), 8);
  Tensor go = poison(T * H * D * 2), glse = poison(T * H * 4), dq = poison(T * H * D * 4), dk = poison(T * G * D * 4),
         dv = poison(T * G * D * 4);
  FlashAttentionParams p;
  p.q = static_cast<const uint16_t*>(gq.data()), p.k = static_cast<const uint16_t*>(gk.data());
  p.v = static_cast<const uint16_t*>(gv.data()), p.out = static_cast<uint16_t*>(go.data());
  p.lse = static_cast<float*>(glse.data());
  p.q_token_stride = H * D, p.q_head_stride = D, p.k_token_stride = G * D, p.k_head_stride = D;
  p.v_token_stride = G * D, p.v_head_stride = D, p.out_token_stride = H * D, p.out_head_stride = D;
  p.cu_seqlens_q = p.cu_seqlens_k = static_cast<const int32_t*>(gcu.data());
  p.batch = 1, p.total_q = p.total_k = T, p.max_seqlen_q = p.max_seqlen_k = int(T);
  p.n_heads = int(H), p.n_kv_heads = int(G), p.d_qk = p.d_v = int(D), p.scale = 0.088f, p.causal = true;
  FlashAttentionGrads g;
  g.dout = static_cast<const uint16_t*>(gdo.data()), g.dout_token_stride = H * D, g.dout_head_stride = D;
  g.dq = static_cast<float*>(dq.data()), g.dk = static_cast<float*>(dk.data()), g.dv = static_cast<float*>(dv.data());
  g.deterministic = true;
  std::vector<uint32_t> bits[2];
  for (int run = 0; run < 2; ++run) {
    cuda::device_synchronize();
    cuda::flash_attention_forward(p, nullptr);
    cuda::flash_attention_backward(p, g, nullptr);
    cuda::device_synchronize();
    for (const Tensor* t : {&dq, &dk, &dv}) {
      const std::vector<uint32_t> b = down<uint32_t>(*t, t->numel() / 4);
      bits[run].insert(bits[run].end(), b.begin(), b.end());
    }
  }
  EXPECT_EQ(bits[0], bits[1]) << "two runs of the deterministic backward differ";
}

TEST_F(CudaFlashAttention, ModelPrefillTakesTheFlashKernel) {
  std::normal_distribution<float> nd(0.f, 1.f);
  for (const auto& [dqk, dv] : std::vector<std::pair<int, int>>{{192, 128}, {128, 128}})
    for (const bool paged : {false, true}) {
      const int H = 4, bs = 16;
      const int64_t n_q = 200, q_pos0 = 56, n_kv = q_pos0 + n_q, blocks = (n_kv + bs - 1) / bs;
      std::vector<float> q(size_t(n_q * H * dqk)), out(size_t(n_q * H * dv));
      for (auto& x : q) x = nd(rng_);
      std::vector<uint16_t> k(size_t(blocks * bs * H * dqk)), v(size_t(blocks * bs * H * dv));
      for (auto& x : k) x = f32_to_bf16(nd(rng_));
      for (auto& x : v) x = f32_to_bf16(nd(rng_));
      std::vector<int32_t> table(static_cast<size_t>(blocks));
      for (int64_t b = 0; b < blocks; ++b) table[size_t(b)] = int32_t((b * 7 + 3) % blocks);  // a permutation
      AttentionParams p;
      p.q_token_stride = int64_t(H) * dqk, p.q_head_stride = dqk;
      p.k_token_stride = int64_t(H) * dqk, p.k_head_stride = dqk;
      p.v_token_stride = int64_t(H) * dv, p.v_head_stride = dv;
      p.out_token_stride = int64_t(H) * dv, p.out_head_stride = dv;
      p.kv_dtype = DType::BF16, p.block_size = paged ? bs : 0;
      p.n_q = n_q, p.n_kv = n_kv, p.q_pos0 = q_pos0, p.n_q_heads = H, p.n_kv_heads = H, p.d_qk = dqk, p.d_v = dv;
      p.scale = 1.0f / std::sqrt(float(dqk)), p.causal = true;
      if (!cuda::flash_prefill_takes(p)) {
        std::printf("  the model's attention stays off the flash kernel here (no sm_90a device)\n");
        return;
      }
      // (the CPU's attention reads F32 keys: the same bf16 values widened)
      std::vector<float> kf(k.size()), vf(v.size());
      for (size_t i = 0; i < k.size(); ++i) kf[i] = bf16_to_f32(k[i]);
      for (size_t i = 0; i < v.size(); ++i) vf[i] = bf16_to_f32(v[i]);
      AttentionParams c = p;
      c.kv_dtype = DType::F32;
      c.q = q.data(), c.k = kf.data(), c.v = vf.data(), c.out = out.data(), c.block_table = paged ? table.data() : nullptr;
      cpu::attention(c, pool_);
      const Tensor gq = up(q.data(), int64_t(q.size()) * 4), gk = up(k.data(), int64_t(k.size()) * 2),
                   gv = up(v.data(), int64_t(v.size()) * 2), gt = up(table.data(), int64_t(table.size()) * 4);
      Tensor go = poison(int64_t(out.size()) * 4);
      AttentionParams g = p;
      g.q = static_cast<const float*>(gq.data()), g.k = gk.data(), g.v = gv.data();
      g.out = static_cast<float*>(go.data()), g.block_table = paged ? static_cast<const int32_t*>(gt.data()) : nullptr;
      cuda::device_synchronize();
      cuda::attention(g, nullptr);
      cuda::device_synchronize();
      const std::vector<float> got = down<float>(go, int64_t(out.size()));
      double worst = 0;
      int bad = 0;
      for (size_t i = 0; i < out.size(); ++i) {
        const double e = std::fabs(double(got[i]) - out[i]) / (1e-2 + 1e-2 * std::fabs(out[i]));
        if (!(e <= 1.0) && bad++ < 5) ADD_FAILURE() << "out[" << i << "] " << got[i] << " vs " << out[i];
        worst = std::max(worst, std::isnan(e) ? 1e9 : e);
      }
      std::printf("  model attention, qk %d v %d %s: worst %.3f of the bound\n", dqk, dv, paged ? "paged " : "contiguous",
                  worst);
    }
}

TEST_F(CudaFlashAttention, BadArgumentsAreErrors) {
  FlashAttentionParams p;
  std::vector<int32_t> cu{0, 4};
  const Tensor dcu = up(cu.data(), 8), buf = poison(4 * 4 * 128 * 2);
  p.q = p.k = p.v = static_cast<const uint16_t*>(buf.data());
  p.out = static_cast<uint16_t*>(const_cast<void*>(buf.data()));
  p.cu_seqlens_q = p.cu_seqlens_k = static_cast<const int32_t*>(dcu.data());
  p.batch = 1, p.total_q = p.total_k = 4, p.max_seqlen_q = p.max_seqlen_k = 4;
  p.n_heads = 4, p.n_kv_heads = 3, p.d_qk = p.d_v = 128;
  p.q_head_stride = p.k_head_stride = p.v_head_stride = p.out_head_stride = 128;
  p.q_token_stride = p.k_token_stride = p.v_token_stride = p.out_token_stride = 512;
  auto message = [&](FlashKernel k) {
    try {
      cuda::flash_attention_forward(p, nullptr, k);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message(FlashKernel::Auto).find("cannot share 3 key/value heads"), std::string::npos);
  p.n_kv_heads = 4, p.d_v = 96;
  EXPECT_NE(message(FlashKernel::Wgmma).find("head dims (qk, v) must be"), std::string::npos);
  p.d_v = 128, p.q_token_stride = 100;
  EXPECT_NE(message(FlashKernel::Auto).find("q strides"), std::string::npos);
  p.q_token_stride = 512, p.scale = -1.0f;
  EXPECT_NE(message(FlashKernel::Auto).find("softmax scale"), std::string::npos);
}

#endif

}  // namespace
}  // namespace fathom
