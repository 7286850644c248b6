#pragma once
#include <ATen/core/Tensor.h>

#include "numerics/calibration.h"
#include "numerics/fake_quant_math.h"
#include "numerics/granularity.h"

namespace qwix {
namespace cpu {

// The calibration of each group of the dense tensor x laid out as `l`, with
// the method's factor applied, in group order: a = absmax (symmetric methods)
// or min, b = max (asymmetric; may be null for symmetric methods). A group
// holding NaN or Inf gets NaN.
void group_calibration(const at::Tensor& x, const Layout& l, const Calibration& c, float* a, float* b);

// Calibration of one contiguous run that is a whole group (the fused path).
template <typename T>
void run_calibration(const T* x, int64_t n, const Calibration& c, float* a, float* b);

// Parameters of group g from its calibration.
inline GroupParams params_from_calibration(const Calibration& c, const QParams& q, float a, float b) {
  return c.symmetric() ? symmetric_params(a, q) : asymmetric_params(a, b, q);
}

}  // namespace cpu
}  // namespace qwix
