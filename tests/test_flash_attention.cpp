// The CPU reference of flash attention (src/ops/cpu/flash_attention.cpp), which the GPU kernels
// are checked against, itself checked against fathom's other attention code on the same values:
// the forward against cpu::attention (the model's attention op, fp32) sequence by sequence, the
// backward against cpu::attention_backward (checked against finite differences in
// test_backward.cpp) — both within 1e-5 — over packed ragged batches, causal and not, GQA; and
// its argument checks (the GPU launcher's too).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "ops/cpu/attention.h"
#include "ops/cpu/backward.h"
#include "ops/cpu/flash_attention.h"

namespace fathom {
namespace {

struct Packed {
  std::vector<int32_t> cu_q{0}, cu_k{0};
  std::vector<uint16_t> q, k, v, dout, out;
  std::vector<float> out_f32, lse;
  FlashAttentionParams p;
};

Packed make(const std::vector<int>& lq, const std::vector<int>& lk, int heads, int kv, int dqk, int dv, bool causal,
            std::mt19937& rng) {
  Packed x;
  for (size_t b = 0; b < lq.size(); ++b) {
    x.cu_q.push_back(x.cu_q.back() + lq[b]);
    x.cu_k.push_back(x.cu_k.back() + lk[b]);
    x.p.max_seqlen_q = std::max(x.p.max_seqlen_q, lq[b]);
    x.p.max_seqlen_k = std::max(x.p.max_seqlen_k, lk[b]);
  }
  FlashAttentionParams& p = x.p;
  p.batch = int(lq.size()), p.total_q = x.cu_q.back(), p.total_k = x.cu_k.back();
  p.n_heads = heads, p.n_kv_heads = kv, p.d_qk = dqk, p.d_v = dv, p.causal = causal, p.scale = 0.3f;
  p.q_head_stride = p.k_head_stride = dqk, p.v_head_stride = p.out_head_stride = dv;
  p.q_token_stride = heads * dqk, p.k_token_stride = kv * dqk, p.v_token_stride = kv * dv, p.out_token_stride = heads * dv;
  std::normal_distribution<float> d(0.f, 1.f);
  auto fill = [&](std::vector<uint16_t>& v, int64_t n) {
    v.resize(size_t(n));
    for (auto& e : v) e = f32_to_bf16(d(rng));
  };
  fill(x.q, p.total_q * heads * dqk), fill(x.k, p.total_k * kv * dqk), fill(x.v, p.total_k * kv * dv);
  fill(x.dout, p.total_q * heads * dv);
  x.out.resize(size_t(p.total_q * heads * dv)), x.out_f32.resize(x.out.size()), x.lse.resize(size_t(p.total_q * heads));
  p.q = x.q.data(), p.k = x.k.data(), p.v = x.v.data(), p.out = x.out.data(), p.lse = x.lse.data();
  p.cu_seqlens_q = x.cu_q.data(), p.cu_seqlens_k = x.cu_k.data();
  return x;
}

std::vector<float> to_f32(const uint16_t* p, int64_t n) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[size_t(i)] = bf16_to_f32(p[i]);
  return v;
}

// Sequence b as the model's AttentionParams over f32 copies (causal: q_pos0 = Lk - Lq).
AttentionParams sequence(const Packed& x, int b, const std::vector<float>& q, const std::vector<float>& k,
                         const std::vector<float>& v, std::vector<float>& out) {
  const FlashAttentionParams& p = x.p;
  AttentionParams a;
  const int64_t q0 = x.cu_q[size_t(b)], k0 = x.cu_k[size_t(b)];
  a.q = q.data() + q0 * p.q_token_stride, a.q_token_stride = p.q_token_stride, a.q_head_stride = p.q_head_stride;
  a.k = k.data() + k0 * p.k_token_stride, a.k_token_stride = p.k_token_stride, a.k_head_stride = p.k_head_stride;
  a.v = v.data() + k0 * p.v_token_stride, a.v_token_stride = p.v_token_stride, a.v_head_stride = p.v_head_stride;
  a.out = out.data() + q0 * p.out_token_stride, a.out_token_stride = p.out_token_stride;
  a.out_head_stride = p.out_head_stride;
  a.n_q = x.cu_q[size_t(b) + 1] - q0, a.n_kv = x.cu_k[size_t(b) + 1] - k0, a.q_pos0 = a.n_kv - a.n_q;
  a.n_q_heads = p.n_heads, a.n_kv_heads = p.n_kv_heads, a.d_qk = p.d_qk, a.d_v = p.d_v, a.scale = p.scale;
  a.causal = p.causal;
  return a;
}

void expect_close(const std::vector<float>& got, const std::vector<float>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size());
  double mx = 0;
  for (float w : want) mx = std::max(mx, double(std::fabs(w)));
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double e = std::fabs(double(got[i]) - want[i]);
    if (!(e <= 1e-5 * (std::fabs(want[i]) + 1e-2 * mx) + 1e-7) && bad++ < 5)
      ADD_FAILURE() << what << "[" << i << "] " << got[i] << " vs " << want[i];
  }
}

TEST(FlashAttentionCpu, ForwardAndBackwardMatchTheModelsAttention) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(cat("random seed ", seed));
  std::mt19937 rng(seed);
  ThreadPool pool(3);
  for (const bool causal : {true, false})
    for (const int kv : {4, 2, 1}) {
      Packed x = make({1, 9, 33, 20}, {1, 9, 40, 64}, 4, kv, 24, 16, causal, rng);
      cpu::flash_attention_forward(x.p, pool, x.out_f32.data());
      const std::vector<float> q = to_f32(x.q.data(), int64_t(x.q.size())), k = to_f32(x.k.data(), int64_t(x.k.size())),
                               v = to_f32(x.v.data(), int64_t(x.v.size())),
                               dout = to_f32(x.dout.data(), int64_t(x.dout.size()));
      std::vector<float> out(x.out.size()), dq(q.size()), dk(k.size()), dv(v.size());
      for (int b = 0; b < x.p.batch; ++b) {
        const AttentionParams a = sequence(x, b, q, k, v, out);
        cpu::attention(a, pool);
        const int64_t q0 = x.cu_q[size_t(b)], k0 = x.cu_k[size_t(b)];
        cpu::attention_backward(dq.data() + q0 * x.p.q_token_stride, dk.data() + k0 * x.p.k_token_stride,
                                dv.data() + k0 * x.p.v_token_stride, dout.data() + q0 * x.p.out_token_stride, a);
      }
      expect_close(x.out_f32, out, "out");
      for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(x.out[i], f32_to_bf16(x.out_f32[i]));
      // the log-sum-exp normalizes each row's softmax: Σ_j exp(scale s_ij - lse) = 1
      for (int h = 0; h < x.p.n_heads; ++h) {
        const int64_t t = x.cu_q[3] + 5, j0 = x.cu_k[3];
        const int n = causal ? 5 + 64 - 20 + 1 : 64;
        double sum = 0;
        for (int j = 0; j < n; ++j) {
          double s = 0;
          for (int d = 0; d < 24; ++d)
            s += double(q[size_t(t * x.p.q_token_stride + h * 24 + d)]) *
                 k[size_t((j0 + j) * x.p.k_token_stride + (h / (4 / kv)) * 24 + d)];
          sum += std::exp(x.p.scale * s - x.lse[size_t(h * x.p.total_q + t)]);
        }
        EXPECT_NEAR(sum, 1.0, 1e-5);
      }
      std::vector<float> fdq(dq.size()), fdk(dk.size()), fdv(dv.size());
      FlashAttentionGrads g;
      g.dout = x.dout.data(), g.dout_token_stride = x.p.out_token_stride, g.dout_head_stride = x.p.out_head_stride;
      g.dq = fdq.data(), g.dk = fdk.data(), g.dv = fdv.data();
      cpu::flash_attention_backward(x.p, g, pool);
      expect_close(fdq, dq, "dq");
      expect_close(fdk, dk, "dk");
      expect_close(fdv, dv, "dv");
    }
}

TEST(FlashAttentionCpu, QueriesThatSeeNoKeyGetZeroAndMinusInfinity) {
  std::mt19937 rng(7);
  ThreadPool pool(2);
  Packed x = make({6}, {2}, 2, 1, 8, 8, true, rng);  // causal, 6 queries over 2 keys: the first 4 see none
  cpu::flash_attention_forward(x.p, pool, x.out_f32.data());
  for (int h = 0; h < 2; ++h)
    for (int t = 0; t < 6; ++t) {
      EXPECT_EQ(std::isinf(x.lse[size_t(h * 6 + t)]) && x.lse[size_t(h * 6 + t)] < 0, t < 4) << t;
      for (int d = 0; d < 8; ++d)
        if (t < 4) {
          EXPECT_EQ(x.out_f32[size_t((t * 2 + h) * 8 + d)], 0.f);
        }
    }
}

TEST(FlashAttentionCpu, BadArgumentsAreErrors) {
  std::mt19937 rng(1);
  ThreadPool pool(2);
  auto message = [&](auto&& edit) {
    Packed x = make({3, 4}, {3, 4}, 4, 2, 8, 8, true, rng);
    edit(x);
    try {
      cpu::flash_attention_forward(x.p, pool);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message([](Packed& x) { x.cu_q[1] = 8, x.p.max_seqlen_q = 100; }).find("sequence 1 has -1 queries"), std::string::npos);
  EXPECT_NE(message([](Packed& x) { x.p.total_k = 6; }).find("not the totals"), std::string::npos);
  EXPECT_NE(message([](Packed& x) { x.p.max_seqlen_q = 3; }).find("max_seqlen"), std::string::npos);
  EXPECT_NE(message([](Packed& x) { x.p.n_kv_heads = 3; }).find("cannot share"), std::string::npos);
  EXPECT_NE(message([](Packed& x) { x.p.d_qk = 300; }).find("head dims"), std::string::npos);
  EXPECT_NE(message([](Packed& x) { x.p.k_token_stride = 9; }).find("k strides"), std::string::npos);
  EXPECT_NE(message([](Packed& x) { x.p.scale = NAN; }).find("softmax scale"), std::string::npos);
  EXPECT_NE(message([](Packed& x) { x.p.q = nullptr; }).find("must be given"), std::string::npos);
  EXPECT_NE(message([](Packed& x) { x.cu_k[0] = 1; }).find("start at 0"), std::string::npos);
}

}  // namespace
}  // namespace fathom
