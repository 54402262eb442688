// CUDA runtime plumbing: device discovery, device buffers, error reporting.
#include <cuda_runtime.h>

#include "core/error.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/cuda_ops.h"

namespace fathom::cuda {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(cat("CUDA error in ", what, ": ", cudaGetErrorString(e)));
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

std::string device_name(int device) {
  cudaDeviceProp p{};
  check(cudaGetDeviceProperties(&p, device), "cudaGetDeviceProperties");
  return cat(p.name, " (sm_", p.major, p.minor, ", ", p.multiProcessorCount, " SMs, ",
             p.totalGlobalMem / (1024 * 1024), " MiB)");
}

DeviceBuffer::DeviceBuffer(size_t bytes) : bytes_(bytes) {
  if (bytes == 0) return;
  cudaError_t e = cudaMalloc(&ptr_, bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw Error(cat("cannot allocate ", bytes, " bytes of GPU memory: ", cudaGetErrorString(e)));
  }
}

DeviceBuffer::~DeviceBuffer() {
  if (ptr_) cudaFree(ptr_);
}

void DeviceBuffer::upload(const void* host, size_t bytes) {
  FATHOM_ASSERT(bytes <= bytes_);
  check(cudaMemcpy(ptr_, host, bytes, cudaMemcpyHostToDevice), "upload");
}

void DeviceBuffer::download(void* host, size_t bytes) const {
  FATHOM_ASSERT(bytes <= bytes_);
  check(cudaMemcpy(host, ptr_, bytes, cudaMemcpyDeviceToHost), "download");
}

void DeviceBuffer::fill_bytes(int value) { check(cudaMemset(ptr_, value, bytes_), "cudaMemset"); }

void synchronize() { check(cudaDeviceSynchronize(), "a kernel (cudaDeviceSynchronize)"); }

}  // namespace fathom::cuda
