// CPU kernels of calibrate and compute_scale.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "ops/common.h"
#include "ops/cpu/group_stats.h"

namespace qwix {
namespace cpu {
namespace {

std::vector<at::Tensor> calibrate_cpu(const at::Tensor& x, c10::string_view method, at::IntArrayRef channelwise_axes,
                                      at::IntArrayRef tiled_axes, at::IntArrayRef tile_sizes) {
  const DynamicSpec spec = make_dynamic_spec(x, nullptr, std::string(method), channelwise_axes, tiled_axes, tile_sizes);
  const at::Tensor xd = dense_input(x);
  const Layout l = make_layout(xd.sizes(), xd.strides(), spec.groups);
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor a = at::empty({l.num_groups}, opts);
  if (spec.calibration.symmetric()) {
    group_calibration(xd, l, spec.calibration, a.mutable_data_ptr<float>(), nullptr);
    return {from_group_order(a, spec.groups, l)};
  }
  at::Tensor b = at::empty({l.num_groups}, opts);
  group_calibration(xd, l, spec.calibration, a.mutable_data_ptr<float>(), b.mutable_data_ptr<float>());
  return {from_group_order(a, spec.groups, l), from_group_order(b, spec.groups, l)};
}

std::vector<at::Tensor> compute_scale_cpu(at::TensorList calibration, c10::string_view qtype) {
  const QType qt = parse_qtype(std::string(qtype));
  check_calibration_list(calibration, &qt);
  const at::Tensor a = calibration[0].contiguous();
  at::Tensor scale = at::empty_like(a, at::MemoryFormat::Contiguous);
  const float* pa = a.const_data_ptr<float>();
  float* ps = scale.mutable_data_ptr<float>();
  if (calibration.size() == 1) {
    for (int64_t i = 0; i < a.numel(); ++i) ps[i] = symmetric_params(pa[i], qt.p).scale;
    return {scale};
  }
  const at::Tensor b = calibration[1].contiguous();
  at::Tensor zp = at::empty_like(a, at::MemoryFormat::Contiguous);
  const float* pb = b.const_data_ptr<float>();
  float* pz = zp.mutable_data_ptr<float>();
  for (int64_t i = 0; i < a.numel(); ++i) {
    const GroupParams p = asymmetric_params(pa[i], pb[i], qt.p);
    ps[i] = p.scale;
    pz[i] = p.zero_point;
  }
  return {scale, zp};
}

}  // namespace

TORCH_LIBRARY_IMPL(qwix, CPU, m) {
  m.impl("calibrate", &calibrate_cpu);
  m.impl("compute_scale", &compute_scale_cpu);
}

}  // namespace cpu
}  // namespace qwix
