#pragma once
// Host-side launchers shared by the CUDA op files (each .cu compiles on its own,
// so nvcc builds them in parallel). All launch on the current stream and never
// synchronize with the host.
#include <ATen/core/Tensor.h>

#include "numerics/calibration.h"
#include "numerics/granularity.h"
#include "numerics/qtype.h"

namespace qwix {
namespace cuda {

// Dynamic fake quant of a layout with one contiguous run of L elements per
// group (per-token, per-channel of the leading axes, tiles of the last axis):
// one kernel that reads each row once, keeps it in registers, reduces it,
// quantizes it and writes y (and the bit-packed mask when `mask` is given).
// Returns false, launching nothing, when the layout or alignment does not fit.
bool fused_rows(const at::Tensor& xd, at::Tensor& y, at::Tensor* mask, const Layout& l, const Calibration& c,
                const QParams& q);

// The calibration of a row layout (as fused_rows takes), one kernel, into the
// preallocated a (and b for asymmetric methods). False, launching nothing, when
// the layout or alignment does not fit.
bool rows_calibration(const at::Tensor& xd, const Layout& l, const Calibration& c, at::Tensor& a, at::Tensor& b,
                      at::Tensor* amax_bits = nullptr);

// Per-group calibration in group order, float32: a = absmax (or min), b = max
// for asymmetric methods (undefined otherwise); amax_bits (when asked): each
// group's max |x| as int32 bits, for device_params. Per-tensor reads x once.
void group_calibration(const at::Tensor& xd, const Layout& l, const Calibration& c, at::Tensor& a, at::Tensor& b,
                       at::Tensor* amax_bits = nullptr);

// Per-group quantization parameters, group order: a float32 [G, 8] tensor whose
// rows are PackedParams (scale, 1/scale, zero point, mask range lo, hi, group max |x|, padding).
struct DeviceParams {
  at::Tensor packed;
  at::Tensor scale() const { return packed.select(1, 0).contiguous(); }
  at::Tensor zero_point() const { return packed.select(1, 2).contiguous(); }
};
enum class ParamsFrom : int { Symmetric = 0, Asymmetric = 1, Given = 2 };
// Symmetric: a = absmax; Asymmetric: a, b = min, max; Given: a = scale, b = zero point (may be undefined).
// amax_bits (group_calibration's, may be undefined) lets the apply kernels skip the per-element checks.
DeviceParams device_params(ParamsFrom from, const QParams& q, const at::Tensor& a, const at::Tensor& b,
                           const at::Tensor& amax_bits = {});

// y = fake_quant(x) with per-group parameters (and the bit-packed mask).
void apply(const at::Tensor& xd, at::Tensor& y, at::Tensor* mask, const Layout& l, const QParams& q,
           const DeviceParams& p);

// Whether p is aligned for kChunk-element vector access of element size `elem`.
inline bool chunk_aligned(const void* p, size_t elem) { return reinterpret_cast<uintptr_t>(p) % (8 * elem) == 0; }

}  // namespace cuda
}  // namespace qwix
