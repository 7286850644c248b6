#pragma once
// The per-element numerics of DESIGN section 2, shared by the CPU kernels and
// CUDA. Every function is branch-free (selects only) so the CPU loops
// auto-vectorize, and the fp32 operation order is the contract: CPU, CUDA and
// the test reference agree bit for bit.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "numerics/host_device.h"
#include "numerics/qtype.h"

namespace qwix {

// sqrt(FLT_MIN): smaller scales (and non-positive ones) become 1, as in Qwix.
constexpr float kMinScale = 1.0842021724855044e-19f;

QWIX_HD uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
#endif
}

QWIX_HD float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
#endif
}

// Round half to even. Exact for |v| < 2^22, which every caller guarantees by
// clamping first; NaN stays NaN; a zero result is +0 on every backend. (Two
// full-rate adds: vectorizes on CPUs, and beats the quarter-rate FRND on GPUs.)
QWIX_HD float round_half_even(float v) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
  return (v + magic) - magic;
}

// Clamp that propagates NaN (a NaN fails both comparisons and passes through).
// The sign of a zero may differ between the two forms; every caller rounds
// with round_half_even or compares against nonzero bounds, so results agree.
QWIX_HD float clamp_keep_nan(float v, float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(v), "f"(hi));
  asm("max.NaN.f32 %0, %0, %1;" : "+f"(r) : "f"(lo));
  return r;
#else
  return v < lo ? lo : (v > hi ? hi : v);
#endif
}

// x / d, correctly rounded (ties to even). CPUs divide (a vector divide is
// cheap next to memory); GPUs use ReciprocalDiv, which gives the same bits.
struct ExactDiv {
  float d;
  QWIX_HD float operator()(float x) const { return x / d; }
};

// x / d from r = RN(1/d) as ReciprocalDiv below computes it, without its
// per-element checks, for a whole group at once: the same value as
// ReciprocalDiv (x / d, with its tiny-quotient caveat) for every x of a group
// whose max |x| passes ReciprocalDiv::unchecked_ok, except that a zero x gives +0
// (fake_quant_value drops the sign of zero quotients anyway). No branch, no
// select: one multiply and four FMAs per element.
struct UncheckedDiv {
  float d, r;
  QWIX_HD float operator()(float x) const {
    const float q0 = x * r;
#if defined(__CUDA_ARCH__)
    const float q1 = __fmaf_rn(__fmaf_rn(-q0, d, x), r, q0);
    return __fmaf_rn(__fmaf_rn(-q1, d, x), r, q1);
#else
    const float q1 = std::fma(std::fma(-q0, d, x), r, q0);
    return std::fma(std::fma(-q1, d, x), r, q1);
#endif
  }
};

// x / d from r = RN(1/d), computed once per group: q0 = RN(x r) is within 1.5
// ulp of x / d, one FMA correction (Markstein) makes it faithful and a second
// one correctly rounded, so the result equals x / d bit for bit. Valid when r is
// a normal float (d <= 2^125; else `divide` is set), the residuals are exact
// (|x| >= 2^-100) and the quotient is normal (>= 2^-126). Outside that, the
// result is still below 2^-37 in magnitude (qwix scales are >= 2^-63), and every
// qtype quantizes it to zero exactly as the true quotient (the finest grid step
// is e5m2's 2^-16). A non-finite q0 (x Inf/NaN, or an overflowing quotient) takes
// the division too.
struct ReciprocalDiv {
  float d, r;
  bool divide;  // r would be subnormal: divide instead
  // From d and r = RN(1/d) (precomputed per group, e.g. in the CUDA params).
  QWIX_HD static ReciprocalDiv with(float d, float r) { return {d, r, !(r >= 2.3509887e-38f)}; }  // 2^-125
  QWIX_HD static ReciprocalDiv of(float d) { return with(d, 1.0f / d); }
  // Whether every x with |x| <= amax divides exactly without the checks: r is
  // normal and every quotient finite with room to spare (false for a NaN or
  // Inf amax). Then `unchecked()` serves the whole group.
  QWIX_HD bool unchecked_ok(float amax) const { return !divide && amax * r <= 1.329228e36f; }  // 2^120
  QWIX_HD UncheckedDiv unchecked() const { return {d, r}; }
  QWIX_HD float operator()(float x) const {
    const float q0 = x * r;
    if (divide || !(q0 - q0 == 0.0f)) return x / d;  // q0 - q0 is NaN iff q0 is Inf or NaN
    // copysign: a zero x keeps its sign (the corrections would turn -0 into +0).
#if defined(__CUDA_ARCH__)
    const float q1 = __fmaf_rn(__fmaf_rn(-q0, d, x), r, q0);
    return copysignf(__fmaf_rn(__fmaf_rn(-q1, d, x), r, q1), q0);
#else
    const float q1 = std::fma(std::fma(-q0, d, x), r, q0);
    return std::copysign(std::fma(std::fma(-q1, d, x), r, q1), q0);
#endif
  }
};

// Round a finite |v| <= format max to a float format with `mbits` mantissa bits
// and smallest normal exponent `emin` (subnormals included), ties to even:
// magic = 1.5 * 2^(e + 23 - mbits), e = max(exponent(v), emin), has the grid
// spacing 2^(e - mbits) as its ulp and v + magic stays in magic's binade, so
// the add rounds v to the grid and the subtract is exact (5 integer/float ops,
// no multiplies; a zero result is +0). NaN stays NaN.
QWIX_HD float round_to_float_format(float v, int mbits, int emin) {
  const uint32_t ev = float_bits(v) & 0x7f800000u;
  const uint32_t emin_bits = static_cast<uint32_t>(emin + 127) << 23;
  const uint32_t e = ev > emin_bits ? ev : emin_bits;
  const float magic = bits_float(e + (static_cast<uint32_t>(23 - mbits) << 23) + 0x400000u);
  return (v + magic) - magic;
}

// The 16 NF4 levels (QLoRA) and the fp32 midpoints between neighbours.
struct NF4Table {
  static QWIX_HD float level(int i) {
    constexpr float kLevels[16] = {-1.0f,
                                   -0.6961928009986877f,
                                   -0.5250730514526367f,
                                   -0.39491748809814453f,
                                   -0.28444138169288635f,
                                   -0.18477343022823334f,
                                   -0.09105003625154495f,
                                   0.0f,
                                   0.07958029955625534f,
                                   0.16093020141124725f,
                                   0.24611230194568634f,
                                   0.33791524171829224f,
                                   0.44070982933044434f,
                                   0.5626170039176941f,
                                   0.7229568362236023f,
                                   1.0f};
    return kLevels[i];
  }
};

// Float thresholds between neighbouring levels: the largest float <= the exact
// midpoint, so `v > threshold` is exactly "v is closer to the upper level"
// (a value exactly on a midpoint goes to the lower level).
QWIX_HD float nf4_threshold(int i) {
  constexpr float kThresholds[15] = {-0.8480964303016663f,  -0.6106329560279846f, -0.4599952697753906f,
                                     -0.33967944979667664f, -0.23460741341114044f, -0.13791173696517944f,
                                     -0.045525018125772476f, 0.03979014977812767f, 0.120255246758461f,
                                     0.2035212516784668f,    0.2920137643814087f,  0.3893125355243683f,
                                     0.5016633868217468f,    0.6427869200706482f,  0.8614783883094788f};
  return kThresholds[i];
}

// Nearest NF4 level of v in [-1, 1]; NaN stays NaN.
QWIX_HD float round_to_nf4(float v) {
  float r = NF4Table::level(0);
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 16
#endif
  for (int i = 0; i < 15; ++i) r = v > nf4_threshold(i) ? NF4Table::level(i + 1) : r;
  return v != v ? v : r;
}

// Per-group quantization parameters. [lo, hi] is the range the straight-through
// gradient is masked to (when the gradient is clipped).
struct GroupParams {
  float scale;
  float zero_point;
  float lo;
  float hi;
};

QWIX_HD float guard_scale(float s) { return s < kMinScale ? 1.0f : s; }

// The smallest power of two >= s, for a finite s >= 2^-63 (Qwix's mx scale:
// 2^ceil(log2(s))); NaN and Inf stay as they are.
QWIX_HD float pow2_ceil(float s) {
  const uint32_t b = float_bits(s);
  const bool exact = (b & 0x7fffffu) == 0u || !(s <= 3.4028234663852886e38f);
  return exact ? s : bits_float(((b >> 23) + 1u) << 23);
}

// Symmetric: scale = absmax / B (MX: rounded up to a power of two). NaN absmax
// (a group with NaN/Inf) stays NaN.
QWIX_HD GroupParams symmetric_params(float absmax, const QParams& q) {
  const float s = guard_scale(absmax / q.bound);
  return {q.pow2_scale ? pow2_ceil(s) : s, 0.0f, -absmax, absmax};
}

// Asymmetric (integer qtypes): the range is widened to contain 0.
QWIX_HD GroupParams asymmetric_params(float mn, float mx, const QParams& q) {
  const float lo = mn > 0.0f ? 0.0f : mn;  // NaN-propagating min(mn, 0)
  const float hi = mx < 0.0f ? 0.0f : mx;  // NaN-propagating max(mx, 0)
  const float scale = guard_scale((hi - lo) / (q.qmax - q.qmin));
  const float zp = round_half_even(clamp_keep_nan(q.qmin - lo / scale, q.qmin, q.qmax));
  return {scale, zp, lo, hi};
}

// Given (static) scale and zero point: the mask range is what the grid covers.
QWIX_HD GroupParams given_params(float scale, float zero_point, const QParams& q) {
  const float s = guard_scale(scale);
  if (q.kind == QKind::Int) return {s, zero_point, (q.qmin - zero_point) * s, (q.qmax - zero_point) * s};
  return {s, 0.0f, q.qmin * s, q.qmax * s};
}

// quantize then dequantize one value, in fp32; `div(x)` is x / scale.
// kSymmetric (zero_point is 0): skips adding and subtracting the zero point,
// which could only change the sign of a zero that rounding makes +0 anyway.
template <QKind K, bool kSymmetric = false, typename Div>
QWIX_HD float fake_quant_value(float x, const Div& div, float scale, float zero_point, const QParams& q) {
  if constexpr (K == QKind::Int && kSymmetric) {
    return round_half_even(clamp_keep_nan(div(x), q.qmin, q.qmax)) * scale;
  } else if constexpr (K == QKind::Int) {
    const float v = clamp_keep_nan(div(x) + zero_point, q.qmin, q.qmax);
    return (round_half_even(v) - zero_point) * scale;
  } else if constexpr (K == QKind::Float) {
    const float v = clamp_keep_nan(div(x), q.qmin, q.qmax);
    return round_to_float_format(v, q.mantissa_bits, q.min_exponent) * scale;
  } else {
    const float v = clamp_keep_nan(div(x), -1.0f, 1.0f);
    return round_to_nf4(v) * scale;
  }
}
template <QKind K, bool kSymmetric = false>
QWIX_HD float fake_quant_value(float x, float scale, float zero_point, const QParams& q) {
  return fake_quant_value<K, kSymmetric>(x, ExactDiv{scale}, scale, zero_point, q);
}

// `&`, not `&&`: no branch, so the masked loops vectorize.
QWIX_HD bool in_range(float x, float lo, float hi) { return (x >= lo) & (x <= hi); }

// Order-preserving map of float bits to int32 (for vectorizable min/max reductions).
QWIX_HD int32_t sortable_bits(float v) {
  const int32_t b = static_cast<int32_t>(float_bits(v));
  return b ^ ((b >> 31) & 0x7fffffff);
}
QWIX_HD float from_sortable_bits(int32_t s) { return bits_float(static_cast<uint32_t>(s ^ ((s >> 31) & 0x7fffffff))); }

// |v| as bits: an unsigned max over these is max|v|, and anything >= 0x7f800000 is Inf/NaN.
QWIX_HD uint32_t abs_bits(float v) { return float_bits(v) & 0x7fffffffu; }
constexpr uint32_t kNonFiniteAbsBits = 0x7f800000u;

}  // namespace qwix
