// Loading a checkpoint and running the decoder stack.
#include "model/transformer.h"

#include <algorithm>
#include <cstring>
#include <filesystem>

#include "core/error.h"
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

}  // namespace

void decoder_layer_forward(Ops& ops, const DecoderLayerWeights& w, const ModelConfig& c, MlaMode mode, Tensor& x,
                           LayerKvCache& cache, int64_t pos0, const RopeTables& rope) {
  const int64_t T = x.dim(0), D = c.hidden_size;
  const float eps = float(c.rms_norm_eps);
  Tensor h = Tensor::empty({T, D}), y = Tensor::empty({T, D});
  ops.rmsnorm(h, x, w.input_layernorm, eps);
  mla_forward(ops, w.attn, c, mode, y, h, cache, pos0, rope);
  ops.add(x, y);
  ops.rmsnorm(h, x, w.post_attention_layernorm, eps);
  if (w.is_moe)
    moe_forward(ops, w.moe, c, y, h);
  else
    swiglu_forward(ops, w.mlp, y, h);
  ops.add(x, y);
}

Model::~Model() = default;

std::unique_ptr<Model> Model::load(const std::string& dir, const ModelOptions& options) {
  namespace fs = std::filesystem;
  FATHOM_CHECK(fs::is_directory(dir), "model directory ", dir, " does not exist or is not a directory");
  std::unique_ptr<Model> m(new Model());
  m->dir_ = dir;
  m->options_ = options;
  m->ops_ = make_cpu_ops();
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
  WeightLoader loader(*w.files, lo, c.weight_block_size[0]);

  w.embed_tokens = loader.table("model.embed_tokens.weight", {c.vocab_size, c.hidden_size});
  for (int i = 0; i < c.num_hidden_layers; ++i) w.layers.push_back(load_layer(loader, c, i, options.mla_mode));
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
    t.layer = load_layer(loader, c, li, options.mla_mode);
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
  return m;
}

const ModelConfig& Model::config() const { return w_->config; }
bool Model::has_mtp() const { return !w_->mtp.empty(); }

KvCache Model::new_cache(int64_t capacity) const {
  return KvCache(w_->config, w_->config.num_hidden_layers, options_.mla_mode, capacity);
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
  w_->rope->tables(positions.data(), T, cos, sin);
  RopeTables rope{&cos, &sin};

  ForwardOutput out;
  Tensor x = Tensor::empty({T, D});  // the residual stream (T, hidden)
  ops.embedding(x, ids.data(), T, w_->embed_tokens);
  auto snapshot = [&] {
    Tensor s = Tensor::empty({T, D});
    std::memcpy(s.data(), x.data(), x.nbytes());
    out.hidden_states.push_back(s);
  };
  if (req.hidden_states) snapshot();
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    decoder_layer_forward(ops, w_->layers[size_t(l)], c, options_.mla_mode, x, cache.layer(l), pos0, rope);
    if (req.hidden_states && l + 1 < c.num_hidden_layers) snapshot();
  }
  cache.advance(T);
  out.final_hidden = Tensor::empty({T, D});
  ops.rmsnorm(out.final_hidden, x, w_->norm, float(c.rms_norm_eps));
  if (req.hidden_states) out.hidden_states.push_back(out.final_hidden);
  Tensor head_in = req.last_logits_only ? out.final_hidden.slice_rows(T - 1, T) : out.final_hidden;
  out.logits = Tensor::empty({head_in.dim(0), c.vocab_size});
  ops.matmul(out.logits, head_in, w_->lm_head);
  return out;
}

Tensor Model::mtp_logits(const std::vector<int32_t>& ids, const Tensor& h, int depth, Tensor* mtp_hidden) {
  const ModelConfig& c = w_->config;
  FATHOM_CHECK(depth >= 0 && depth < int(w_->mtp.size()), "model ", dir_, " has ", w_->mtp.size(),
               " MTP module(s) (num_nextn_predict_layers); module ", depth, " was requested");
  check_ids(ids, "input ids");
  const int64_t T = int64_t(ids.size()), D = c.hidden_size;
  const int64_t n = T - 1 - depth;  // positions that have a next token for this depth
  FATHOM_CHECK(n >= 1, "MTP depth ", depth + 1, " needs at least ", depth + 2, " input tokens, got ", T);
  FATHOM_CHECK(h.dim(0) >= n && h.dim(1) == D, "MTP input hidden states have shape ", shape_str(h.shape()));
  const MtpWeights& m = w_->mtp[size_t(depth)];
  Ops& ops = *ops_;
  const float eps = float(c.rms_norm_eps);

  std::vector<int32_t> next(ids.begin() + 1 + depth, ids.end());  // the token after each position
  Tensor e = Tensor::empty({n, D}), hn = Tensor::empty({n, D});
  ops.embedding(e, next.data(), n, m.embed_tokens);
  ops.rmsnorm(e, e, m.enorm, eps);
  ops.rmsnorm(hn, h.slice_rows(0, n), m.hnorm, eps);
  Tensor cat_eh = Tensor::empty({n, 2 * D});  // [enorm(emb(t[i+1])) ; hnorm(h[i])]
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(cat_eh.f32() + i * 2 * D, e.f32() + i * D, sizeof(float) * size_t(D));
    std::memcpy(cat_eh.f32() + i * 2 * D + D, hn.f32() + i * D, sizeof(float) * size_t(D));
  }
  Tensor x = Tensor::empty({n, D});
  ops.matmul(x, cat_eh, m.eh_proj);

  std::vector<int64_t> positions(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) positions[size_t(i)] = i;
  Tensor cos, sin;
  w_->rope->tables(positions.data(), n, cos, sin);
  KvCache cache(c, 1, options_.mla_mode, n);
  decoder_layer_forward(ops, m.layer, c, options_.mla_mode, x, cache.layer(0), 0, RopeTables{&cos, &sin});
  if (mtp_hidden) *mtp_hidden = x;
  Tensor normed = Tensor::empty({n, D});
  ops.rmsnorm(normed, x, m.shared_head_norm, eps);
  Tensor logits = Tensor::empty({n, c.vocab_size});
  ops.matmul(logits, normed, m.shared_head);
  return logits;
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
