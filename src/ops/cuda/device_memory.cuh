// The CUDA backend's device context and its upload path (cuda_backend.cu): the device, stream
// and stream-ordered memory pool every tensor of the backend lives on, and the pinned staging
// buffers that large host tensors (memory-mapped weights) travel through.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "core/thread_pool.h"
#include "ops/cuda/cuda_check.cuh"

namespace fathom::cuda {

// The device and stream that tensors of this backend are allocated and freed on. Shared by the
// backend and by every tensor's deleter, so the stream outlives the last tensor.
struct CudaContext {
  int device = 0;
  cudaStream_t stream = nullptr;
  cudaMemPool_t pool = nullptr;

  explicit CudaContext(int d) : device(d) {
    use_device(device);
    check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    check(cudaDeviceGetDefaultMemPool(&pool, device), "cudaDeviceGetDefaultMemPool");
    // Keep freed blocks in the pool instead of returning them at every synchronization: the
    // activations of each step are allocated and freed again and again.
    uint64_t keep_all = UINT64_MAX;
    check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep_all), "cudaMemPoolSetAttribute");
  }
  ~CudaContext() {
    cudaStreamSynchronize(stream);
    cudaStreamDestroy(stream);
  }
  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;
};

// Host-to-device copies of large (memory-mapped) tensors through two pinned buffers: while the
// GPU copies one chunk, the CPU fills the other (several threads: a single thread's memcpy
// would be the bottleneck).
class PinnedStaging {
 public:
  static constexpr size_t kChunk = size_t(32) << 20;

  ~PinnedStaging() {
    for (Buffer& b : buffers_) {
      if (b.done) cudaEventSynchronize(b.done), cudaEventDestroy(b.done);
      if (b.host) cudaFreeHost(b.host);
    }
  }

  void copy_to_device(void* dst, const void* src, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    if (!ready_ && !init()) {  // no pinned memory to be had: a plain synchronous copy
      check(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, stream), "upload (cudaMemcpyAsync)");
      check(cudaStreamSynchronize(stream), "upload (cudaStreamSynchronize)");
      return;
    }
    for (size_t off = 0; off < n;) {
      const size_t len = std::min(kChunk, n - off);
      Buffer& b = buffers_[next_];
      next_ = (next_ + 1) % 2;
      check(cudaEventSynchronize(b.done), "upload (waiting for a staging buffer)");
      const char* from = static_cast<const char*>(src) + off;
      constexpr int64_t kPiece = int64_t(1) << 20;
      ThreadPool::global().parallel_for(int64_t(len), [&](int64_t begin, int64_t end, int) {
        std::memcpy(b.host + begin, from + begin, size_t(end - begin));
      }, kPiece);
      check(cudaMemcpyAsync(static_cast<char*>(dst) + off, b.host, len, cudaMemcpyHostToDevice, stream),
            "upload (cudaMemcpyAsync)");
      check(cudaEventRecord(b.done, stream), "upload (cudaEventRecord)");
      off += len;
    }
  }

 private:
  struct Buffer {
    char* host = nullptr;
    cudaEvent_t done = nullptr;  // the copy out of `host` has finished
  };
  bool init() {
    for (Buffer& b : buffers_) {
      if (cudaMallocHost(reinterpret_cast<void**>(&b.host), kChunk) != cudaSuccess) {
        cudaGetLastError();
        b.host = nullptr;
        return false;
      }
      check(cudaEventCreateWithFlags(&b.done, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    }
    return ready_ = true;
  }
  Buffer buffers_[2];
  int next_ = 0;
  bool ready_ = false;
};

}  // namespace fathom::cuda
