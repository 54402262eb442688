#include <gtest/gtest.h>

#include <cmath>

#include "core/dtype.h"

using namespace fathom;

TEST(DType, Bf16RoundTripAndRounding) {
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f)), 1.0f);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(-2.5f)), -2.5f);
  // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties to even -> 1
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + std::ldexp(1.0f, -8))), 1.0f);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8))), 1.0f + std::ldexp(1.0f, -6));
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::nanf("")))));
}

TEST(DType, F16AllFiniteCodesRoundTrip) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    uint16_t code = uint16_t(h);
    if ((code & 0x7c00) == 0x7c00) continue;  // inf/nan
    float f = f16_to_f32(code);
    ASSERT_EQ(f32_to_f16(f), code) << "f16 code " << h << " value " << f;
  }
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_to_f32(0xc000), -2.0f);
}

TEST(DType, Fp8E4M3Values) {
  EXPECT_EQ(fp8e4m3_to_f32(0x00), 0.0f);
  EXPECT_EQ(fp8e4m3_to_f32(0x38), 1.0f);             // e=7 m=0
  EXPECT_EQ(fp8e4m3_to_f32(0x7e), 448.0f);           // largest finite
  EXPECT_EQ(fp8e4m3_to_f32(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(fp8e4m3_to_f32(0xb8), -1.0f);
  EXPECT_TRUE(std::isnan(fp8e4m3_to_f32(0x7f)));
  for (int c = 0; c < 0x7f; ++c) {
    ASSERT_EQ(f32_to_fp8e4m3(fp8e4m3_to_f32(uint8_t(c))), c);
    ASSERT_EQ(f32_to_fp8e4m3(fp8e4m3_to_f32(uint8_t(c | 0x80))), c | 0x80);
  }
  EXPECT_EQ(f32_to_fp8e4m3(1000.0f), 0x7e);  // saturates
}

// Round to nearest, ties to the even code, by brute force over every finite code.
static uint8_t fp8_brute_force(float f) {
  uint8_t sign = std::signbit(f) ? 0x80 : 0;
  float a = std::fabs(f);
  if (a >= 448.0f) return uint8_t(sign | 0x7e);
  int best = 0;
  float best_err = a;
  for (int c = 1; c <= 0x7e; ++c) {
    float err = std::fabs(fp8e4m3_to_f32(uint8_t(c)) - a);
    if (err < best_err || (err == best_err && (c & 1) == 0)) {
      best = c;
      best_err = err;
    }
  }
  return uint8_t(sign | best);
}

TEST(DType, Fp8RoundingMatchesBruteForce) {
  // every midpoint between neighbouring codes (the ties), and a sweep of values
  for (int c = 0; c < 0x7e; ++c) {
    float mid = 0.5f * (fp8e4m3_to_f32(uint8_t(c)) + fp8e4m3_to_f32(uint8_t(c + 1)));
    ASSERT_EQ(f32_to_fp8e4m3(mid), fp8_brute_force(mid)) << "midpoint after code " << c;
    ASSERT_EQ(f32_to_fp8e4m3(-mid), fp8_brute_force(-mid)) << "midpoint after code " << c;
  }
  for (float x = 1e-4f; x < 500.0f; x *= 1.0013f) ASSERT_EQ(f32_to_fp8e4m3(x), fp8_brute_force(x)) << x;
}

TEST(DType, NamesRoundTrip) {
  for (DType t : {DType::F32, DType::F16, DType::BF16, DType::F8_E4M3, DType::I64, DType::I32}) {
    DType back;
    ASSERT_TRUE(dtype_from_name(dtype_name(t), &back));
    EXPECT_EQ(back, t);
  }
  DType x;
  EXPECT_FALSE(dtype_from_name("F7", &x));
}
