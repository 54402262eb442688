#include "train/optimizer.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "ops/cpu/backward.h"

namespace fathom::train {

AdamW::AdamW(AdamWConfig config) : config_(config) {
  FATHOM_CHECK(config.beta1 >= 0 && config.beta1 < 1 && config.beta2 >= 0 && config.beta2 < 1 && config.eps > 0 &&
                   config.weight_decay >= 0,
               "AdamW: betas must lie in [0, 1), eps be positive and weight decay non-negative (got beta1 ",
               config.beta1, ", beta2 ", config.beta2, ", eps ", config.eps, ", weight decay ", config.weight_decay,
               ").");
}

Param& AdamW::add(std::string name, Tensor value, Tensor grad) {
  FATHOM_CHECK(value.defined() && value.dtype() == DType::F32 && value.device() == Device::CPU,
               "AdamW: parameter '", name, "' must be an F32 host tensor.");
  FATHOM_CHECK(grad.defined() && grad.dtype() == DType::F32 && grad.shape() == value.shape(), "AdamW: the gradient of '",
               name, "' has shape ", shape_str(grad.shape()), ", its parameter ", shape_str(value.shape()), ".");
  Param p;
  p.name = std::move(name);
  p.decay = value.ndim() >= 2;
  p.m = Tensor::zeros(value.shape());
  p.v = Tensor::zeros(value.shape());
  p.value = std::move(value);
  p.grad = std::move(grad);
  params_.push_back(std::move(p));
  return params_.back();
}

double AdamW::clip_grad_norm(double max_norm) {
  double ss = 0;
  if (ops_) {
    std::vector<Tensor> grads;
    grads.reserve(params_.size());
    for (const Param& p : params_) grads.push_back(p.device_grad);
    ss = ops_->sum_squares(grads) * grad_scale_ * grad_scale_;
  } else {
    for (const Param& p : params_) ss += cpu::sum_squares(p.grad);
  }
  const double norm = std::sqrt(ss);
  if (!std::isfinite(norm) || max_norm <= 0) return norm;
  const double coef = max_norm / (norm + 1e-6);
  if (coef >= 1) return norm;
  scale_grads(float(coef));
  return norm;
}

void AdamW::scale_grads(float s) {
  if (ops_) {
    grad_scale_ *= s;
    return;
  }
  for (Param& p : params_) {
    float* g = p.grad.f32();
    for (int64_t i = 0, n = p.grad.numel(); i < n; ++i) g[i] *= s;
  }
}

void AdamW::step(float lr) {
  ++t_;
  const double bc1 = 1 - std::pow(double(config_.beta1), double(t_));
  const double bc2 = 1 - std::pow(double(config_.beta2), double(t_));
  AdamWStepParams sp;
  sp.beta1 = config_.beta1;
  sp.beta2 = config_.beta2;
  sp.eps = config_.eps;
  sp.step_size = float(lr / bc1);
  sp.bc2_sqrt = float(std::sqrt(bc2));
  sp.grad_scale = float(grad_scale_);
  const float decay = 1.0f - lr * config_.weight_decay;
  std::vector<AdamWTensor> on_device;  // updated together (one launch on the GPU)
  for (Param& p : params_) {
    if (p.frozen) continue;
    sp.decay = p.decay ? decay : 1.0f;
    if (ops_)
      on_device.push_back({&p.device_value, &p.device_m, &p.device_v, &p.device_grad, sp});
    else
      cpu::adamw_step(p.value, p.m, p.v, p.grad, sp);
  }
  if (ops_ && !on_device.empty()) ops_->adamw_steps(on_device);
  grad_scale_ = 1;
}

void AdamW::zero_grad() {
  grad_scale_ = 1;
  for (Param& p : params_) {
    if (ops_)
      ops_->zero(p.device_grad);
    else
      std::memset(p.grad.data(), 0, p.grad.nbytes());
  }
}

void AdamW::use_backend(Ops& ops) {
  for (Param& p : params_) {
    FATHOM_CHECK(p.device_value.defined() && p.device_grad.defined() && p.device_value.device() == ops.device() &&
                     p.device_grad.device() == ops.device() && p.device_value.numel() == p.value.numel() &&
                     p.device_grad.numel() == p.value.numel(),
                 "AdamW::use_backend: parameter '", p.name, "' has no copy of its value and gradient on the ",
                 ops.name(), " backend.");
  }
  ops_ = &ops;
  grad_scale_ = 1;
  for (Param& p : params_) {
    p.device_m = ops.upload(p.m);
    p.device_v = ops.upload(p.v);
  }
}

void AdamW::to_host() {
  if (!ops_) return;
  for (Param& p : params_) {
    ops_->download(p.value.data(), p.device_value);
    ops_->download(p.m.data(), p.device_m);
    ops_->download(p.v.data(), p.device_v);
  }
}

void AdamW::to_device() {
  if (!ops_) return;
  for (Param& p : params_) {
    ops_->copy_from_host(p.device_value, p.value);
    ops_->copy_from_host(p.device_m, p.m);
    ops_->copy_from_host(p.device_v, p.v);
  }
  ops_->synchronize();
}

double LrSchedule::at(int64_t step) const {
  FATHOM_CHECK(total > 0 && warmup >= 0 && decay >= 0 && peak >= 0 && min_lr >= 0, "learning-rate schedule: total ",
               total, " steps, warm-up ", warmup, ", decay ", decay, ", peak ", peak, ", min ", min_lr,
               " is not a schedule.");
  if (step < warmup) return peak * double(step + 1) / double(warmup);
  const int64_t s = std::min(step, total);
  switch (kind) {
    case Kind::Constant: return peak;
    case Kind::Cosine: {
      const int64_t span = std::max<int64_t>(1, total - warmup);
      const double progress = std::clamp(double(s - warmup) / double(span), 0.0, 1.0);
      return min_lr + (peak - min_lr) * 0.5 * (1 + std::cos(M_PI * progress));
    }
    case Kind::Wsd: {
      const int64_t decay_start = std::max(warmup, total - decay);
      if (s < decay_start) return peak;
      const int64_t span = std::max<int64_t>(1, total - decay_start);
      const double progress = std::clamp(double(s - decay_start) / double(span), 0.0, 1.0);
      return peak + (min_lr - peak) * progress;
    }
  }
  return peak;
}

}  // namespace fathom::train
