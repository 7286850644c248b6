// Applying an OperandPlan with the registered ops (the C++ frontend and TorchScript
// passes use these; the Python pass makes the same op calls so Dynamo can trace them).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "qwix/qwix.h"

namespace qwix {
namespace {

FakeQuantOptions options_of(const OperandPlan& p) {
  FakeQuantOptions o;
  o.calibration_method = p.calibration_method;
  o.channelwise_axes = p.channelwise_axes;
  o.tiled_axes = p.tiled_axes;
  o.clip_gradient = p.clip_gradient;
  return o;
}

}  // namespace

std::vector<at::Tensor> calibrate_operand(const at::Tensor& x, const OperandPlan& p) {
  TORCH_CHECK_VALUE(p.quantize, "qwix: calibrate_operand: the plan does not quantize this operand");
  return calibrate(x.detach(), p.calibration_method, p.channelwise_axes, p.tiled_axes);
}

QuantStatTensors make_quant_stat(const at::Tensor& x, const OperandPlan& p) {
  const auto cal = calibrate_operand(x, p);
  QuantStatTensors s;
  s.count = at::zeros({}, x.options().dtype(at::kInt));
  for (const auto& c : cal) {
    auto shape = c.sizes().vec();
    for (int64_t a : p.batch_axes) {
      TORCH_CHECK_INDEX(a >= 0 && a < static_cast<int64_t>(shape.size()), "qwix: batch axis ", a,
                        " out of range for a rank-", shape.size(), " operand");
      shape[a] = 1;
    }
    s.sums.push_back(at::zeros(shape, x.options().dtype(at::kFloat)));
  }
  return s;
}

void update_operand_stat(QuantStatTensors& stat, const std::vector<at::Tensor>& calibration, const OperandPlan& p,
                         int64_t count_increment) {
  update_quant_stat(stat.count, stat.sums, calibration, p.batch_axes, count_increment);
}

at::Tensor quantize_operand(const at::Tensor& x, const OperandPlan& p, const QuantStatTensors* stat) {
  if (!p.quantize || !x.is_floating_point()) return x;
  if (!p.static_scale) return fake_quant(x, p.qtype, options_of(p));
  TORCH_CHECK_VALUE(stat != nullptr, "qwix: quantize_operand: a static-scale plan needs its QuantStat tensors");
  const auto scale = srq_scale(x.detach(), stat->count, stat->sums, p.qtype, p.calibration_method,
                               p.channelwise_axes, p.tiled_axes);
  const c10::optional<at::Tensor> zp = scale.size() > 1 ? c10::optional<at::Tensor>(scale[1]) : c10::nullopt;
  return fake_quant_with_scale(x, scale[0], p.qtype, zp, p.clip_gradient.value_or(false));
}

}  // namespace qwix
