// Device-side helpers shared by the kernels: element conversions that match core/dtype.h bit
// for bit, 16-byte weight loads with dequantization, warp reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.h"

namespace fathom::cuda {

// The device side of programmatic dependent launch (see launch_kernel() in cuda_check.cuh): wait for
// the kernels this one depends on to finish and flush, then let the next kernel be scheduled.
// Both are no-ops before sm_90 and when the kernel was launched without the attribute.
// Work that reads nothing an earlier kernel writes (weights) may come before it: see
// prefetch_l2.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

constexpr unsigned kFullMask = 0xffffffffu;

// cp.async (sm_80 and later): 16 bytes from global to shared memory (dst: a shared-memory
// address, smem_u32) through L2 only, zero-filled when !valid (src is then not read, but stays a
// valid address); cp_async_commit groups the copies a thread issued so far, cp_async_wait<N>
// returns once at most N of its groups are still in flight.
__device__ inline uint32_t smem_u32(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }
__device__ inline void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ inline void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Asks L2 to fetch [p, p + bytes) from memory, without waiting; called by one thread. Kernels
// issue it for their weights before pdl_wait(), so that the weights stream in while the kernel
// before them is still running and the reads after the wait hit L2. On sm_90 one bulk prefetch
// (16-byte aligned start and size; the range is widened to that); before, one prefetch per
// 128-byte line of the first 32 lines (a hint only).
__device__ inline void prefetch_l2(const void* p, uint64_t bytes) {
  if (bytes == 0) return;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint64_t a = reinterpret_cast<uint64_t>(p);
  const uint64_t lo = a & ~uint64_t(15), hi = (a + bytes + 15) & ~uint64_t(15);
  for (uint64_t s = lo; s < hi; s += (uint64_t(1) << 30)) {
    const uint32_t n = uint32_t(min(hi - s, uint64_t(1) << 30));
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(s), "r"(n) : "memory");
  }
#elif defined(__CUDA_ARCH__)
  const char* c = static_cast<const char*>(p);
  for (uint64_t o = 0; o < bytes && o < 32 * 128; o += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(c + o));
#else
  (void)p;
#endif
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <DType D> struct ElemSize;
template <> struct ElemSize<DType::F32> { static constexpr int value = 4; };
template <> struct ElemSize<DType::BF16> { static constexpr int value = 2; };
template <> struct ElemSize<DType::F16> { static constexpr int value = 2; };
template <> struct ElemSize<DType::F8_E4M3> { static constexpr int value = 1; };
// Elements of a 16-byte load.
template <DType D> constexpr int kVec = 16 / ElemSize<D>::value;

__device__ inline float bf16_bits_to_f32(uint32_t h) { return __uint_as_float(h << 16); }
__device__ inline float f16_bits_to_f32(uint32_t h) { return __half2float(__ushort_as_half(uint16_t(h))); }

// Two e4m3 codes (low byte first) -> two floats, exactly as core's fp8e4m3_to_f32: every e4m3
// value is a half, the conversion is exact (one cvt instruction on sm_89+) and 0x7F/0xFF
// become NaN.
__device__ inline float2 fp8x2_to_float2(uint16_t two) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(two), __NV_E4M3);
  return __half22float2(*reinterpret_cast<const __half2*>(&h));
}
__device__ inline float fp8_to_f32(uint8_t b) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t(b), __NV_E4M3);
  return __half2float(__half(h));
}

// core's f32_to_bf16: round to nearest-even, NaN stays NaN (quiet bit set).
__device__ inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t b = __float_as_uint(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x40u);
  b += 0x7fffu + ((b >> 16) & 1u);
  return uint16_t(b >> 16);
}

// core's f32_to_f16: round to nearest-even, overflow to infinity.
__device__ inline uint16_t f32_to_f16_bits(float f) {
  const uint32_t b = __float_as_uint(f);
  const uint16_t sign = uint16_t((b >> 16) & 0x8000u);
  const float a = fabsf(f);
  if (isnan(f)) return uint16_t(sign | 0x7e00u);
  if (a >= 65520.0f) return uint16_t(sign | 0x7c00u);
  if (a < 6.103515625e-05f) return uint16_t(sign | uint16_t(rintf(a * 16777216.0f)));  // subnormal: 2^-24 steps
  const uint32_t ab = __float_as_uint(a);
  uint32_t h = (((ab >> 23) - 112) << 10) | ((ab & 0x7fffffu) >> 13);
  const uint32_t rest = ab & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1;  // may carry into the exponent: correct
  return uint16_t(sign | h);
}

// core's f32_to_fp8e4m3: round to nearest-even, saturating to +-448, NaN -> 0x7F.
__device__ inline uint8_t f32_to_fp8_bits(float f) {
  if (isnan(f)) return 0x7f;
  const uint8_t sign = signbit(f) ? 0x80 : 0x00;
  const float a = fabsf(f);
  if (a >= 448.0f) return uint8_t(sign | 0x7e);
  if (a < 0.015625f) return uint8_t(sign | uint8_t(rintf(a * 512.0f)));  // subnormal: 2^-9 steps
  int e;
  const float m = frexpf(a, &e);  // a = m * 2^e, m in [0.5, 1)
  int exponent = e - 1;
  int mant = int(rintf((2.0f * m - 1.0f) * 8.0f));
  if (mant == 8) {
    mant = 0;
    ++exponent;
  }
  const int code = ((exponent + 7) << 3) | mant;
  return uint8_t(sign | (code < 0x7e ? code : 0x7e));
}

// Element k of a row of D values, as float (no scale).
template <DType D>
__device__ inline float load_elem(const uint8_t* row, int64_t k) {
  if constexpr (D == DType::F32) {
    return __ldg(reinterpret_cast<const float*>(row) + k);
  } else if constexpr (D == DType::BF16) {
    return bf16_bits_to_f32(__ldg(reinterpret_cast<const unsigned short*>(row) + k));
  } else if constexpr (D == DType::F16) {
    return f16_bits_to_f32(__ldg(reinterpret_cast<const unsigned short*>(row) + k));
  } else {
    return fp8_to_f32(__ldg(row + k));
  }
}

// Converts the 16 bytes in v (kVec<D> elements) to floats.
template <DType D>
__device__ inline void convert16(const uint4& v, float* out) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (D == DType::F32) {
      out[i] = __uint_as_float(w[i]);
    } else if constexpr (D == DType::BF16) {
      out[2 * i] = __uint_as_float(w[i] << 16);
      out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    } else if constexpr (D == DType::F16) {
      out[2 * i] = f16_bits_to_f32(w[i] & 0xffffu);
      out[2 * i + 1] = f16_bits_to_f32(w[i] >> 16);
    } else {
      const float2 a = fp8x2_to_float2(uint16_t(w[i] & 0xffffu));
      const float2 b = fp8x2_to_float2(uint16_t(w[i] >> 16));
      out[4 * i] = a.x;
      out[4 * i + 1] = a.y;
      out[4 * i + 2] = b.x;
      out[4 * i + 3] = b.y;
    }
  }
}

// 16 FP8 e4m3 codes -> 16 floats equal to the codes' values times 2^-120, by bit placement
// alone: the code's 7 magnitude bits go to float bits 20..26 and its sign to bit 31, so its
// 4-bit exponent and 3-bit mantissa become the float's with the bias 127 instead of 7 (exact for
// normal and subnormal codes alike: the float is then subnormal too). Three integer operations
// per value instead of the f16 round trip of convert16, which on Hopper is limited by the
// conversion throughput, not by memory. The caller multiplies its sums by 2^120 (in two 2^60
// steps, so that neither factor can overflow). The NaN codes 0x7F/0xFF read as ±480; checkpoints
// never hold them (the quantizer saturates at ±448).
__device__ inline void fp8x4_scaled_down(uint32_t w, float* out) {
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const uint32_t top = b == 3 ? w : w << (24 - 8 * b);  // code b in bits 24..31
    out[b] = __uint_as_float((top & 0x80000000u) | ((top >> 4) & 0x07f00000u));
  }
}
__device__ inline void fp8x16_scaled_down(const uint4& v, float* out) {
  fp8x4_scaled_down(v.x, out);
  fp8x4_scaled_down(v.y, out + 4);
  fp8x4_scaled_down(v.z, out + 8);
  fp8x4_scaled_down(v.w, out + 12);
}

// 16 bytes of weights through the read-only path, streamed (evict-first: read once per pass).
__device__ inline uint4 load16_stream(const uint8_t* p) { return __ldcs(reinterpret_cast<const uint4*>(p)); }

__device__ inline float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}
__device__ inline float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

}  // namespace fathom::cuda
