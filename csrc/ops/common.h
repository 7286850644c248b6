#pragma once
// Validation and shape logic shared by the CPU, Meta and CUDA kernels, so every
// backend raises the same errors and allocates the same outputs.
#include <ATen/core/Tensor.h>

#include <string>
#include <type_traits>
#include <vector>

#include "numerics/calibration.h"
#include "numerics/granularity.h"
#include "numerics/qtype.h"

namespace qwix {

// x is a floating tensor qwix can quantize (float16, bfloat16, float32, float64).
void check_float_input(const at::Tensor& x, const char* what);

// x itself when it is dense (any memory format), else a contiguous copy: the
// kernels walk memory in order and outputs take this tensor's strides.
at::Tensor dense_input(const at::Tensor& x);

// Bytes of a bit-packed mask with one bit per element (0 when not requested).
int64_t mask_bytes(int64_t numel, bool with_mask);

// The groups of an MX qtype (Qwix): every axis but the last channelwise, the last
// in blocks of 32; channelwise / tiled arguments are ignored. Errors name the shape.
Groups mx_groups(c10::IntArrayRef sizes, const QType& qtype);

// Everything a dynamic fake quant / calibration needs, validated.
struct DynamicSpec {
  QType qtype;
  Calibration calibration;
  Groups groups;  // fixed calibration: all ones (per-tensor)
};
DynamicSpec make_dynamic_spec(const at::Tensor& x, const std::string* qtype, const std::string& method,
                              c10::IntArrayRef channelwise_axes, c10::IntArrayRef tiled_axes,
                              c10::IntArrayRef tile_sizes);

// Validates a given scale (and zero point) against x and the qtype.
Groups check_scale_args(const at::Tensor& x, const at::Tensor& scale, const c10::optional<at::Tensor>& zero_point,
                        const QType& qtype);

// That tensor `what` is on `ref`'s device (named `ref_what`): a kernel would otherwise read another
// device's memory (or, with a meta operand, return uninitialized memory).
void check_device(const at::Tensor& t, const std::string& what, const at::Tensor& ref, const char* ref_what);

// fake_quant_backward: a floating grad and its bit-packed mask (1-D uint8 of ceil(numel/8) bytes, the size
// checked where it is concrete) on grad's device.
void check_backward_args(const at::Tensor& grad, const at::Tensor& mask);

// SRQ: a statistics count is an int32 or int64 scalar tensor.
void check_count(const at::Tensor& count);

// SRQ: count and sums (one float32 tensor per statistic the calibration keeps) for srq_scale with x;
// sums on x's device, count there too or a CPU scalar; no static scales for nvfp4.
void check_srq_stats(const at::Tensor& x, const at::Tensor& count, at::TensorList sums, const DynamicSpec& spec,
                     c10::string_view method);

// Checks a calibration list (1 tensor: absmax; 2: min, max; float32, on one device) against a qtype
// (none: the list alone).
void check_calibration_list(at::TensorList calibration, const QType* qtype);

// A scale/zero point (calibration-shaped, right-aligned) as a flat float32
// tensor in x's group order (the layout's memory order), and back.
at::Tensor to_group_order(const at::Tensor& t, const Groups& groups, const Layout& l);
at::Tensor from_group_order(const at::Tensor& flat, const Groups& groups, const Layout& l);

// Calls f with std::integral_constant<QKind, k> (kernels are templated on the kind).
template <typename F>
void dispatch_kind(QKind k, const F& f) {
  switch (k) {
    case QKind::Int:
      return f(std::integral_constant<QKind, QKind::Int>{});
    case QKind::Float:
      return f(std::integral_constant<QKind, QKind::Float>{});
    case QKind::NF4:
      return f(std::integral_constant<QKind, QKind::NF4>{});
  }
}

}  // namespace qwix
