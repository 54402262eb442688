#include "model/weights.h"

#include <cmath>
#include <string>

#include "core/error.h"

namespace fathom {

namespace {
std::string dtype_list(std::initializer_list<DType> allowed) {
  std::string s;
  for (DType d : allowed) s += (s.empty() ? "" : ", ") + std::string(dtype_name(d));
  return s;
}
}  // namespace

Tensor WeightLoader::random_tensor(const std::string& name, const Shape& shape, DType dtype, float scale) const {
  Tensor t = random_.ops->empty(shape, dtype);
  uint64_t h = random_.seed;  // one stream per tensor name
  for (unsigned char ch : name) h = (h ^ ch) * 0x100000001B3ull;
  random_.ops->fill_random(t, h, scale);
  return t;
}

Tensor WeightLoader::random_stack(const std::string& name, const Shape& shape) const {
  const DType d = random_.dtype == DType::F8_E4M3 ? DType::BF16 : random_.dtype;
  return random_tensor(name, shape, d, float(random_.std * std::sqrt(3.0)));
}

Tensor WeightLoader::checked(const std::string& name, const Shape& shape, std::initializer_list<DType> allowed) const {
  FATHOM_CHECK(set_->contains(name), "checkpoint ", set_->dir(), " is missing tensor ", name, " (expected shape ",
               shape_str(shape), ")");
  Tensor t = set_->tensor(name);
  bool ok = false;
  for (DType d : allowed) ok = ok || t.dtype() == d;
  FATHOM_CHECK(ok, "checkpoint ", set_->dir(), ": tensor ", name, " in ", set_->file_of(name), " has dtype ",
               dtype_name(t.dtype()), ", expected one of ", dtype_list(allowed));
  FATHOM_CHECK(t.shape() == shape, "checkpoint ", set_->dir(), ": tensor ", name, " in ", set_->file_of(name),
               " has shape ", shape_str(t.shape()), ", expected ", shape_str(shape));
  return t;
}

LinearWeight WeightLoader::linear(const std::string& name, int64_t out_features, int64_t in_features) const {
  LinearWeight w;
  w.name = name;
  if (random()) {
    const float range = float(random_.std * std::sqrt(3.0));
    if (random_.dtype != DType::F8_E4M3) {
      w.weight = random_tensor(name, {out_features, in_features}, random_.dtype, range);
      return w;
    }
    // e4m3 over its whole range, one scale for every block: W = q · range / 448
    const int64_t b = fp8_block_;
    w.weight = random_tensor(name, {out_features, in_features}, DType::F8_E4M3, 448.0f);
    w.scale_inv = Tensor::empty({(out_features + b - 1) / b, (in_features + b - 1) / b});
    for (int64_t i = 0; i < w.scale_inv.numel(); ++i) w.scale_inv.f32()[i] = range / 448.0f;
    w.block = b;
    return w;
  }
  w.weight = checked(name, {out_features, in_features}, {DType::BF16, DType::F16, DType::F32, DType::F8_E4M3});
  if (w.weight.dtype() != DType::F8_E4M3) return w;
  const int64_t b = fp8_block_;
  const std::string sname = name + "_scale_inv";
  const Shape sshape = {(out_features + b - 1) / b, (in_features + b - 1) / b};
  Tensor s = checked(sname, sshape, {DType::F32, DType::BF16});
  w.scale_inv = s.dtype() == DType::F32 ? s : to_f32(s);
  w.block = b;
  if (options_.dequantize_fp8) {
    Tensor deq = dequantize(w);
    w.weight = deq;
    w.scale_inv = Tensor();
  }
  return w;
}

Tensor WeightLoader::f32(const std::string& name, const Shape& shape) const {
  if (random()) {
    Tensor t = Tensor::empty(shape);
    const bool bias = name.find("e_score_correction_bias") != std::string::npos;
    for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = bias ? 0.0f : 1.0f;
    return t;
  }
  return to_f32(checked(name, shape, {DType::BF16, DType::F16, DType::F32}));
}

Tensor WeightLoader::table(const std::string& name, const Shape& shape) const {
  if (random())
    return random_tensor(name, shape, random_.dtype == DType::F8_E4M3 ? DType::BF16 : random_.dtype,
                         float(random_.std * std::sqrt(3.0)));
  return checked(name, shape, {DType::BF16, DType::F16, DType::F32});
}

Tensor dequantize(const LinearWeight& w) {
  const int64_t N = w.out_features(), K = w.in_features();
  Tensor out = Tensor::empty({N, K});
  convert_to_f32(w.weight.dtype(), w.weight.data(), out.f32(), size_t(N * K));
  if (w.quantized()) {
    const int64_t kb = w.scale_inv.dim(1);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) out.f32()[n * K + k] *= w.scale_inv.f32()[(n / w.block) * kb + k / w.block];
  }
  return out;
}

}  // namespace fathom
