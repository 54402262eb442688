// Loading a checkpoint and running the decoder stack.
#include "model/transformer.h"
#include "model/kv_pool.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>

#include "core/error.h"
#include "core/progress.h"
#include "fathom/model.h"

namespace fathom {

namespace {

DecoderLayerWeights load_layer(const WeightLoader& w, const ModelConfig& c, int i, MlaMode mode) {
  const std::string p = cat("model.layers.", i, ".");
  DecoderLayerWeights l;
  l.input_layernorm = w.f32(p + "input_layernorm.weight", {c.hidden_size});
  l.post_attention_layernorm = w.f32(p + "post_attention_layernorm.weight", {c.hidden_size});
  l.attn = load_mla(w, c, p + "self_attn.", mode);
  l.is_moe = c.is_moe_layer(i);
  if (l.is_moe)
    l.moe = load_moe(w, c, p + "mlp.");
  else
    l.mlp = load_swiglu(w, p + "mlp.", c.hidden_size, c.intermediate_size);
  return l;
}

int64_t numel_of(const LinearWeight& l) { return l.weight.defined() ? l.weight.numel() : 0; }
int64_t numel_of(const SwiGluWeights& s) { return numel_of(s.gate_proj) + numel_of(s.up_proj) + numel_of(s.down_proj); }

struct LayerCount {
  int64_t total = 0, active = 0, active_bytes = 0;
};

LayerCount count_layer(const DecoderLayerWeights& l, const ModelConfig& c) {
  LayerCount n;
  int64_t attn = 0;
  for (const LinearWeight* x : {&l.attn.q_a_proj, &l.attn.q_b_proj, &l.attn.q_proj, &l.attn.kv_a_proj_with_mqa,
                                &l.attn.kv_b_proj, &l.attn.o_proj})
    attn += numel_of(*x);
  attn += l.attn.q_a_layernorm.numel() * (l.attn.q_a_layernorm.defined() ? 1 : 0) + l.attn.kv_a_layernorm.numel();
  int64_t norms = l.input_layernorm.numel() + l.post_attention_layernorm.numel();
  n.total = n.active = attn + norms;
  n.active_bytes = l.attn.nbytes();
  if (!l.is_moe) {
    n.total += numel_of(l.mlp);
    n.active += numel_of(l.mlp);
    n.active_bytes += l.mlp.nbytes();
    return n;
  }
  int64_t gate = numel_of(l.moe.gate) + (l.moe.e_score_correction_bias.defined() ? c.n_routed_experts : 0);
  int64_t shared = l.moe.has_shared ? numel_of(l.moe.shared_experts) : 0;
  int64_t expert = l.moe.experts.empty() ? 0 : numel_of(l.moe.experts[0]);
  n.total += gate + shared + expert * c.n_routed_experts;
  n.active += gate + shared + expert * c.num_experts_per_tok;
  n.active_bytes += int64_t(l.moe.gate.nbytes()) + (l.moe.has_shared ? l.moe.shared_experts.nbytes() : 0) +
                    (l.moe.experts.empty() ? 0 : l.moe.experts[0].nbytes() * c.num_experts_per_tok);
  return n;
}

// Every weight tensor of the model, for placing them on the device. Tied tensors (the LM head
// and the embedding, the MTP modules' shared head) appear more than once; the caller keeps
// one copy per storage.
template <typename Fn> void for_each_weight(ModelWeights& w, Fn&& fn) {
  auto lin = [&](LinearWeight& l) {
    if (l.weight.defined()) fn(l.weight, true, &l);
  };
  auto vec = [&](Tensor& t) {
    if (t.defined()) fn(t, false, nullptr);
  };
  auto swiglu = [&](SwiGluWeights& s) {
    lin(s.gate_proj);
    lin(s.up_proj);
    lin(s.down_proj);
  };
  auto layer = [&](DecoderLayerWeights& l) {
    vec(l.input_layernorm);
    vec(l.post_attention_layernorm);
    MlaWeights& a = l.attn;
    for (LinearWeight* x : {&a.q_a_proj, &a.q_b_proj, &a.q_proj, &a.kv_a_proj_with_mqa, &a.kv_b_proj, &a.o_proj}) lin(*x);
    vec(a.q_a_layernorm);
    vec(a.kv_a_layernorm);
    if (a.w_uk_t.defined()) fn(a.w_uk_t, true, nullptr);
    if (a.w_uv.defined()) fn(a.w_uv, true, nullptr);
    if (!l.is_moe) return swiglu(l.mlp);
    lin(l.moe.gate);
    vec(l.moe.e_score_correction_bias);
    for (SwiGluWeights& e : l.moe.experts) swiglu(e);
    if (l.moe.has_shared) swiglu(l.moe.shared_experts);
  };
  fn(w.embed_tokens, true, nullptr);
  vec(w.rope_inv_freq);
  for (auto& l : w.layers) layer(l);
  vec(w.norm);
  lin(w.lm_head);
  for (auto& m : w.mtp) {
    vec(m.enorm);
    vec(m.hnorm);
    lin(m.eh_proj);
    layer(m.layer);
    vec(m.shared_head_norm);
    lin(m.shared_head);
    fn(m.embed_tokens, true, nullptr);
  }
}

}  // namespace

const char* device_kind_name(DeviceKind d) {
  return d == DeviceKind::Auto ? "auto" : d == DeviceKind::Cpu ? "cpu" : "cuda";
}
const char* precision_name(Precision p) { return p == Precision::Auto ? "auto" : p == Precision::Fp32 ? "fp32" : "bf16"; }

void decoder_layer_forward(Ops& ops, const DecoderLayerWeights& w, const ModelConfig& c, MlaMode mode, Tensor& x,
                           const std::vector<SeqSlice>& seqs, const RopeTables& rope, ExpertChoices* choices) {
  const float eps = float(c.rms_norm_eps);
  mla_forward(ops, w.attn, c, mode, x, x, seqs, rope, InputNorm{&w.input_layernorm, eps}, /*accumulate=*/true);
  const InputNorm post{&w.post_attention_layernorm, eps};
  if (w.is_moe)
    moe_forward(ops, w.moe, c, x, x, choices, post, /*accumulate=*/true);
  else
    swiglu_forward(ops, w.mlp, x, x, /*accumulate=*/true, post);
}

// The backend and precision an options struct asks for, resolved.
void Model::init_backend(const ModelOptions& options) {
  options_ = options;
  device_ = options.device == DeviceKind::Auto ? (cuda_available() ? DeviceKind::Cuda : DeviceKind::Cpu) : options.device;
  ops_ = device_ == DeviceKind::Cuda ? make_cuda_ops(0) : make_cpu_ops();
  set_fp8_activations(options.fp8_activations);
  precision_ = options.precision != Precision::Auto ? options.precision
               : device_ == DeviceKind::Cuda        ? Precision::Bf16
                                                    : Precision::Fp32;
}

void Model::set_fp8_activations(bool enabled) {
  FATHOM_CHECK(ops_->set_fp8_activations(enabled), "the ", ops_->name(),
               " backend cannot multiply FP8 activations by FP8 weights; use weight-only FP8");
  options_.fp8_activations = enabled;
}

std::unique_ptr<Model> Model::load(const std::string& dir, const ModelOptions& options) {
  namespace fs = std::filesystem;
  FATHOM_CHECK(fs::is_directory(dir), "model directory ", dir, " does not exist or is not a directory");
  std::unique_ptr<Model> m(new Model());
  m->dir_ = dir;
  m->init_backend(options);
  m->w_ = std::make_unique<ModelWeights>();
  ModelWeights& w = *m->w_;
  w.config = load_config((fs::path(dir) / "config.json").string());
  const ModelConfig& c = w.config;
  w.files = std::make_shared<SafetensorsSet>(SafetensorsSet::open_dir(dir));
  LoadOptions lo;
  lo.dequantize_fp8 = options.dequantize_fp8;
  FATHOM_CHECK(c.weight_block_size[0] == c.weight_block_size[1], dir,
               "/config.json: only square FP8 weight blocks are supported, found ", c.weight_block_size[0], "x",
               c.weight_block_size[1]);
  m->build(WeightLoader(*w.files, lo, c.weight_block_size[0]));
  return m;
}

std::unique_ptr<Model> Model::random(const ModelConfig& config, const ModelOptions& options, DType dtype,
                                     uint64_t seed) {
  std::unique_ptr<Model> m(new Model());
  m->dir_ = cat("(random ", dtype_name(dtype), " weights, seed ", seed, ")");
  m->init_backend(options);
  m->w_ = std::make_unique<ModelWeights>();
  m->w_->config = config;
  RandomWeights r;
  r.ops = m->ops_.get();
  r.dtype = dtype;
  r.seed = seed;
  FATHOM_CHECK(dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F16 || dtype == DType::F8_E4M3,
               "random weights must be F32, BF16, F16 or F8_E4M3, not ", dtype_name(dtype));
  m->build(WeightLoader(r, config.weight_block_size[0]));
  return m;
}

void Model::build(const WeightLoader& loader) {
  ModelWeights& w = *w_;
  const ModelConfig& c = w.config;
  w.embed_tokens = loader.table("model.embed_tokens.weight", {c.vocab_size, c.hidden_size});
  for (int i = 0; i < c.num_hidden_layers; ++i) w.layers.push_back(load_layer(loader, c, i, options_.mla_mode));
  w.norm = loader.f32("model.norm.weight", {c.hidden_size});
  if (c.tie_word_embeddings && !loader.contains("lm_head.weight")) {
    w.lm_head.name = "model.embed_tokens.weight";
    w.lm_head.weight = w.embed_tokens;
  } else {
    w.lm_head = loader.linear("lm_head.weight", c.vocab_size, c.hidden_size);
  }
  for (int k = 0; k < c.num_nextn_predict_layers; ++k) {
    const int li = c.num_hidden_layers + k;
    const std::string p = cat("model.layers.", li, ".");
    MtpWeights t;
    t.enorm = loader.f32(p + "enorm.weight", {c.hidden_size});
    t.hnorm = loader.f32(p + "hnorm.weight", {c.hidden_size});
    t.eh_proj = loader.linear(p + "eh_proj.weight", c.hidden_size, 2 * c.hidden_size);
    t.layer = load_layer(loader, c, li, options_.mla_mode);
    t.shared_head_norm = loader.f32(p + "shared_head.norm.weight", {c.hidden_size});
    // The published V3 checkpoint repeats the embedding and head in every MTP module;
    // checkpoints that share them may leave them out.
    t.shared_head = loader.contains(p + "shared_head.head.weight")
                        ? loader.linear(p + "shared_head.head.weight", c.vocab_size, c.hidden_size)
                        : w.lm_head;
    t.embed_tokens = loader.contains(p + "embed_tokens.weight")
                         ? loader.table(p + "embed_tokens.weight", {c.vocab_size, c.hidden_size})
                         : w.embed_tokens;
    w.mtp.push_back(std::move(t));
  }
  w.rope = std::make_unique<Rope>(c);
  w.rope_inv_freq = Tensor::empty({int64_t(w.rope->inv_freq().size())}, DType::F64);
  std::copy(w.rope->inv_freq().begin(), w.rope->inv_freq().end(), w.rope_inv_freq.ptr<double>());
  place_weights();
  // every MoE layer's experts in the backend's form, now that the weights stay where they are
  auto prepare = [&](DecoderLayerWeights& l) {
    if (!l.is_moe) return prepare_swiglu(*ops_, l.mlp);
    prepare_moe(*ops_, l.moe);
    if (l.moe.has_shared) prepare_swiglu(*ops_, l.moe.shared_experts);
  };
  for (auto& l : w.layers) prepare(l);
  for (auto& t : w.mtp) prepare(t.layer);
}

// Puts every weight where the backend computes: rounded to BF16 first in bf16 mode, then (on
// CUDA) copied to the GPU through the backend's pinned staging buffers, behind a progress bar.
// The memory budget is checked before the first byte moves, and what is left of it after the
// weights and a work-space reserve becomes the KV cache's limit.
void Model::place_weights() {
  ModelWeights& w = *w_;
  const ModelConfig& c = w.config;
  Ops& ops = *ops_;
  const bool to_bf16 = precision_ == Precision::Bf16;
  auto placed_dtype = [&](const Tensor& t, bool convertible) {
    return to_bf16 && convertible && (t.dtype() == DType::F32 || t.dtype() == DType::F16) ? DType::BF16 : t.dtype();
  };
  // one placement per storage: tied tensors share it
  std::map<const void*, Tensor> done;
  int64_t total = 0, to_move = 0;  // all weight bytes; those still in host memory
  for_each_weight(w, [&](Tensor& t, bool convertible, LinearWeight* l) {
    if (done.emplace(t.data(), Tensor()).second) {
      const int64_t n = t.numel() * int64_t(dtype_size(placed_dtype(t, convertible)));
      total += n;
      if (t.device() != ops.device()) to_move += n;
    }
    if (l && l->quantized() && done.emplace(l->scale_inv.data(), Tensor()).second) {
      total += int64_t(l->scale_inv.nbytes());
      if (l->scale_inv.device() != ops.device()) to_move += int64_t(l->scale_inv.nbytes());
    }
  });
  done.clear();
  const int64_t kv_token_bytes =
      KvCache::bytes_per_token_per_layer(c, options_.mla_mode, int64_t(dtype_size(kv_dtype()))) *
      (c.num_hidden_layers);
  if (device_ == DeviceKind::Cpu) {
    max_cache_tokens_ = std::max<int64_t>(c.max_position_embeddings, 1);
    if (!to_bf16) return;  // weights stay as they were loaded
  } else {
    // weights made on the device already (random models) count as used budget
    const int64_t free = ops.free_memory() + (total - to_move);
    const double gib = 1024.0 * 1024.0 * 1024.0;
    int64_t budget = options_.gpu_memory > 0 ? options_.gpu_memory : free;
    FATHOM_CHECK(budget <= free, "--gpu-memory asks for ", budget / gib, " GiB but only ", free / gib,
                 " GiB of GPU memory are free");
    FATHOM_CHECK(total <= budget, "model ", dir_, " needs ", total / gib, " GiB of GPU memory for its weights (",
                 precision_name(precision_), ") but the budget is ", budget / gib,
                 " GiB; use a smaller model, FP8 weights, a larger --gpu-memory or --device cpu");
    // work space for activations: 10% of what remains, at least 256 MiB
    const int64_t left = budget - total;
    const int64_t reserve = std::max<int64_t>(left / 10, int64_t(256) << 20);
    kv_budget_tokens_ = (left - reserve) / kv_token_bytes;
    max_cache_tokens_ = std::min<int64_t>(kv_budget_tokens_, c.max_position_embeddings);
    FATHOM_CHECK(max_cache_tokens_ >= 1, "the GPU memory budget leaves no room for the KV cache: ", budget / gib,
                 " GiB budget, ", total / gib, " GiB of weights, ", reserve / gib,
                 " GiB work space; one token needs ", kv_token_bytes, " bytes; raise --gpu-memory");
    gpu_weight_bytes_ = total;
  }
  Progress bar(cat("loading ", c.num_hidden_layers, " layers to ", ops.name()), to_move, true, options_.progress);
  for_each_weight(w, [&](Tensor& t, bool convertible, LinearWeight* l) {
    auto it = done.find(t.data());
    if (it != done.end() && it->second.defined()) {
      t = it->second;
    } else if (t.device() == ops.device() && placed_dtype(t, convertible) == t.dtype()) {
      done[t.data()] = t;  // made in place
    } else if (t.device() != Device::CPU) {
      // made on the device (random weights) in F32: rounded to BF16 there, by the copy op
      FATHOM_ASSERT(t.dtype() == DType::F32 && t.numel() > 0, "a device weight of ", dtype_name(t.dtype()),
                    " to round to ", dtype_name(placed_dtype(t, convertible)));
      const void* key = t.data();
      Tensor placed = ops.empty(t.shape(), placed_dtype(t, convertible));
      CopyParams cp;
      cp.out = placed.data();
      cp.out_dtype = placed.dtype();
      cp.in = t.f32();
      cp.cols = int(t.shape().back());
      cp.n_tokens = t.numel() / cp.cols;
      cp.out_token_stride = cp.in_token_stride = cp.cols;
      ops.copy(cp);
      done[key] = placed;
      t = placed;
    } else {
      const void* key = t.data();
      const DType to = placed_dtype(t, convertible);
      Tensor host = to == t.dtype() ? t : from_f32(to_f32(t).f32(), t.shape(), to);
      Tensor placed = ops.upload(host);
      bar.add(int64_t(placed.nbytes()));
      done[key] = placed;
      t = placed;
    }
    if (l && l->quantized()) {
      const void* key = l->scale_inv.data();
      auto si = done.find(key);
      if (si == done.end() || !si->second.defined()) {
        Tensor placed = ops.upload(l->scale_inv);
        bar.add(int64_t(placed.nbytes()));
        si = done.insert_or_assign(key, placed).first;
      }
      l->scale_inv = si->second;
    }
  });
  bar.finish();
}

const char* Model::backend_name() const { return ops_->name(); }

void Model::rope_tables(const std::vector<int64_t>& positions, Tensor& cos, Tensor& sin) const {
  Tensor cos_h, sin_h;
  w_->rope->tables(positions.data(), int64_t(positions.size()), cos_h, sin_h);
  cos = ops_->upload(cos_h);
  sin = ops_->upload(sin_h);
}

void Model::check_caches(const std::vector<KvCache*>& caches, const char* what) const {
  for (size_t b = 0; b < caches.size(); ++b) {
    FATHOM_CHECK(caches[b]->mode() == options_.mla_mode, "KV cache ", b, " was made for MLA mode ",
                 mla_mode_name(caches[b]->mode()));
    for (size_t b2 = 0; b2 < b; ++b2) FATHOM_CHECK(caches[b2] != caches[b], what, ": cache ", b, " repeats cache ", b2);
  }
}

const ModelConfig& Model::config() const { return w_->config; }
bool Model::has_mtp() const { return !w_->mtp.empty(); }

std::shared_ptr<KvBlockPool> Model::new_block_pool(int64_t tokens, int block_size, bool mtp) const {
  FATHOM_CHECK(block_size >= 1 && block_size <= 4096, "KV block size ", block_size, " is out of range (1 to 4096)");
  FATHOM_CHECK(tokens >= block_size, "a KV cache of ", tokens, " tokens is smaller than one block of ", block_size);
  FATHOM_CHECK(!mtp || has_mtp(), "model ", dir_, " has no MTP module for an MTP block pool");
  const int layers = mtp ? 1 : w_->config.num_hidden_layers;
  const int64_t token_bytes =
      KvCache::bytes_per_token_per_layer(w_->config, options_.mla_mode, int64_t(dtype_size(kv_dtype()))) * layers;
  // the budget is counted in tokens of the whole model's layers
  const int64_t budget = kv_budget_tokens_ * (w_->config.num_hidden_layers / layers);
  if (kv_budget_tokens_ > 0)
    FATHOM_CHECK(tokens <= budget, "a KV cache of ", tokens, " tokens (", tokens * token_bytes / 1048576,
                 " MiB) does not fit the GPU memory budget, which leaves room for ", budget,
                 " tokens; lower the KV cache size or raise --gpu-memory");
  return std::make_shared<KvBlockPool>(*ops_, w_->config, layers, options_.mla_mode, kv_dtype(), block_size,
                                       tokens / block_size);
}

KvCache Model::new_cache(int64_t capacity) const {
  if (capacity <= 0) capacity = std::min<int64_t>(256, max_cache_tokens_);
  return KvCache(*ops_, w_->config, w_->config.num_hidden_layers, options_.mla_mode, capacity, kv_dtype(),
                 max_cache_tokens_);
}

ParamCounts Model::param_counts() const {
  const ModelConfig& c = w_->config;
  ParamCounts p;
  int64_t emb = w_->embed_tokens.numel();
  int64_t head = (w_->lm_head.weight.data() == w_->embed_tokens.data()) ? 0 : numel_of(w_->lm_head);
  p.main = emb + head + w_->norm.numel();
  p.active_per_token = p.main;
  // one embedding row is read per token; the LM head and the final norm are read whole
  p.active_weight_bytes = int64_t(w_->lm_head.nbytes()) + c.hidden_size * int64_t(dtype_size(w_->embed_tokens.dtype())) +
                          w_->norm.numel() * 2;
  for (const auto& l : w_->layers) {
    LayerCount n = count_layer(l, c);
    p.main += n.total;
    p.active_per_token += n.active;
    p.active_weight_bytes += n.active_bytes + (l.input_layernorm.numel() + l.post_attention_layernorm.numel()) * 2;
  }
  for (const auto& t : w_->mtp) {
    LayerCount n = count_layer(t.layer, c);
    p.mtp += n.total + t.enorm.numel() + t.hnorm.numel() + numel_of(t.eh_proj) + t.shared_head_norm.numel();
    if (t.shared_head.weight.data() != w_->lm_head.weight.data()) p.mtp += numel_of(t.shared_head);
    if (t.embed_tokens.data() != w_->embed_tokens.data()) p.mtp += t.embed_tokens.numel();
  }
  p.total = p.main + p.mtp;
  return p;
}

void Model::check_ids(const std::vector<int32_t>& ids, const std::string& what) const {
  FATHOM_CHECK(!ids.empty(), what, " is empty: at least one token id is needed");
  const int64_t V = w_->config.vocab_size;
  for (size_t i = 0; i < ids.size(); ++i)
    FATHOM_CHECK(ids[i] >= 0 && ids[i] < V, what, "[", i, "] = ", ids[i], " is outside the vocabulary [0, ", V, ")");
}

ForwardOutput Model::forward(const std::vector<int32_t>& ids, KvCache& cache, const ForwardRequest& req) {
  FATHOM_CHECK(!launched_, "forward: a step launched by decode_launch was not waited for (decode_wait)");
  check_ids(ids, "input ids");
  FATHOM_CHECK(cache.mode() == options_.mla_mode, "KV cache was made for MLA mode ", mla_mode_name(cache.mode()),
               " but the model runs ", mla_mode_name(options_.mla_mode));
  const ModelConfig& c = w_->config;
  Ops& ops = *ops_;
  const int64_t T = int64_t(ids.size()), D = c.hidden_size, pos0 = cache.length();
  cache.reserve(T);

  std::vector<int64_t> positions(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) positions[size_t(t)] = pos0 + t;
  Tensor cos, sin;
  rope_tables(positions, cos, sin);
  RopeTables rope{&cos, &sin};
  Tensor ids_d = ops.upload(Tensor::view(const_cast<int32_t*>(ids.data()), {T}, DType::I32, nullptr));

  ForwardOutput out;
  Tensor x = ops.empty({T, D});  // the residual stream (T, hidden)
  ops.embedding(x, ids_d, w_->embed_tokens);
  auto snapshot = [&](const Tensor& s) {
    Tensor h = Tensor::empty({T, D});
    ops.download(h.data(), s);
    out.hidden_states.push_back(h);
  };
  if (req.hidden_states) snapshot(x);
  const KvPaging paging(ops, {&cache}, {T});
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    ExpertChoices* ch = nullptr;
    if (req.expert_choices) {
      out.expert_choices.emplace_back();
      ch = &out.expert_choices.back();
    }
    decoder_layer_forward(ops, w_->layers[size_t(l)], c, options_.mla_mode, x, {cache_slice(cache, l, paging, 0, 0, T)},
                          rope, ch);
    if (req.hidden_states && l + 1 < c.num_hidden_layers) snapshot(x);
  }
  cache.advance(T);
  Tensor normed = ops.empty({T, D});  // after the final norm
  ops.rmsnorm(normed, x, w_->norm, float(c.rms_norm_eps));
  out.final_hidden = Tensor::empty({T, D});
  ops.download(out.final_hidden.data(), normed);
  if (req.hidden_states) out.hidden_states.push_back(out.final_hidden);
  Tensor head_in = req.last_logits_only ? normed.slice_rows(T - 1, T) : normed;
  Tensor logits = ops.empty({head_in.dim(0), c.vocab_size});
  ops.matmul(logits, head_in, w_->lm_head);
  out.logits = Tensor::empty({head_in.dim(0), c.vocab_size});
  ops.download(out.logits.data(), logits);
  return out;
}

Tensor gather_last_rows(Ops& ops, const Tensor& x, const std::vector<int64_t>& starts,
                        const std::vector<std::vector<int32_t>>& lens, const std::vector<int64_t>& want, int64_t D) {
  int64_t R = 0;
  for (size_t b = 0; b < lens.size(); ++b) R += want.empty() ? 1 : want[b];
  Tensor rows = ops.empty({R, D});
  int64_t r = 0;
  for (size_t b = 0; b < lens.size(); ++b) {
    const int64_t n = want.empty() ? 1 : want[b];
    CopyParams cp;
    cp.out = rows.f32() + r * D;
    cp.out_token_stride = D;
    cp.in = x.f32() + (starts[b] + int64_t(lens[b].size()) - n) * D;
    cp.in_token_stride = D;
    cp.n_tokens = n;
    cp.cols = int(D);
    ops.copy(cp);
    r += n;
  }
  return rows;
}

SeqSlice cache_slice(KvCache& cache, int layer, const KvPaging& paging, size_t b, int64_t t0, int64_t n) {
  SeqSlice s;
  s.cache = &cache.layer(layer);
  s.pos0 = cache.length();
  s.t0 = t0;
  s.n = n;
  s.block_table = paging.block_table(b);
  s.block_size = cache.block_size();
  s.rows = paging.rows(b);
  return s;
}

void check_batch(const std::vector<std::vector<int32_t>>& tokens, size_t n_caches, const char* what) {
  FATHOM_CHECK(!tokens.empty() && tokens.size() == n_caches, what, ": ", tokens.size(), " token lists for ", n_caches,
               " caches");
  for (size_t b = 0; b < tokens.size(); ++b)
    FATHOM_CHECK(!tokens[b].empty(), what, ": sequence ", b, " has no tokens");
}

Tensor Model::batch_logits(const std::vector<std::vector<int32_t>>& tokens, const std::vector<KvCache*>& caches,
                           const char* what) {
  check_batch(tokens, caches.size(), what);
  std::vector<int64_t> starts;
  Tensor x = batch_layers(tokens, caches, starts);
  const ModelConfig& c = w_->config;
  Ops& ops = *ops_;
  const int64_t B = int64_t(tokens.size()), D = c.hidden_size;
  // the last row of every sequence through the final norm and the LM head
  Tensor last = gather_last_rows(ops, x, starts, tokens, {}, D);
  Tensor logits = ops.empty({B, c.vocab_size});
  ops.matmul_batch({{logits.f32(), last.f32(), B, &w_->lm_head, InputNorm{&w_->norm, float(c.rms_norm_eps)}}});
  return logits;
}

Tensor Model::forward_batch(const std::vector<std::vector<int32_t>>& tokens, const std::vector<KvCache*>& caches) {
  Tensor logits = batch_logits(tokens, caches, "forward_batch");
  Tensor host = Tensor::empty(logits.shape());
  ops_->download(host.data(), logits);
  return host;
}

std::vector<int32_t> Model::forward_batch_sample(const std::vector<std::vector<int32_t>>& tokens,
                                                 const std::vector<KvCache*>& caches,
                                                 const std::vector<SampleRow>& rows) {
  check_sample_rows(rows, tokens.size(), "forward_batch_sample");
  std::vector<int32_t> ids = graph_sample_step(tokens, caches, rows, "forward_batch_sample", /*launch_only=*/false);
  if (!ids.empty()) return ids;
  return sample_eagerly(tokens, caches, rows);
}

std::vector<int32_t> Model::graph_sample_step(const std::vector<std::vector<int32_t>>& tokens,
                                              const std::vector<KvCache*>& caches, const std::vector<SampleRow>& rows,
                                              const char* what, bool launch_only) {
  // one new token per sequence of paged caches on the GPU: the graph-replayed decode step
  bool one_each = device_ == DeviceKind::Cuda && !tokens.empty() && tokens.size() == caches.size() &&
                  graph_step_takes(caches) && caches[0]->paged() && graph_steps_;
  for (const auto& t : tokens) one_each = one_each && t.size() == 1;
  if (!one_each) return {};
  std::vector<int32_t> flat;
  for (const auto& t : tokens) flat.push_back(t[0]);
  // every row greedy (temperature 0: Ops::sample's answer is the first largest logit, whatever
  // the rest of the row says): the argmax step, without the sampling kernels and their work space
  bool greedy = true;
  for (const SampleRow& r : rows) greedy = greedy && r.temperature == 0.0f;
  // {} for a batch seen for the first time (the caller runs it eagerly) or a step left running
  return decode_step(flat, caches, greedy ? nullptr : &rows, what, /*wait_to_capture=*/true, launch_only);
}

std::vector<int32_t> Model::sample_eagerly(const std::vector<std::vector<int32_t>>& tokens,
                                           const std::vector<KvCache*>& caches, const std::vector<SampleRow>& rows) {
  Ops& ops = *ops_;
  const Tensor logits = batch_logits(tokens, caches, "forward_batch_sample");
  const int64_t B = int64_t(tokens.size());
  Tensor params_host = Tensor::empty({B * int64_t(sizeof(SampleRow))}, DType::U8);
  std::memcpy(params_host.data(), rows.data(), size_t(B) * sizeof(SampleRow));
  const Tensor params = ops.upload(params_host);
  Tensor ids = ops.empty({B}, DType::I32);
  ops.sample(ids, logits, params);
  std::vector<int32_t> out(static_cast<size_t>(B));
  ops.download(out.data(), ids);
  return out;
}

Model::StagedBatch Model::stage_batch(const std::vector<std::vector<int32_t>>& tokens,
                                     const std::vector<KvCache*>& caches, int layers, const char* what) const {
  FATHOM_CHECK(!launched_, what, ": a step launched by decode_launch was not waited for (decode_wait)");
  check_caches(caches, what);
  StagedBatch sb;
  for (size_t b = 0; b < tokens.size(); ++b) {
    check_ids(tokens[b], cat(what, ": tokens of sequence ", b));
    KvCache& kc = *caches[b];
    FATHOM_CHECK(kc.n_layers() == layers, what, ": cache ", b, " has ", kc.n_layers(), " layers, not ", layers,
                 layers == 1 ? " (an MTP cache: new_mtp_cache)" : " (the model's)");
    kc.reserve(int64_t(tokens[b].size()));
    sb.starts.push_back(int64_t(sb.ids.size()));
    sb.n_new.push_back(int64_t(tokens[b].size()));
    for (size_t i = 0; i < tokens[b].size(); ++i) {
      sb.ids.push_back(tokens[b][i]);
      sb.positions.push_back(kc.length() + int64_t(i));
    }
  }
  return sb;
}

Tensor Model::batch_layers(const std::vector<std::vector<int32_t>>& tokens, const std::vector<KvCache*>& caches,
                           std::vector<int64_t>& starts) {
  const ModelConfig& c = w_->config;
  Ops& ops = *ops_;
  const int64_t B = int64_t(tokens.size()), D = c.hidden_size;
  StagedBatch sb = stage_batch(tokens, caches, c.num_hidden_layers, "forward_batch");
  starts = sb.starts;
  const std::vector<int64_t>& n_new = sb.n_new;
  const int64_t T = int64_t(sb.ids.size());
  Tensor cos, sin;
  rope_tables(sb.positions, cos, sin);
  RopeTables rope{&cos, &sin};
  Tensor ids_d = ops.upload(Tensor::view(sb.ids.data(), {T}, DType::I32, nullptr));
  Tensor x = ops.empty({T, D});
  ops.embedding(x, ids_d, w_->embed_tokens);
  const KvPaging paging(ops, caches, n_new);
  std::vector<SeqSlice> seqs(static_cast<size_t>(B));
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    for (int64_t b = 0; b < B; ++b)
      seqs[size_t(b)] = cache_slice(*caches[size_t(b)], l, paging, size_t(b), starts[size_t(b)], n_new[size_t(b)]);
    decoder_layer_forward(ops, w_->layers[size_t(l)], c, options_.mla_mode, x, seqs, rope);
  }
  for (int64_t b = 0; b < B; ++b) caches[size_t(b)]->advance(int64_t(tokens[size_t(b)].size()));
  return x;
}

Model::BatchRows Model::forward_batch_rows(const std::vector<std::vector<int32_t>>& tokens,
                                           const std::vector<KvCache*>& caches, const std::vector<int64_t>& want) {
  check_batch(tokens, caches.size(), "forward_batch_rows");
  FATHOM_CHECK(want.size() == tokens.size(), "forward_batch_rows: ", want.size(), " row counts for ", tokens.size(),
               " sequences");
  int64_t R = 0;
  for (size_t b = 0; b < want.size(); ++b) {
    FATHOM_CHECK(want[b] >= 1 && want[b] <= int64_t(tokens[b].size()), "forward_batch_rows: sequence ", b, " wants ",
                 want[b], " rows of its ", tokens[b].size(), " tokens");
    R += want[b];
  }
  std::vector<int64_t> starts;
  Tensor x = batch_layers(tokens, caches, starts);
  const ModelConfig& c = w_->config;
  Ops& ops = *ops_;
  const int64_t D = c.hidden_size;
  Tensor rows = gather_last_rows(ops, x, starts, tokens, want, D);
  Tensor normed = ops.empty({R, D});
  ops.rmsnorm(normed, rows, w_->norm, float(c.rms_norm_eps));
  Tensor logits = ops.empty({R, c.vocab_size});
  ops.matmul(logits, normed, w_->lm_head);
  BatchRows out;
  out.logits = Tensor::empty({R, c.vocab_size});
  ops.download(out.logits.data(), logits);
  out.hidden = Tensor::empty({R, D});
  ops.download(out.hidden.data(), normed);
  return out;
}

std::vector<int32_t> Model::generate_greedy(const std::vector<int32_t>& prompt, int64_t n_new) {
  KvCache cache = new_cache(int64_t(prompt.size()) + n_new);
  std::vector<int32_t> out;
  ForwardRequest req;
  req.last_logits_only = true;
  std::vector<int32_t> step = prompt;
  const int64_t V = w_->config.vocab_size;
  for (int64_t i = 0; i < n_new; ++i) {
    ForwardOutput o = forward(step, cache, req);
    const float* l = o.logits.f32();
    int32_t best = int32_t(std::max_element(l, l + V) - l);
    out.push_back(best);
    step.assign(1, best);
  }
  return out;
}

}  // namespace fathom
