// Element types of tensors and their conversions to float32.
// bf16 is the top half of an IEEE float32; f16 is IEEE half; F8_E4M3 is the "fn" variant
// (no infinities, 0x7F/0xFF are NaN, max 448) used by DeepSeek-V3's FP8 checkpoints.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace fathom {

enum class DType : uint8_t { F32, F16, BF16, F8_E4M3, F64, I64, I32, I16, I8, U8, BOOL };

size_t dtype_size(DType t);
// The safetensors spelling: "F32", "BF16", "F8_E4M3", ...
const char* dtype_name(DType t);
// Parses the safetensors spelling; returns false for an unknown name.
bool dtype_from_name(std::string_view name, DType* out);

inline float f32_from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint32_t bits_from_f32(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

inline float bf16_to_f32(uint16_t h) { return f32_from_bits(uint32_t(h) << 16); }
// Round to nearest even, as PyTorch does; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t b = bits_from_f32(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x40);
  b += 0x7fffu + ((b >> 16) & 1u);
  return uint16_t(b >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// e4m3fn: s eeee mmm, bias 7, subnormals at e == 0, NaN at 0x7F / 0xFF.
float fp8e4m3_to_f32(uint8_t v);
// Round to nearest even, saturating to +-448 (the convention of torch's to(float8_e4m3fn)
// for values in range; out-of-range values saturate instead of becoming NaN).
uint8_t f32_to_fp8e4m3(float f);

// Converts n elements of type `from` at src to float32.
void convert_to_f32(DType from, const void* src, float* dst, size_t n);

}  // namespace fathom
