// GoogleTest: the shared per-element math (numerics/), independent of the ops.
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <cmath>

#include "numerics/calibration.h"
#include "numerics/fake_quant_math.h"
#include "numerics/qtype.h"

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
