// The loss of a DeepSeek-V3/V2-architecture model on a token sequence and its gradient with
// respect to every weight, on the CPU in F32: the reference training step.
//
// The forward pass is the inference model's (the CPU ops, naive MLA: per-head keys and values
// decompressed by kv_b_proj, which is what trains) with every activation the backward needs kept;
// the backward calls the passes of src/train/backward.h in exactly the reverse order:
//   embedding → for each layer: x += MLA(rmsnorm(x)); x += MLP or MoE(rmsnorm(x))
//   → rmsnorm → LM head → cross-entropy against the next tokens.
// MoE gradients reach the router through the chosen experts' routing weights; the expert choice
// and e_score_correction_bias are not differentiated. MTP modules are not part of it yet.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"
#include "train/optimizer.h"

namespace fathom::train {

class GradModel {
 public:
  // The weights of a checkpoint directory (config.json + safetensors; F32/BF16/F16, or FP8 with
  // block scales, all made F32 masters). MTP layers in the file are ignored.
  static std::unique_ptr<GradModel> load(const std::string& dir);

  const ModelConfig& config() const { return config_; }
  // Weight names in checkpoint order, and each master value and gradient (same shape).
  const std::vector<std::string>& names() const { return names_; }
  bool has(const std::string& name) const { return value_.count(name) != 0; }
  Tensor& value(const std::string& name);
  Tensor& grad(const std::string& name);
  void zero_grad();
  // Registers every weight (value and gradient) with the optimizer.
  void add_to(AdamW& optimizer);

  // Mean next-token cross-entropy of `tokens` (one sequence: position i predicts tokens[i + 1];
  // targets < 0 are skipped), and its gradient added to every weight's grad. The e_score
  // correction bias is carried as a value but gets no gradient.
  double loss_and_grad(const std::vector<int32_t>& tokens);
  // The same loss without the backward.
  double loss(const std::vector<int32_t>& tokens);
  // DeepSeek-V3's sequence-wise balance loss (balance.h) with weight alpha in every MoE layer,
  // added to the objective that loss() and loss_and_grad() return (0, the default: none).
  void set_balance_alpha(float alpha) { balance_alpha_ = alpha; }
  // The balance part of the last loss()/loss_and_grad() result, summed over the layers.
  double last_balance_loss() const { return last_balance_; }
  // Multiplies every gradient by s (averaging over the sequences of a step).
  void scale_grad(float s);

  // Tokens routed to each expert of each MoE layer by the loss_and_grad calls since the last
  // reset (layer index -> counts; the auxiliary-loss-free bias update reads them).
  const std::map<int, std::vector<int64_t>>& expert_load() const { return load_; }
  void reset_expert_load() { load_.clear(); }
  // config.json as read, for checkpoints.
  const std::string& config_json() const { return config_json_; }

 private:
  struct Impl;
  double run(const std::vector<int32_t>& tokens, bool backward);
  ModelConfig config_;
  std::vector<std::string> names_;
  std::map<std::string, Tensor> value_, grad_;
  std::map<int, std::vector<int64_t>> load_;
  float balance_alpha_ = 0.0f;
  double last_balance_ = 0.0;
  std::string config_json_;
};

}  // namespace fathom::train
