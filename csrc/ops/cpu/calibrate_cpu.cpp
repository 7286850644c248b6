// CPU kernels of calibrate and compute_scale.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "ops/common.h"
#include "ops/cpu/group_stats.h"

namespace qwix {
namespace cpu {
namespace {

// A float tensor with the calibration shape, filled in x's group order.
struct GroupOrderTensor {
  at::Tensor storage;  // groups permuted to memory order, contiguous
  std::vector<int64_t> inverse;
  GroupOrderTensor(const Groups& groups, const Layout& l, const at::TensorOptions& opts) : inverse(l.perm.size()) {
    std::vector<int64_t> permuted;
    for (size_t i = 0; i < l.perm.size(); ++i) {
      permuted.push_back(groups[l.perm[i]]);
      inverse[l.perm[i]] = static_cast<int64_t>(i);
    }
    storage = at::empty(permuted, opts);
  }
  float* data() { return storage.mutable_data_ptr<float>(); }
  at::Tensor logical() const { return storage.permute(inverse).contiguous(); }
};

std::vector<at::Tensor> calibrate_cpu(const at::Tensor& x, c10::string_view method, at::IntArrayRef channelwise_axes,
                                      at::IntArrayRef tiled_axes, at::IntArrayRef tile_sizes) {
  const DynamicSpec spec = make_dynamic_spec(x, nullptr, std::string(method), channelwise_axes, tiled_axes, tile_sizes);
  const at::Tensor xd = dense_input(x);
  const Layout l = make_layout(xd.sizes(), xd.strides(), spec.groups);
  const auto opts = x.options().dtype(at::kFloat);
  GroupOrderTensor a(spec.groups, l, opts);
  if (spec.calibration.symmetric()) {
    group_calibration(xd, l, spec.calibration, a.data(), nullptr);
    return {a.logical()};
  }
  GroupOrderTensor b(spec.groups, l, opts);
  group_calibration(xd, l, spec.calibration, a.data(), b.data());
  return {a.logical(), b.logical()};
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
