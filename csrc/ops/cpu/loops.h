#pragma once
// Vectorized inner loops over one contiguous run of elements. Defined (and
// cloned for AVX-512 / AVX2 / baseline, picked at load time) in loops.cpp.
#include <cstdint>

#include "numerics/fake_quant_math.h"

namespace qwix {
namespace cpu {

// Max of |x| as float bits (>= kNonFiniteAbsBits: the run holds Inf/NaN).
template <typename T>
uint32_t run_absmax_bits(const T* x, int64_t n);
// Min/max in sortable-int form, combined into *mn / *mx; *abs_bits as above.
template <typename T>
void run_minmax(const T* x, int64_t n, int32_t* mn, int32_t* mx, uint32_t* abs_bits);
// Sum of squares in float64.
template <typename T>
double run_sumsq(const T* x, int64_t n);

// Element i of the run belongs to group i: combine into per-group arrays.
template <typename T>
void acc_absmax_bits(const T* x, int64_t n, uint32_t* acc);
template <typename T>
void acc_minmax(const T* x, int64_t n, int32_t* mn, int32_t* mx, uint32_t* abs_bits);
template <typename T>
void acc_sumsq(const T* x, int64_t n, double* acc);

// y = fake_quant(x) with one group's parameters; mask[i] = lo <= x[i] <= hi when mask != nullptr.
template <typename T, QKind K>
void apply_run(const T* x, T* y, int64_t n, GroupParams p, QParams q, uint8_t* mask);
// Element i uses parameters [i] of the arrays.
template <typename T, QKind K>
void apply_run_grouped(const T* x, T* y, int64_t n, const float* scale, const float* zp, const float* lo,
                       const float* hi, QParams q, uint8_t* mask);

// Consecutive rows of length L, each its own group with an `absmax,mult`
// calibration: calibrate and quantize row by row (one call for many short
// rows, e.g. tiles of 128, so the row loops stay inlined and vectorized).
template <typename T, QKind K>
void fused_absmax_rows(const T* x, T* y, int64_t rows, int64_t L, float mult, QParams q);

// ORs n 0/1 bytes into a bit array starting at bit `bit_offset` (LSB first).
void pack_bits(const uint8_t* m, int64_t n, uint8_t* bits, int64_t bit_offset);
// out[i] = bit i of bits (from bit 0 of bits[0]) ? g[i] : 0.
template <typename T>
void masked_copy(const T* g, const uint8_t* bits, T* out, int64_t n);

}  // namespace cpu
}  // namespace qwix
