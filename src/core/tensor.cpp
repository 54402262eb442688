#include "core/tensor.h"

#include <cstdlib>
#include <cstring>
#include <sstream>

#include "core/error.h"

namespace fathom {

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

Tensor Tensor::empty(Shape shape, DType dtype) {
  for (int64_t d : shape) FATHOM_ASSERT(d >= 0, "negative dimension in ", shape_str(shape));
  Tensor t;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  size_t bytes = t.nbytes();
  size_t alloc = (bytes + 63) / 64 * 64;
  if (alloc == 0) alloc = 64;
  void* p = std::aligned_alloc(64, alloc);
  if (!p) throw Error(cat("out of memory allocating ", bytes, " bytes for a tensor of shape ", shape_str(t.shape_)));
  t.owner_ = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  t.data_ = p;
  return t;
}

Tensor Tensor::zeros(Shape shape, DType dtype) {
  Tensor t = empty(std::move(shape), dtype);
  std::memset(t.data_, 0, t.nbytes());
  return t;
}

Tensor Tensor::view(void* data, Shape shape, DType dtype, std::shared_ptr<void> owner, Device device) {
  Tensor t;
  t.data_ = data;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.device_ = device;
  t.owner_ = std::move(owner);
  return t;
}

Tensor Tensor::reshape(Shape shape) const {
  FATHOM_ASSERT(shape_numel(shape) == numel(), "reshape ", shape_str(shape_), " to ", shape_str(shape));
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::slice_rows(int64_t begin, int64_t end) const {
  FATHOM_ASSERT(ndim() >= 1 && begin >= 0 && begin <= end && end <= shape_[0], "slice_rows");
  Tensor t = *this;
  int64_t row = shape_[0] ? numel() / shape_[0] : 0;
  t.data_ = static_cast<char*>(data_) + size_t(begin * row) * dtype_size(dtype_);
  t.shape_[0] = end - begin;
  return t;
}

Tensor to_f32(const Tensor& t) {
  Tensor out = Tensor::empty(t.shape(), DType::F32);
  convert_to_f32(t.dtype(), t.data(), out.f32(), size_t(t.numel()));
  return out;
}

}  // namespace fathom

namespace fathom {

Tensor from_f32(const float* values, Shape shape, DType dtype) {
  Tensor t = Tensor::empty(std::move(shape), dtype);
  const int64_t n = t.numel();
  switch (dtype) {
    case DType::F32:
      std::memcpy(t.data(), values, t.nbytes());
      break;
    case DType::BF16:
      for (int64_t i = 0; i < n; ++i) t.ptr<uint16_t>()[i] = f32_to_bf16(values[i]);
      break;
    case DType::F16:
      for (int64_t i = 0; i < n; ++i) t.ptr<uint16_t>()[i] = f32_to_f16(values[i]);
      break;
    case DType::F8_E4M3:
      for (int64_t i = 0; i < n; ++i) t.ptr<uint8_t>()[i] = f32_to_fp8e4m3(values[i]);
      break;
    default:
      throw Error(cat("cannot convert F32 to ", dtype_name(dtype)));
  }
  return t;
}

}  // namespace fathom
