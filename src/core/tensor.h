// Tensor: a dtype, a row-major contiguous shape and a pointer to storage that it may share.
// Storage is either owned (allocated, 64-byte aligned) or borrowed from something that
// outlives the view (a memory-mapped safetensors file keeps itself alive through `owner`).
#pragma once
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace fathom {

enum class Device : uint8_t { CPU, CUDA };

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);  // "[2, 24, 1024]"
int64_t shape_numel(const Shape& s);

class Tensor {
 public:
  Tensor() = default;
  // Allocates zero-filled CPU storage.
  static Tensor zeros(Shape shape, DType dtype = DType::F32);
  // Allocates CPU storage without clearing it.
  static Tensor empty(Shape shape, DType dtype = DType::F32);
  // A view of memory owned by `owner` (may be null when the caller guarantees lifetime).
  static Tensor view(void* data, Shape shape, DType dtype, std::shared_ptr<void> owner, Device device = Device::CPU);

  bool defined() const { return data_ != nullptr; }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_[i < 0 ? shape_.size() + i : i]; }
  int ndim() const { return int(shape_.size()); }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype_); }

  void* data() { return data_; }
  const void* data() const { return data_; }
  template <typename T> T* ptr() { return static_cast<T*>(data_); }
  template <typename T> const T* ptr() const { return static_cast<const T*>(data_); }
  float* f32() { return ptr<float>(); }
  const float* f32() const { return ptr<float>(); }

  // Same storage, another shape with the same element count.
  Tensor reshape(Shape shape) const;
  // Rows [begin, end) of the first dimension, sharing storage.
  Tensor slice_rows(int64_t begin, int64_t end) const;
  const std::shared_ptr<void>& owner() const { return owner_; }

 private:
  void* data_ = nullptr;
  Shape shape_;
  DType dtype_ = DType::F32;
  Device device_ = Device::CPU;
  std::shared_ptr<void> owner_;
};

// Copies any float-convertible tensor into a new F32 tensor of the same shape.
Tensor to_f32(const Tensor& t);
// The inverse: shape_numel(shape) floats rounded to nearest-even in `dtype` (F32, BF16, F16,
// or F8_E4M3 saturating at ±448, without scales).
Tensor from_f32(const float* values, Shape shape, DType dtype);

}  // namespace fathom
