// ModelConfig: the architecture of a DeepSeek-V2/V3 checkpoint, read from its config.json
// (published form with `rope_scaling` + `rope_theta`, or the newer `rope_parameters`).
// Field names follow config.json so code reads side by side with it.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace fathom {

struct RopeScaling {
  std::string type = "default";       // "default" | "yarn"
  double factor = 1.0;
  double original_max_position_embeddings = 0;
  double beta_fast = 32.0, beta_slow = 1.0;
  double mscale = 1.0, mscale_all_dim = 0.0;
  std::optional<double> attention_factor;  // explicit override of the cos/sin scale
  bool truncate = true;
};

struct ModelConfig {
  std::string model_type;  // "deepseek_v3" | "deepseek_v2"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;      // dense MLP
  int64_t moe_intermediate_size = 0;  // each routed / shared expert
  int num_hidden_layers = 0;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;
  // MLA
  int64_t q_lora_rank = 0;  // 0: no query compression (q_proj), as in V2-Lite
  int64_t kv_lora_rank = 0;
  int qk_nope_head_dim = 0, qk_rope_head_dim = 0, v_head_dim = 0;
  // MoE
  int n_routed_experts = 0, n_shared_experts = 0, num_experts_per_tok = 0;
  int n_group = 1, topk_group = 1;
  int first_k_dense_replace = 0, moe_layer_freq = 1;
  bool norm_topk_prob = false;
  double routed_scaling_factor = 1.0;
  std::string scoring_func = "softmax";  // "softmax" (V2) | "sigmoid" (V3)
  std::string topk_method = "greedy";    // "greedy" | "group_limited_greedy" | "noaux_tc"
  // MTP
  int num_nextn_predict_layers = 0;
  // norms, rope, vocabulary
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  bool rope_interleave = true;
  RopeScaling rope_scaling;
  int64_t max_position_embeddings = 4096;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;
  std::string hidden_act = "silu";
  // FP8 block quantization (quantization_config)
  bool fp8 = false;
  int64_t weight_block_size[2] = {128, 128};

  int qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  bool is_moe_layer(int layer) const {
    return n_routed_experts > 0 && layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
  }
  // The softmax scale of MLA: 1/sqrt(qk_head_dim), times mscale² under YaRN.
  double softmax_scale() const;
};

// Parses a config.json; `source` names the file in error messages.
ModelConfig parse_config(const nlohmann::json& j, const std::string& source);
ModelConfig load_config(const std::string& path);

}  // namespace fathom
