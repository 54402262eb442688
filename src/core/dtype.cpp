#include "core/dtype.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace fathom {

namespace {
struct DTypeInfo {
  DType type;
  const char* name;
  size_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::F32, "F32", 4},   {DType::F16, "F16", 2}, {DType::BF16, "BF16", 2}, {DType::F8_E4M3, "F8_E4M3", 1},
    {DType::F64, "F64", 8},   {DType::I64, "I64", 8}, {DType::I32, "I32", 4},   {DType::I16, "I16", 2},
    {DType::I8, "I8", 1},     {DType::U8, "U8", 1},   {DType::BOOL, "BOOL", 1},
};
}  // namespace

size_t dtype_size(DType t) {
  for (const auto& d : kDTypes)
    if (d.type == t) return d.size;
  FATHOM_ASSERT(false, "unknown dtype");
}

const char* dtype_name(DType t) {
  for (const auto& d : kDTypes)
    if (d.type == t) return d.name;
  return "?";
}

bool dtype_from_name(std::string_view name, DType* out) {
  for (const auto& d : kDTypes)
    if (name == d.name) {
      *out = d.type;
      return true;
    }
  return false;
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // zero or subnormal: mant * 2^-24
    float v = std::ldexp(float(mant), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return f32_from_bits(sign | 0x7f800000u | (mant << 13));
  return f32_from_bits(sign | ((exp + 112) << 23) | (mant << 13));
}

uint16_t f32_to_f16(float f) {
  uint32_t b = bits_from_f32(f);
  uint16_t sign = uint16_t((b >> 16) & 0x8000u);
  float a = std::fabs(f);
  if (std::isnan(f)) return uint16_t(sign | 0x7e00u);
  if (a >= 65520.0f) return uint16_t(sign | 0x7c00u);  // rounds to infinity
  if (a < 6.103515625e-05f) {
    // subnormal range: quantum 2^-24, round to nearest even
    float q = std::nearbyint(a * 16777216.0f);
    return uint16_t(sign | uint16_t(q));
  }
  uint32_t ab = bits_from_f32(a);
  uint32_t exp = (ab >> 23) - 112;
  uint32_t mant = ab & 0x7fffffu;
  uint32_t h = (exp << 10) | (mant >> 13);
  uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1;  // may carry into exponent: correct
  return uint16_t(sign | h);
}

float fp8e4m3_to_f32(uint8_t v) {
  uint32_t sign = v & 0x80u;
  uint32_t exp = (v >> 3) & 0xfu;
  uint32_t mant = v & 0x7u;
  float r;
  if (exp == 0xf && mant == 0x7) return std::nanf("");
  if (exp == 0)
    r = std::ldexp(float(mant), -9);  // subnormal: mant/8 * 2^-6
  else
    r = std::ldexp(1.0f + float(mant) / 8.0f, int(exp) - 7);
  return sign ? -r : r;
}

uint8_t f32_to_fp8e4m3(float f) {
  if (std::isnan(f)) return 0x7f;
  const uint8_t sign = std::signbit(f) ? 0x80 : 0x00;
  const float a = std::fabs(f);
  if (a >= 448.0f) return uint8_t(sign | 0x7e);
  if (a < 0.015625f) {
    // subnormal range (below 2^-6): the code is the multiple of 2^-9, rounded to nearest even;
    // 8 * 2^-9 rounds up into the smallest normal, whose code is exactly 8.
    return uint8_t(sign | uint8_t(std::nearbyint(a * 512.0f)));
  }
  int e;
  const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  int exponent = e - 1;               // a = (2m) * 2^exponent, 2m in [1, 2)
  int mant = int(std::nearbyint((2.0f * m - 1.0f) * 8.0f));  // ties to even on the 3-bit mantissa
  if (mant == 8) {
    mant = 0;
    ++exponent;
  }
  const int code = ((exponent + 7) << 3) | mant;
  return uint8_t(sign | std::min(code, 0x7e));
}

void convert_to_f32(DType from, const void* src, float* dst, size_t n) {
  switch (from) {
    case DType::F32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    case DType::F16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    case DType::F8_E4M3: {
      const uint8_t* s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = fp8e4m3_to_f32(s[i]);
      return;
    }
    case DType::F64: {
      const double* s = static_cast<const double*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = float(s[i]);
      return;
    }
    default:
      throw Error(cat("cannot convert ", dtype_name(from), " to F32"));
  }
}

}  // namespace fathom
