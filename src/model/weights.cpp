#include "model/weights.h"

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

Tensor WeightLoader::checked(const std::string& name, const Shape& shape, std::initializer_list<DType> allowed) const {
  FATHOM_CHECK(set_.contains(name), "checkpoint ", set_.dir(), " is missing tensor ", name, " (expected shape ",
               shape_str(shape), ")");
  Tensor t = set_.tensor(name);
  bool ok = false;
  for (DType d : allowed) ok = ok || t.dtype() == d;
  FATHOM_CHECK(ok, "checkpoint ", set_.dir(), ": tensor ", name, " in ", set_.file_of(name), " has dtype ",
               dtype_name(t.dtype()), ", expected one of ", dtype_list(allowed));
  FATHOM_CHECK(t.shape() == shape, "checkpoint ", set_.dir(), ": tensor ", name, " in ", set_.file_of(name),
               " has shape ", shape_str(t.shape()), ", expected ", shape_str(shape));
  return t;
}

LinearWeight WeightLoader::linear(const std::string& name, int64_t out_features, int64_t in_features) const {
  LinearWeight w;
  w.name = name;
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
  return to_f32(checked(name, shape, {DType::BF16, DType::F16, DType::F32}));
}

Tensor WeightLoader::table(const std::string& name, const Shape& shape) const {
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
