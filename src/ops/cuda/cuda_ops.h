// The CUDA backend's kernels, as plain launchers over device pointers (launcher-only header:
// no CUDA types here, so model and test code compile without CUDA headers). Activations are
// F32 like the CPU backend's; tables may be BF16/F16/F32. Every launcher runs on the current
// stream (the default stream for now) and reports a CUDA failure as fathom::Error.
//
// Built only when CMake finds nvcc (FATHOM_HAVE_CUDA); the CUDA Ops backend that the model
// calls is assembled from these launchers by the CUDA-backend issue.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/dtype.h"

namespace fathom::cuda {

// Number of usable CUDA devices; 0 when there is no driver or no GPU (never throws).
int device_count();
std::string device_name(int device);

// Device memory, freed on destruction.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* data() { return ptr_; }
  const void* data() const { return ptr_; }
  template <typename T> T* as() { return static_cast<T*>(ptr_); }
  size_t size() const { return bytes_; }
  void upload(const void* host, size_t bytes);    // host -> device, bytes <= size()
  void download(void* host, size_t bytes) const;  // device -> host (synchronizes)
  void fill_bytes(int value);                     // e.g. 0xFF poisons floats with NaN

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

void synchronize();  // waits for all work; throws fathom::Error naming a failed kernel

// out (T, H) f32 = table[ids[t]] converted from `dtype` (F32, BF16, F16); ids on the device.
void embedding(float* out, const int32_t* ids, int64_t n_tokens, const void* table, DType dtype, int64_t H);
// out (M, N) = x / rms(x) * w, w (N) f32; one block per row, fp32 sum of squares.
void rmsnorm(float* out, const float* x, const float* w, int64_t M, int64_t N, float eps);
// out (n) = silu(gate) * up; out may alias gate.
void silu_mul(float* out, const float* gate, const float* up, int64_t n);
// x (n) += y
void add(float* x, const float* y, int64_t n);

}  // namespace fathom::cuda
