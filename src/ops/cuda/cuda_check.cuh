// Error checking for the CUDA sources (launcher side only).
#pragma once
#include <cuda_runtime.h>

namespace fathom::cuda {
// Throws fathom::Error naming `what` when e is not cudaSuccess.
void check(cudaError_t e, const char* what);
// After a launch: configuration errors surface here; execution errors at the next sync.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }
}  // namespace fathom::cuda
