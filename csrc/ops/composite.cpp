// Backend-generic kernels (CompositeExplicitAutograd): the public ops forward to
// their *_forward kernels; SRQ helpers are compositions of qwix and ATen ops.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <limits>
#include <numeric>

#include "ops/common.h"
#include "ops/forward_ops.h"

namespace qwix {
namespace {

at::Tensor fake_quant_composite(const at::Tensor& x, c10::string_view qtype, c10::string_view method,
                                at::IntArrayRef channelwise_axes, at::IntArrayRef tiled_axes,
                                at::IntArrayRef tile_sizes, c10::optional<bool>) {
  return std::get<0>(call_fake_quant_forward(x, qtype, method, channelwise_axes, tiled_axes, tile_sizes, false));
}

at::Tensor fake_quant_with_scale_composite(const at::Tensor& x, const at::Tensor& scale,
                                           const c10::optional<at::Tensor>& zero_point, c10::string_view qtype,
                                           bool) {
  return std::get<0>(call_fake_quant_with_scale_forward(x, scale, zero_point, qtype, false));
}

// A statistic broadcasts (right-aligned) to x's calibration shape, whatever the count.
void check_stat_shape(const at::Tensor& sum, const Groups& groups) {
  TORCH_CHECK_VALUE(sum.dim() <= static_cast<int64_t>(groups.size()), "qwix: statistic of shape ", sum.sizes(),
                    " does not fit the calibration shape ", c10::IntArrayRef(groups));
  for (int64_t i = 0; i < sum.dim(); ++i) {
    const int64_t g = groups[groups.size() - sum.dim() + i];
    TORCH_CHECK_VALUE(sum.size(i) == 1 || sum.size(i) == g, "qwix: statistic of shape ", sum.sizes(),
                      " does not broadcast to the calibration shape ", c10::IntArrayRef(groups));
  }
}

// The statistic's average, broadcast to x's calibration shape. The count is a tensor on the sum's device:
// CUDA divides by a CPU scalar as a multiply by its rounded reciprocal, one ulp off the CPU's quotient.
at::Tensor static_range(const at::Tensor& sum, const at::Tensor& count, const Groups& groups) {
  const at::Tensor n = count.device() == sum.device()
                           ? count.reshape({}).to(at::kFloat)  // (a count of shape [1, 1, 1] broadcast sum's rank up)
                           : at::scalar_tensor(static_cast<double>(count.item<int64_t>()), sum.options());
  return (sum / n).expand(groups).contiguous();
}

std::vector<at::Tensor> srq_scale_composite(const at::Tensor& x, const at::Tensor& count, at::TensorList sums,
                                            c10::string_view qtype, c10::string_view method,
                                            at::IntArrayRef channelwise_axes, at::IntArrayRef tiled_axes,
                                            at::IntArrayRef tile_sizes) {
  const std::string qname(qtype);
  const DynamicSpec spec = make_dynamic_spec(x, &qname, std::string(method), channelwise_axes, tiled_axes, tile_sizes);
  check_srq_stats(x, count, sums, spec, method);
  for (const auto& s : sums) check_stat_shape(s, spec.groups);
  auto dynamic = [&] {
    if (!spec.qtype.is_block_format()) return call_calibrate(x, method, channelwise_axes, tiled_axes, tile_sizes);
    // MX: the qtype's own blocks (every axis but the last kept, the last in blocks), as fake_quant does.
    std::vector<int64_t> ch(x.dim() - 1);
    std::iota(ch.begin(), ch.end(), 0);
    return call_calibrate(x, method, ch, {x.dim() - 1}, {spec.qtype.p.block});
  };
  auto from_stats = [&] {
    std::vector<at::Tensor> r;
    for (const auto& s : sums) r.push_back(static_range(s, count, spec.groups));
    return r;
  };
  std::vector<at::Tensor> cal;
  if (count.device().is_cpu()) {  // reading a CPU scalar is no device sync
    cal = count.item<int64_t>() > 0 ? from_stats() : dynamic();
  } else {  // no host sync: select on the device
    const std::vector<at::Tensor> st = from_stats(), dy = dynamic();
    const at::Tensor have = count.reshape({}) > 0;
    for (size_t i = 0; i < st.size(); ++i) cal.push_back(at::where(have, st[i], dy[i]));
  }
  return call_compute_scale(cal, qtype);
}

void update_quant_stat_composite(const at::Tensor& count, at::TensorList sums, at::TensorList calibration,
                                 at::IntArrayRef batch_axes, int64_t count_increment) {
  check_calibration_list(calibration, nullptr);
  TORCH_CHECK_VALUE(sums.size() == calibration.size(), "qwix: update_quant_stat got ", sums.size(), " sums but ",
                    calibration.size(), " calibration tensors");
  check_count(count);
  TORCH_CHECK_VALUE(count_increment >= 1 && count_increment <= std::numeric_limits<int32_t>::max(),
                    "qwix: count_increment must be in [1, 2^31 - 1], got ", count_increment);
  for (size_t i = 0; i < sums.size(); ++i) {
    check_device(sums[i], "statistic " + std::to_string(i), count, "count");
    check_device(calibration[i], "calibration tensor " + std::to_string(i), count, "count");
  }
  // An empty batch (no tokens for this op) has no statistics: averaging it would add NaN for good.
  for (const auto& c : calibration)
    if (TORCH_GUARD_SIZE_OBLIVIOUS(c.sym_numel().sym_eq(0))) return;
  // Everything is checked before anything is written: a bad entry leaves every statistic as it was.
  auto check_writable = [](const at::Tensor& t, const std::string& what) {
    TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, "qwix: ", what, " has elements that "
                      "share memory (an expanded view, stride 0) and cannot be updated in place; pass a tensor of "
                      "its own, e.g. .clone()");
  };
  std::vector<at::Tensor> averages;
  for (size_t i = 0; i < sums.size(); ++i) {
    check_writable(sums[i], "statistic " + std::to_string(i));
    const at::Tensor& c = calibration[i];
    const int64_t rank = std::max<int64_t>(c.dim(), 1);  // (a scalar takes axis 0, as in ATen's mean)
    std::vector<bool> seen(rank, false);
    for (const int64_t a : batch_axes) {
      TORCH_CHECK_INDEX(a >= -rank && a < rank, "qwix: update_quant_stat's batch axis ", a, " is out of range for a ",
                        "calibration of rank ", c.dim(), " (batch_axes ", batch_axes, "; allowed: -", rank, " to ",
                        rank - 1, ")");
      const int64_t axis = a < 0 ? a + rank : a;
      TORCH_CHECK_VALUE(!seen[axis], "qwix: update_quant_stat's batch_axes ", batch_axes, " name axis ", axis,
                        " twice");
      seen[axis] = true;
    }
    at::Tensor avg = batch_axes.empty() ? c : c.mean(batch_axes, /*keepdim=*/true);
    TORCH_CHECK_VALUE(sums[i].sym_sizes() == avg.sym_sizes(), "qwix: statistic ", i, " has shape ",
                      sums[i].sym_sizes(), " but the calibration of shape ", c.sym_sizes(),
                      " averaged over batch axes ", batch_axes, " has shape ", avg.sym_sizes());
    TORCH_CHECK_TYPE(sums[i].scalar_type() == at::kFloat, "qwix: statistics are float32, got ",
                     sums[i].scalar_type());
    averages.push_back(std::move(avg));
  }
  // A batch with NaN/Inf in its calibration (an fp16 overflow step that GradScaler will skip) is left out
  // on the device, without a host sync: added, it would make every later scale NaN.
  // So is a batch that would take count past its dtype's range (the statistics are then averages over
  // 2^31 - 1 or more samples already): wrapped negative, it would turn SRQ back to dynamic scales.
  const int64_t count_max = count.scalar_type() == at::kInt ? std::numeric_limits<int32_t>::max()
                                                            : std::numeric_limits<int64_t>::max();
  at::Tensor add = count.reshape({}).le(count_max - count_increment);
  for (const auto& a : averages) add = add.logical_and(at::isfinite(a).all());
  for (size_t i = 0; i < sums.size(); ++i)
    const_cast<at::Tensor&>(sums[i]).add_(at::where(add, averages[i], at::zeros_like(averages[i])));
  const_cast<at::Tensor&>(count).add_(add.to(count.scalar_type()) * count_increment);
}

}  // namespace

TORCH_LIBRARY_IMPL(qwix, CompositeExplicitAutograd, m) {
  m.impl("fake_quant", &fake_quant_composite);
  m.impl("fake_quant_with_scale", &fake_quant_with_scale_composite);
  m.impl("srq_scale", &srq_scale_composite);
  m.impl("update_quant_stat", &update_quant_stat_composite);
}

}  // namespace qwix
