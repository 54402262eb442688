// The CPU backend: fp32 math, multithreaded over the global thread pool. Matmul lives in
// matmul.cpp (SIMD, dequantizing inside the kernel); the rest is here.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/error.h"
#include "core/random_fill.h"
#include "core/thread_pool.h"
#include "ops/cpu/attention.h"
#include "ops/cpu/backward.h"
#include "ops/cpu/fp8_gemm.h"
#include "ops/cpu/matmul.h"
#include "ops/cpu/sample.h"
#include "ops/cpu/vec.h"
#include "ops/ops.h"

namespace fathom {
namespace {

// One row of RMSNorm, o = x / rms(x) * w (o may alias x): rmsnorm and mla_cache_append share it,
// so the fused op rounds exactly like the separate ones.
inline void rmsnorm_row(const float* xr, float* o, const float* w, int64_t N, float eps) {
  double ss = 0.0;
  for (int64_t i = 0; i < N; ++i) ss += double(xr[i]) * xr[i];
  float inv = float(1.0 / std::sqrt(ss / double(N) + eps));
  for (int64_t i = 0; i < N; ++i) o[i] = xr[i] * inv * w[i];
}

// One rotated slice: v (2*half dims) by the angles of c, s into o (o may be v).
inline void rope_row(const float* v, float* o, const float* c, const float* s, int half, bool interleaved,
                     bool inverse) {
  for (int i = 0; i < half; ++i) {
    // interleaved: the pair (2i, 2i+1) rotates by angle i; halves: (i, i + half)
    const int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
    const float x0 = v[a], x1 = v[b], si = inverse ? -s[i] : s[i];
    o[a] = x0 * c[i] - x1 * si;
    o[b] = x1 * c[i] + x0 * si;
  }
}

class CpuOps final : public Ops {
 public:
  CpuOps() : pool_(ThreadPool::global()) {}
  const char* name() const override { return "cpu"; }
  Device device() const override { return Device::CPU; }

  Tensor empty(Shape shape, DType dtype) override { return Tensor::empty(std::move(shape), dtype); }
  Tensor upload(const Tensor& host) override {
    FATHOM_ASSERT(host.device() == Device::CPU);
    return host;
  }
  void download(void* host, const Tensor& t) override {
    FATHOM_ASSERT(t.device() == Device::CPU);
    if (host != t.data()) std::memcpy(host, t.data(), t.nbytes());
  }

  void copy(const CopyParams& p) override {
    FATHOM_ASSERT(p.out_dtype == DType::F32 || p.out_dtype == DType::BF16, "copy to ", dtype_name(p.out_dtype));
    for (int64_t t = 0; t < p.n_tokens; ++t)
      for (int h = 0; h < p.n_heads; ++h) {
        const float* src = p.in + t * p.in_token_stride + h * p.in_head_stride;
        const int64_t ot = p.out_token_index ? int64_t(p.out_token_index[t]) : t;
        const int64_t o = ot * p.out_token_stride + h * p.out_head_stride;
        if (p.out_dtype == DType::F32) {
          std::memmove(static_cast<float*>(p.out) + o, src, sizeof(float) * size_t(p.cols));
        } else {
          uint16_t* dst = static_cast<uint16_t*>(p.out) + o;
          for (int c = 0; c < p.cols; ++c) dst[c] = f32_to_bf16(src[c]);
        }
      }
  }

  void fill_random(Tensor& t, uint64_t seed, float scale) override {
    FATHOM_ASSERT(t.device() == Device::CPU);
    const int64_t n = t.numel();
    std::vector<float> chunk;
    const int64_t step = 1 << 16;
    const size_t elem = dtype_size(t.dtype());
    for (int64_t i0 = 0; i0 < n; i0 += step) {
      const int64_t m = std::min(step, n - i0);
      chunk.resize(size_t(m));
      for (int64_t i = 0; i < m; ++i) chunk[size_t(i)] = scale * random_uniform(seed, uint64_t(i0 + i));
      Tensor c = from_f32(chunk.data(), {m}, t.dtype());
      std::memcpy(static_cast<char*>(t.data()) + size_t(i0) * elem, c.data(), c.nbytes());
    }
  }

  void copy_bytes(void* dst, const void* src, size_t n) override {
    if (n) std::memcpy(dst, src, n);
  }

  void embedding(Tensor& out, const Tensor& ids, const Tensor& table) override {
    const int64_t H = table.dim(1), n_tokens = ids.numel();  // table (V, H), ids (T), out (T, H)
    FATHOM_ASSERT(out.numel() == n_tokens * H && ids.dtype() == DType::I32);
    const size_t row_bytes = size_t(H) * dtype_size(table.dtype());
    for (int64_t t = 0; t < n_tokens; ++t) {
      const char* row = static_cast<const char*>(table.data()) + size_t(ids.ptr<int32_t>()[t]) * row_bytes;
      convert_to_f32(table.dtype(), row, out.f32() + t * H, size_t(H));
    }
  }

  void rmsnorm(Tensor& out, const Tensor& x, const Tensor& weight, float eps) override {
    const int64_t N = weight.numel(), M = x.numel() / N;  // x, out (M, N)
    FATHOM_ASSERT(weight.dtype() == DType::F32 && out.numel() == x.numel());
    const float* w = weight.f32();
    pool_.parallel_for(M, [&](int64_t b, int64_t e, int) {
      for (int64_t m = b; m < e; ++m) rmsnorm_row(x.f32() + m * N, out.f32() + m * N, w, N, eps);
    }, 16);
  }

  void add_rmsnorm(Tensor& x, const Tensor& y, Tensor& h, const Tensor& weight, float eps) override {
    add(x, y);
    rmsnorm(h, x, weight, eps);
  }

  // x itself, or (norm set) its rows normalised into a new tensor
  Tensor normed_input(const Tensor& x, InputNorm norm) {
    if (!norm) return x;
    Tensor n = Tensor::empty(x.shape());
    rmsnorm(n, x, *norm.weight, norm.eps);
    return n;
  }

  void swiglu(Tensor& out, const Tensor& x_in, const ExpertSet& set, bool accumulate, InputNorm norm = {}) override {
    FATHOM_ASSERT(set.experts.size() == 1, "swiglu takes one expert");
    const ExpertWeights& e = set.experts[0];
    const Tensor x = normed_input(x_in, norm);
    const int64_t D = x.dim(-1), T = x.numel() / D, I = e.gate_proj->out_features();
    Tensor g = Tensor::empty({T, I}), u = Tensor::empty({T, I}), y = Tensor::empty({T, D});
    matmul_batch({{g.f32(), x.f32(), T, e.gate_proj}, {u.f32(), x.f32(), T, e.up_proj}});
    silu_mul(g, g, u);
    matmul(accumulate ? y : out, g, *e.down_proj);
    if (accumulate) add(out, y);
  }

  void matmul(Tensor& out, const Tensor& x, const LinearWeight& w) override {
    const int64_t K = w.in_features(), N = w.out_features(), M = x.numel() / K;  // x (M, K), out (M, N)
    FATHOM_ASSERT(x.numel() == M * K && out.numel() == M * N, "matmul ", w.name, ": x ", shape_str(x.shape()), " out ",
                  shape_str(out.shape()), " weight ", shape_str(w.weight.shape()));
    product(out.f32(), x.f32(), M, w);
  }

  bool set_fp8_activations(bool enabled) override {
    fp8_activations_ = enabled;
    return true;
  }

  // out (M, N) = x (M, K) · Wᵀ: the FP8 x FP8 recipe when asked for and the product qualifies,
  // else the matmul with W dequantized as it is read.
  void product(float* out, const float* x, int64_t M, const LinearWeight& w) {
    if (fp8_activations_ && w.quantized() && w.block == kFp8Tile && M > kFp8ActivationRows) {
      const int64_t K = w.in_features();
      std::vector<uint8_t> q(size_t(M * K));
      std::vector<float> scales(size_t(M * ((K + kFp8Tile - 1) / kFp8Tile)));
      quantize_1x128(q.data(), scales.data(), x, M, K);
      fp8_gemm(out, q.data(), scales.data(), M, w);
      return;
    }
    cpu::matmul(out, x, M, w, pool_);
  }

  void matmul_batch(const std::vector<MatmulJob>& in_jobs) override {
    // Input norms and accumulation become plain jobs first: a normalised copy of each input
    // (shared by the jobs with the same input and norm) and, for accumulating jobs, a product
    // added to `out` at the end.
    std::vector<MatmulJob> jobs = in_jobs;
    std::vector<Tensor> temps;
    struct Normed {
      const float* x;
      const Tensor* weight;
      float eps;
      int64_t M, K;
      const float* out;
    };
    std::vector<Normed> normed;
    struct Add {
      float* out;
      const float* y;
      int64_t n;
    };
    std::vector<Add> adds;
    for (MatmulJob& j : jobs) {
      FATHOM_ASSERT(j.w && j.M >= 0, "matmul_batch: a job without a weight");
      const int64_t K = j.w->in_features(), N = j.w->out_features();
      if (j.norm) {
        const float* made = nullptr;
        for (const Normed& n : normed)
          if (n.x == j.x && n.weight == j.norm.weight && n.eps == j.norm.eps && n.M == j.M && n.K == K) made = n.out;
        if (!made) {
          const Tensor xin = Tensor::view(const_cast<float*>(j.x), {j.M, K}, DType::F32, nullptr);
          temps.push_back(normed_input(xin, j.norm));
          made = temps.back().f32();
          normed.push_back({j.x, j.norm.weight, j.norm.eps, j.M, K, made});
        }
        j.x = made;
        j.norm = {};
      }
      if (j.accumulate) {
        temps.push_back(Tensor::empty({j.M, N}));
        adds.push_back({j.out, temps.back().f32(), j.M * N});
        j.out = temps.back().f32();
        j.accumulate = false;
      }
    }
    plain_matmuls(jobs);
    for (const Add& a : adds) cpu::axpy(a.out, 1.f, a.y, a.n);
  }

  void plain_matmuls(const std::vector<MatmulJob>& jobs) {
    // Single-row jobs are cut into slices of weight rows and spread over the threads in one
    // region; jobs of several rows go through the blocked matmul one after another.
    struct Slice {
      const MatmulJob* job;
      int64_t n0, n1;
    };
    std::vector<Slice> slices;
    for (const MatmulJob& j : jobs) {
      if (j.M != 1) {
        if (j.M > 0) product(j.out, j.x, j.M, *j.w);
        continue;
      }
      const int64_t N = j.w->out_features();
      // FP8 slices must start on a scale block; otherwise ~32 KB of weights per slice
      const int64_t step = j.w->quantized() ? j.w->block
                                            : std::max<int64_t>(8, (32 << 10) / std::max<int64_t>(1, j.w->weight.nbytes() / N));
      for (int64_t n0 = 0; n0 < N; n0 += step) slices.push_back({&j, n0, std::min(N, n0 + step)});
    }
    pool_.parallel_for(int64_t(slices.size()), [&](int64_t b, int64_t e, int) {
      for (int64_t i = b; i < e; ++i) {
        const Slice& s = slices[size_t(i)];
        const LinearWeight& w = *s.job->w;
        LinearWeight part;
        part.weight = w.weight.slice_rows(s.n0, s.n1);
        if (w.quantized()) {
          part.scale_inv = w.scale_inv.slice_rows(s.n0 / w.block, (s.n1 + w.block - 1) / w.block);
          part.block = w.block;
        }
        cpu::matmul(s.job->out + s.n0, s.job->x, 1, part, serial_);
      }
    });
  }

  void rope(const RopeParams& p) override {
    FATHOM_CHECK(p.rope_dim >= 0 && p.rope_dim % 2 == 0, "rope: rope_dim ", p.rope_dim, " must be even.");
    const int half = p.rope_dim / 2;
    for (int64_t t = 0; t < p.n_tokens; ++t) {
      const float* c = p.cos + t * half;
      const float* s = p.sin + t * half;
      for (int h = 0; h < p.n_heads; ++h) {
        float* v = p.x + t * p.token_stride + h * p.head_stride + p.offset;
        float* o = p.out ? p.out + t * p.out_token_stride + h * p.out_head_stride + p.out_offset : v;
        rope_row(v, o, c, s, half, p.interleaved, p.inverse);
      }
    }
  }

  void mla_cache_append(const MlaAppendParams& p) override {
    FATHOM_CHECK(p.out_dtype == DType::F32 || p.out_dtype == DType::BF16, "mla_cache_append: cache dtype ",
                 dtype_name(p.out_dtype), " is not supported; expected F32 or BF16.");
    FATHOM_CHECK(p.rope_dim >= 0 && p.rope_dim % 2 == 0, "mla_cache_append: rope_dim ", p.rope_dim, " must be even.");
    FATHOM_CHECK(p.kv_lora_rank > 0 && p.n_tokens >= 0, "mla_cache_append: kv_lora_rank ", p.kv_lora_rank, " and ",
                 p.n_tokens, " tokens; expected a positive rank and no negative count.");
    if (p.n_tokens == 0) return;
    const int64_t R = p.kv_lora_rank, W = R + p.rope_dim;
    const int half = p.rope_dim / 2;
    // the steps of the separate ops in their order: rope of k_pe, rmsnorm of c_kv, conversion
    pool_.parallel_for(p.n_tokens, [&](int64_t b, int64_t e, int) {
      std::vector<float> row(static_cast<size_t>(W));
      for (int64_t t = b; t < e; ++t) {
        const float* in = p.kv + t * p.kv_token_stride;
        rope_row(in + R, row.data() + R, p.cos + t * half, p.sin + t * half, half, p.interleaved, false);
        rmsnorm_row(in, row.data(), p.norm_weight, R, p.eps);
        const int64_t o = (p.out_token_index ? int64_t(p.out_token_index[t]) : p.pos0 + t) * W;
        if (p.out_dtype == DType::F32) {
          std::memcpy(static_cast<float*>(p.out) + o, row.data(), sizeof(float) * size_t(W));
        } else {
          uint16_t* dst = static_cast<uint16_t*>(p.out) + o;
          for (int64_t c = 0; c < W; ++c) dst[c] = f32_to_bf16(row[size_t(c)]);
        }
      }
    }, 16);
  }

  void attention(const AttentionParams& p) override {
    if (!p.kv_len) return cpu::attention(p, pool_);
    AttentionParams q = p;  // the CPU backend's "device" memory is host memory
    q.n_kv = *p.kv_len;
    q.q_pos0 = q.n_kv - q.n_q;
    q.kv_len = nullptr;
    FATHOM_ASSERT(q.n_kv <= p.n_kv && q.q_pos0 >= 0, "kv_len ", q.n_kv, " bound ", p.n_kv);
    cpu::attention(q, pool_);
  }

  void rope_tables(Tensor& cos, Tensor& sin, const Tensor& positions, const Tensor& inv_freq,
                   float attention_factor) override {
    const int64_t T = positions.numel(), half = inv_freq.numel();  // cos, sin (T, half)
    FATHOM_ASSERT(positions.dtype() == DType::I32 && inv_freq.dtype() == DType::F64 && cos.numel() == T * half &&
                  sin.numel() == T * half);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < half; ++i) {
        const double angle = double(positions.ptr<int32_t>()[t]) * inv_freq.ptr<double>()[i];
        cos.f32()[t * half + i] = float(std::cos(angle) * attention_factor);
        sin.f32()[t * half + i] = float(std::sin(angle) * attention_factor);
      }
  }

  void argmax(Tensor& ids, const Tensor& logits) override {
    const int64_t B = ids.numel(), V = logits.numel() / std::max<int64_t>(B, 1);
    FATHOM_ASSERT(ids.dtype() == DType::I32 && logits.numel() == B * V);
    for (int64_t b = 0; b < B; ++b) {
      const float* l = logits.f32() + b * V;
      ids.ptr<int32_t>()[b] = int32_t(std::max_element(l, l + V) - l);
    }
  }
  void sample(Tensor& ids, const Tensor& logits, const Tensor& params) override { cpu::sample(ids, logits, params); }

  void matmul_per_head(const HeadMatmulParams& p, const Tensor& w) override {
    head_matmul(p, w);
    if (p.also_rope) rope(*p.also_rope);
    if (p.also_append) mla_cache_append(*p.also_append);
  }

  void head_matmul(const HeadMatmulParams& p, const Tensor& w) {
    const int H = int(w.dim(0));  // w (H, N, K)
    if (H == 0 || p.n_tokens == 0) return;
    const int64_t N = w.dim(1), K = w.dim(2);
    FATHOM_ASSERT(w.ndim() == 3 && w.dtype() != DType::F8_E4M3);
    auto head = [&](int h) {
      LinearWeight l;
      l.weight = w.slice_rows(h, h + 1).reshape({N, K});
      return l;
    };
    if (p.n_tokens <= 8) {
      // decode: one parallel region over (token, head) instead of one per head
      pool_.parallel_for(p.n_tokens * H, [&](int64_t b, int64_t e, int) {
        for (int64_t it = b; it < e; ++it) {
          const int64_t t = it / H;
          const int h = int(it % H);
          const float* x = p.x + t * p.x_token_stride + h * p.x_head_stride;
          float* o = p.out + t * p.out_token_stride + h * p.out_head_stride;
          cpu::matmul(o, x, 1, head(h), serial_);
        }
      });
      return;
    }
    // prefill: gather each head's rows and use the blocked matmul
    Tensor xh = Tensor::empty({p.n_tokens, K}), oh = Tensor::empty({p.n_tokens, N});
    for (int h = 0; h < H; ++h) {
      for (int64_t t = 0; t < p.n_tokens; ++t)
        std::memcpy(xh.f32() + t * K, p.x + t * p.x_token_stride + h * p.x_head_stride, sizeof(float) * size_t(K));
      cpu::matmul(oh.f32(), xh.f32(), p.n_tokens, head(h), pool_);
      for (int64_t t = 0; t < p.n_tokens; ++t)
        std::memcpy(p.out + t * p.out_token_stride + h * p.out_head_stride, oh.f32() + t * N, sizeof(float) * size_t(N));
    }
  }

  void silu_mul(Tensor& out, const Tensor& gate, const Tensor& up) override {
    FATHOM_ASSERT(gate.numel() == up.numel() && out.numel() == gate.numel());
    const float* g = gate.f32();
    const float* u = up.f32();
    float* o = out.f32();
    for (int64_t i = 0, n = gate.numel(); i < n; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }

  void add(Tensor& x, const Tensor& y) override {
    FATHOM_ASSERT(x.numel() == y.numel());
    float* a = x.f32();
    const float* b = y.f32();
    for (int64_t i = 0, n = x.numel(); i < n; ++i) a[i] += b[i];
  }

  void moe_gate(Tensor& weights, Tensor& experts, const Tensor& logits, const float* bias,
                const MoeGateParams& p) override {
    const int E = p.n_experts, K = p.top_k;
    const int64_t T = logits.numel() / E;  // logits (T, E); weights, experts (T, K)
    FATHOM_ASSERT(weights.numel() == T * K && experts.numel() == T * K && E % p.n_group == 0);
    const int per_group = E / p.n_group;
    std::vector<float> score(static_cast<size_t>(E)), choice(static_cast<size_t>(E)), group_score(static_cast<size_t>(p.n_group));
    std::vector<int> order(static_cast<size_t>(std::max(E, p.n_group)));
    for (int64_t t = 0; t < T; ++t) {
      const float* l = logits.f32() + t * E;
      if (p.scoring == ScoringFunc::Sigmoid) {
        for (int e = 0; e < E; ++e) score[size_t(e)] = 1.0f / (1.0f + std::exp(-l[e]));
      } else {
        float mx = *std::max_element(l, l + E);
        double sum = 0.0;
        for (int e = 0; e < E; ++e) sum += (score[size_t(e)] = std::exp(l[e] - mx));
        for (int e = 0; e < E; ++e) score[size_t(e)] = float(score[size_t(e)] / sum);
      }
      for (int e = 0; e < E; ++e) choice[size_t(e)] = score[size_t(e)] + (bias ? bias[e] : 0.0f);
      if (p.n_group > 1 && p.topk_group < p.n_group) {
        // Rank groups, keep the best topk_group; experts of the others cannot be chosen.
        for (int g = 0; g < p.n_group; ++g) {
          const float* c = choice.data() + g * per_group;
          if (p.group_by_top2_sum) {
            float a = -std::numeric_limits<float>::infinity(), b = a;
            for (int e = 0; e < per_group; ++e) {
              if (c[e] > a) { b = a; a = c[e]; } else if (c[e] > b) b = c[e];
            }
            group_score[size_t(g)] = per_group >= 2 ? a + b : a;
          } else {
            group_score[size_t(g)] = *std::max_element(c, c + per_group);
          }
        }
        top_indices(group_score.data(), p.n_group, p.topk_group, order.data());
        std::vector<char> keep(size_t(p.n_group), 0);
        for (int g = 0; g < p.topk_group; ++g) keep[size_t(order[size_t(g)])] = 1;
        for (int e = 0; e < E; ++e)
          if (!keep[size_t(e / per_group)]) choice[size_t(e)] = -std::numeric_limits<float>::infinity();
      }
      top_indices(choice.data(), E, K, order.data());
      float* w = weights.f32() + t * K;
      int32_t* idx = experts.ptr<int32_t>() + t * K;
      double sum = 0.0;
      for (int k = 0; k < K; ++k) {
        idx[k] = order[size_t(k)];
        w[k] = score[size_t(order[size_t(k)])];  // routing weight: the score without bias
        sum += w[k];
      }
      for (int k = 0; k < K; ++k) {
        if (p.norm_topk_prob) w[k] = float(w[k] / (sum + 1e-20));
        w[k] *= p.routed_scaling_factor;
      }
    }
  }

  void moe_experts(Tensor& out, const Tensor& x_in, const Tensor& weights, const Tensor& experts,
                   const ExpertSet& set, const ExpertSet* shared = nullptr, bool accumulate = false, InputNorm norm = {}) override {
    const Tensor x = normed_input(x_in, norm);
    Tensor y = accumulate ? Tensor::empty(out.shape()) : out;
    routed_experts(y, x, weights, experts, set);  // reads x whole before writing y (which may be x)
    if (shared) swiglu(y, x, *shared, /*accumulate=*/true);
    if (accumulate) add(out, y);
  }

  void routed_experts(Tensor& out, const Tensor& x, const Tensor& weights, const Tensor& experts,
                      const ExpertSet& set) {
    const int64_t D = x.dim(-1), T = x.numel() / D, K = weights.numel() / std::max<int64_t>(T, 1);
    FATHOM_ASSERT(out.numel() == T * D && experts.numel() == T * K && experts.dtype() == DType::I32);
    const int E = int(set.experts.size());
    // Group the (token, slot) pairs by expert so each expert runs once over its tokens.
    std::vector<std::vector<int64_t>> rows(static_cast<size_t>(E));  // token indices per expert
    std::vector<std::vector<float>> mix(static_cast<size_t>(E));     // their routing weights
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < K; ++k) {
        const int e = experts.ptr<int32_t>()[t * K + k];
        FATHOM_ASSERT(e >= 0 && e < E, "expert id ", e);
        rows[size_t(e)].push_back(t);
        mix[size_t(e)].push_back(weights.f32()[t * K + k]);
      }
    // Every expert with tokens as one batch of gate/up matmuls, then one batch of down ones.
    struct Active {
      int expert;
      int64_t n;
      Tensor x, g, u, y;  // (n, D), (n, I), (n, I), (n, D)
    };
    std::vector<Active> active;
    std::vector<MatmulJob> jobs;
    for (int e = 0; e < E; ++e) {
      const auto& r = rows[size_t(e)];
      if (r.empty()) continue;
      const int64_t n = int64_t(r.size()), I = set.experts[size_t(e)].gate_proj->out_features();
      Active a{e, n, Tensor::empty({n, D}), Tensor::empty({n, I}), Tensor::empty({n, I}), Tensor::empty({n, D})};
      for (int64_t i = 0; i < n; ++i)
        std::memcpy(a.x.f32() + i * D, x.f32() + r[size_t(i)] * D, sizeof(float) * size_t(D));
      active.push_back(std::move(a));
    }
    for (Active& a : active) {
      jobs.push_back({a.g.f32(), a.x.f32(), a.n, set.experts[size_t(a.expert)].gate_proj});
      jobs.push_back({a.u.f32(), a.x.f32(), a.n, set.experts[size_t(a.expert)].up_proj});
    }
    matmul_batch(jobs);
    jobs.clear();
    for (Active& a : active) {
      silu_mul(a.g, a.g, a.u);
      jobs.push_back({a.y.f32(), a.g.f32(), a.n, set.experts[size_t(a.expert)].down_proj});
    }
    matmul_batch(jobs);
    std::memset(out.data(), 0, out.nbytes());
    for (const Active& a : active) {
      const auto& r = rows[size_t(a.expert)];
      for (int64_t j = 0; j < a.n; ++j) cpu::axpy(out.f32() + r[size_t(j)] * D, mix[size_t(a.expert)][size_t(j)],
                                             a.y.f32() + j * D, D);
    }
  }

  // ---- backward passes: the reference implementations (ops/cpu/backward.h)
  void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids) override {
    cpu::embedding_backward(dtable, dout, ids);
  }
  void rmsnorm_backward(Tensor& dx, Tensor& dweight, const Tensor& dout, const Tensor& x, const Tensor& weight,
                        float eps) override {
    cpu::rmsnorm_backward(dx, dweight, dout, x, weight, eps);
  }
  void matmul_backward(Tensor& dx, Tensor& dw, const Tensor& dout, const Tensor& x, const Tensor& w) override {
    cpu::matmul_backward(dx, dw, dout, x, w);
  }
  void silu_mul_backward(Tensor& dgate, Tensor& dup, const Tensor& dout, const Tensor& gate,
                         const Tensor& up) override {
    cpu::silu_mul_backward(dgate, dup, dout, gate, up);
  }
  void rope_backward(const RopeParams& p) override { cpu::rope_backward(p); }
  void attention_backward(float* dq, float* dk, float* dv, const float* dout, const AttentionParams& p,
                          int64_t n_seq) override {
    FATHOM_CHECK(n_seq >= 1, "attention_backward: ", n_seq, " sequences");
    for (int64_t b = 0; b < n_seq; ++b)  // one sequence at a time
      cpu::attention_backward(dq + b * p.n_q * p.q_token_stride, dk + b * p.n_kv * p.k_token_stride,
                              dv + b * p.n_kv * p.v_token_stride, dout + b * p.n_q * p.out_token_stride,
                              sequence_of(p, b));
  }
  void moe_gate_backward(Tensor& dlogits, const Tensor& dweights, const Tensor& logits, const Tensor& experts,
                         const MoeGateParams& p) override {
    cpu::moe_gate_backward(dlogits, dweights, logits, experts, p);
  }
  void cross_entropy_backward(Tensor& losses, Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                              float dloss) override {
    cpu::cross_entropy_backward(losses, dlogits, logits, targets, dloss);
  }
  void adamw_step(Tensor& w, Tensor& m, Tensor& v, const Tensor& grad, const AdamWStepParams& p) override {
    cpu::adamw_step(w, m, v, grad, p);
  }
  double sum_squares(const std::vector<Tensor>& xs) override {
    double ss = 0;
    for (const Tensor& x : xs) ss += cpu::sum_squares(x);
    return ss;
  }
  void zero(Tensor& t) override {
    if (t.nbytes()) std::memset(t.data(), 0, t.nbytes());
  }
  void mul_rows(Tensor& x, const Tensor& s) override {
    const int64_t M = s.numel();
    FATHOM_CHECK(x.dtype() == DType::F32 && s.dtype() == DType::F32 && M > 0 && x.numel() % M == 0,
                 "mul_rows: F32 x ", shape_str(x.shape()), " and one F32 factor per row, got ", shape_str(s.shape()));
    const int64_t N = x.numel() / M;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) x.f32()[m * N + n] *= s.f32()[m];
  }
  void row_dot(Tensor& out, const Tensor& a, const Tensor& b) override {
    const int64_t M = out.numel();
    FATHOM_CHECK(out.dtype() == DType::F32 && a.dtype() == DType::F32 && b.dtype() == DType::F32 && M > 0 &&
                     a.numel() == b.numel() && a.numel() % M == 0,
                 "row_dot: F32 a ", shape_str(a.shape()), " b ", shape_str(b.shape()), " out ", shape_str(out.shape()));
    const int64_t N = a.numel() / M;
    for (int64_t m = 0; m < M; ++m) {
      double d = 0;
      for (int64_t n = 0; n < N; ++n) d += double(a.f32()[m * N + n]) * b.f32()[m * N + n];
      out.f32()[m] = float(d);
    }
  }

 private:
  // The indices of the k largest of v[0..n) in descending order; ties keep the lower index.
  static void top_indices(const float* v, int n, int k, int* out) {
    std::vector<int> idx(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) idx[size_t(i)] = i;
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int a, int b) {
      return v[a] > v[b] || (v[a] == v[b] && a < b);
    });
    std::copy(idx.begin(), idx.begin() + k, out);
  }

  ThreadPool& pool_;
  bool fp8_activations_ = false;  // set_fp8_activations
  ThreadPool serial_{1};  // runs inline: for kernels called from inside a parallel region
};

}  // namespace

std::unique_ptr<Ops> make_cpu_ops() { return std::make_unique<CpuOps>(); }

}  // namespace fathom
