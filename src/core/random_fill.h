// The counter-based generator behind Ops::fill_random, written once for host and device code:
// u(seed, i) ∈ [-1, 1) is the top 24 bits of splitmix64(seed + i · golden ratio), so every
// backend draws bit-identical values in any order and in parallel.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FATHOM_HD __host__ __device__ __forceinline__
#else
#define FATHOM_HD inline
#endif

namespace fathom {

FATHOM_HD float random_uniform(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return float(int32_t(z >> 40) - (1 << 23)) * (1.0f / float(1 << 23));  // exact in float
}

}  // namespace fathom
