#pragma once
// Device-side helpers for the qwix CUDA kernels: vector access, the
// calibration statistic and its (sub-)warp/block reductions, group lookup.
#include <cfloat>
#include <c10/macros/Macros.h>  // C10_HOST_DEVICE, used by IntegerDivider.cuh
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "numerics/calibration.h"
#include "numerics/fake_quant_math.h"

namespace qwix {
namespace cuda {

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);  // round to nearest even, as the CPU kernels
}

// Every kernel moves 8 consecutive elements per access: one byte of the
// bit-packed mask, one 16-byte vector for 16-bit types, two for float32.
constexpr int kChunk = 8;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};
template <typename T>
using Chunk = Vec<T, kChunk>;

enum class CalKind : int { AbsMax = 0, MinMax = 1, Rms = 2 };

inline CalKind cal_kind(const Calibration& c) {
  return c.kind == Calibration::Kind::MinMax ? CalKind::MinMax
         : c.kind == Calibration::Kind::Rms  ? CalKind::Rms
                                             : CalKind::AbsMax;
}

constexpr unsigned kFullMask = 0xffffffffu;

// Running calibration statistic of a group. Only the fields of the kind are
// maintained and exchanged (the kind is uniform across a launch).
struct Stat {
  uint32_t amax_bits;  // max |x| as bits (>= kNonFiniteAbsBits: Inf/NaN seen)
  int32_t mn, mx;      // sortable bits
  double sumsq;

  __device__ __forceinline__ static Stat empty() { return {0u, 0x7fffffff, static_cast<int32_t>(0x80000000), 0.0}; }
  __device__ __forceinline__ void add(float v, CalKind k) {
    const uint32_t b = abs_bits(v);
    amax_bits = b > amax_bits ? b : amax_bits;
    if (k == CalKind::MinMax) {
      const int32_t s = sortable_bits(v);
      mn = s < mn ? s : mn;
      mx = s > mx ? s : mx;
    } else if (k == CalKind::Rms) {
      sumsq += static_cast<double>(v) * static_cast<double>(v);
    }
  }
  __device__ __forceinline__ void merge(const Stat& o, CalKind k) {
    amax_bits = o.amax_bits > amax_bits ? o.amax_bits : amax_bits;
    if (k == CalKind::MinMax) {
      mn = o.mn < mn ? o.mn : mn;
      mx = o.mx > mx ? o.mx : mx;
    } else if (k == CalKind::Rms) {
      sumsq += o.sumsq;
    }
  }
  // The calibration (a = absmax or min, b = max), factor s applied; NaN when non-finite.
  __device__ __forceinline__ void finalize(CalKind k, float s, int64_t count, float* a, float* b) const {
    const float nan = __int_as_float(0x7fffffff);
    const bool bad = amax_bits >= kNonFiniteAbsBits;
    if (k == CalKind::AbsMax) {
      *a = (bad ? nan : bits_float(amax_bits)) * s;
    } else if (k == CalKind::MinMax) {
      *a = (bad ? nan : from_sortable_bits(mn)) * s;
      *b = (bad ? nan : from_sortable_bits(mx)) * s;
    } else {
      // NaN when non-finite, as the CPU's: a sum of squares is >= 0, and the test is false for NaN and +Inf.
      *a = (sumsq <= DBL_MAX ? static_cast<float>(sqrt(sumsq / static_cast<double>(count))) : nan) * s;
    }
  }
};

// Butterfly over aligned groups of WIDTH lanes (a power of two <= 32): every
// lane of the group ends with the group's statistic.
template <int WIDTH>
__device__ __forceinline__ Stat lanes_reduce(Stat s, CalKind k) {
#pragma unroll
  for (int o = WIDTH / 2; o > 0; o >>= 1) {
    Stat t = s;
    t.amax_bits = __shfl_xor_sync(kFullMask, s.amax_bits, o, WIDTH);
    if (k == CalKind::MinMax) {
      t.mn = __shfl_xor_sync(kFullMask, s.mn, o, WIDTH);
      t.mx = __shfl_xor_sync(kFullMask, s.mx, o, WIDTH);
    } else if (k == CalKind::Rms) {
      t.sumsq = __shfl_xor_sync(kFullMask, s.sumsq, o, WIDTH);
    }
    s.merge(t, k);
  }
  return s;
}

// Reduces over a block of THREADS threads (a multiple of 32); every thread gets
// the result. The order of merges is fixed, so results are deterministic.
template <int THREADS>
__device__ __forceinline__ Stat block_reduce_all(Stat s, CalKind k) {
  s = lanes_reduce<32>(s, k);
  if constexpr (THREADS == 32) {
    return s;
  } else {
    __shared__ Stat partial[THREADS / 32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = s;
    __syncthreads();
    Stat t = lane < THREADS / 32 ? partial[lane] : Stat::empty();
    t = lanes_reduce<32>(t, k);  // every warp reduces the partials itself: no second barrier
    return t;
  }
}

// Fake-quantizes one chunk with `div` (ReciprocalDiv, or UncheckedDiv where the
// group allows it) into `o`; returns the chunk's mask byte when MASK. SYM: the
// symmetric integer form (zero point 0).
template <typename T, QKind K, bool SYM, bool MASK, typename Div>
__device__ __forceinline__ uint8_t quantize_chunk(const Chunk<T>& v, Chunk<T>& o, const Div& div, const GroupParams& p,
                                                  const QParams& q) {
  uint8_t m = 0;
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    const float f = to_float(v.v[j]);
    o.v[j] = from_float<T>(fake_quant_value<K, SYM>(f, div, p.scale, p.zero_point, q));
    if constexpr (MASK) m |= static_cast<uint8_t>(in_range(f, p.lo, p.hi)) << j;
  }
  return m;
}

// One group's quantization parameters as the kernels read them (32 bytes: two
// 16-byte loads). inv = RN(1 / scale) for ReciprocalDiv; amax = the group's max
// |x| when its statistics were taken (+Inf for given scales: unknown).
struct alignas(32) PackedParams {
  float scale, inv, zero_point, lo, hi, amax, pad[2];
  __device__ __forceinline__ ReciprocalDiv div() const { return ReciprocalDiv::with(scale, inv); }
};
static_assert(sizeof(PackedParams) == 8 * sizeof(float), "PackedParams is a row of 8 floats");

// Runs emit(sym, division) with the cheapest exact per-element form, chosen
// once for a whole row / chunk / thread: `checked` (ReciprocalDiv) unless
// `unchecked` says every quotient may skip the checks, then `fast`
// (UncheckedDiv), with the symmetric integer form (sym = std::true_type) where
// the zero point is 0. Each form is its own unrolled copy of emit's loop.
template <QKind K, typename Checked, typename Fast, typename Emit>
__device__ __forceinline__ auto with_division_form(bool unchecked, bool zero_point_is_0, const Checked& checked,
                                                   const Fast& fast, Emit&& emit) {
  if (!unchecked) return emit(std::false_type{}, checked);
  if (K == QKind::Int && zero_point_is_0) return emit(std::true_type{}, fast);
  return emit(std::false_type{}, fast);
}

// A chunk whose 8 elements share one group's parameters, with the cheapest
// exact per-element form the chunk allows: UncheckedDiv when the group's (or
// else the chunk's) max |x| passes unchecked_ok (one uniform branch per chunk
// instead of one per element), the symmetric integer form when the zero point
// is 0.
template <typename T, QKind K, bool MASK>
__device__ __forceinline__ uint8_t quantize_group_chunk(const Chunk<T>& v, Chunk<T>& o, const PackedParams& pp,
                                                        const QParams& q) {
  const GroupParams p{pp.scale, pp.zero_point, pp.lo, pp.hi};
  const ReciprocalDiv div = pp.div();
  auto chunk_amax = [&] {  // only where the group's own max |x| is unknown (given scales) or too large
    uint32_t amax = 0;
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      const uint32_t b = abs_bits(to_float(v.v[j]));
      amax = b > amax ? b : amax;
    }
    return bits_float(amax);
  };
  const bool unchecked = div.unchecked_ok(pp.amax) || div.unchecked_ok(chunk_amax());
  return with_division_form<K>(unchecked, p.zero_point == 0.0f, div, div.unchecked(), [&](auto sym, const auto& d) {
    return quantize_chunk<T, K, decltype(sym)::value, MASK>(v, o, d, p, q);
  });
}

// Group of a flat element index (memory order) for a Layout flattened to
// device arrays, with 32-bit magic-number division when the tensor allows.
constexpr int kMaxSegments = 16;
struct DeviceLayout {
  int nseg;
  bool small;  // numel <= QWIX_CUDA_INDEX32_MAX (2^31 - 1): 32-bit index math
  int64_t size[kMaxSegments];  // innermost first
  at::cuda::detail::IntDivider<unsigned int> div32[kMaxSegments];
  bool kept[kMaxSegments];
  int64_t num_groups;

  __device__ __forceinline__ int64_t group_of(int64_t i) const {
    if (num_groups == 1) return 0;
    if (small) {
      uint32_t r = static_cast<uint32_t>(i), g = 0, gstride = 1;
      for (int s = 0; s < nseg; ++s) {
        const auto dm = div32[s].divmod(r);
        r = dm.div;
        if (kept[s]) {
          g += dm.mod * gstride;
          gstride *= static_cast<uint32_t>(size[s]);
        }
      }
      return g;
    }
    int64_t g = 0, gstride = 1;
    for (int s = 0; s < nseg; ++s) {
      const int64_t d = i % size[s];
      i /= size[s];
      if (kept[s]) {
        g += d * gstride;
        gstride *= size[s];
      }
    }
    return g;
  }
};

}  // namespace cuda
}  // namespace qwix
