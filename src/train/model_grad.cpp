#include "train/model_grad.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>

#include "core/error.h"
#include "core/files.h"
#include "core/safetensors.h"
#include "model/moe.h"
#include "model/rope.h"
#include "ops/ops.h"
#include "train/balance.h"
#include "train/data.h"

namespace fs = std::filesystem;

namespace fathom::train {
namespace {

Ops& cpu() {
  static const std::unique_ptr<Ops> ops = make_cpu_ops();
  return *ops;
}

// What one layer's backward needs from its forward.
struct Expert {  // the shared experts, or a dense layer's MLP: every token of the layer
  std::string prefix;
  Tensor x, g, u, a, y;  // (n, D), (n, I), (n, I), (n, I), (n, D)
};
// A MoE layer's routed experts, computed all at once: each expert's tokens gathered into its own
// C rows (C: the most any expert took; the rest of its rows padding: token 0 at routing weight 0,
// which adds exactly nothing to any gradient), so that each product is one stacked matmul over
// the experts instead of one per expert.
struct Routed {
  int64_t C = 0;                  // rows per expert (0: no pair was routed)
  Tensor idx, w;                  // (E·C) I32 tokens and F32 routing weights (0 for padding), on the device
  Tensor pos;                     // (n, top_k) I32: each pair's row in the stack (-1: dropped at capacity)
  Tensor x, g, u, a, y;           // (E·C, D), (E·C, I) ×3, (E·C, D) unweighted output
};
struct LayerActs {
  Tensor x_in, h1, qa, qan, q, kva, ckv, ckvn, kvb, kpe, K, V, attn, x_mid, h2;
  Tensor logits, weights, ids;          // router (on the device)
  Tensor weights_h, ids_h;              // the router's choice in host memory
  Tensor dlogits_balance;               // the balance loss's gradient of the router logits
  std::vector<Expert> experts;          // a dense layer's MLP, or the shared experts
  Routed routed;
  bool moe = false;
};

void dequantize_fp8(const Tensor& w, const Tensor& scale, int64_t block, float* out) {
  const int64_t N = w.dim(0), K = w.dim(1), kb = (K + block - 1) / block;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      out[n * K + k] = fp8e4m3_to_f32(w.ptr<uint8_t>()[n * K + k]) * scale.f32()[(n / block) * kb + k / block];
}

}  // namespace

std::unique_ptr<GradModel> GradModel::load(const std::string& dir) {
  auto m = std::unique_ptr<GradModel>(new GradModel());
  m->ops_ = &cpu();
  m->config_ = load_config((fs::path(dir) / "config.json").string());
  m->config_json_ = read_file((fs::path(dir) / "config.json").string());
  const ModelConfig& c = m->config_;
  const SafetensorsSet set = SafetensorsSet::open_dir(dir);
  for (const std::string& name : set.names()) {
    if (name.size() >= 10 && name.compare(name.size() - 10, 10, "_scale_inv") == 0) continue;
    int layer = -1;
    // layers past the MTP modules' are not part of the model (inference ignores them too)
    if (std::sscanf(name.c_str(), "model.layers.%d.", &layer) == 1 &&
        layer >= c.num_hidden_layers + c.num_nextn_predict_layers)
      continue;
    const Tensor t = set.tensor(name);
    Tensor f = Tensor::empty(t.shape());
    if (t.dtype() == DType::F8_E4M3) {
      FATHOM_CHECK(set.contains(name + "_scale_inv") && t.ndim() == 2, dir, ": FP8 weight ", name,
                   " has no block scales (", name, "_scale_inv).");
      dequantize_fp8(t, to_f32(set.tensor(name + "_scale_inv")), c.weight_block_size[0], f.f32());
    } else {
      convert_to_f32(t.dtype(), t.data(), f.f32(), size_t(t.numel()));
    }
    m->names_.push_back(name);
    m->value_[name] = f;
    m->grad_[name] = Tensor::zeros(t.shape());
  }
  FATHOM_CHECK(m->value_.count("model.embed_tokens.weight") && m->value_.count("model.norm.weight"), dir,
               ": the checkpoint has no model.embed_tokens.weight or model.norm.weight.");
  FATHOM_CHECK(c.tie_word_embeddings || m->value_.count("lm_head.weight"), dir, ": no lm_head.weight.");
  m->stack_experts();
  return m;
}

void GradModel::stack_experts() {
  const int E = config_.n_routed_experts;
  if (E <= 0) return;
  for (int l = 0; l < config_.num_hidden_layers + config_.num_nextn_predict_layers; ++l) {
    const std::string p = cat("model.layers.", l, ".mlp.experts.");
    for (const char* kind : {"gate_proj", "up_proj", "down_proj"}) {
      const std::string first = cat(p, 0, ".", kind, ".weight");
      if (!value_.count(first)) continue;  // a dense layer, or an MTP module the checkpoint lacks
      const Shape shape = value_.at(first).shape();
      FATHOM_CHECK(shape.size() == 2, first, " is ", shape_str(shape), "; an expert's matrix must be 2-D.");
      const int64_t N = shape[0], K = shape[1];
      Stack st{Tensor::empty({E * N, K}), Tensor::zeros({E * N, K}), {}, {}};
      const std::string key = p + kind;
      for (int e = 0; e < E; ++e) {
        const std::string name = cat(p, e, ".", kind, ".weight");
        const auto it = value_.find(name);
        FATHOM_CHECK(it != value_.end() && it->second.shape() == shape, "the checkpoint has ", first, " (",
                     shape_str(shape), ") but ",
                     it == value_.end() ? cat("no ", name) : cat(name, " is ", shape_str(it->second.shape())),
                     ": every routed expert of a layer needs matrices of one shape.");
        std::memcpy(st.value.f32() + e * N * K, it->second.f32(), size_t(N * K) * sizeof(float));
        it->second = st.value.slice_rows(e * N, (e + 1) * N);
        grad_.at(name) = st.grad.slice_rows(e * N, (e + 1) * N);
        stacked_[name] = {key, e};
      }
      stacks_[key] = std::move(st);
    }
  }
}

Tensor& GradModel::stack_value(const std::string& key) {
  auto it = stacks_.find(key);
  FATHOM_CHECK(it != stacks_.end(), "the model has no routed experts ", key, ".");
  return it->second.dvalue.defined() ? it->second.dvalue : it->second.value;
}
Tensor& GradModel::stack_grad(const std::string& key) {
  auto it = stacks_.find(key);
  FATHOM_CHECK(it != stacks_.end(), "the model has no routed experts ", key, ".");
  return it->second.dgrad.defined() ? it->second.dgrad : it->second.grad;
}

Tensor& GradModel::value(const std::string& name) {
  auto it = value_.find(name);
  FATHOM_CHECK(it != value_.end(), "the model has no weight ", name, ".");
  return it->second;
}
Tensor& GradModel::grad(const std::string& name) {
  auto it = grad_.find(name);
  FATHOM_CHECK(it != grad_.end(), "the model has no weight ", name, ".");
  return it->second;
}
void GradModel::scale_grad(float s) {
  for (auto& [n, g] : grad_)
    for (int64_t i = 0; i < g.numel(); ++i) g.f32()[i] *= s;
}
void GradModel::zero_grad() {
  if (dgrad_.empty()) {
    for (auto& [n, g] : grad_) std::memset(g.data(), 0, g.nbytes());
    return;
  }
  // the host gradients are left as they are: grads_to_host() overwrites every one of them
  std::vector<Tensor*> all;
  all.reserve(dgrad_.size());
  for (auto& [n, g] : dgrad_) all.push_back(&g);
  ops_->zero_many(all);  // one launch on the GPU, not one a tensor
}
Tensor& GradModel::device_value(const std::string& name) {
  if (dvalue_.empty()) return value(name);
  auto it = dvalue_.find(name);
  FATHOM_CHECK(it != dvalue_.end(), "the model has no weight ", name, ".");
  return it->second;
}
Tensor& GradModel::device_grad(const std::string& name) {
  if (dgrad_.empty()) return grad(name);
  auto it = dgrad_.find(name);
  FATHOM_CHECK(it != dgrad_.end(), "the model has no weight ", name, ".");
  return it->second;
}
void GradModel::use_backend(std::unique_ptr<Ops> ops) {
  FATHOM_CHECK(ops != nullptr, "GradModel::use_backend: no backend.");
  owned_ops_ = std::move(ops);
  ops_ = owned_ops_.get();
  dvalue_.clear();
  dgrad_.clear();
  for (auto& [key, st] : stacks_) st.dvalue = st.dgrad = Tensor();
  if (ops_->device() == Device::CPU) return;  // the host tensors are the backend's
  for (auto& [key, st] : stacks_) {
    st.dvalue = ops_->upload(st.value);
    st.dgrad = ops_->upload(st.grad);
  }
  for (const std::string& n : names_) {
    const auto it = stacked_.find(n);
    if (it != stacked_.end()) {  // a view of its rows of the stack's copy
      const Stack& st = stacks_.at(it->second.first);
      const int64_t N = value_.at(n).dim(0), e = it->second.second;
      dvalue_[n] = st.dvalue.slice_rows(e * N, (e + 1) * N);
      dgrad_[n] = st.dgrad.slice_rows(e * N, (e + 1) * N);
      continue;
    }
    dvalue_[n] = ops_->upload(value_.at(n));
    dgrad_[n] = ops_->upload(grad_.at(n));
  }
}
void GradModel::grads_to_host() {
  for (auto& [n, g] : dgrad_) ops_->download(grad_.at(n).data(), g);
}
void GradModel::value_to_device(const std::string& name) {
  if (dvalue_.empty()) return;
  ops_->copy_from_host(device_value(name), value(name));  // in place: the optimizer shares the tensor
  ops_->synchronize();
}
void GradModel::add_to(AdamW& optimizer) {
  for (const std::string& n : names_) {
    Param& p = optimizer.add(n, value_[n], grad_[n]);
    if (!dvalue_.empty()) {  // the backend's copies, for an optimizer that runs there
      p.device_value = dvalue_.at(n);
      p.device_grad = dgrad_.at(n);
    }
    int layer = -1;
    if (mtp_lambda_ == 0 && std::sscanf(n.c_str(), "model.layers.%d.", &layer) == 1 &&
        layer >= config_.num_hidden_layers)
      p.frozen = true;
  }
}
void GradModel::set_capacity_factor(float factor) {
  FATHOM_CHECK(std::isfinite(factor) && factor >= 0, "the expert capacity factor must be a finite number >= 0 (0: "
               "no dropping), got ", factor, ".");
  capacity_factor_ = factor;
}
void GradModel::set_mtp_lambda(float lambda) {
  FATHOM_CHECK(std::isfinite(lambda) && lambda >= 0, "the MTP loss weight must be a finite number >= 0, got ", lambda,
               ".");
  FATHOM_CHECK(lambda == 0 || mtp_depth() > 0, "an MTP loss weight of ", lambda,
               " was set, but the model has no MTP modules (num_nextn_predict_layers is 0).");
  mtp_lambda_ = lambda;
}
double GradModel::loss_and_grad(const std::vector<int32_t>& tokens) { return run({tokens}, true); }
double GradModel::loss(const std::vector<int32_t>& tokens) { return run({tokens}, false); }
double GradModel::loss_and_grad_batch(const std::vector<std::vector<int32_t>>& batch) { return run(batch, true); }
double GradModel::loss_batch(const std::vector<std::vector<int32_t>>& batch) { return run(batch, false); }

// One pass over a batch of sequences (one, or several stacked): the forward with every activation
// the backward needs kept, then (on request) the backward. The decoder layer's two halves are shared by the main layers and the MTP
// modules, which run the same layer shape over a shorter sequence. Every tensor operation goes
// through the model's backend (Ops): the CPU reference, or the CUDA backend with the weights,
// gradients and activations in GPU memory; what stays on the host is bookkeeping — the router's
// choice (downloaded once per layer) to list each expert's tokens, and the few numbers of the
// losses.
struct GradModel::Impl {
  GradModel& m;
  Ops& ops;
  const ModelConfig& c;
  const bool backward;
  const int H, nope, rd, dv, dqk;
  const int64_t R, D;
  const float eps;
  const MoeGateParams gp;
  const int64_t B;  // sequences in the pass, their rows stacked
  // RoPE tables on the backend for B sequences of L rows (positions 0 .. L-1, B times), by L: the
  // main layers' and each MTP module's (a shorter sequence)
  std::map<int64_t, std::pair<Tensor, Tensor>> rope_tables;
  double balance = 0;  // Σ over MoE layers of the sequence-wise balance loss
  bool recomputing = false;  // a layer forward run again in the backward: count nothing twice

  Impl(GradModel& model, int64_t batch, bool bw)
      : m(model), ops(*model.ops_), c(model.config_), backward(bw), H(c.num_attention_heads),
        nope(c.qk_nope_head_dim), rd(c.qk_rope_head_dim), dv(c.v_head_dim), dqk(c.qk_head_dim()),
        R(c.kv_lora_rank), D(c.hidden_size), eps(float(c.rms_norm_eps)), gp(moe_gate_params(c)), B(batch) {}
  const std::pair<Tensor, Tensor>& tables(int64_t L) {
    auto it = rope_tables.find(L);
    if (it != rope_tables.end()) return it->second;
    std::vector<int64_t> positions(static_cast<size_t>(B * L));
    for (int64_t t = 0; t < B * L; ++t) positions[size_t(t)] = t % L;
    Tensor cos_h, sin_h;
    Rope(c).tables(positions.data(), B * L, cos_h, sin_h);
    return rope_tables[L] = {ops.upload(cos_h), ops.upload(sin_h)};
  }
  Tensor& W(const std::string& n) { return m.device_value(n); }
  Tensor& G(const std::string& n) { return m.device_grad(n); }

  // ---- tensor helpers on the backend
  Tensor zeros(Shape shape) {
    Tensor t = ops.empty(std::move(shape));
    ops.zero(t);
    return t;
  }
  Tensor mm(const Tensor& x, const Tensor& w) {  // out (M, N) = x (M, K) · Wᵀ
    LinearWeight lw;
    lw.weight = w;
    Tensor out = ops.empty({x.numel() / w.dim(1), w.dim(0)});
    ops.matmul(out, x, lw);
    return out;
  }
  Tensor norm(const Tensor& x, const Tensor& w) {
    Tensor out = ops.empty(x.shape());
    ops.rmsnorm(out, x, w, eps);
    return out;
  }
  void add_into(Tensor& a, const Tensor& b) { ops.add(a, b); }
  // out[t, h, 0:cols] = in[t, h, 0:cols] over n rows (strides in floats; in_hs 0 broadcasts a row)
  void copy(float* out, int64_t out_ts, int64_t out_hs, const float* in, int64_t in_ts, int64_t in_hs, int64_t n,
            int heads, int cols) {
    CopyParams p;
    p.out = out, p.out_token_stride = out_ts, p.out_head_stride = out_hs;
    p.in = in, p.in_token_stride = in_ts, p.in_head_stride = in_hs;
    p.n_tokens = n, p.n_heads = heads, p.cols = cols;
    ops.copy(p);
  }
  Tensor clone(const Tensor& t) {
    Tensor out = ops.empty(t.shape());
    ops.copy_bytes(out.data(), t.data(), t.nbytes());
    return out;
  }
  // A view of `shape` in `dtype` at 4-byte element `at` of t (4-byte elements), sharing its storage:
  // several small arrays moved between host and device as one.
  static Tensor as(const Tensor& t, int64_t at, Shape shape, DType dtype) {
    FATHOM_ASSERT(dtype_size(t.dtype()) == 4 && dtype_size(dtype) == 4 && at + shape_numel(shape) <= t.numel(),
                  "a view past its buffer");
    return Tensor::view(const_cast<int32_t*>(t.ptr<int32_t>()) + at, std::move(shape), dtype, t.owner(), t.device());
  }
  Tensor to_host(const Tensor& t) {
    if (t.device() == Device::CPU) return t;
    Tensor h = Tensor::empty(t.shape(), t.dtype());
    ops.download(h.data(), t);
    return h;
  }

  // x: n rows, B sequences of L
  RopeParams rope_params(float* x, int64_t n, int64_t L, int64_t token_stride, int64_t head_stride, int n_heads,
                         int offset) {
    const auto& [cosv, sinv] = tables(L);
    RopeParams p;
    p.x = x, p.n_tokens = n, p.token_stride = token_stride, p.head_stride = head_stride;
    p.n_heads = n_heads, p.offset = offset, p.rope_dim = rd, p.cos = cosv.f32(), p.sin = sinv.f32();
    p.interleaved = c.rope_interleave;
    return p;
  }
  // Sequence b's causal self-attention (its L rows of the stacked q, K, V); the caller sets the output.
  AttentionParams attn_params(const LayerActs& a, int64_t L, int64_t b) {
    AttentionParams p;
    p.q = a.q.f32() + b * L * H * dqk, p.q_token_stride = int64_t(H) * dqk, p.q_head_stride = dqk;
    p.k = a.K.f32() + b * L * H * dqk, p.k_token_stride = int64_t(H) * dqk, p.k_head_stride = dqk;
    p.v = a.V.f32() + b * L * H * dv, p.v_token_stride = int64_t(H) * dv, p.v_head_stride = dv;
    p.out_token_stride = int64_t(H) * dv, p.out_head_stride = dv;
    p.n_q = L, p.n_kv = L, p.q_pos0 = 0, p.causal = true;
    p.n_q_heads = H, p.n_kv_heads = H, p.d_qk = dqk, p.d_v = dv, p.scale = float(c.softmax_scale());
    return p;
  }

  void expert_forward(Expert& e) {
    e.g = mm(e.x, W(e.prefix + "gate_proj.weight"));
    e.u = mm(e.x, W(e.prefix + "up_proj.weight"));
    e.a = ops.empty(e.g.shape());
    ops.silu_mul(e.a, e.g, e.u);
    e.y = mm(e.a, W(e.prefix + "down_proj.weight"));
  }
  Tensor expert_backward(Expert& e, const Tensor& dy) {  // dy (n, D): gradient of e.y; returns that of e.x
    Tensor da = ops.empty(e.a.shape()), dg = ops.empty(e.g.shape()), du = ops.empty(e.u.shape());
    ops.matmul_backward(da, G(e.prefix + "down_proj.weight"), dy, e.a, W(e.prefix + "down_proj.weight"));
    ops.silu_mul_backward(dg, du, da, e.g, e.u);
    Tensor dxe = ops.empty(e.x.shape()), dxu = ops.empty(e.x.shape());
    ops.matmul_backward(dxe, G(e.prefix + "gate_proj.weight"), dg, e.x, W(e.prefix + "gate_proj.weight"));
    ops.matmul_backward(dxu, G(e.prefix + "up_proj.weight"), du, e.x, W(e.prefix + "up_proj.weight"));
    add_into(dxe, dxu);
    return dxe;
  }

  // Decoder layer l (a main layer, or an MTP module's at num_hidden_layers + k) over the n rows of
  // x, B sequences of L: x ← x + MLA(rmsnorm(x)); x ← x + MLP or MoE(rmsnorm(x)).
  void layer_forward(int l, Tensor& x, LayerActs& a, int64_t n, int64_t L) {
    const std::string p = cat("model.layers.", l, "."), sa = p + "self_attn.";
    const int64_t kv_w = R + rd, kvb_w = nope + dv;
    a.x_in = x;
    a.h1 = norm(x, W(p + "input_layernorm.weight"));
    if (c.q_lora_rank > 0) {
      a.qa = mm(a.h1, W(sa + "q_a_proj.weight"));
      a.qan = norm(a.qa, W(sa + "q_a_layernorm.weight"));
      a.q = mm(a.qan, W(sa + "q_b_proj.weight"));
    } else {
      a.q = mm(a.h1, W(sa + "q_proj.weight"));
    }
    ops.rope(rope_params(a.q.f32(), n, L, int64_t(H) * dqk, dqk, H, nope));
    a.kva = mm(a.h1, W(sa + "kv_a_proj_with_mqa.weight"));  // (n, R + rd) = [c_kv | k_pe]
    a.ckv = ops.empty({n, R});
    a.kpe = ops.empty({n, rd});
    copy(a.ckv.f32(), R, 0, a.kva.f32(), kv_w, 0, n, 1, int(R));
    copy(a.kpe.f32(), rd, 0, a.kva.f32() + R, kv_w, 0, n, 1, rd);
    ops.rope(rope_params(a.kpe.f32(), n, L, rd, 0, 1, 0));
    a.ckvn = norm(a.ckv, W(sa + "kv_a_layernorm.weight"));
    a.kvb = mm(a.ckvn, W(sa + "kv_b_proj.weight"));  // (n, H, nope + dv)
    a.K = ops.empty({n, H, dqk});
    a.V = ops.empty({n, H, dv});
    copy(a.K.f32(), int64_t(H) * dqk, dqk, a.kvb.f32(), H * kvb_w, kvb_w, n, H, nope);
    copy(a.K.f32() + nope, int64_t(H) * dqk, dqk, a.kpe.f32(), rd, 0, n, H, rd);  // k_pe shared by the heads
    copy(a.V.f32(), int64_t(H) * dv, dv, a.kvb.f32() + nope, H * kvb_w, kvb_w, n, H, dv);
    a.attn = ops.empty({n, int64_t(H) * dv});
    for (int64_t b = 0; b < B; ++b) {
      AttentionParams ap = attn_params(a, L, b);
      ap.out = a.attn.f32() + b * L * H * dv;
      ops.attention(ap);
    }
    x = mm(a.attn, W(sa + "o_proj.weight"));
    add_into(x, a.x_in);  // x_mid = x_in + o
    a.x_mid = x;
    a.h2 = norm(x, W(p + "post_attention_layernorm.weight"));
    Tensor y;
    a.moe = c.is_moe_layer(l);
    if (!a.moe) {
      Expert e;
      e.prefix = p + "mlp.";
      e.x = a.h2;
      expert_forward(e);
      y = e.y;
      a.experts.push_back(std::move(e));
    } else {
      const int K = c.num_experts_per_tok;
      a.logits = mm(a.h2, W(p + "mlp.gate.weight"));
      // the weights and the ids in one buffer: one download (one wait) for both
      const Tensor route = ops.empty({2 * n * K}, DType::I32);
      a.weights = as(route, 0, {n, K}, DType::F32);
      a.ids = as(route, n * K, {n, K}, DType::I32);
      const std::string bias = p + "mlp.gate.e_score_correction_bias";
      ops.moe_gate(a.weights, a.ids, a.logits, m.has(bias) ? W(bias).f32() : nullptr, gp);
      const Tensor route_h = to_host(route);
      a.weights_h = as(route_h, 0, {n, K}, DType::F32);
      a.ids_h = as(route_h, n * K, {n, K}, DType::I32);
      if (m.balance_alpha_ > 0) {
        Tensor dlb = Tensor::zeros(a.logits.shape());
        const double b = sequence_balance_loss(dlb, to_host(a.logits), a.ids_h, std::vector<int64_t>(size_t(B), L),
                                               m.balance_alpha_, gp);
        a.dlogits_balance = ops.upload(dlb);
        if (!recomputing) balance += b;
      }
      if (backward && !recomputing) {
        const std::vector<int64_t> step = train::expert_load(a.ids_h, c.n_routed_experts);
        std::vector<int64_t>& load = m.load_[l];
        load.resize(step.size(), 0);
        for (size_t e = 0; e < step.size(); ++e) load[e] += step[e];
      }
      // each routed expert's capacity for this pass (no limit without a factor)
      const int64_t capacity =
          m.capacity_factor_ > 0
              ? int64_t(std::ceil(double(m.capacity_factor_) * double(n) * K / double(c.n_routed_experts)))
              : n * K;
      const int32_t* ids_h = a.ids_h.ptr<int32_t>();
      const float* weights_h = a.weights_h.f32();
      const int E = c.n_routed_experts;
      std::vector<std::vector<int64_t>> pairs(static_cast<size_t>(E));  // expert -> its pairs (t · K + k)
      for (int64_t t = 0; t < n; ++t)
        for (int k = 0; k < K; ++k) {
          const int32_t e = ids_h[t * K + k];
          FATHOM_ASSERT(e >= 0 && e < E, "moe_gate chose expert ", e, " of ", E);
          pairs[size_t(e)].push_back(t * K + k);
        }
      int64_t C = 0;
      for (int e = 0; e < E; ++e) {
        std::vector<int64_t>& list = pairs[size_t(e)];
        if (int64_t(list.size()) > capacity) {
          // keep the `capacity` pairs of the highest routing weight (the earlier token on ties),
          // in token order
          std::vector<int64_t> kept = list;
          std::stable_sort(kept.begin(), kept.end(),
                           [&](int64_t i, int64_t j) { return weights_h[i] > weights_h[j]; });
          kept.resize(size_t(capacity));
          std::sort(kept.begin(), kept.end());
          if (backward && !recomputing) m.dropped_[l] += int64_t(list.size()) - capacity;
          list = std::move(kept);
        }
        C = std::max<int64_t>(C, int64_t(list.size()));
      }
      Routed& r = a.routed;
      r.C = C;
      y = ops.empty({n, D});
      if (C == 0) {
        ops.zero(y);
      } else {
        // one upload each of the gather list, the weights and the positions (a copy per expert
        // would wait on the GPU each time)
        // (one upload: each is a wait for a staging buffer otherwise)
        Tensor packed_h = Tensor::zeros({2 * E * C + n * K}, DType::I32);
        Tensor idx_h = as(packed_h, 0, {E * C}, DType::I32), w_h = as(packed_h, E * C, {E * C}, DType::F32);
        Tensor pos_h = as(packed_h, 2 * E * C, {n, K}, DType::I32);
        std::fill_n(pos_h.ptr<int32_t>(), n * K, -1);
        for (int e = 0; e < E; ++e)
          for (size_t i = 0; i < pairs[size_t(e)].size(); ++i) {
            const int64_t pair = pairs[size_t(e)][i], row = e * C + int64_t(i);
            idx_h.ptr<int32_t>()[row] = int32_t(pair / K);
            w_h.f32()[row] = weights_h[pair];
            pos_h.ptr<int32_t>()[pair] = int32_t(row);
          }
        const Tensor packed = ops.upload(packed_h);
        r.idx = as(packed, 0, {E * C}, DType::I32);
        r.w = as(packed, E * C, {E * C}, DType::F32);
        r.pos = as(packed, 2 * E * C, {n, K}, DType::I32);
        const std::string ep = p + "mlp.experts.";
        const int64_t I = m.stack_value(ep + "gate_proj").dim(0) / E;
        r.x = ops.empty({E * C, D});
        ops.embedding(r.x, r.idx, a.h2);  // every expert's tokens (and padding rows of token 0)
        r.g = ops.empty({E * C, I});
        r.u = ops.empty({E * C, I});
        ops.matmul_stacked(r.g, r.x, m.stack_value(ep + "gate_proj"), E);
        ops.matmul_stacked(r.u, r.x, m.stack_value(ep + "up_proj"), E);
        r.a = ops.empty(r.g.shape());
        ops.silu_mul(r.a, r.g, r.u);
        r.y = ops.empty({E * C, D});
        ops.matmul_stacked(r.y, r.a, m.stack_value(ep + "down_proj"), E);
        Tensor weighted = clone(r.y);
        ops.mul_rows(weighted, r.w);
        ops.gather_sum_rows(y, weighted, r.pos, false);  // y[token] = Σ_k weight · out, in order of k
      }
      if (c.n_shared_experts > 0) {
        Expert ex;
        ex.prefix = p + "mlp.shared_experts.";
        ex.x = a.h2;
        expert_forward(ex);
        add_into(y, ex.y);
        a.experts.push_back(std::move(ex));
      }
    }
    add_into(y, a.x_mid);  // x_out = x_mid + y
    x = y;
  }

  // The backward of layer_forward: dx, the gradient of the layer's output, becomes that of its input.
  void layer_backward(int l, LayerActs& a, Tensor& dx, int64_t n, int64_t L) {
    const std::string p = cat("model.layers.", l, "."), sa = p + "self_attn.";
    const int64_t kv_w = R + rd, kvb_w = nope + dv;
    // x_out = x_mid + y
    Tensor dh2;
    if (!a.moe) {
      dh2 = expert_backward(a.experts[0], dx);
    } else {
      const int K = c.num_experts_per_tok, E = c.n_routed_experts;
      Tensor dweights = ops.empty({n, K});  // each routed pair's dot product (0 when dropped)
      dh2 = ops.empty({n, D});
      Routed& r = a.routed;
      if (r.C == 0) {
        ops.zero(dh2);
        ops.zero(dweights);
      } else {
        const std::string ep = p + "mlp.experts.";
        Tensor dy = ops.empty(r.y.shape());
        ops.embedding(dy, r.idx, dx);  // the tokens' output gradients
        Tensor dots = ops.empty({E * r.C});
        ops.row_dot(dots, dy, r.y);  // d weight = dx[token] · out
        ops.mul_rows(dy, r.w);       // d out = weight · dx[token] (0 on padding rows)
        Tensor da = ops.empty(r.a.shape()), dg = ops.empty(r.g.shape()), du = ops.empty(r.u.shape());
        ops.matmul_stacked_backward(da, m.stack_grad(ep + "down_proj"), dy, r.a, m.stack_value(ep + "down_proj"), E);
        ops.silu_mul_backward(dg, du, da, r.g, r.u);
        Tensor dxe = ops.empty(r.x.shape()), dxu = ops.empty(r.x.shape());
        ops.matmul_stacked_backward(dxe, m.stack_grad(ep + "gate_proj"), dg, r.x, m.stack_value(ep + "gate_proj"), E);
        ops.matmul_stacked_backward(dxu, m.stack_grad(ep + "up_proj"), du, r.x, m.stack_value(ep + "up_proj"), E);
        add_into(dxe, dxu);
        ops.gather_sum_rows(dh2, dxe, r.pos, false);  // each token's rows summed back, in order of k
        // each pair's dot product from its row, on the device (no wait for the host)
        Tensor dw_rows = dweights.reshape({n * K, 1});
        ops.gather_sum_rows(dw_rows, dots.reshape({E * r.C, 1}), r.pos.reshape({n * K, 1}), false);
      }
      for (Expert& e : a.experts) add_into(dh2, expert_backward(e, dx));  // the shared experts, weight 1
      Tensor dlg = ops.empty(a.logits.shape());
      ops.moe_gate_backward(dlg, dweights, a.logits, a.ids, gp);
      if (a.dlogits_balance.defined()) add_into(dlg, a.dlogits_balance);
      Tensor dhg = ops.empty({n, D});
      ops.matmul_backward(dhg, G(p + "mlp.gate.weight"), dlg, a.h2, W(p + "mlp.gate.weight"));
      add_into(dh2, dhg);
    }
    Tensor dx_mid = ops.empty({n, D});
    ops.rmsnorm_backward(dx_mid, G(p + "post_attention_layernorm.weight"), dh2, a.x_mid,
                         W(p + "post_attention_layernorm.weight"), eps);
    add_into(dx_mid, dx);  // the residual path
    // x_mid = x_in + attn · Woᵀ
    Tensor dattn = ops.empty(a.attn.shape());
    ops.matmul_backward(dattn, G(sa + "o_proj.weight"), dx_mid, a.attn, W(sa + "o_proj.weight"));
    Tensor dq = zeros(a.q.shape()), dK = zeros(a.K.shape()), dV = zeros(a.V.shape());
    ops.attention_backward(dq.f32(), dK.f32(), dV.f32(), dattn.f32(), attn_params(a, L, 0), B);  // all B sequences
    // K = [k_nope | k_pe broadcast], V from kv_b_proj's rows
    Tensor dkvb = ops.empty(a.kvb.shape()), dkpe = ops.empty({n, rd});
    copy(dkvb.f32(), H * kvb_w, kvb_w, dK.f32(), int64_t(H) * dqk, dqk, n, H, nope);
    copy(dkvb.f32() + nope, H * kvb_w, kvb_w, dV.f32(), int64_t(H) * dv, dv, n, H, dv);
    {  // k_pe's gradient: the sum over the heads that shared it
      CopyParams sp;
      sp.out = dkpe.f32(), sp.out_token_stride = rd;
      sp.in = dK.f32() + nope, sp.in_token_stride = int64_t(H) * dqk, sp.in_head_stride = dqk;
      sp.n_tokens = n, sp.n_heads = H, sp.cols = rd;
      ops.sum_heads(sp);
    }
    ops.rope_backward(rope_params(dkpe.f32(), n, L, rd, 0, 1, 0));
    Tensor dckvn = ops.empty(a.ckvn.shape()), dckv = ops.empty(a.ckv.shape());
    ops.matmul_backward(dckvn, G(sa + "kv_b_proj.weight"), dkvb, a.ckvn, W(sa + "kv_b_proj.weight"));
    ops.rmsnorm_backward(dckv, G(sa + "kv_a_layernorm.weight"), dckvn, a.ckv, W(sa + "kv_a_layernorm.weight"), eps);
    Tensor dkva = ops.empty(a.kva.shape());
    copy(dkva.f32(), kv_w, 0, dckv.f32(), R, 0, n, 1, int(R));
    copy(dkva.f32() + R, kv_w, 0, dkpe.f32(), rd, 0, n, 1, rd);
    Tensor dh1 = ops.empty({n, D}), dh1b = ops.empty({n, D});
    ops.matmul_backward(dh1, G(sa + "kv_a_proj_with_mqa.weight"), dkva, a.h1, W(sa + "kv_a_proj_with_mqa.weight"));
    ops.rope_backward(rope_params(dq.f32(), n, L, int64_t(H) * dqk, dqk, H, nope));
    if (c.q_lora_rank > 0) {
      Tensor dqan = ops.empty(a.qan.shape()), dqa = ops.empty(a.qa.shape());
      ops.matmul_backward(dqan, G(sa + "q_b_proj.weight"), dq, a.qan, W(sa + "q_b_proj.weight"));
      ops.rmsnorm_backward(dqa, G(sa + "q_a_layernorm.weight"), dqan, a.qa, W(sa + "q_a_layernorm.weight"), eps);
      ops.matmul_backward(dh1b, G(sa + "q_a_proj.weight"), dqa, a.h1, W(sa + "q_a_proj.weight"));
    } else {
      ops.matmul_backward(dh1b, G(sa + "q_proj.weight"), dq, a.h1, W(sa + "q_proj.weight"));
    }
    add_into(dh1, dh1b);
    Tensor dx_in = ops.empty({n, D});
    ops.rmsnorm_backward(dx_in, G(p + "input_layernorm.weight"), dh1, a.x_in, W(p + "input_layernorm.weight"), eps);
    add_into(dx_in, dx_mid);  // the residual path
    dx = dx_in;
  }

  // Mean cross-entropy of logits (n, V) against targets (n, host; < 0 skipped), times `weight`; the
  // logits are replaced by the gradient of that weighted mean. `counted` gets the targets used.
  double weighted_cross_entropy(Tensor& logits, const Tensor& targets, double weight, int64_t& counted) {
    const int64_t n = logits.dim(0);
    counted = 0;
    for (int64_t t = 0; t < n; ++t) counted += targets.ptr<int32_t>()[t] >= 0;
    Tensor losses = ops.empty({n});
    const float dloss = counted ? float(weight / double(counted)) : 0.0f;  // nothing to predict: no gradient
    ops.cross_entropy_backward(losses, logits, logits, ops.upload(targets), dloss);
    if (counted == 0) return 0;
    const Tensor lh = to_host(losses);
    double loss = 0;
    for (int64_t t = 0; t < n; ++t) loss += lh.f32()[t];
    return loss / double(counted);
  }
};

// A batch: B sequences of T + 1 tokens, their T input rows stacked into B·T rows (row b·T + t is
// sequence b's position t). Row-wise ops see the whole batch; RoPE restarts at every sequence and
// attention runs per sequence; the MTP modules stack each sequence's shorter rows the same way.
namespace {
// what position t learns to predict: token t + 1, unless that one is context only (chat prompts)
int32_t target_of(int32_t v) { return is_context_only(v) ? -1 : v; }
}  // namespace

double GradModel::run(const std::vector<std::vector<int32_t>>& batch, bool backward) {
  const ModelConfig& c = config_;
  FATHOM_CHECK(!batch.empty(), "a training batch needs at least one sequence.");
  const size_t len = batch[0].size();
  FATHOM_CHECK(len >= 2, "a training sequence needs at least 2 tokens, got ", len, ".");
  const int64_t B = int64_t(batch.size()), T = int64_t(len) - 1, N = B * T, D = c.hidden_size, V = c.vocab_size;
  for (size_t b = 0; b < batch.size(); ++b) {
    FATHOM_CHECK(batch[b].size() == len, "the sequences of a training batch must have one length: sequence ", b,
                 " has ", batch[b].size(), " tokens, sequence 0 ", len, ".");
    for (size_t i = 0; i < len; ++i)
      FATHOM_CHECK(token_id(batch[b][i]) < V, "token ", token_id(batch[b][i]), " at position ", i,
                   B > 1 ? cat(" of sequence ", b) : "", " is outside the vocabulary of ", V, ".");
  }
  Impl im(*this, B, backward);
  Ops& ops = im.ops;
  auto W = [&](const std::string& n) -> Tensor& { return device_value(n); };
  auto G = [&](const std::string& n) -> Tensor& { return device_grad(n); };

  Tensor ids_h = Tensor::empty({N}, DType::I32), targets = Tensor::empty({N}, DType::I32);
  for (int64_t b = 0; b < B; ++b) {
    const std::vector<int32_t>& tokens = batch[size_t(b)];
    for (int64_t t = 0; t < T; ++t) {
      ids_h.ptr<int32_t>()[b * T + t] = token_id(tokens[size_t(t)]);
      targets.ptr<int32_t>()[b * T + t] = target_of(tokens[size_t(t) + 1]);
    }
  }
  const Tensor ids = ops.upload(ids_h);

  // ---- forward: the main model
  const std::string embed = "model.embed_tokens.weight";
  const std::string head = c.tie_word_embeddings ? embed : "lm_head.weight";
  Tensor x = ops.empty({N, D});
  ops.embedding(x, ids, W(embed));
  std::vector<LayerActs> acts(static_cast<size_t>(c.num_hidden_layers));
  const bool recompute = backward && recompute_;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    LayerActs& a = acts[size_t(l)];
    im.layer_forward(l, x, a, N, T);
    if (recompute || !backward) {  // keep the layer's input (never written in place) alone
      Tensor in = a.x_in;
      a = LayerActs{};
      a.x_in = in;
    }
  }
  const Tensor hf = im.norm(x, W("model.norm.weight"));
  Tensor logits = im.mm(hf, W(head));
  int64_t counted = 0;
  const double lm = im.weighted_cross_entropy(logits, targets, 1.0, counted);  // logits -> dlogits
  // (counted is 0 only when every target is context only — a window inside a long chat prompt:
  // then its next-token loss is 0 with no gradient, rather than an error that stops the run)

  // ---- forward: the MTP modules (DeepSeek-V3 §2.2). Module k (0-based) at position i combines
  // the previous depth's hidden state h[i] (k = 0: the main model's, after its final norm; then
  // the previous module's output) with the embedding of tokens[i+1+k] and predicts tokens[i+2+k]:
  //   x = eh_proj([enorm(embed(tokens[i+1+k])) ; hnorm(h[i])]);  x = layer(x);
  //   logits = head(shared_head.norm(x)).
  // Loss: λ / depth · Σ_k mean CE_k.
  struct MtpActs {
    std::string p, embed, head;
    int64_t L = 0, n = 0;  // rows per sequence, rows in all
    Tensor rows;           // the rows of the previous depth's output it reads (I32, n)
    Tensor ids, e, en, hin, hn, cat_eh, x_out, xn, dlogits;
    LayerActs layer;
  };
  std::vector<MtpActs> mtp;
  double mtp_sum = 0;
  const int depth = mtp_depth();
  if (mtp_lambda_ > 0 && depth > 0) {
    const double weight = double(mtp_lambda_) / double(depth);
    const Tensor* h = &hf;
    int64_t L_prev = T;  // rows per sequence of h
    mtp.resize(static_cast<size_t>(depth));
    for (int k = 0; k < depth; ++k) {
      MtpActs& a = mtp[size_t(k)];
      a.L = T - 1 - k;
      if (a.L < 1) {  // too short a sequence for this depth (and the deeper ones)
        mtp.resize(size_t(k));
        break;
      }
      const int64_t L = a.L, n = B * L;
      a.n = n;
      a.p = cat("model.layers.", c.num_hidden_layers + k, ".");
      a.embed = has(a.p + "embed_tokens.weight") ? a.p + "embed_tokens.weight" : embed;
      a.head = has(a.p + "shared_head.head.weight") ? a.p + "shared_head.head.weight" : head;
      Tensor in_h = Tensor::empty({n}, DType::I32), tg = Tensor::empty({n}, DType::I32);
      Tensor rows_h = Tensor::empty({n}, DType::I32);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < L; ++i) {
          in_h.ptr<int32_t>()[b * L + i] = token_id(batch[size_t(b)][size_t(i + 1 + k)]);
          tg.ptr<int32_t>()[b * L + i] = target_of(batch[size_t(b)][size_t(i + 2 + k)]);
          rows_h.ptr<int32_t>()[b * L + i] = int32_t(b * L_prev + i);
        }
      a.ids = ops.upload(in_h);
      a.rows = ops.upload(rows_h);
      a.e = ops.empty({n, D});
      ops.embedding(a.e, a.ids, W(a.embed));
      a.en = im.norm(a.e, W(a.p + "enorm.weight"));
      if (B == 1) {
        a.hin = h->slice_rows(0, n);  // a view: neither h nor hin is written later
      } else {
        a.hin = ops.empty({n, D});  // each sequence's first L rows of h
        ops.embedding(a.hin, a.rows, *h);
      }
      a.hn = im.norm(a.hin, W(a.p + "hnorm.weight"));
      a.cat_eh = ops.empty({n, 2 * D});
      im.copy(a.cat_eh.f32(), 2 * D, 0, a.en.f32(), D, 0, n, 1, int(D));
      im.copy(a.cat_eh.f32() + D, 2 * D, 0, a.hn.f32(), D, 0, n, 1, int(D));
      Tensor xm = im.mm(a.cat_eh, W(a.p + "eh_proj.weight"));
      im.layer_forward(c.num_hidden_layers + k, xm, a.layer, n, L);
      a.x_out = xm;
      a.xn = im.norm(a.x_out, W(a.p + "shared_head.norm.weight"));
      a.dlogits = im.mm(a.xn, W(a.head));
      int64_t used = 0;
      mtp_sum += im.weighted_cross_entropy(a.dlogits, tg, weight, used);
      h = &a.x_out;
      L_prev = L;
    }
  }
  last_lm_ = lm;
  last_balance_ = im.balance;
  last_mtp_ = mtp.empty() ? 0.0 : mtp_sum / double(depth);
  const double loss = lm + im.balance + (mtp.empty() ? 0.0 : double(mtp_lambda_) * last_mtp_);
  if (!backward) return loss;

  // ---- backward, in exactly the reverse order: the MTP modules (deepest first), then the main model
  const float eps = im.eps;
  Tensor dhf = ops.empty({N, D});
  Tensor& dlogits = logits;
  ops.matmul_backward(dhf, G(head), dlogits, hf, W(head));
  Tensor dh_next;  // the gradient of the hidden state the next-deeper module read
  for (int k = int(mtp.size()) - 1; k >= 0; --k) {
    MtpActs& a = mtp[size_t(k)];
    const int64_t n = a.n;
    Tensor dxn = ops.empty({n, D}), dx = ops.empty({n, D});
    ops.matmul_backward(dxn, G(a.head), a.dlogits, a.xn, W(a.head));
    ops.rmsnorm_backward(dx, G(a.p + "shared_head.norm.weight"), dxn, a.x_out, W(a.p + "shared_head.norm.weight"),
                         eps);
    if (dh_next.defined()) ops.embedding_backward(dx, dh_next, mtp[size_t(k) + 1].rows);  // the rows the next module read
    im.layer_backward(c.num_hidden_layers + k, a.layer, dx, n, a.L);
    Tensor dcat = ops.empty({n, 2 * D});
    ops.matmul_backward(dcat, G(a.p + "eh_proj.weight"), dx, a.cat_eh, W(a.p + "eh_proj.weight"));
    Tensor den = ops.empty({n, D}), dhn = ops.empty({n, D});
    im.copy(den.f32(), D, 0, dcat.f32(), 2 * D, 0, n, 1, int(D));
    im.copy(dhn.f32(), D, 0, dcat.f32() + D, 2 * D, 0, n, 1, int(D));
    Tensor de = ops.empty({n, D});
    ops.rmsnorm_backward(de, G(a.p + "enorm.weight"), den, a.e, W(a.p + "enorm.weight"), eps);
    ops.embedding_backward(G(a.embed), de, a.ids);
    dh_next = ops.empty({n, D});
    ops.rmsnorm_backward(dh_next, G(a.p + "hnorm.weight"), dhn, a.hin, W(a.p + "hnorm.weight"), eps);
  }
  if (dh_next.defined()) ops.embedding_backward(dhf, dh_next, mtp[0].rows);  // module 0 read these rows of it
  Tensor dx = ops.empty({N, D});
  ops.rmsnorm_backward(dx, G("model.norm.weight"), dhf, x, W("model.norm.weight"), eps);
  im.recomputing = true;  // (only read by layer_forward below)
  for (int l = c.num_hidden_layers - 1; l >= 0; --l) {
    LayerActs& a = acts[size_t(l)];
    if (recompute) {
      Tensor xin = a.x_in;
      a = LayerActs{};
      im.layer_forward(l, xin, a, N, T);  // the same inputs give the same activations, bit for bit
    }
    im.layer_backward(l, a, dx, N, T);
    a = LayerActs{};  // this layer's activations are no longer needed
  }
  ops.embedding_backward(G(embed), dx, ids);
  return loss;
}

}  // namespace fathom::train
