#include "ops/cpu/loops.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "ops/cpu/elem.h"

// One binary, the best vector ISA at run time: GCC clones each loop for
// x86-64-v4 (AVX-512), v3 (AVX2/FMA/F16C) and the baseline, resolved by ifunc.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define QWIX_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define QWIX_CLONES
#endif

namespace qwix {
namespace cpu {

template <typename T>
QWIX_CLONES uint32_t run_absmax_bits(const T* __restrict x, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = abs_bits(Elem<T>::load(x[i]));
    m = b > m ? b : m;
  }
  return m;
}

template <typename T>
QWIX_CLONES void run_minmax(const T* __restrict x, int64_t n, int32_t* mn_out, int32_t* mx_out, uint32_t* ab_out) {
  int32_t mn = *mn_out, mx = *mx_out;
  uint32_t ab = *ab_out;
  for (int64_t i = 0; i < n; ++i) {
    const float v = Elem<T>::load(x[i]);
    const int32_t s = sortable_bits(v);
    const uint32_t b = abs_bits(v);
    mn = s < mn ? s : mn;
    mx = s > mx ? s : mx;
    ab = b > ab ? b : ab;
  }
  *mn_out = mn;
  *mx_out = mx;
  *ab_out = ab;
}

template <typename T>
QWIX_CLONES double run_sumsq(const T* __restrict x, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) {
      const double v = Elem<T>::load(x[i + j]);
      acc[j] += v * v;
    }
  }
  for (; i < n; ++i) {
    const double v = Elem<T>::load(x[i]);
    acc[0] += v * v;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <typename T>
QWIX_CLONES void acc_absmax_bits(const T* __restrict x, int64_t n, uint32_t* __restrict acc) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = abs_bits(Elem<T>::load(x[i]));
    acc[i] = b > acc[i] ? b : acc[i];
  }
}

template <typename T>
QWIX_CLONES void acc_minmax(const T* __restrict x, int64_t n, int32_t* __restrict mn, int32_t* __restrict mx,
                            uint32_t* __restrict ab) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = Elem<T>::load(x[i]);
    const int32_t s = sortable_bits(v);
    const uint32_t b = abs_bits(v);
    mn[i] = s < mn[i] ? s : mn[i];
    mx[i] = s > mx[i] ? s : mx[i];
    ab[i] = b > ab[i] ? b : ab[i];
  }
}

template <typename T>
QWIX_CLONES void acc_sumsq(const T* __restrict x, int64_t n, double* __restrict acc) {
  for (int64_t i = 0; i < n; ++i) {
    const double v = Elem<T>::load(x[i]);
    acc[i] += v * v;
  }
}

template <typename T, QKind K>
QWIX_CLONES void apply_run(const T* __restrict x, T* __restrict y, int64_t n, GroupParams p, QParams q,
                           uint8_t* __restrict mask) {
  if (mask) {
    for (int64_t i = 0; i < n; ++i) {
      const float v = Elem<T>::load(x[i]);
      y[i] = Elem<T>::store(fake_quant_value<K>(v, p.scale, p.zero_point, q));
      mask[i] = in_range(v, p.lo, p.hi);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      y[i] = Elem<T>::store(fake_quant_value<K>(Elem<T>::load(x[i]), p.scale, p.zero_point, q));
    }
  }
}

template <typename T, QKind K>
QWIX_CLONES void apply_run_grouped(const T* __restrict x, T* __restrict y, int64_t n, const float* __restrict scale,
                                   const float* __restrict zp, const float* __restrict lo, const float* __restrict hi,
                                   QParams q, uint8_t* __restrict mask) {
  if (mask) {
    for (int64_t i = 0; i < n; ++i) {
      const float v = Elem<T>::load(x[i]);
      y[i] = Elem<T>::store(fake_quant_value<K>(v, scale[i], zp[i], q));
      mask[i] = in_range(v, lo[i], hi[i]);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      y[i] = Elem<T>::store(fake_quant_value<K>(Elem<T>::load(x[i]), scale[i], zp[i], q));
    }
  }
}

template <typename T, QKind K>
QWIX_CLONES void fused_absmax_rows(const T* __restrict x, T* __restrict y, int64_t rows, int64_t L, float mult,
                                   QParams q) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict xr = x + r * L;
    T* __restrict yr = y + r * L;
    uint32_t m = 0;
    for (int64_t i = 0; i < L; ++i) {
      const uint32_t b = abs_bits(Elem<T>::load(xr[i]));
      m = b > m ? b : m;
    }
    const float absmax = m >= kNonFiniteAbsBits ? bits_float(0x7fc00000u) : bits_float(m);
    const GroupParams p = symmetric_params(absmax * mult, q);
    for (int64_t i = 0; i < L; ++i) {
      yr[i] = Elem<T>::store(fake_quant_value<K, true>(Elem<T>::load(xr[i]), p.scale, p.zero_point, q));
    }
  }
}

void pack_bits(const uint8_t* m, int64_t n, uint8_t* bits, int64_t bit_offset) {
  int64_t i = 0;
  // Unaligned head, one bit at a time.
  for (; i < n && (bit_offset + i) % 8 != 0; ++i) {
    bits[(bit_offset + i) / 8] |= static_cast<uint8_t>(m[i] << ((bit_offset + i) % 8));
  }
  uint8_t* out = bits + (bit_offset + i) / 8;
  for (; i + 8 <= n; i += 8) {
    // Eight 0/1 bytes -> one byte, bit j from byte j: the multiply gathers them into the top byte.
    uint64_t v;
    std::memcpy(&v, m + i, 8);
    *out++ = static_cast<uint8_t>((v * 0x0102040810204080ull) >> 56);
  }
  for (int j = 0; i < n; ++i, ++j) *out |= static_cast<uint8_t>(m[i] << j);
}

template <typename T>
QWIX_CLONES void masked_copy(const T* __restrict g, const uint8_t* __restrict bits, T* __restrict out, int64_t n) {
  // Zeroing by AND-ing the raw bits with 0 or ~0: no branch, any element type.
  using U = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;
  auto keep = [&](int64_t i, unsigned bit) {
    U v;
    std::memcpy(&v, g + i, sizeof(T));
    v &= U(0) - static_cast<U>(bit & 1u);
    std::memcpy(out + i, &v, sizeof(T));
  };
  const int64_t full = n / 8;
  for (int64_t b = 0; b < full; ++b) {
    const unsigned m = bits[b];
    for (int j = 0; j < 8; ++j) keep(b * 8 + j, m >> j);
  }
  for (int64_t i = full * 8; i < n; ++i) keep(i, bits[i >> 3] >> (i & 7));
}

#define QWIX_INSTANTIATE_TYPE(T)                                                                                   \
  template uint32_t run_absmax_bits<T>(const T*, int64_t);                                                         \
  template void run_minmax<T>(const T*, int64_t, int32_t*, int32_t*, uint32_t*);                                   \
  template double run_sumsq<T>(const T*, int64_t);                                                                 \
  template void acc_absmax_bits<T>(const T*, int64_t, uint32_t*);                                                  \
  template void acc_minmax<T>(const T*, int64_t, int32_t*, int32_t*, uint32_t*);                                   \
  template void acc_sumsq<T>(const T*, int64_t, double*);                                                          \
  template void masked_copy<T>(const T*, const uint8_t*, T*, int64_t);                                             \
  template void fused_absmax_rows<T, QKind::Int>(const T*, T*, int64_t, int64_t, float, QParams);                 \
  template void fused_absmax_rows<T, QKind::Float>(const T*, T*, int64_t, int64_t, float, QParams);               \
  template void fused_absmax_rows<T, QKind::NF4>(const T*, T*, int64_t, int64_t, float, QParams);                 \
  template void apply_run<T, QKind::Int>(const T*, T*, int64_t, GroupParams, QParams, uint8_t*);                   \
  template void apply_run<T, QKind::Float>(const T*, T*, int64_t, GroupParams, QParams, uint8_t*);                 \
  template void apply_run<T, QKind::NF4>(const T*, T*, int64_t, GroupParams, QParams, uint8_t*);                   \
  template void apply_run_grouped<T, QKind::Int>(const T*, T*, int64_t, const float*, const float*, const float*,  \
                                                 const float*, QParams, uint8_t*);                                 \
  template void apply_run_grouped<T, QKind::Float>(const T*, T*, int64_t, const float*, const float*, const float*, \
                                                   const float*, QParams, uint8_t*);                               \
  template void apply_run_grouped<T, QKind::NF4>(const T*, T*, int64_t, const float*, const float*, const float*,  \
                                                 const float*, QParams, uint8_t*);

QWIX_INSTANTIATE_TYPE(float)
QWIX_INSTANTIATE_TYPE(double)
QWIX_INSTANTIATE_TYPE(c10::Half)
QWIX_INSTANTIATE_TYPE(c10::BFloat16)

}  // namespace cpu
}  // namespace qwix
