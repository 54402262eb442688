#include "model/config.h"

#include <cmath>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace fathom {

using nlohmann::json;

namespace {

// Typed field access with errors that name the file, the field and the expected type.
class Fields {
 public:
  Fields(const json& j, std::string source) : j_(j), source_(std::move(source)) {}

  bool has(const char* key) const { return j_.contains(key) && !j_.at(key).is_null(); }

  int64_t integer(const char* key) const {
    FATHOM_CHECK(has(key), source_, ": missing field '", key, "' (an integer)");
    return as_integer(j_.at(key), key);
  }
  int64_t integer(const char* key, int64_t fallback) const { return has(key) ? as_integer(j_.at(key), key) : fallback; }
  int64_t positive(const char* key) const {
    int64_t v = integer(key);
    FATHOM_CHECK(v > 0, source_, ": field '", key, "' must be a positive integer, found ", v);
    return v;
  }
  double number(const char* key, double fallback) const {
    if (!has(key)) return fallback;
    const json& v = j_.at(key);
    FATHOM_CHECK(v.is_number(), source_, ": field '", key, "' must be a number, found ", type_of(v));
    double d = v.get<double>();
    FATHOM_CHECK(std::isfinite(d), source_, ": field '", key, "' must be finite");
    return d;
  }
  bool boolean(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    const json& v = j_.at(key);
    FATHOM_CHECK(v.is_boolean(), source_, ": field '", key, "' must be true or false, found ", type_of(v));
    return v.get<bool>();
  }
  std::string string(const char* key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    const json& v = j_.at(key);
    FATHOM_CHECK(v.is_string(), source_, ": field '", key, "' must be a string, found ", type_of(v));
    return v.get<std::string>();
  }
  std::string string(const char* key) const {
    FATHOM_CHECK(has(key), source_, ": missing field '", key, "' (a string)");
    return string(key, "");
  }

  static std::string type_of(const json& v) {
    std::string d = v.dump();
    if (d.size() > 40) d = d.substr(0, 40) + "...";
    return std::string(v.type_name()) + " " + d;
  }

 private:
  int64_t as_integer(const json& v, const char* key) const {
    if (v.is_number_integer()) return v.get<int64_t>();
    // 4.0 written by a float-happy serializer is still an integer
    if (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>() && std::fabs(v.get<double>()) < 9e15)
      return int64_t(v.get<double>());
    throw Error(cat(source_, ": field '", key, "' must be an integer, found ", type_of(v)));
  }

  const json& j_;
  std::string source_;
};

RopeScaling parse_rope(const json& r, const std::string& where) {
  FATHOM_CHECK(r.is_object(), where, " must be an object, found ", Fields::type_of(r));
  Fields f(r, where);
  RopeScaling s;
  s.type = f.has("rope_type") ? f.string("rope_type") : f.string("type", "default");
  if (s.type == "default") return s;
  FATHOM_CHECK(s.type == "yarn", where, ": rope type '", s.type, "' is not supported (fathom implements 'default' and 'yarn')");
  s.factor = f.number("factor", 0.0);
  FATHOM_CHECK(f.has("factor") && s.factor >= 1.0, where, ": yarn needs 'factor' >= 1");
  s.original_max_position_embeddings = f.number("original_max_position_embeddings", 0.0);
  s.beta_fast = f.number("beta_fast", 32.0);
  s.beta_slow = f.number("beta_slow", 1.0);
  s.mscale = f.number("mscale", 1.0);
  s.mscale_all_dim = f.number("mscale_all_dim", 0.0);
  if (f.has("attention_factor")) s.attention_factor = f.number("attention_factor", 1.0);
  s.truncate = f.boolean("truncate", true);
  return s;
}

}  // namespace

double ModelConfig::softmax_scale() const {
  double scale = 1.0 / std::sqrt(double(qk_head_dim()));
  if (rope_scaling.type == "yarn" && rope_scaling.mscale_all_dim != 0.0 && rope_scaling.factor > 1.0) {
    double m = 0.1 * rope_scaling.mscale_all_dim * std::log(rope_scaling.factor) + 1.0;
    scale *= m * m;
  }
  return scale;
}

ModelConfig parse_config(const json& j, const std::string& source) {
  FATHOM_CHECK(j.is_object(), source, ": expected a JSON object, found ", Fields::type_of(j));
  Fields f(j, source);
  ModelConfig c;
  c.model_type = f.string("model_type");
  FATHOM_CHECK(c.model_type == "deepseek_v3" || c.model_type == "deepseek_v2", source, ": unsupported model_type '",
               c.model_type, "' (fathom runs deepseek_v2 and deepseek_v3)");
  const bool v3 = c.model_type == "deepseek_v3";

  c.vocab_size = f.positive("vocab_size");
  c.hidden_size = f.positive("hidden_size");
  c.intermediate_size = f.positive("intermediate_size");
  c.num_hidden_layers = int(f.positive("num_hidden_layers"));
  c.num_attention_heads = int(f.positive("num_attention_heads"));
  c.num_key_value_heads = int(f.integer("num_key_value_heads", c.num_attention_heads));
  c.q_lora_rank = f.integer("q_lora_rank", 0);
  FATHOM_CHECK(c.q_lora_rank >= 0, source, ": field 'q_lora_rank' must be null or a non-negative integer");
  c.kv_lora_rank = f.positive("kv_lora_rank");
  c.qk_nope_head_dim = int(f.positive("qk_nope_head_dim"));
  c.qk_rope_head_dim = int(f.positive("qk_rope_head_dim"));
  c.v_head_dim = int(f.positive("v_head_dim"));
  FATHOM_CHECK(c.qk_rope_head_dim % 2 == 0, source, ": 'qk_rope_head_dim' must be even, found ", c.qk_rope_head_dim);

  c.n_routed_experts = int(f.integer("n_routed_experts", 0));
  FATHOM_CHECK(c.n_routed_experts >= 0, source, ": 'n_routed_experts' must be >= 0");
  if (c.n_routed_experts > 0) {
    c.moe_intermediate_size = f.positive("moe_intermediate_size");
    c.num_experts_per_tok = int(f.positive("num_experts_per_tok"));
    c.n_shared_experts = int(f.integer("n_shared_experts", 0));
    c.n_group = int(f.integer("n_group", 1));
    c.topk_group = int(f.integer("topk_group", c.n_group));
    FATHOM_CHECK(c.num_experts_per_tok <= c.n_routed_experts, source, ": 'num_experts_per_tok' (", c.num_experts_per_tok,
                 ") exceeds 'n_routed_experts' (", c.n_routed_experts, ")");
    FATHOM_CHECK(c.n_group >= 1 && c.n_routed_experts % c.n_group == 0, source, ": 'n_routed_experts' (",
                 c.n_routed_experts, ") must split into 'n_group' (", c.n_group, ") equal groups");
    FATHOM_CHECK(c.topk_group >= 1 && c.topk_group <= c.n_group, source, ": 'topk_group' must be in [1, n_group]");
    FATHOM_CHECK(c.n_shared_experts >= 0, source, ": 'n_shared_experts' must be >= 0");
  }
  c.first_k_dense_replace = int(f.integer("first_k_dense_replace", 0));
  c.moe_layer_freq = int(f.integer("moe_layer_freq", 1));
  FATHOM_CHECK(c.moe_layer_freq >= 1, source, ": 'moe_layer_freq' must be >= 1");
  c.norm_topk_prob = f.boolean("norm_topk_prob", v3);
  c.routed_scaling_factor = f.number("routed_scaling_factor", 1.0);
  c.scoring_func = f.string("scoring_func", v3 ? "sigmoid" : "softmax");
  FATHOM_CHECK(c.scoring_func == "sigmoid" || c.scoring_func == "softmax", source, ": unsupported scoring_func '",
               c.scoring_func, "' (expected 'softmax' or 'sigmoid')");
  c.topk_method = f.string("topk_method", v3 ? "noaux_tc" : "greedy");
  FATHOM_CHECK(c.topk_method == "greedy" || c.topk_method == "group_limited_greedy" || c.topk_method == "noaux_tc",
               source, ": unsupported topk_method '", c.topk_method,
               "' (expected 'greedy', 'group_limited_greedy' or 'noaux_tc')");
  c.num_nextn_predict_layers = int(f.integer("num_nextn_predict_layers", 0));
  FATHOM_CHECK(c.num_nextn_predict_layers >= 0, source, ": 'num_nextn_predict_layers' must be >= 0");

  c.rms_norm_eps = f.number("rms_norm_eps", 1e-6);
  c.rope_interleave = f.boolean("rope_interleave", true);
  c.max_position_embeddings = f.integer("max_position_embeddings", 4096);
  c.tie_word_embeddings = f.boolean("tie_word_embeddings", false);
  c.hidden_act = f.string("hidden_act", "silu");
  FATHOM_CHECK(c.hidden_act == "silu", source, ": hidden_act '", c.hidden_act, "' is not supported (expected 'silu')");
  c.bos_token_id = f.integer("bos_token_id", -1);
  if (f.has("eos_token_id")) {
    const json& e = j.at("eos_token_id");
    if (e.is_array()) {
      for (const auto& x : e) {
        FATHOM_CHECK(x.is_number_integer(), source, ": 'eos_token_id' must be an integer or a list of integers");
        c.eos_token_ids.push_back(x.get<int64_t>());
      }
    } else {
      c.eos_token_ids.push_back(f.integer("eos_token_id"));
    }
  }

  // RoPE: newer configs put everything (theta included) in rope_parameters.
  if (f.has("rope_parameters")) {
    const json& rp = j.at("rope_parameters");
    c.rope_scaling = parse_rope(rp, source + ": 'rope_parameters'");
    Fields rf(rp, source + ": 'rope_parameters'");
    c.rope_theta = rf.number("rope_theta", f.number("rope_theta", 10000.0));
  } else {
    c.rope_theta = f.number("rope_theta", 10000.0);
    if (f.has("rope_scaling")) c.rope_scaling = parse_rope(j.at("rope_scaling"), source + ": 'rope_scaling'");
  }
  FATHOM_CHECK(c.rope_theta > 0, source, ": 'rope_theta' must be positive");
  if (c.rope_scaling.type == "yarn" && c.rope_scaling.original_max_position_embeddings <= 0)
    c.rope_scaling.original_max_position_embeddings = double(c.max_position_embeddings);

  if (f.has("quantization_config")) {
    const json& q = j.at("quantization_config");
    Fields qf(q, source + ": 'quantization_config'");
    FATHOM_CHECK(q.is_object(), source, ": 'quantization_config' must be an object");
    std::string method = qf.string("quant_method", "");
    FATHOM_CHECK(method == "fp8", source, ": 'quantization_config.quant_method' is '", method,
                 "', which is not supported (expected 'fp8')");
    std::string fmt = qf.string("fmt", "e4m3");
    FATHOM_CHECK(fmt == "e4m3", source, ": 'quantization_config.fmt' is '", fmt,
                 "', which is not supported (expected 'e4m3')");
    c.fp8 = true;
    if (qf.has("weight_block_size")) {
      const json& b = q.at("weight_block_size");
      FATHOM_CHECK(b.is_array() && b.size() == 2 && b[0].is_number_integer() && b[1].is_number_integer() &&
                       b[0].get<int64_t>() > 0 && b[1].get<int64_t>() > 0,
                   source, ": 'quantization_config.weight_block_size' must be two positive integers");
      c.weight_block_size[0] = b[0].get<int64_t>();
      c.weight_block_size[1] = b[1].get<int64_t>();
    }
  }
  return c;
}

ModelConfig load_config(const std::string& path) {
  std::ifstream in(path);
  FATHOM_CHECK(in.good(), "cannot open ", path, ": a model directory must contain config.json");
  json j = json::parse(in, nullptr, /*allow_exceptions=*/false);
  FATHOM_CHECK(!j.is_discarded(), path, " is not valid JSON");
  return parse_config(j, path);
}

}  // namespace fathom
