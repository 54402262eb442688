#include "ops/cpu/backward.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "core/error.h"

namespace fathom::cpu {
namespace {

void check_f32(const Tensor& t, const char* op, const char* what) {
  FATHOM_CHECK(t.defined() && t.dtype() == DType::F32 && t.device() == Device::CPU, op, ": ", what,
               " must be an F32 host tensor.");
}

}  // namespace

void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids) {
  check_f32(dtable, "embedding_backward", "the table gradient");
  check_f32(dout, "embedding_backward", "the output gradient");
  FATHOM_CHECK(ids.dtype() == DType::I32 && dtable.ndim() == 2, "embedding_backward: expected I32 ids and a 2-D table.");
  const int64_t V = dtable.dim(0), H = dtable.dim(1), T = ids.numel();
  FATHOM_CHECK(dout.numel() == T * H, "embedding_backward: dout ", shape_str(dout.shape()), " for ", T, " ids of ", H);
  for (int64_t t = 0; t < T; ++t) {
    const int32_t id = ids.ptr<int32_t>()[t];
    FATHOM_CHECK(id >= 0 && id < V, "embedding_backward: id ", id, " at position ", t, " is outside [0, ", V, ").");
    float* row = dtable.f32() + int64_t(id) * H;
    const float* g = dout.f32() + t * H;
    for (int64_t h = 0; h < H; ++h) row[h] += g[h];
  }
}

void rmsnorm_backward(Tensor& dx, Tensor& dweight, const Tensor& dout, const Tensor& x, const Tensor& weight,
                      float eps) {
  for (const Tensor* t : std::initializer_list<const Tensor*>{&dx, &dweight, &dout, &x, &weight}) check_f32(*t, "rmsnorm_backward", "every tensor");
  const int64_t N = weight.numel(), M = x.numel() / std::max<int64_t>(N, 1);
  FATHOM_CHECK(N > 0 && x.numel() == M * N && dout.numel() == x.numel() && dx.numel() == x.numel() &&
                   dweight.numel() == N,
               "rmsnorm_backward: x ", shape_str(x.shape()), " dout ", shape_str(dout.shape()), " dx ",
               shape_str(dx.shape()), " weight ", shape_str(weight.shape()), " dweight ", shape_str(dweight.shape()));
  const float* w = weight.f32();
  float* dw = dweight.f32();
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x.f32() + m * N;
    const float* gr = dout.f32() + m * N;
    float* dr = dx.f32() + m * N;
    double ss = 0, dot = 0;  // Σ x², Σ dout·w·x
    for (int64_t i = 0; i < N; ++i) {
      ss += double(xr[i]) * xr[i];
      dot += double(gr[i]) * w[i] * xr[i];
    }
    const double r = 1.0 / std::sqrt(ss / double(N) + eps);
    const double c = r * r * r * dot / double(N);
    for (int64_t i = 0; i < N; ++i) {
      dw[i] += float(double(gr[i]) * xr[i] * r);
      dr[i] = float(r * double(gr[i]) * w[i] - c * xr[i]);
    }
  }
}

void matmul_backward(Tensor& dx, Tensor& dw, const Tensor& dout, const Tensor& x, const Tensor& w) {
  check_f32(dout, "matmul_backward", "the output gradient");
  check_f32(x, "matmul_backward", "the input");
  check_f32(w, "matmul_backward", "the (master) weight");
  check_f32(dw, "matmul_backward", "the weight gradient");
  FATHOM_CHECK(w.ndim() == 2 && dw.numel() == w.numel(), "matmul_backward: weight ", shape_str(w.shape()),
               " and its gradient ", shape_str(dw.shape()), " differ.");
  const int64_t N = w.dim(0), K = w.dim(1), M = K > 0 ? x.numel() / K : 0;
  FATHOM_CHECK(x.numel() == M * K && dout.numel() == M * N, "matmul_backward: x ", shape_str(x.shape()), " dout ",
               shape_str(dout.shape()), " for weight ", shape_str(w.shape()));
  if (M == 0 || N == 0 || K == 0) {
    if (dx.defined()) std::fill(dx.f32(), dx.f32() + dx.numel(), 0.0f);
    return;
  }
  // dw (N, K) += doutᵀ (N, M) · x (M, K)
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(N), int(K), int(M), 1.0f, dout.f32(), int(N), x.f32(),
              int(K), 1.0f, dw.f32(), int(K));
  if (!dx.defined()) return;
  check_f32(dx, "matmul_backward", "the input gradient");
  FATHOM_CHECK(dx.numel() == M * K, "matmul_backward: dx ", shape_str(dx.shape()), " for x ", shape_str(x.shape()));
  // dx (M, K) = dout (M, N) · W (N, K)
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(M), int(K), int(N), 1.0f, dout.f32(), int(N), w.f32(),
              int(K), 0.0f, dx.f32(), int(K));
}

void silu_mul_backward(Tensor& dgate, Tensor& dup, const Tensor& dout, const Tensor& gate, const Tensor& up) {
  for (const Tensor* t : std::initializer_list<const Tensor*>{&dgate, &dup, &dout, &gate, &up}) check_f32(*t, "silu_mul_backward", "every tensor");
  const int64_t n = gate.numel();
  FATHOM_CHECK(up.numel() == n && dout.numel() == n && dgate.numel() == n && dup.numel() == n,
               "silu_mul_backward: gate ", shape_str(gate.shape()), " up ", shape_str(up.shape()), " dout ",
               shape_str(dout.shape()));
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate.f32()[i], u = up.f32()[i], d = dout.f32()[i];
    const float sg = 1.0f / (1.0f + std::exp(-g));
    const float silu = g * sg;
    dgate.f32()[i] = d * u * sg * (1.0f + g * (1.0f - sg));
    dup.f32()[i] = d * silu;
  }
}

void rope_backward(const RopeParams& p) {
  FATHOM_CHECK(p.rope_dim >= 0 && p.rope_dim % 2 == 0, "rope_backward: rope_dim ", p.rope_dim, " must be even.");
  FATHOM_CHECK(p.out == nullptr, "rope_backward works in place (out must be null).");
  // The forward multiplies each pair by [[c, −s], [s, c]] (c, s scaled by the attention
  // factor); its transpose [[c, s], [−s, c]] is the same rotation with sin negated: the forward
  // op itself, asked for the inverse rotation.
  RopeParams q = p;
  q.inverse = !p.inverse;
  static const std::unique_ptr<Ops> cpu = make_cpu_ops();
  cpu->rope(q);
}

void attention_backward(float* dq, float* dk, float* dv, const float* dout, const AttentionParams& p) {
  FATHOM_CHECK(p.kv_dtype == DType::F32 && !p.block_table && !p.kv_len, "attention_backward: F32 keys and values "
               "without a block table or device key count (the training layout) are supported.");
  FATHOM_CHECK(p.n_q >= 0 && p.n_kv >= 0 && p.n_kv_heads > 0 && p.n_q_heads % p.n_kv_heads == 0 && p.d_qk > 0 &&
                   p.d_v > 0,
               "attention_backward: ", p.n_q_heads, " query heads over ", p.n_kv_heads, " KV heads, d_qk ", p.d_qk,
               ", d_v ", p.d_v, ".");
  FATHOM_ASSERT(dq && dk && dv && dout && p.q && p.k && p.v, "attention_backward with a null pointer");
  FATHOM_CHECK(p.k != p.v, "attention_backward: keys and values must be separate tensors (absorbed MLA's shared "
               "latent rows train through the naive layout).");
  const float* K = static_cast<const float*>(p.k);
  const float* Vv = static_cast<const float*>(p.v);
  const int group = p.n_q_heads / p.n_kv_heads;
  auto qrow = [&](int64_t i, int h) { return i * p.q_token_stride + int64_t(h) * p.q_head_stride; };
  auto krow = [&](int64_t j, int g) { return j * p.k_token_stride + int64_t(g) * p.k_head_stride; };
  auto vrow = [&](int64_t j, int g) { return j * p.v_token_stride + int64_t(g) * p.v_head_stride; };
  auto orow = [&](int64_t i, int h) { return i * p.out_token_stride + int64_t(h) * p.out_head_stride; };
  // key and value gradients in double until the end: many query rows add into each
  std::vector<double> gk(size_t(p.n_kv) * p.n_kv_heads * p.d_qk, 0.0), gv(size_t(p.n_kv) * p.n_kv_heads * p.d_v, 0.0);
  std::vector<double> prob, dp, gq(size_t(p.d_qk));
  for (int64_t i = 0; i < p.n_q; ++i)
    for (int h = 0; h < p.n_q_heads; ++h) {
      const int g = h / group;
      const int64_t n = p.causal ? std::clamp<int64_t>(p.q_pos0 + i + 1, 0, p.n_kv) : p.n_kv;
      const float* q = p.q + qrow(i, h);
      const float* go = dout + orow(i, h);
      prob.assign(size_t(n), 0.0);
      dp.assign(size_t(n), 0.0);
      double mx = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (int c = 0; c < p.d_qk; ++c) s += double(q[c]) * K[krow(j, g) + c];
        prob[size_t(j)] = s * p.scale;
        mx = std::max(mx, prob[size_t(j)]);
      }
      double sum = 0;
      for (int64_t j = 0; j < n; ++j) sum += (prob[size_t(j)] = std::exp(prob[size_t(j)] - mx));
      double d = 0;  // Σ_j P_ij dP_ij = dout_i · out_i
      for (int64_t j = 0; j < n; ++j) {
        prob[size_t(j)] /= sum;
        double s = 0;
        for (int c = 0; c < p.d_v; ++c) s += double(go[c]) * Vv[vrow(j, g) + c];
        dp[size_t(j)] = s;
        d += prob[size_t(j)] * s;
      }
      std::fill(gq.begin(), gq.end(), 0.0);
      for (int64_t j = 0; j < n; ++j) {
        const double pj = prob[size_t(j)], ds = pj * (dp[size_t(j)] - d) * p.scale;
        double* gkj = gk.data() + (size_t(j) * p.n_kv_heads + g) * p.d_qk;
        double* gvj = gv.data() + (size_t(j) * p.n_kv_heads + g) * p.d_v;
        for (int c = 0; c < p.d_qk; ++c) {
          gq[size_t(c)] += ds * K[krow(j, g) + c];
          gkj[c] += ds * q[c];
        }
        for (int c = 0; c < p.d_v; ++c) gvj[c] += pj * go[c];
      }
      float* dqi = dq + qrow(i, h);
      for (int c = 0; c < p.d_qk; ++c) dqi[c] = float(gq[size_t(c)]);
    }
  for (int64_t j = 0; j < p.n_kv; ++j)
    for (int g = 0; g < p.n_kv_heads; ++g) {
      for (int c = 0; c < p.d_qk; ++c) dk[krow(j, g) + c] = float(gk[(size_t(j) * p.n_kv_heads + g) * p.d_qk + c]);
      for (int c = 0; c < p.d_v; ++c) dv[vrow(j, g) + c] = float(gv[(size_t(j) * p.n_kv_heads + g) * p.d_v + c]);
    }
}

void moe_gate_backward(Tensor& dlogits, const Tensor& dweights, const Tensor& logits, const Tensor& experts,
                       const MoeGateParams& p) {
  check_f32(dlogits, "moe_gate_backward", "the logits' gradient");
  check_f32(dweights, "moe_gate_backward", "the routing weights' gradient");
  check_f32(logits, "moe_gate_backward", "the logits");
  const int E = p.n_experts, K = p.top_k;
  FATHOM_CHECK(E > 0 && K > 0 && logits.numel() % E == 0 && experts.dtype() == DType::I32,
               "moe_gate_backward: logits ", shape_str(logits.shape()), " for ", E, " experts, I32 ids expected.");
  const int64_t T = logits.numel() / E;
  FATHOM_CHECK(dlogits.numel() == T * E && dweights.numel() == T * K && experts.numel() == T * K,
               "moe_gate_backward: ", T, " tokens but dlogits ", shape_str(dlogits.shape()), " dweights ",
               shape_str(dweights.shape()), " experts ", shape_str(experts.shape()));
  std::vector<double> score(static_cast<size_t>(E)), dscore(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    const float* l = logits.f32() + t * E;
    if (p.scoring == ScoringFunc::Sigmoid) {
      for (int e = 0; e < E; ++e) score[size_t(e)] = 1.0 / (1.0 + std::exp(-double(l[e])));
    } else {
      const double mx = *std::max_element(l, l + E);
      double sum = 0;
      for (int e = 0; e < E; ++e) sum += (score[size_t(e)] = std::exp(double(l[e]) - mx));
      for (double& s : score) s /= sum;
    }
    const int32_t* ids = experts.ptr<int32_t>() + t * K;
    const float* dw = dweights.f32() + t * K;
    std::fill(dscore.begin(), dscore.end(), 0.0);
    double raw_sum = 0, dot = 0;  // Σ_k score(e_k), Σ_k dw_k · score(e_k)
    for (int k = 0; k < K; ++k) {
      FATHOM_CHECK(ids[k] >= 0 && ids[k] < E, "moe_gate_backward: expert id ", ids[k], " of token ", t, ".");
      raw_sum += score[size_t(ids[k])];
      dot += double(dw[k]) * score[size_t(ids[k])];
    }
    const double rsf = p.routed_scaling_factor, denom = raw_sum + 1e-20;
    for (int k = 0; k < K; ++k) {
      // w_k = rsf · raw_k / denom:  d raw_j = rsf · (dw_j / denom − Σ_k dw_k raw_k / denom²)
      const double d = p.norm_topk_prob ? rsf * (double(dw[k]) / denom - dot / (denom * denom)) : rsf * dw[k];
      dscore[size_t(ids[k])] += d;
    }
    float* dl = dlogits.f32() + t * E;
    if (p.scoring == ScoringFunc::Sigmoid) {
      for (int e = 0; e < E; ++e) dl[e] = float(dscore[size_t(e)] * score[size_t(e)] * (1 - score[size_t(e)]));
    } else {
      double sd = 0;
      for (int e = 0; e < E; ++e) sd += score[size_t(e)] * dscore[size_t(e)];
      for (int e = 0; e < E; ++e) dl[e] = float(score[size_t(e)] * (dscore[size_t(e)] - sd));
    }
  }
}

int64_t cross_entropy_backward(Tensor& losses, Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                               float dloss) {
  check_f32(logits, "cross_entropy_backward", "the logits");
  check_f32(dlogits, "cross_entropy_backward", "the logits' gradient");
  check_f32(losses, "cross_entropy_backward", "the losses");
  FATHOM_CHECK(logits.ndim() == 2 && targets.dtype() == DType::I32, "cross_entropy_backward: expected (T, V) logits "
               "and I32 targets, got ", shape_str(logits.shape()), " and ", dtype_name(targets.dtype()));
  const int64_t T = logits.dim(0), V = logits.dim(1);
  FATHOM_CHECK(targets.numel() == T && losses.numel() == T && dlogits.numel() == T * V,
               "cross_entropy_backward: ", T, " rows but targets ", shape_str(targets.shape()), " losses ",
               shape_str(losses.shape()), " dlogits ", shape_str(dlogits.shape()));
  int64_t counted = 0;
  for (int64_t t = 0; t < T; ++t) {
    const float* l = logits.f32() + t * V;
    float* d = dlogits.f32() + t * V;
    const int32_t target = targets.ptr<int32_t>()[t];
    FATHOM_CHECK(target < V, "cross_entropy_backward: target ", target, " at row ", t, " is outside [0, ", V, ").");
    if (target < 0) {
      losses.f32()[t] = 0.0f;
      std::fill(d, d + V, 0.0f);
      continue;
    }
    ++counted;
    float mx = l[0];
    for (int64_t v = 1; v < V; ++v) mx = std::max(mx, l[v]);
    double sum = 0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(double(l[v]) - mx);
    const double lse = double(mx) + std::log(sum);
    const double target_logit = l[target];  // read before d (which may be l) is written
    for (int64_t v = 0; v < V; ++v) d[v] = float(std::exp(double(l[v]) - lse) * dloss);
    d[target] = float(std::expm1(target_logit - lse) * dloss);  // p − 1 without cancellation
    losses.f32()[t] = float(lse - target_logit);
  }
  return counted;
}

void adamw_step(Tensor& w, Tensor& m, Tensor& v, const Tensor& grad, const AdamWStepParams& p) {
  const int64_t n = w.numel();
  FATHOM_CHECK(w.dtype() == DType::F32 && m.dtype() == DType::F32 && v.dtype() == DType::F32 &&
                   grad.dtype() == DType::F32 && m.numel() == n && v.numel() == n && grad.numel() == n,
               "adamw_step: F32 value ", shape_str(w.shape()), ", moments ", shape_str(m.shape()), " and ",
               shape_str(v.shape()), ", gradient ", shape_str(grad.shape()), " must all be one size.");
  float* wp = w.f32();
  float* mp = m.f32();
  float* vp = v.f32();
  const float* gp = grad.f32();
  for (int64_t i = 0; i < n; ++i) {
    const float g = gp[i] * p.grad_scale;
    wp[i] *= p.decay;
    mp[i] += (1 - p.beta1) * (g - mp[i]);  // torch's exp_avg.lerp_(grad, 1 - beta1)
    vp[i] = p.beta2 * vp[i] + (1 - p.beta2) * g * g;
    wp[i] -= p.step_size * mp[i] / (std::sqrt(vp[i]) / p.bc2_sqrt + p.eps);
  }
}

double sum_squares(const Tensor& x) {
  FATHOM_CHECK(x.dtype() == DType::F32, "sum_squares: the tensor is ", dtype_name(x.dtype()), ", not F32.");
  const float* p = x.f32();
  double ss = 0;
  for (int64_t i = 0, n = x.numel(); i < n; ++i) ss += double(p[i]) * p[i];
  return ss;
}

}  // namespace fathom::cpu
