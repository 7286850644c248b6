// GoogleTest: the shared per-element math (numerics/), independent of the ops.
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <algorithm>
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

// The float-format rounding (magic-number add) against the textbook form:
// scale v to the grid of its binade, round half to even, scale back.
TEST(Numerics, FloatFormatRoundingMatchesScaledRounding) {
  for (const char* name : {"float8_e4m3fn", "float8_e5m2", "float4_e2m1fn"}) {
    const qwix::QParams q = qwix::parse_qtype(name).p;
    auto textbook = [&](float v) {
      const int e = std::max(std::ilogb(v == 0.0f ? 1e-30f : v), q.min_exponent);
      const float spacing = std::ldexp(1.0f, e - q.mantissa_bits);
      return std::nearbyint(v / spacing) * spacing + 0.0f;  // +0.0f: a zero result is +0
    };
    std::vector<float> xs;
    for (uint32_t b = 0; b <= qwix::float_bits(q.qmax); b += 61) xs.push_back(qwix::bits_float(b));
    for (float g = 0.0f; g <= q.qmax;) {  // every grid point, the midpoint above it and their neighbours
      const float step =
          std::ldexp(1.0f, std::max(std::ilogb(g == 0.0f ? 1e-30f : g), q.min_exponent) - q.mantissa_bits);
      for (const float v : {g, g + step / 2}) {
        xs.push_back(v);
        xs.push_back(std::nextafter(v, 0.0f));
        xs.push_back(std::nextafter(v, INFINITY));
      }
      g += step;
    }
    int64_t checked = 0;
    for (float v : xs) {
      if (!(v <= q.qmax)) continue;
      for (const float s : {v, -v}) {
        ASSERT_EQ(qwix::float_bits(qwix::round_to_float_format(s, q.mantissa_bits, q.min_exponent)),
                  qwix::float_bits(textbook(s)))
            << name << " v=" << s;
        ++checked;
      }
    }
    EXPECT_GT(checked, 1000) << name;
    EXPECT_TRUE(std::isnan(qwix::round_to_float_format(NAN, q.mantissa_bits, q.min_exponent)));
  }
}

// The GPU kernels divide a whole group without per-element checks when the
// group's max |x| allows it (UncheckedDiv): the quotient must still be x / d
// bit for bit, and the fake-quantized value the same as with a true division.
TEST(Numerics, UncheckedDivIsExactWhereAllowed) {
  std::mt19937_64 rng(4321);
  auto rand_float = [&](int emin, int emax) {
    const uint32_t e = static_cast<uint32_t>(emin + 127 + static_cast<int>(rng() % (emax - emin + 1)));
    return qwix::bits_float((static_cast<uint32_t>(rng() & 1u) << 31) | (e << 23) |
                            (static_cast<uint32_t>(rng()) & 0x7fffffu));
  };
  int64_t allowed = 0, refused = 0;
  for (int i = 0; i < 2000000; ++i) {
    const float x = rand_float(-100, 127), d = std::fabs(rand_float(-63, 127));
    const auto div = qwix::ReciprocalDiv::of(d);
    if (!div.unchecked_ok(std::fabs(x))) {
      ++refused;
      continue;
    }
    const float got = div.unchecked()(x), want = x / d;
    if (std::fabs(want) >= 1.1754944e-38f) {  // a normal quotient: the same bits
      ASSERT_EQ(qwix::float_bits(got), qwix::float_bits(want)) << x << " / " << d;
    } else {  // subnormal: maybe not the same last bits, but as tiny (every qtype quantizes it to 0)
      ASSERT_LE(std::fabs(got), 2.4e-38f) << x << " / " << d;
    }
    ASSERT_EQ(qwix::float_bits(got), qwix::float_bits(div(x))) << x << " / " << d;  // always ReciprocalDiv's value
    ++allowed;
  }
  EXPECT_GT(allowed, 500000);
  EXPECT_GT(refused, 100000);  // overflowing quotients and subnormal reciprocals were drawn too
  // A subnormal quotient where the reciprocal form is off in the last bit (found in review): both
  // forms agree, and the fake-quantized value is the true quotient's.
  {
    const float x = qwix::bits_float(0x157fffffu), d = qwix::bits_float(0x607fffffu);
    const auto div = qwix::ReciprocalDiv::of(d);
    ASSERT_TRUE(div.unchecked_ok(x));
    EXPECT_NE(qwix::float_bits(div(x)), qwix::float_bits(x / d));
    EXPECT_EQ(qwix::float_bits(div.unchecked()(x)), qwix::float_bits(div(x)));
    const qwix::QParams q = qwix::parse_qtype("float8_e5m2").p;
    EXPECT_EQ(qwix::fake_quant_value<qwix::QKind::Float>(x, div.unchecked(), d, 0.0f, q),
              qwix::fake_quant_value<qwix::QKind::Float>(x, qwix::ExactDiv{d}, d, 0.0f, q));
  }
  // Never allowed: non-finite groups, reciprocals that are not normal, huge quotients.
  const auto one = qwix::ReciprocalDiv::of(1.0f);
  EXPECT_FALSE(one.unchecked_ok(NAN));
  EXPECT_FALSE(one.unchecked_ok(INFINITY));
  EXPECT_FALSE(one.unchecked_ok(3.0e38f));
  EXPECT_TRUE(one.unchecked_ok(1.0e36f));
  EXPECT_FALSE(qwix::ReciprocalDiv::of(3.3e38f).unchecked_ok(1.0f));
  EXPECT_FALSE(qwix::ReciprocalDiv::of(NAN).unchecked_ok(1.0f));
  // Groups as the kernels see them: dynamic scales from the group's own
  // calibration (absmax or min/max), values including zeros and tiny ones.
  for (const char* name : {"int8", "int4", "uint8", "float8_e4m3fn", "float8_e5m2", "float4_e2m1fn", "nf4"}) {
    const qwix::QParams q = qwix::parse_qtype(name).p;
    for (int g = 0; g < 2000; ++g) {
      std::vector<float> x(64);
      const int top = -60 + static_cast<int>(rng() % 180);
      for (float& v : x) v = rand_float(std::max(top - 30, -126), std::min(top, 127));
      x[0] = 0.0f;
      x[1] = -0.0f;
      x[2] = rand_float(-126, -100);
      float amax = 0.0f, mn = INFINITY, mx = -INFINITY;
      for (const float v : x) {
        amax = std::max(amax, std::fabs(v));
        mn = std::min(mn, v);
        mx = std::max(mx, v);
      }
      const bool sym = (g % 2 == 0) || q.kind != qwix::QKind::Int;
      const qwix::GroupParams p = sym ? qwix::symmetric_params(amax, q) : qwix::asymmetric_params(mn, mx, q);
      const auto div = qwix::ReciprocalDiv::of(p.scale);
      ASSERT_TRUE(div.unchecked_ok(amax)) << name << " amax=" << amax << " scale=" << p.scale;
      for (const float v : x) {
        float got = 0, want = 0;
        qwix::dispatch_kind(q.kind, [&](auto k) {
          constexpr qwix::QKind K = decltype(k)::value;
          got = sym ? qwix::fake_quant_value<K, true>(v, div.unchecked(), p.scale, p.zero_point, q)
                    : qwix::fake_quant_value<K>(v, div.unchecked(), p.scale, p.zero_point, q);
          want = qwix::fake_quant_value<K>(v, qwix::ExactDiv{p.scale}, p.scale, p.zero_point, q);
        });
        ASSERT_EQ(qwix::float_bits(got), qwix::float_bits(want)) << name << " x=" << v << " scale=" << p.scale;
      }
    }
  }
}

// The symmetric form of the integer fake quant (no zero-point add/subtract)
// gives the same bits as the general form with a zero point of 0.
TEST(Numerics, SymmetricIntFormMatchesZeroPointZero) {
  std::mt19937_64 rng(7);
  for (const char* name : {"int8", "int4", "uint8", "int16"}) {
    const qwix::QParams q = qwix::parse_qtype(name).p;
    for (int i = 0; i < 200000; ++i) {
      const float x = qwix::bits_float(static_cast<uint32_t>(rng()));  // any float: NaN, Inf, subnormals, -0
      const float scale = std::ldexp(1.0f + static_cast<float>(rng() % 1000) / 1000.0f, static_cast<int>(rng() % 40) - 20);
      const float a = qwix::fake_quant_value<qwix::QKind::Int, true>(x, scale, 0.0f, q);
      const float b = qwix::fake_quant_value<qwix::QKind::Int>(x, scale, 0.0f, q);
      ASSERT_TRUE(same_or_nan(a, b)) << name << " x=" << x << " scale=" << scale;
      if (!std::isnan(b)) ASSERT_EQ(qwix::float_bits(a), qwix::float_bits(b)) << name << " x=" << x;
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
