#include "model/random_init.h"

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/files.h"
#include "core/safetensors.h"

namespace fathom {

namespace {

void add_layer(std::vector<TensorSpec>& t, const ModelConfig& c, int i) {
  const std::string p = cat("model.layers.", i, ".");
  const int64_t D = c.hidden_size, H = c.num_attention_heads;
  t.push_back({p + "input_layernorm.weight", {D}, TensorRole::Norm});
  const std::string a = p + "self_attn.";
  if (c.q_lora_rank > 0) {
    t.push_back({a + "q_a_proj.weight", {c.q_lora_rank, D}, TensorRole::Linear});
    t.push_back({a + "q_a_layernorm.weight", {c.q_lora_rank}, TensorRole::Norm});
    t.push_back({a + "q_b_proj.weight", {H * c.qk_head_dim(), c.q_lora_rank}, TensorRole::Linear});
  } else {
    t.push_back({a + "q_proj.weight", {H * c.qk_head_dim(), D}, TensorRole::Linear});
  }
  t.push_back({a + "kv_a_proj_with_mqa.weight", {c.kv_lora_rank + c.qk_rope_head_dim, D}, TensorRole::Linear});
  t.push_back({a + "kv_a_layernorm.weight", {c.kv_lora_rank}, TensorRole::Norm});
  t.push_back({a + "kv_b_proj.weight", {H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank}, TensorRole::Linear});
  t.push_back({a + "o_proj.weight", {D, H * c.v_head_dim}, TensorRole::Linear});
  t.push_back({p + "post_attention_layernorm.weight", {D}, TensorRole::Norm});
  auto swiglu = [&](const std::string& q, int64_t inter) {
    t.push_back({q + "gate_proj.weight", {inter, D}, TensorRole::Linear});
    t.push_back({q + "up_proj.weight", {inter, D}, TensorRole::Linear});
    t.push_back({q + "down_proj.weight", {D, inter}, TensorRole::Linear});
  };
  if (!c.is_moe_layer(i)) {
    swiglu(p + "mlp.", c.intermediate_size);
    return;
  }
  t.push_back({p + "mlp.gate.weight", {c.n_routed_experts, D}, TensorRole::Embedding});  // router: kept unquantized
  if (c.topk_method == "noaux_tc") t.push_back({p + "mlp.gate.e_score_correction_bias", {c.n_routed_experts}, TensorRole::Bias});
  for (int e = 0; e < c.n_routed_experts; ++e) swiglu(cat(p, "mlp.experts.", e, "."), c.moe_intermediate_size);
  if (c.n_shared_experts > 0) swiglu(p + "mlp.shared_experts.", c.moe_intermediate_size * c.n_shared_experts);
}

// splitmix64 + Box-Muller: fast, deterministic across platforms.
class Normal {
 public:
  explicit Normal(uint64_t seed) : s_(seed) {}
  double next() {
    if (have_) {
      have_ = false;
      return spare_;
    }
    double u1 = (double(bits() >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    double u2 = double(bits() >> 11) * (1.0 / 9007199254740992.0);
    double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = r * std::sin(2 * M_PI * u2);
    have_ = true;
    return r * std::cos(2 * M_PI * u2);
  }

 private:
  uint64_t bits() {
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint64_t s_;
  double spare_ = 0;
  bool have_ = false;
};

}  // namespace

// FP8 e4m3 with one scale per block x block tile: scale = amax / 448, q = round(w / scale).
void quantize_fp8(const float* v, int64_t N, int64_t K, int64_t block, Tensor& q, Tensor& scale_inv) {
  const int64_t b = block, nb = (N + b - 1) / b, kb = (K + b - 1) / b;
  q = Tensor::empty({N, K}, DType::F8_E4M3);
  scale_inv = Tensor::empty({nb, kb});
  for (int64_t bi = 0; bi < nb; ++bi)
    for (int64_t bj = 0; bj < kb; ++bj) {
      float amax = 0;
      for (int64_t n = bi * b; n < std::min(N, (bi + 1) * b); ++n)
        for (int64_t k = bj * b; k < std::min(K, (bj + 1) * b); ++k) amax = std::max(amax, std::fabs(v[n * K + k]));
      const float s = std::max(amax, 1e-12f) / 448.0f;
      scale_inv.f32()[bi * kb + bj] = s;
      for (int64_t n = bi * b; n < std::min(N, (bi + 1) * b); ++n)
        for (int64_t k = bj * b; k < std::min(K, (bj + 1) * b); ++k)
          q.ptr<uint8_t>()[n * K + k] = f32_to_fp8e4m3(v[n * K + k] / s);
    }
}

std::vector<TensorSpec> checkpoint_layout(const ModelConfig& c) {
  std::vector<TensorSpec> t;
  const int64_t D = c.hidden_size, V = c.vocab_size;
  t.push_back({"model.embed_tokens.weight", {V, D}, TensorRole::Embedding});
  for (int i = 0; i < c.num_hidden_layers; ++i) add_layer(t, c, i);
  t.push_back({"model.norm.weight", {D}, TensorRole::Norm});
  if (!c.tie_word_embeddings) t.push_back({"lm_head.weight", {V, D}, TensorRole::Embedding});
  for (int k = 0; k < c.num_nextn_predict_layers; ++k) {
    const int li = c.num_hidden_layers + k;
    const std::string p = cat("model.layers.", li, ".");
    t.push_back({p + "enorm.weight", {D}, TensorRole::Norm});
    t.push_back({p + "hnorm.weight", {D}, TensorRole::Norm});
    t.push_back({p + "eh_proj.weight", {D, 2 * D}, TensorRole::Linear});
    add_layer(t, c, li);
    t.push_back({p + "shared_head.norm.weight", {D}, TensorRole::Norm});
    t.push_back({p + "shared_head.head.weight", {V, D}, TensorRole::Embedding});
    t.push_back({p + "embed_tokens.weight", {V, D}, TensorRole::Embedding});
  }
  return t;
}

void write_random_checkpoint(const std::string& config_json, const std::string& dir, const RandomInitOptions& o,
                             const std::string& source) {
  namespace fs = std::filesystem;
  nlohmann::json j = nlohmann::json::parse(config_json, nullptr, false);
  FATHOM_CHECK(!j.is_discarded(), source, " is not valid JSON");
  ModelConfig c = parse_config(j, source);
  const bool fp8 = o.dtype == DType::F8_E4M3;
  if (fp8 && !j.contains("quantization_config"))
    j["quantization_config"] = {{"activation_scheme", "dynamic"}, {"fmt", "e4m3"}, {"quant_method", "fp8"},
                                {"weight_block_size", {128, 128}}};
  std::error_code ec;
  fs::create_directories(dir, ec);
  FATHOM_CHECK(!ec, "cannot create directory ", dir, ": ", ec.message());
  const DType plain = fp8 ? DType::BF16 : o.dtype;  // what non-linear tensors use
  Normal rng(o.seed);
  SafetensorsWriter w;
  w.set_metadata("format", "pt");
  for (const TensorSpec& s : checkpoint_layout(c)) {
    if (o.mtp_shared_embeddings && (s.name.find(".shared_head.head.") != std::string::npos ||
                                    (s.name.find(".embed_tokens.") != std::string::npos && s.name != "model.embed_tokens.weight")))
      continue;
    std::vector<float> v(static_cast<size_t>(shape_numel(s.shape)));
    if (s.role == TensorRole::Norm) {
      std::fill(v.begin(), v.end(), 1.0f);
    } else {
      for (float& x : v) x = float(rng.next() * o.std);
    }
    if (s.role == TensorRole::Bias) {
      w.add(s.name, from_f32(v.data(), s.shape, DType::F32));
    } else if (s.role == TensorRole::Linear && fp8) {
      Tensor q, scale;
      quantize_fp8(v.data(), s.shape[0], s.shape[1], 128, q, scale);
      w.add(s.name, q);
      w.add(s.name + "_scale_inv", scale);
    } else {
      w.add(s.name, from_f32(v.data(), s.shape, plain));
    }
  }
  if (o.max_shard_bytes > 0)
    w.write_sharded(dir, o.max_shard_bytes);
  else
    w.write((fs::path(dir) / "model.safetensors").string());
  write_file_atomic((fs::path(dir) / "config.json").string(), j.dump(2) + "\n");
}

}  // namespace fathom
