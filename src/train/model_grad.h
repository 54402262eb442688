// The loss of a DeepSeek-V3/V2-architecture model on a token sequence and its gradient with
// respect to every weight, in F32: the reference training step on the CPU, and the same code on
// the GPU through the CUDA backend (use_backend).
//
// The forward pass is the inference model's ops (naive MLA: per-head keys and values decompressed
// by kv_b_proj, which is what trains) with every activation the backward needs kept; the backward
// calls the Ops::*_backward passes (math in src/ops/cpu/backward.h) in exactly the reverse order:
//   embedding → for each layer: x += MLA(rmsnorm(x)); x += MLP or MoE(rmsnorm(x))
//   → rmsnorm → LM head → cross-entropy against the next tokens.
// MoE gradients reach the router through the chosen experts' routing weights; the expert choice
// and e_score_correction_bias are not differentiated. With an MTP weight λ > 0 the model's MTP
// modules (num_nextn_predict_layers, at model.layers.{num_hidden_layers + k}) add DeepSeek-V3's
// multi-token prediction loss λ / depth · Σ_k CE_k, whose gradient also flows back into the main
// model through the hidden states the first module reads.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"
#include "ops/ops.h"
#include "train/optimizer.h"

namespace fathom::train {

class GradModel {
 public:
  // The weights of a checkpoint directory (config.json + safetensors; F32/BF16/F16, or FP8 with
  // block scales, all made F32 masters), the MTP modules' included.
  static std::unique_ptr<GradModel> load(const std::string& dir);

  const ModelConfig& config() const { return config_; }

  // The backend the passes run on (the CPU reference until set). A GPU backend gets a copy of
  // every weight and gradient in its memory, which an optimizer on that backend steps
  // (add_to, AdamW::use_backend); the host tensors of value()/grad() are then brought up to date
  // on request: grads_to_host() for the gradients, AdamW::to_host() for the values.
  void use_backend(std::unique_ptr<Ops> ops);
  Ops& backend() { return *ops_; }
  void grads_to_host();
  // One host value copied to the backend (a weight the host changed: the expert bias).
  void value_to_device(const std::string& name);
  // The backend's copy of a weight and of its gradient (the host tensors on the CPU).
  Tensor& device_value(const std::string& name);
  Tensor& device_grad(const std::string& name);
  // Weight names in checkpoint order, and each master value and gradient (same shape).
  const std::vector<std::string>& names() const { return names_; }
  bool has(const std::string& name) const { return value_.count(name) != 0; }
  Tensor& value(const std::string& name);
  Tensor& grad(const std::string& name);
  void zero_grad();  // host and backend gradients
  // Registers every weight (value and gradient, and the backend's copies of both) with the
  // optimizer, which then may run on the backend (AdamW::use_backend); while λ is 0 the MTP
  // modules' weights are registered frozen (kept and saved, never updated or decayed).
  void add_to(AdamW& optimizer);

  // The training objective of `tokens` (one sequence: position i predicts tokens[i + 1]; a token
  // with train::kContextOnly set — chat prompts, data.h — is read as its id but never predicted):
  // the mean next-token cross-entropy, plus the balance loss (α) and the MTP
  // loss (λ) when set; its gradient is added to every weight's grad. The e_score correction
  // bias is carried as a value but gets no gradient.
  double loss_and_grad(const std::vector<int32_t>& tokens);
  // The same objective without the backward.
  double loss(const std::vector<int32_t>& tokens);
  // A batch of sequences of one length in one pass (their rows stacked: every matmul and expert
  // sees all of them at once; attention and RoPE stay within each sequence): the objective is
  // the mean over the predicted tokens of the batch (for sequences without negative targets, the
  // mean of the sequences' own objectives, the balance loss averaged over the sequences) and its
  // gradient, that mean's, is added to every weight's grad.
  double loss_and_grad_batch(const std::vector<std::vector<int32_t>>& batch);
  double loss_batch(const std::vector<std::vector<int32_t>>& batch);
  // The parts of the last loss()/loss_and_grad() result: the next-token cross-entropy, and the
  // MTP loss (the mean over the modules of each one's cross-entropy, before λ; 0 without MTP).
  double last_lm_loss() const { return last_lm_; }
  double last_mtp_loss() const { return last_mtp_; }
  // MTP modules the checkpoint has (num_nextn_predict_layers).
  int mtp_depth() const { return config_.num_nextn_predict_layers; }
  // λ, the MTP loss weight (0, the default: the MTP modules take no part). DeepSeek-V3 used 0.3,
  // then 0.1 for its last 4.8T tokens.
  void set_mtp_lambda(float lambda);
  float mtp_lambda() const { return mtp_lambda_; }
  // DeepSeek-V3's sequence-wise balance loss (balance.h) with weight alpha in every MoE layer,
  // added to the objective that loss() and loss_and_grad() return (0, the default: none).
  void set_balance_alpha(float alpha) { balance_alpha_ = alpha; }
  // The balance part of the last loss()/loss_and_grad() result, summed over the layers.
  double last_balance_loss() const { return last_balance_; }
  // Activation recomputation: keep only each main layer's input in the forward and run the layer
  // forward again, one layer at a time, in the backward (the activations of one layer instead of
  // all of them; the gradients are bit for bit the same).
  void set_recompute(bool on) { recompute_ = on; }
  // Expert capacity (0, the default: no token is ever dropped). With a factor c > 0 each routed
  // expert of each MoE layer takes at most ceil(c · T · top_k / n_experts) of the T tokens of a
  // pass (one sequence, or a batch's); beyond that, the tokens with the lowest routing weight for it are dropped (their
  // output from that expert is left out, the other weights unchanged, as DeepSeek-V2's
  // device-level dropping does) and counted in expert_dropped().
  void set_capacity_factor(float factor);
  const std::map<int, int64_t>& expert_dropped() const { return dropped_; }
  // Multiplies every (host) gradient by s (averaging over the sequences of a step).
  void scale_grad(float s);

  // Tokens routed to each expert of each MoE layer by the loss_and_grad calls since the last
  // reset (layer index -> counts; the auxiliary-loss-free bias update reads them).
  const std::map<int, std::vector<int64_t>>& expert_load() const { return load_; }
  void reset_expert_load() {
    load_.clear();
    dropped_.clear();
  }
  // config.json as read, for checkpoints.
  const std::string& config_json() const { return config_json_; }
  // The routed experts' matrices of one kind in one MoE layer, stacked: `key` is
  // "model.layers.L.mlp.experts.{gate_proj,up_proj,down_proj}"; (n_routed_experts · N, K), expert
  // e's rows [e·N, (e+1)·N). Each expert's own value()/grad() (and backend copy) is a view of its
  // rows, so the optimizer and checkpoints see the usual tensors. The backend's copy, or the host's
  // on the CPU.
  bool has_stack(const std::string& key) const { return stacks_.count(key) != 0; }
  Tensor& stack_value(const std::string& key);
  Tensor& stack_grad(const std::string& key);

 private:
  struct Impl;
  double run(const std::vector<std::vector<int32_t>>& batch, bool backward);
  ModelConfig config_;
  std::vector<std::string> names_;
  std::map<std::string, Tensor> value_, grad_;
  std::unique_ptr<Ops> owned_ops_;
  Ops* ops_ = nullptr;                          // set by load(): the CPU reference
  std::map<std::string, Tensor> dvalue_, dgrad_;  // the backend's copies (empty on the CPU)
  struct Stack {
    Tensor value, grad;    // host (n_routed_experts · N, K)
    Tensor dvalue, dgrad;  // the backend's copies (undefined on the CPU)
  };
  std::map<std::string, Stack> stacks_;
  std::map<std::string, std::pair<std::string, int64_t>> stacked_;  // weight name -> (stack key, expert)
  void stack_experts();
  std::map<int, std::vector<int64_t>> load_;
  std::map<int, int64_t> dropped_;  // (token, expert) pairs dropped at capacity, per layer
  bool recompute_ = false;
  float capacity_factor_ = 0.0f;
  float balance_alpha_ = 0.0f, mtp_lambda_ = 0.0f;
  double last_balance_ = 0.0, last_lm_ = 0.0, last_mtp_ = 0.0;
  std::string config_json_;
};

}  // namespace fathom::train
