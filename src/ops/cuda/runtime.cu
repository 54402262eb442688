// CUDA runtime plumbing: device discovery, memory figures, error reporting, scratch memory.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "core/error.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/mma_gemv.cuh"

namespace fathom::cuda {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so the next call does not report it again
    throw Error(cat("CUDA error in ", what, ": ", cudaGetErrorString(e), "."));
  }
}

namespace {
thread_local int t_device = -1;  // -1: not read yet
}  // namespace

int thread_device() {
  if (t_device < 0) check(cudaGetDevice(&t_device), "cudaGetDevice");
  return t_device;
}

void use_device(int device) {
  if (t_device == device) return;
  check(cudaSetDevice(device), "cudaSetDevice");
  t_device = device;
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the "no driver" error
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

MemoryInfo memory_info() {
  size_t free = 0, total = 0;
  check(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
  return {int64_t(free), int64_t(total)};
}

int sm_count() {
  static std::atomic<int> cached[kMaxDevices] = {};
  const int device = thread_device();
  if (device >= 0 && device < kMaxDevices) {
    if (const int n = cached[device].load(std::memory_order_relaxed)) return n;
  }
  int n = 0;
  check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  if (device >= 0 && device < kMaxDevices) cached[device].store(n, std::memory_order_relaxed);
  return n;
}

StreamScratch::StreamScratch(size_t bytes, cudaStream_t stream, const char* what) : stream_(stream) {
  const cudaError_t e = cudaMallocAsync(&ptr_, bytes ? bytes : 16, stream);
  if (e != cudaSuccess) {
    cudaGetLastError();
    size_t free = 0, total = 0;
    cudaMemGetInfo(&free, &total);
    throw Error(cat(what, ": cannot allocate ", bytes, " bytes of GPU work space (", free >> 20, " MiB free of ",
                    total >> 20, " MiB): ", cudaGetErrorString(e), "."));
  }
}

StreamScratch::~StreamScratch() {
  if (ptr_) cudaFreeAsync(ptr_, stream_);
}

namespace {
std::atomic<int> g_gemv_kind{-1};  // -1: not yet read from FATHOM_GEMV
}
void set_gemv_kind(GemvKind k) { g_gemv_kind.store(int(k)); }
GemvKind gemv_kind() {
  int v = g_gemv_kind.load();
  if (v < 0) {
    const char* e = std::getenv("FATHOM_GEMV");
    const std::string s = e ? e : "auto";
    FATHOM_CHECK(s == "auto" || s == "simt" || s == "mma", "FATHOM_GEMV is '", s,
                 "'; expected auto (the default), simt or mma.");
    v = int(s == "simt" ? GemvKind::Simt : s == "mma" ? GemvKind::TensorCores : GemvKind::Auto);
    g_gemv_kind.store(v);
  }
  return GemvKind(v);
}
bool mma_gemv_on(MmaSite site) {
  const GemvKind k = gemv_kind();
  return k == GemvKind::TensorCores || (k == GemvKind::Auto && (site == MmaSite::GroupedExperts || site == MmaSite::Skinny));
}

void device_synchronize() { check(cudaDeviceSynchronize(), "cudaDeviceSynchronize (or a kernel queued before it)"); }

bool pdl_enabled() {
  static int cached[64];  // per device: 0 unknown, 1 off, 2 on
  const int device = thread_device();
  if (device < 0 || device >= 64) return false;
  if (cached[device] == 0) {
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    const char* off = std::getenv("FATHOM_NO_PDL");
    cached[device] = major >= 9 && !(off && *off && *off != '0') ? 2 : 1;
  }
  return cached[device] == 2;
}

namespace {
std::atomic<int> g_repeat{0};
}
void set_repeat(int mask) { g_repeat = mask; }
int repeats(RepeatKind kind) { return (g_repeat.load(std::memory_order_relaxed) & kind) ? 2 : 1; }

}  // namespace fathom::cuda
