#include "ops/cpu/flash_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/dtype.h"

namespace fathom::cpu {
namespace {

// One (sequence, query head)'s attention, its probabilities kept for the backward: for query i
// (of n_q) the keys it sees are [0, seen(i)), scores s_ij = scale · q_i·k_j, p_ij their softmax.
struct HeadView {
  const FlashAttentionParams& p;
  int64_t q0, k0, n_q, n_k;
  int h, kvh;
  double q(int64_t i, int d) const {
    return bf16_to_f32(p.q[(q0 + i) * p.q_token_stride + int64_t(h) * p.q_head_stride + d]);
  }
  double k(int64_t j, int d) const {
    return bf16_to_f32(p.k[(k0 + j) * p.k_token_stride + int64_t(kvh) * p.k_head_stride + d]);
  }
  double v(int64_t j, int d) const {
    return bf16_to_f32(p.v[(k0 + j) * p.v_token_stride + int64_t(kvh) * p.v_head_stride + d]);
  }
  int64_t seen(int64_t i) const { return p.causal ? std::clamp<int64_t>(i + n_k - n_q + 1, 0, n_k) : n_k; }
  // the probabilities of query i over its keys, and the log-sum-exp (-inf when it sees none)
  double softmax(int64_t i, std::vector<double>& prob) const {
    const int64_t n = seen(i);
    prob.assign(size_t(n), 0.0);
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int d = 0; d < p.d_qk; ++d) s += q(i, d) * k(j, d);
      prob[size_t(j)] = s * p.scale;
      mx = std::max(mx, prob[size_t(j)]);
    }
    if (n == 0) return -std::numeric_limits<double>::infinity();
    double sum = 0;
    for (auto& x : prob) sum += (x = std::exp(x - mx));
    for (auto& x : prob) x /= sum;
    return mx + std::log(sum);
  }
};

// Every (sequence, query head) pair, in parallel.
template <typename F>
void for_each_head(const FlashAttentionParams& p, ThreadPool& pool, F&& fn) {
  const int group = p.n_heads / p.n_kv_heads;
  pool.parallel_for(int64_t(p.batch) * p.n_heads, [&](int64_t lo, int64_t hi, int) {
    for (int64_t x = lo; x < hi; ++x) {
      const int b = int(x / p.n_heads), h = int(x % p.n_heads);
      const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
      fn(HeadView{p, q0, k0, p.cu_seqlens_q[b + 1] - q0, p.cu_seqlens_k[b + 1] - k0, h, h / group});
    }
  });
}

}  // namespace

void flash_attention_forward(const FlashAttentionParams& p, ThreadPool& pool, float* out_f32) {
  check_flash_attention(p, true, "flash_attention_forward");
  for_each_head(p, pool, [&](const HeadView& hv) {
    std::vector<double> prob;
    for (int64_t i = 0; i < hv.n_q; ++i) {
      const double lse = hv.softmax(i, prob);
      const int64_t t = hv.q0 + i;
      if (p.lse) p.lse[int64_t(hv.h) * p.total_q + t] = float(lse);
      for (int d = 0; d < p.d_v; ++d) {
        double o = 0;
        for (size_t j = 0; j < prob.size(); ++j) o += prob[j] * hv.v(int64_t(j), d);
        p.out[t * p.out_token_stride + int64_t(hv.h) * p.out_head_stride + d] = f32_to_bf16(float(o));
        if (out_f32) out_f32[(t * p.n_heads + hv.h) * p.d_v + d] = float(o);
      }
    }
  });
}

void flash_attention_backward(const FlashAttentionParams& p, const FlashAttentionGrads& g, ThreadPool& pool) {
  check_flash_attention(p, true, "flash_attention_backward");
  FATHOM_CHECK(g.dout && g.dq && g.dk && g.dv, "flash_attention_backward: dout, dq, dk and dv must be given.");
  std::fill(g.dq, g.dq + p.total_q * p.n_heads * p.d_qk, 0.0f);
  std::fill(g.dk, g.dk + p.total_k * p.n_kv_heads * p.d_qk, 0.0f);
  std::fill(g.dv, g.dv + p.total_k * p.n_kv_heads * p.d_v, 0.0f);
  // dk and dv of a KV head gather from all its query heads: accumulate per (sequence, query head)
  // in double, then add under the pool's partition by KV head (one task per (sequence, KV head)).
  const int group = p.n_heads / p.n_kv_heads;
  pool.parallel_for(int64_t(p.batch) * p.n_kv_heads, [&](int64_t lo, int64_t hi, int) {
    for (int64_t x = lo; x < hi; ++x) {
      const int b = int(x / p.n_kv_heads), kvh = int(x % p.n_kv_heads);
      const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
      const int64_t n_q = p.cu_seqlens_q[b + 1] - q0, n_k = p.cu_seqlens_k[b + 1] - k0;
      std::vector<double> dk(size_t(n_k * p.d_qk)), dv(size_t(n_k * p.d_v)), prob, dprob, o(size_t(p.d_v));
      for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
        const HeadView hv{p, q0, k0, n_q, n_k, h, kvh};
        for (int64_t i = 0; i < n_q; ++i) {
          hv.softmax(i, prob);
          const int64_t t = q0 + i;
          auto dout = [&](int d) {
            return double(bf16_to_f32(g.dout[t * g.dout_token_stride + int64_t(h) * g.dout_head_stride + d]));
          };
          double D = 0;  // Σ_d dout · out
          for (int d = 0; d < p.d_v; ++d) {
            o[size_t(d)] = 0;
            for (size_t j = 0; j < prob.size(); ++j) o[size_t(d)] += prob[j] * hv.v(int64_t(j), d);
            D += dout(d) * o[size_t(d)];
          }
          dprob.assign(prob.size(), 0.0);
          for (size_t j = 0; j < prob.size(); ++j) {
            double dp = 0;
            for (int d = 0; d < p.d_v; ++d) {
              dp += dout(d) * hv.v(int64_t(j), d);
              dv[j * size_t(p.d_v) + size_t(d)] += prob[j] * dout(d);
            }
            dprob[j] = prob[j] * (dp - D) * p.scale;  // dS, with the scale of the scores folded in
          }
          float* dq = g.dq + (t * p.n_heads + h) * p.d_qk;
          for (int d = 0; d < p.d_qk; ++d) {
            double acc = 0;
            for (size_t j = 0; j < prob.size(); ++j) {
              acc += dprob[j] * hv.k(int64_t(j), d);
              dk[j * size_t(p.d_qk) + size_t(d)] += dprob[j] * hv.q(i, d);
            }
            dq[d] = float(acc);
          }
        }
      }
      for (int64_t j = 0; j < n_k; ++j) {
        for (int d = 0; d < p.d_qk; ++d)
          g.dk[((k0 + j) * p.n_kv_heads + kvh) * p.d_qk + d] = float(dk[size_t(j * p.d_qk + d)]);
        for (int d = 0; d < p.d_v; ++d)
          g.dv[((k0 + j) * p.n_kv_heads + kvh) * p.d_v + d] = float(dv[size_t(j * p.d_v + d)]);
      }
    }
  });
}

}  // namespace fathom::cpu
