#include "ops/cpu/group_stats.h"

#include <ATen/Dispatch.h>

#include <cmath>
#include <limits>
#include <vector>

#include "ops/cpu/loops.h"
#include "ops/cpu/parallel.h"

namespace qwix {
namespace cpu {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

float absmax_from_bits(uint32_t bits) { return bits >= kNonFiniteAbsBits ? kNaN : bits_float(bits); }
// A float's square is below 2^256, so the double sum of squares is finite exactly when every element is:
// a group holding NaN or Inf gets NaN, as with the other methods (the sum alone gave Inf for Inf).
float rms_from_sumsq(double sumsq, double count) {
  return std::isfinite(sumsq) ? static_cast<float>(std::sqrt(sumsq / count)) : kNaN;
}

// Each chunk keeps a partial state per group, so chunks of at least G elements bound the scratch by
// about numel states: with many groups and few elements each (a kept innermost axis, [8, 2^20] per
// column) up to 64 chunks x G states took gigabytes and most of the time.
int64_t scratch_bounded_chunk(int64_t groups) { return std::max<int64_t>(kMinChunk, groups); }

// Per-chunk partial states, combined in chunk order (deterministic).
template <typename T>
void absmax_groups(const T* x, const Layout& l, float* a) {
  const int64_t G = l.num_groups;
  const int64_t min_chunk = scratch_bounded_chunk(G);
  const int64_t chunks = num_chunks(l.numel, 1, min_chunk);
  std::vector<uint32_t> part(chunks * G, 0u);
  parallel_chunks(l.numel, 1, min_chunk, [&](int64_t c, int64_t b, int64_t e) {
    uint32_t* p = part.data() + c * G;
    for_each_piece(l, b, e, [&](int64_t pos, int64_t len, int64_t g) {
      if (l.inner_kept()) {
        acc_absmax_bits(x + pos, len, p + g);
      } else {
        const uint32_t m = run_absmax_bits(x + pos, len);
        p[g] = m > p[g] ? m : p[g];
      }
    });
  });
  for (int64_t g = 0; g < G; ++g) {
    uint32_t m = 0;
    for (int64_t c = 0; c < chunks; ++c) m = std::max(m, part[c * G + g]);
    a[g] = absmax_from_bits(m);
  }
}

template <typename T>
void minmax_groups(const T* x, const Layout& l, float* a, float* b) {
  const int64_t G = l.num_groups;
  const int64_t min_chunk = scratch_bounded_chunk(G);
  const int64_t chunks = num_chunks(l.numel, 1, min_chunk);
  std::vector<int32_t> mn(chunks * G, std::numeric_limits<int32_t>::max());
  std::vector<int32_t> mx(chunks * G, std::numeric_limits<int32_t>::min());
  std::vector<uint32_t> ab(chunks * G, 0u);
  parallel_chunks(l.numel, 1, min_chunk, [&](int64_t c, int64_t b0, int64_t e) {
    const int64_t o = c * G;
    for_each_piece(l, b0, e, [&](int64_t pos, int64_t len, int64_t g) {
      if (l.inner_kept()) {
        acc_minmax(x + pos, len, mn.data() + o + g, mx.data() + o + g, ab.data() + o + g);
      } else {
        run_minmax(x + pos, len, &mn[o + g], &mx[o + g], &ab[o + g]);
      }
    });
  });
  for (int64_t g = 0; g < G; ++g) {
    int32_t lo = std::numeric_limits<int32_t>::max(), hi = std::numeric_limits<int32_t>::min();
    uint32_t m = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      lo = std::min(lo, mn[c * G + g]);
      hi = std::max(hi, mx[c * G + g]);
      m = std::max(m, ab[c * G + g]);
    }
    const bool bad = m >= kNonFiniteAbsBits;
    a[g] = bad ? kNaN : from_sortable_bits(lo);
    b[g] = bad ? kNaN : from_sortable_bits(hi);
  }
}

template <typename T>
void sumsq_groups(const T* x, const Layout& l, float* a) {
  const int64_t G = l.num_groups;
  const int64_t min_chunk = scratch_bounded_chunk(G);
  const int64_t chunks = num_chunks(l.numel, 1, min_chunk);
  std::vector<double> part(chunks * G, 0.0);
  parallel_chunks(l.numel, 1, min_chunk, [&](int64_t c, int64_t b, int64_t e) {
    double* p = part.data() + c * G;
    for_each_piece(l, b, e, [&](int64_t pos, int64_t len, int64_t g) {
      if (l.inner_kept()) {
        acc_sumsq(x + pos, len, p + g);
      } else {
        p[g] += run_sumsq(x + pos, len);
      }
    });
  });
  const double count = static_cast<double>(l.numel / G);
  for (int64_t g = 0; g < G; ++g) {
    double s = 0.0;
    for (int64_t c = 0; c < chunks; ++c) s += part[c * G + g];
    a[g] = rms_from_sumsq(s, count);
  }
}

}  // namespace

template <typename T>
void run_calibration(const T* x, int64_t n, const Calibration& c, float* a, float* b) {
  switch (c.kind) {
    case Calibration::Kind::AbsMax:
      *a = absmax_from_bits(run_absmax_bits(x, n)) * c.multiplier;
      return;
    case Calibration::Kind::MinMax: {
      int32_t mn = std::numeric_limits<int32_t>::max(), mx = std::numeric_limits<int32_t>::min();
      uint32_t ab = 0;
      run_minmax(x, n, &mn, &mx, &ab);
      const bool bad = ab >= kNonFiniteAbsBits;
      *a = (bad ? kNaN : from_sortable_bits(mn)) * c.multiplier;
      *b = (bad ? kNaN : from_sortable_bits(mx)) * c.multiplier;
      return;
    }
    case Calibration::Kind::Rms:
      *a = rms_from_sumsq(run_sumsq(x, n), static_cast<double>(n)) * c.multiplier;
      return;
    case Calibration::Kind::Fixed:
      if (c.symmetric()) {
        *a = c.fixed_hi;
      } else {
        *a = c.fixed_lo;
        *b = c.fixed_hi;
      }
      return;
  }
}

void group_calibration(const at::Tensor& x, const Layout& l, const Calibration& c, float* a, float* b) {
  const int64_t G = l.num_groups;
  if (c.is_fixed() || l.numel == 0) {
    for (int64_t g = 0; g < G; ++g) {
      a[g] = c.is_fixed() ? (c.symmetric() ? c.fixed_hi : c.fixed_lo) : 0.0f;
      if (b) b[g] = c.is_fixed() ? c.fixed_hi : 0.0f;
    }
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "qwix_calibrate", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    if (l.rows() && G > 1) {  // one contiguous run per group
      const int64_t L = l.inner();
      at::parallel_for(0, G, std::max<int64_t>(1, kMinChunk / L), [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; ++g) run_calibration(px + g * L, L, c, a + g, b ? b + g : nullptr);
      });
      return;
    }
    switch (c.kind) {
      case Calibration::Kind::AbsMax:
        absmax_groups(px, l, a);
        break;
      case Calibration::Kind::MinMax:
        minmax_groups(px, l, a, b);
        break;
      case Calibration::Kind::Rms:
        sumsq_groups(px, l, a);
        break;
      case Calibration::Kind::Fixed:
        break;
    }
    if (c.multiplier != 1.0f) {
      for (int64_t g = 0; g < G; ++g) {
        a[g] *= c.multiplier;
        if (b) b[g] *= c.multiplier;
      }
    }
  });
}

template void run_calibration<float>(const float*, int64_t, const Calibration&, float*, float*);
template void run_calibration<double>(const double*, int64_t, const Calibration&, float*, float*);
template void run_calibration<c10::Half>(const c10::Half*, int64_t, const Calibration&, float*, float*);
template void run_calibration<c10::BFloat16>(const c10::BFloat16*, int64_t, const Calibration&, float*, float*);

}  // namespace cpu
}  // namespace qwix
