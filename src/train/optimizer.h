// The optimizer of DeepSeek-V3's pre-training: AdamW (β 0.9 / 0.95, decoupled weight decay on
// matrices only) over fp32 master weights, gradient clipping by the global norm, and the
// learning-rate schedules (linear warm-up, then cosine decay or warmup-stable-decay).
//
// The update is PyTorch's torch.optim.AdamW step for step (so that a loss-parity run against
// PyTorch can match it), for parameter p with gradient g at step t = 1, 2, ...:
//   p ← p · (1 − lr · weight_decay)                      (matrices only)
//   m ← β1 m + (1 − β1) g;   v ← β2 v + (1 − β2) g²
//   p ← p − lr / (1 − β1^t) · m / (sqrt(v) / sqrt(1 − β2^t) + eps)
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "ops/ops.h"

namespace fathom::train {

struct AdamWConfig {
  float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
  float weight_decay = 0.1f;  // applied to parameters of two or more dimensions
};

// One trained tensor: its F32 master value, its gradient (same shape; the backward passes
// accumulate into it) and the two moment estimates. With a backend (AdamW::use_backend) the
// device_* tensors are the backend's copies, where the update runs; the host ones are then
// brought up to date by AdamW::to_host() only.
struct Param {
  std::string name;
  Tensor value, grad, m, v;
  Tensor device_value, device_grad, device_m, device_v;
  bool decay = false;   // weight decay applies (a matrix, not a norm weight or a bias)
  bool frozen = false;  // kept (and checkpointed) but not updated
};

class AdamW {
 public:
  explicit AdamW(AdamWConfig config = {});
  // Registers a parameter (F32 host tensors of one shape); the moments start at zero.
  Param& add(std::string name, Tensor value, Tensor grad);
  // Scales every gradient by min(1, max_norm / (norm + 1e-6)) — torch.nn.utils.clip_grad_norm_ —
  // and returns the global L2 norm before scaling (a NaN or infinite norm is returned as is and
  // nothing is scaled: the caller stops). max_norm <= 0 only measures.
  double clip_grad_norm(double max_norm);
  // Multiplies every gradient by s (on a backend, folded into the norm and the update instead
  // of a pass over the gradients).
  void scale_grads(float s);
  // One update of every parameter with learning rate lr; t advances first.
  void step(float lr);
  void zero_grad();

  // Runs the update on a backend (the GPU): every parameter's device_value and device_grad must
  // be set (GradModel::add_to does it once the model has the backend); the moments are copied
  // there. The norm, clipping and update then touch no host memory: to_host() brings values
  // and moments back (before a checkpoint is written), to_device() sends the host ones out
  // (after a checkpoint is restored). Without a backend both do nothing.
  void use_backend(Ops& ops);
  bool on_backend() const { return ops_ != nullptr; }
  void to_host();
  void to_device();
  int64_t steps() const { return t_; }
  void set_steps(int64_t t) { t_ = t; }  // resuming: the bias corrections depend on t
  std::vector<Param>& params() { return params_; }
  const std::vector<Param>& params() const { return params_; }
  const AdamWConfig& config() const { return config_; }

 private:
  AdamWConfig config_;
  std::vector<Param> params_;
  int64_t t_ = 0;
  Ops* ops_ = nullptr;
  double grad_scale_ = 1;  // on a backend: the factor scale_grads and the clipping have set, applied in step()
};

// The learning rate at a step (0-based): linear warm-up to `peak` over `warmup` steps (step s
// gets peak · (s + 1) / warmup), then
//   Cosine: min_lr + (peak − min_lr) · (1 + cos(π · progress)) / 2 over the remaining steps to `total`;
//   Wsd (warmup-stable-decay): `peak` until the last `decay` steps before `total`, then linear to min_lr;
//   Constant: peak.
// Past `total` the final value holds.
struct LrSchedule {
  enum class Kind { Constant, Cosine, Wsd };
  Kind kind = Kind::Cosine;
  double peak = 3e-4, min_lr = 3e-5;
  int64_t warmup = 0, total = 1, decay = 0;
  double at(int64_t step) const;
};

}  // namespace fathom::train
