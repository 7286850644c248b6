// GoogleTest: the shared per-element math (numerics/), independent of the ops.
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "numerics/calibration.h"
#include "numerics/fake_quant_math.h"
#include "numerics/qtype.h"
#include "ops/common.h"

namespace {

TEST(Numerics, RoundHalfEven) {
  EXPECT_EQ(qwix::round_half_even(0.5f), 0.0f);
  EXPECT_EQ(qwix::round_half_even(1.5f), 2.0f);
  EXPECT_EQ(qwix::round_half_even(2.5f), 2.0f);
  EXPECT_EQ(qwix::round_half_even(-3.5f), -4.0f);
  EXPECT_TRUE(std::isnan(qwix::round_half_even(NAN)));
}

TEST(Numerics, Float8E4M3Grid) {
  const auto q = qwix::parse_qtype("fp8_e4m3").p;
  auto r = [&](float v) { return qwix::round_to_float_format(v, q.mantissa_bits, q.min_exponent); };
  EXPECT_EQ(r(448.0f), 448.0f);
  EXPECT_EQ(r(17.0f), 16.0f);     // spacing 2 at [16, 32): tie to even mantissa
  EXPECT_EQ(r(19.0f), 20.0f);
  EXPECT_EQ(r(0.0009765625f), 0.0f);  // 2^-10 is half the smallest subnormal 2^-9: tie to 0
  EXPECT_EQ(r(0.0029296875f), 0.00390625f);  // 1.5 * 2^-9 -> 2 * 2^-9
}

TEST(Numerics, Float4E2M1Grid) {
  const auto q = qwix::parse_qtype("float4_e2m1fn").p;
  const float in[] = {0.2f, 0.25f, 0.75f, 1.25f, 2.5f, 3.5f, 5.0f, 5.5f};
  const float out[] = {0.0f, 0.0f, 1.0f, 1.0f, 2.0f, 4.0f, 4.0f, 6.0f};
  for (int i = 0; i < 8; ++i) EXPECT_EQ(qwix::round_to_float_format(in[i], q.mantissa_bits, q.min_exponent), out[i]) << in[i];
}

TEST(Numerics, NF4TiesGoLow) {
  // Just above the fp32 rounding of a midpoint that is not representable: still nearer the lower level.
  EXPECT_EQ(qwix::round_to_nf4(-0.8480963706970215f), -0.6961928009986877f);
  EXPECT_EQ(qwix::round_to_nf4(0.8614784479141235f), 1.0f);
  EXPECT_EQ(qwix::round_to_nf4(0.0397901f), 0.0f);
  EXPECT_EQ(qwix::round_to_nf4(1.0f), 1.0f);
  EXPECT_EQ(qwix::round_to_nf4(-0.9f), -1.0f);
}

TEST(Numerics, ScaleGuardAndAsymmetric) {
  const auto q = qwix::parse_qtype("uint8").p;
  EXPECT_EQ(qwix::symmetric_params(0.0f, q).scale, 1.0f);
  const auto p = qwix::asymmetric_params(-1.0f, 3.0f, q);
  EXPECT_FLOAT_EQ(p.scale, 4.0f / 255.0f);
  EXPECT_EQ(p.zero_point, 64.0f);  // round(0 + 1 / (4/255)) = round(63.75)
  EXPECT_TRUE(std::isnan(qwix::symmetric_params(NAN, q).scale));
}

TEST(Calibration, Parsing) {
  EXPECT_TRUE(qwix::parse_calibration("AbsMax, 0.5").can_clip());
  EXPECT_FALSE(qwix::parse_calibration("minmax").can_clip());
  EXPECT_FALSE(qwix::parse_calibration("fixed,-1,3").symmetric());
  EXPECT_TRUE(qwix::parse_calibration("fixed,-2,2").symmetric());
  EXPECT_THROW(qwix::parse_calibration("absmax,"), c10::ValueError);
  EXPECT_THROW(qwix::parse_calibration("fixed,1,2"), c10::ValueError);
  EXPECT_THROW(qwix::parse_calibration("median"), c10::ValueError);
}

}  // namespace

namespace {
uint32_t bits_of(float v) { return qwix::float_bits(v); }
float same_or_nan(float a, float b) { return (std::isnan(a) && std::isnan(b)) || bits_of(a) == bits_of(b); }
}  // namespace

// The GPU kernels divide by a scale through its reciprocal plus two FMA
// corrections; the result must be x / d bit for bit (the CPU divides).
TEST(Numerics, ReciprocalDivIsCorrectlyRounded) {
  std::mt19937_64 rng(1234);
  auto rand_float = [&](int emin, int emax) {
    const uint32_t e = static_cast<uint32_t>(emin + 127 + static_cast<int>(rng() % (emax - emin + 1)));
    const uint32_t m = static_cast<uint32_t>(rng()) & 0x7fffffu;
    const uint32_t s = static_cast<uint32_t>(rng() & 1u) << 31;
    return qwix::bits_float(s | (e << 23) | m);
  };
  int64_t checked = 0;
  for (int i = 0; i < 3000000; ++i) {  // random x in [2^-100, 2^128), d in [2^-63, 2^125]
    const float x = rand_float(-100, 127), d = std::fabs(rand_float(-63, 124));
    const auto div = qwix::ReciprocalDiv::of(d);
    const float want = x / d, got = div(x);
    ASSERT_TRUE(same_or_nan(got, want)) << x << " / " << d << ": " << got << " != " << want;
    ++checked;
  }
  // Rounding boundaries of the grids: x on and next to (n + 1/2) d and n d, for
  // scales with all-ones and all-zeros significands and random ones.
  std::vector<float> scales = {1.0f, qwix::bits_float(0x3fffffffu), qwix::bits_float(0x3f7fffffu),
                               qwix::bits_float(0x20ffffffu), 1.0842021724855044e-19f, 3.0e37f};
  for (int i = 0; i < 200; ++i) scales.push_back(std::fabs(rand_float(-63, 120)));
  for (const float d : scales) {
    const auto div = qwix::ReciprocalDiv::of(d);
    for (int n = -300; n <= 300; ++n) {
      for (const float k : {static_cast<float>(n), n + 0.5f}) {
        float x = k * d;
        for (int step = 0; step < 3; ++step) {
          ASSERT_TRUE(same_or_nan(div(x), x / d)) << x << " / " << d;
          x = std::nextafter(x, INFINITY);
          ++checked;
        }
        x = std::nextafter(k * d, -INFINITY);
        ASSERT_TRUE(same_or_nan(div(x), x / d)) << x << " / " << d;
      }
    }
  }
  // Special values: overflowing quotients, Inf/NaN, a scale whose reciprocal is subnormal.
  const float tiny = 1.0842021724855044e-19f;
  for (const float x : {3.0e38f, -3.0e38f, INFINITY, -INFINITY, NAN, 0.0f, -0.0f}) {
    ASSERT_TRUE(same_or_nan(qwix::ReciprocalDiv::of(tiny)(x), x / tiny)) << x;
    ASSERT_TRUE(same_or_nan(qwix::ReciprocalDiv::of(3.3e38f)(x), x / 3.3e38f)) << x;
  }
  ASSERT_TRUE(qwix::ReciprocalDiv::of(3.3e38f).divide);
  EXPECT_GT(checked, 3000000);
}

// Below |x| = 2^-100 the quotient may be off in its last bits, but it is below
// 2^-37 and every qtype quantizes it to the same value as the exact quotient.
TEST(Numerics, ReciprocalDivTinyInputsQuantizeAlike) {
  std::mt19937_64 rng(99);
  for (const char* name : {"int8", "uint4", "float8_e4m3fn", "float4_e2m1fn", "nf4"}) {
    const qwix::QParams q = qwix::parse_qtype(name).p;
    for (int i = 0; i < 200000; ++i) {
      const uint32_t sign = static_cast<uint32_t>(rng() & 1u) << 31;
      const uint32_t ex = static_cast<uint32_t>(rng() % 27), ed = static_cast<uint32_t>(64 + rng() % 62);
      const float x = qwix::bits_float(sign | (ex << 23) | (static_cast<uint32_t>(rng()) & 0x7fffffu));  // < 2^-100
      const float d = qwix::bits_float((ed << 23) | (static_cast<uint32_t>(rng()) & 0x7fffffu));  // [2^-63, 2^-1)
      const int zp_i = static_cast<int>(rng() % 5) - 2 + (q.qmin == 0.0f ? 5 : 0);
      const float zp = q.kind == qwix::QKind::Int ? static_cast<float>(zp_i) : 0.0f;
      float a = 0, b = 0;
      qwix::dispatch_kind(q.kind, [&](auto k) {
        a = qwix::fake_quant_value<decltype(k)::value>(x, qwix::ReciprocalDiv::of(d), d, zp, q);
        b = qwix::fake_quant_value<decltype(k)::value>(x, qwix::ExactDiv{d}, d, zp, q);
      });
      ASSERT_EQ(bits_of(a), bits_of(b)) << name << " x=" << x << " d=" << d;
    }
  }
}

TEST(Numerics, MxQtypesUsePowerOfTwoScales) {
  EXPECT_EQ(qwix::pow2_ceil(1.0f), 1.0f);
  EXPECT_EQ(qwix::pow2_ceil(1.5f), 2.0f);
  EXPECT_EQ(qwix::pow2_ceil(0.25f), 0.25f);
  EXPECT_EQ(qwix::pow2_ceil(0.3f), 0.5f);
  EXPECT_EQ(qwix::pow2_ceil(std::nextafter(4.0f, 5.0f)), 8.0f);
  EXPECT_TRUE(std::isnan(qwix::pow2_ceil(NAN)));
  EXPECT_TRUE(std::isinf(qwix::pow2_ceil(INFINITY)));
  const qwix::QType mx8 = qwix::parse_qtype("mxfp8"), mx4 = qwix::parse_qtype("mxfp4");
  EXPECT_TRUE(mx8.is_block_format() && mx4.is_block_format());
  EXPECT_FALSE(qwix::parse_qtype("float8_e4m3fn").is_block_format());
  EXPECT_EQ(mx8.p.block, qwix::kMxBlock);
  EXPECT_EQ(mx8.p.bound, 448.0f);
  EXPECT_EQ(mx4.p.bound, 6.0f);
  EXPECT_EQ(qwix::symmetric_params(1.0f, mx8.p).scale, std::ldexp(1.0f, -8));  // 1/448 -> 2^-8
  EXPECT_EQ(qwix::symmetric_params(1.0f, mx4.p).scale, 0.25f);                // 1/6 -> 2^-2
  EXPECT_EQ(qwix::symmetric_params(0.0f, mx8.p).scale, 1.0f);
  const qwix::QType nv = qwix::parse_qtype("nvfp4");
  EXPECT_TRUE(nv.two_level && nv.is_block_format() && !nv.p.pow2_scale);
  EXPECT_EQ(nv.p.block, qwix::kNvfp4Block);
  EXPECT_FALSE(mx8.two_level);
}
