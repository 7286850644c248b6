#pragma once
// Device-side helpers for the qwix CUDA kernels: 16-byte vector access,
// the calibration statistic and its warp/block reductions.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

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

// Elements per 16-byte vector.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

enum class CalKind : int { AbsMax = 0, MinMax = 1, Rms = 2 };

inline CalKind cal_kind(const Calibration& c) {
  return c.kind == Calibration::Kind::MinMax ? CalKind::MinMax
         : c.kind == Calibration::Kind::Rms  ? CalKind::Rms
                                             : CalKind::AbsMax;
}

// Running calibration statistic of a group (all fields kept; the kind picks).
struct Stat {
  uint32_t amax_bits;  // max |x| as bits (>= kNonFiniteAbsBits: Inf/NaN seen)
  int32_t mn, mx;     // sortable bits
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
  __device__ __forceinline__ void merge(const Stat& o) {
    amax_bits = o.amax_bits > amax_bits ? o.amax_bits : amax_bits;
    mn = o.mn < mn ? o.mn : mn;
    mx = o.mx > mx ? o.mx : mx;
    sumsq += o.sumsq;
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
      *a = static_cast<float>(sqrt(sumsq / static_cast<double>(count))) * s;
    }
  }
};

__device__ __forceinline__ Stat shfl_down(const Stat& s, int offset) {
  Stat o;
  o.amax_bits = __shfl_down_sync(0xffffffffu, s.amax_bits, offset);
  o.mn = __shfl_down_sync(0xffffffffu, s.mn, offset);
  o.mx = __shfl_down_sync(0xffffffffu, s.mx, offset);
  o.sumsq = __shfl_down_sync(0xffffffffu, s.sumsq, offset);
  return o;
}

// Reduces over the warp; lane 0 holds the result.
__device__ __forceinline__ Stat warp_reduce(Stat s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s.merge(shfl_down(s, o));
  return s;
}

// Reduces over a block of THREADS threads; every thread gets the result.
template <int THREADS>
__device__ __forceinline__ Stat block_reduce_all(Stat s) {
  s = warp_reduce(s);
  if constexpr (THREADS == 32) {
    Stat r;
    r.amax_bits = __shfl_sync(0xffffffffu, s.amax_bits, 0);
    r.mn = __shfl_sync(0xffffffffu, s.mn, 0);
    r.mx = __shfl_sync(0xffffffffu, s.mx, 0);
    r.sumsq = __shfl_sync(0xffffffffu, s.sumsq, 0);
    return r;
  } else {
    __shared__ Stat partial[THREADS / 32];
    __shared__ Stat total;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = s;
    __syncthreads();
    if (warp == 0) {
      Stat t = lane < THREADS / 32 ? partial[lane] : Stat::empty();
      t = warp_reduce(t);
      if (lane == 0) total = t;
    }
    __syncthreads();
    return total;
  }
}

// Group of a flat element index for a Layout flattened to device arrays.
constexpr int kMaxSegments = 16;
struct DeviceLayout {
  int nseg;
  int64_t size[kMaxSegments];  // innermost first
  bool kept[kMaxSegments];
  int64_t num_groups;

  __device__ __forceinline__ int64_t group_of(int64_t i) const {
    if (num_groups == 1) return 0;
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
