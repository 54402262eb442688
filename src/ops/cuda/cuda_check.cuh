// Error checking and small runtime helpers for the CUDA sources (launcher side only).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <utility>

#include "ops/cuda/cuda_ops.h"

namespace fathom::cuda {
// Throws fathom::Error naming `what` when e is not cudaSuccess.
void check(cudaError_t e, const char* what);
// After a launch: configuration errors surface here; execution errors at the next sync.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

inline cudaStream_t as_cuda(Stream s) { return static_cast<cudaStream_t>(s); }

// The calling thread's current device, read from the runtime once per thread and then kept as
// fathom's own device switches (use_device) leave it: every launch asks (pdl_enabled), and each
// cudaGetDevice / cudaSetDevice was ~0.2–0.3 µs of host time (bench_train's timeline: ~28,000 a
// training step). Fathom changes the device only through use_device.
int thread_device();
// cudaSetDevice(device) unless it is this thread's current device already.
void use_device(int device);

// Streaming multiprocessors of the current device (cached per device).
int sm_count();

// Blocks of `threads` threads for n elements at one a thread: at least 1, at most `cap` — kernels
// with a grid-stride loop pass the most blocks worth launching (kGridStrideBlocks, or a multiple of
// the SMs) and cover the rest by striding; the default is beyond any launch that needs no stride.
constexpr int64_t kGridStrideBlocks = 65535 * 8;
inline unsigned grid_blocks(int64_t n, int threads, int64_t cap = int64_t(1) << 30) {
  const int64_t g = (n + threads - 1) / threads;
  return unsigned(g < 1 ? 1 : g > cap ? cap : g);
}
// The same for a grid-stride kernel capped at 8 blocks an SM of this device.
inline unsigned grid_blocks_per_sm(int64_t n, int threads) { return grid_blocks(n, threads, int64_t(sm_count()) * 8); }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Runs fn once for the current device (on a device past the table, every time).
constexpr int kMaxDevices = 64;
template <class F>
void once_per_device(std::once_flag (&done)[kMaxDevices], F&& fn) {
  const int device = thread_device();
  if (device >= 0 && device < kMaxDevices) std::call_once(done[device], fn);
  else fn();
}
// Lets each kernel use up to `bytes` of dynamic shared memory (above the 48 KB default), once per
// device.
template <class... Kernels>
void allow_dynamic_smem(std::once_flag (&done)[kMaxDevices], int bytes, const char* what, Kernels... kernels) {
  once_per_device(done, [&] {
    (check(cudaFuncSetAttribute(kernels, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), what), ...);
  });
}

// Whether kernels launch with programmatic dependent launch (PDL, Hopper and later, checked
// at run time per device; FATHOM_NO_PDL=1 turns it off): the next kernel on the stream may be
// scheduled while this one's last blocks run, and waits in pdl_wait() (device_util.cuh) until
// this one's results are visible. In a decode step of ~350 small kernels that hides most of
// the launch gap between them; CUDA graphs keep the programmatic edges.
bool pdl_enabled();

// kernel<<<grid, block, smem, stream>>>(args...) with the PDL attribute when pdl_enabled().
// Every kernel launched this way starts with pdl_wait() before it reads what earlier kernels
// wrote.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  if (pdl_enabled()) {
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attr;
    config.numAttrs = 1;
  }
  cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

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
