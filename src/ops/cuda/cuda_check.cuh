// Error checking and small runtime helpers for the CUDA sources (launcher side only).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/cuda_ops.h"

namespace fathom::cuda {
// Throws fathom::Error naming `what` when e is not cudaSuccess.
void check(cudaError_t e, const char* what);
// After a launch: configuration errors surface here; execution errors at the next sync.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

inline cudaStream_t as_cuda(Stream s) { return static_cast<cudaStream_t>(s); }

// Streaming multiprocessors of the current device (cached per device).
int sm_count();

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Stream-ordered scratch memory for one launcher call: allocated on `stream` from the device's
// default pool and freed on the same stream when it goes out of scope (the kernels that use it
// are ordered before the free), so it needs no host synchronization and can be graph-captured.
class StreamScratch {
 public:
  StreamScratch(size_t bytes, cudaStream_t stream, const char* what);
  ~StreamScratch();
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
  template <typename T> T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};
}  // namespace fathom::cuda
