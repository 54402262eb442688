#include "train/optimizer.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"

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
  for (const Param& p : params_) {
    const float* g = p.grad.f32();
    for (int64_t i = 0, n = p.grad.numel(); i < n; ++i) ss += double(g[i]) * g[i];
  }
  const double norm = std::sqrt(ss);
  if (!std::isfinite(norm) || max_norm <= 0) return norm;
  const double coef = max_norm / (norm + 1e-6);
  if (coef >= 1) return norm;
  const float c = float(coef);
  for (Param& p : params_) {
    float* g = p.grad.f32();
    for (int64_t i = 0, n = p.grad.numel(); i < n; ++i) g[i] *= c;
  }
  return norm;
}

void AdamW::step(float lr) {
  ++t_;
  const double b1 = config_.beta1, b2 = config_.beta2;
  const double bc1 = 1 - std::pow(b1, double(t_)), bc2 = 1 - std::pow(b2, double(t_));
  const float step_size = float(lr / bc1), bc2_sqrt = float(std::sqrt(bc2));
  const float decay = 1.0f - lr * config_.weight_decay;
  const float fb1 = config_.beta1, fb2 = config_.beta2, eps = config_.eps;
  for (Param& p : params_) {
    if (p.frozen) continue;
    float* w = p.value.f32();
    const float* g = p.grad.f32();
    float* m = p.m.f32();
    float* v = p.v.f32();
    for (int64_t i = 0, n = p.value.numel(); i < n; ++i) {
      if (p.decay) w[i] *= decay;
      m[i] += (1 - fb1) * (g[i] - m[i]);  // torch's exp_avg.lerp_(grad, 1 - beta1)
      v[i] = fb2 * v[i] + (1 - fb2) * g[i] * g[i];
      w[i] -= step_size * m[i] / (std::sqrt(v[i]) / bc2_sqrt + eps);
    }
  }
}

void AdamW::zero_grad() {
  for (Param& p : params_) std::memset(p.grad.data(), 0, p.grad.nbytes());
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
