// The host side of hopper.cuh: the sm_90a probe and the tensor-map encoder.
#include "ops/cuda/hopper.cuh"

#include "core/error.h"
#include "ops/cuda/cuda_check.cuh"

namespace fathom::cuda {
namespace {

// Writes 1 when the kernel image has sm_90a's instructions.
__global__ void sm90a_probe_kernel(int* flag) {
#ifdef FATHOM_SM90A
  *flag = 1;
#else
  *flag = 0;
#endif
}

}  // namespace

bool sm90a_available() {
  static int cached[kMaxDevices];  // 0 unknown, 1 no, 2 yes
  const int device = thread_device();
  if (device < 0 || device >= kMaxDevices) return false;
  if (cached[device] == 0) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    int flag = 0;
    bool clean = true;  // the probe ran (not refused, e.g. inside a graph capture): its answer is kept
    if (major == 9 && minor == 0) {
      int* d = nullptr;
      clean = cudaMalloc(&d, sizeof(int)) == cudaSuccess;
      if (clean) {
        sm90a_probe_kernel<<<1, 1>>>(d);
        clean = cudaMemcpy(&flag, d, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess;
        cudaFree(d);
      }
      cudaGetLastError();
    }
    if (!clean) return false;
    cached[device] = flag == 1 ? 2 : 1;
  }
  return cached[device] == 2;
}

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    check(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q),
          "cuTensorMapEncodeTiled");
    FATHOM_CHECK(q == cudaDriverEntryPointSuccess && f, "the CUDA driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

}  // namespace fathom::cuda
