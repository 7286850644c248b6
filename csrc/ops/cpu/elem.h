#pragma once
// Branch-free conversions between storage types and float32, written so GCC
// vectorizes them (c10's Half uses F16C only when the whole TU is built for it).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "numerics/fake_quant_math.h"

namespace qwix {
namespace cpu {

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};

template <>
struct Elem<double> {
  static float load(double v) { return static_cast<float>(v); }
  static double store(float v) { return v; }
};

template <>
struct Elem<c10::BFloat16> {
  static float load(c10::BFloat16 v) { return bits_float(static_cast<uint32_t>(v.x) << 16); }
  static c10::BFloat16 store(float f) {  // round to nearest even; NaN -> canonical NaN
    const uint32_t u = float_bits(f);
    const uint16_t r = static_cast<uint16_t>((u + (((u >> 16) & 1u) + 0x7fffu)) >> 16);
    return c10::BFloat16(f != f ? uint16_t{0x7fc0} : r, c10::BFloat16::from_bits());
  }
};

template <>
struct Elem<c10::Half> {
  // The FP16 library's algorithms (c10's portable path), with selects written
  // as bit masks so GCC vectorizes them.
  static uint32_t select(bool c, uint32_t a, uint32_t b) {
    const uint32_t m = 0u - static_cast<uint32_t>(c);
    return (a & m) | (b & ~m);
  }
  static float load(c10::Half v) {
    const uint32_t w = static_cast<uint32_t>(v.x) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
    return bits_float(sign | select(two_w < (1u << 27), float_bits(denormalized), float_bits(normalized)));
  }
  static c10::Half store(float f) {
    float base = bits_float(float_bits(f) & 0x7fffffffu) * 0x1.0p+112f * 0x1.0p-110f;
    const uint32_t w = float_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = select(bias < 0x71000000u, 0x71000000u, bias);
    base = bits_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = float_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    const uint32_t h = (sign >> 16) | select(shl1_w > 0xFF000000u, 0x7E00u, nonsign);
    return c10::Half(static_cast<uint16_t>(h), c10::Half::from_bits());
  }
};

}  // namespace cpu
}  // namespace qwix
