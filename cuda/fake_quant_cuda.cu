// CUDA entry points of fake_quant_forward, fake_quant_with_scale_forward,
// calibrate and compute_scale: the same validation and layout as the CPU
// (csrc/ops/common, csrc/numerics/granularity), kernels in fused_rows.cu and
// group_kernels.cu. Dynamic row layouts take one fused kernel; everything else
// a statistics pass and an apply pass.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/kernels.h"
#include "ops/common.h"
#include "ops/nvfp4.h"

namespace qwix {
namespace cuda {
namespace {

ParamsFrom params_from(const Calibration& c) { return c.symmetric() ? ParamsFrom::Symmetric : ParamsFrom::Asymmetric; }

std::tuple<at::Tensor, at::Tensor> fake_quant_forward_cuda(const at::Tensor& x, c10::string_view qtype,
                                                           c10::string_view method, at::IntArrayRef ch,
                                                           at::IntArrayRef tiled, at::IntArrayRef tiles,
                                                           bool with_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  const std::string qname(qtype);
  const DynamicSpec spec = make_dynamic_spec(x, &qname, std::string(method), ch, tiled, tiles);
  if (spec.qtype.two_level && x.numel() > 0) return nvfp4_fake_quant_forward(x, with_mask);  // composes the ops
  const at::Tensor xd = dense_input(x);
  at::Tensor y = at::empty_like(xd);
  at::Tensor mask = at::empty({mask_bytes(x.numel(), with_mask)}, x.options().dtype(at::kByte));
  if (x.numel() == 0) return {y, mask};
  const Layout l = make_layout(xd.sizes(), xd.strides(), spec.groups);
  at::Tensor* m = with_mask ? &mask : nullptr;
  if (fused_rows(xd, y, m, l, spec.calibration, spec.qtype.p)) return {y, mask};
  at::Tensor a, b, amax_bits;
  group_calibration(xd, l, spec.calibration, a, b, &amax_bits);
  apply(xd, y, m, l, spec.qtype.p, device_params(params_from(spec.calibration), spec.qtype.p, a, b, amax_bits));
  return {y, mask};
}

std::tuple<at::Tensor, at::Tensor> fake_quant_with_scale_forward_cuda(const at::Tensor& x, const at::Tensor& scale,
                                                                      const c10::optional<at::Tensor>& zero_point,
                                                                      c10::string_view qtype, bool with_mask) {
  const QType qt = parse_qtype(std::string(qtype));
  const Groups groups = check_scale_args(x, scale, zero_point, qt);  // first: a CPU operand fails the guard
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = dense_input(x);
  at::Tensor y = at::empty_like(xd);
  at::Tensor mask = at::empty({mask_bytes(x.numel(), with_mask)}, x.options().dtype(at::kByte));
  if (x.numel() == 0) return {y, mask};
  const Layout l = make_layout(xd.sizes(), xd.strides(), groups);
  const at::Tensor s = to_group_order(scale, groups, l);
  const at::Tensor z = zero_point.has_value() ? to_group_order(*zero_point, groups, l) : at::Tensor();
  apply(xd, y, with_mask ? &mask : nullptr, l, qt.p, device_params(ParamsFrom::Given, qt.p, s, z));
  return {y, mask};
}

std::vector<at::Tensor> calibrate_cuda(const at::Tensor& x, c10::string_view method, at::IntArrayRef ch,
                                       at::IntArrayRef tiled, at::IntArrayRef tiles) {
  const c10::cuda::CUDAGuard guard(x.device());
  const DynamicSpec spec = make_dynamic_spec(x, nullptr, std::string(method), ch, tiled, tiles);
  const at::Tensor xd = dense_input(x);
  const Layout l = make_layout(xd.sizes(), xd.strides(), spec.groups);
  at::Tensor a, b;
  group_calibration(xd, l, spec.calibration, a, b);
  if (!b.defined()) return {from_group_order(a, spec.groups, l)};
  return {from_group_order(a, spec.groups, l), from_group_order(b, spec.groups, l)};
}

std::vector<at::Tensor> compute_scale_cuda(at::TensorList calibration, c10::string_view qtype) {
  TORCH_CHECK_VALUE(!calibration.empty(), "qwix: compute_scale needs 1 (absmax) or 2 (min, max) tensors, got 0");
  const QType qt = parse_qtype(std::string(qtype));
  check_calibration_list(calibration, &qt);  // first: a CPU operand fails the guard
  const c10::cuda::CUDAGuard guard(calibration[0].device());
  const at::Tensor a = calibration[0].contiguous();
  const at::Tensor b = calibration.size() == 2 ? calibration[1].contiguous() : at::Tensor();
  const DeviceParams p = device_params(b.defined() ? ParamsFrom::Asymmetric : ParamsFrom::Symmetric, qt.p, a, b);
  if (!b.defined()) return {p.scale().view(a.sizes())};
  return {p.scale().view(a.sizes()), p.zero_point().view(a.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(qwix, CUDA, m) {
  m.impl("fake_quant_forward", &fake_quant_forward_cuda);
  m.impl("fake_quant_with_scale_forward", &fake_quant_with_scale_forward_cuda);
  m.impl("calibrate", &calibrate_cuda);
  m.impl("compute_scale", &compute_scale_cuda);
}

}  // namespace cuda
}  // namespace qwix
