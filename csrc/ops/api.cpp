// The C++ API of <qwix/qwix.h>: thin typed calls into the dispatcher.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "ops/forward_ops.h"
#include "qwix/qwix.h"

namespace qwix {
namespace {

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

// An undefined at::Tensor (a default-constructed one) reaches the dispatcher as no tensor at all: say so.
void check_defined(const char* fn, const char* what, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), "qwix::", fn, ": ", what, " is an undefined tensor");
}
void check_defined(const char* fn, const char* what, const std::vector<at::Tensor>& ts) {
  for (const auto& t : ts) check_defined(fn, what, t);
}

}  // namespace

std::pair<std::vector<int64_t>, std::vector<int64_t>> resolve_tiled_axes(c10::IntArrayRef sizes,
                                                                         const TiledAxes& tiled_axes) {
  std::vector<int64_t> axes, tiles;
  const int64_t rank = static_cast<int64_t>(sizes.size());
  for (const auto& [axis, tile] : tiled_axes) {
    TORCH_CHECK_INDEX(axis >= -rank && axis < rank, "qwix: tiled axis ", axis,
                      " is out of range for a tensor of rank ", rank);
    const int64_t dim = sizes[axis < 0 ? axis + rank : axis];
    int64_t t;
    if (tile > 0.0 && tile < 1.0) {
      t = static_cast<int64_t>(std::nearbyint(static_cast<double>(dim) * tile));
      TORCH_CHECK_VALUE(t > 0, "qwix: fractional tile ", tile, " of axis ", axis, " (size ", dim,
                        ") rounds to 0 elements");
    } else {
      // (at most 2^62: larger doubles, inf included, do not convert to int64)
      TORCH_CHECK_VALUE(tile >= 1.0 && tile == std::floor(tile) && tile <= 0x1p62, "qwix: tile ", tile, " for axis ",
                        axis, " must be a positive integer (elements, at most 2^62) or a fraction in (0, 1)");
      t = static_cast<int64_t>(tile);
    }
    axes.push_back(axis);
    tiles.push_back(t);
  }
  return {axes, tiles};
}

at::Tensor fake_quant(const at::Tensor& x, const std::string& qtype, const FakeQuantOptions& o) {
  check_defined("fake_quant", "x", x);
  static auto h = op("qwix::fake_quant")
                      .typed<at::Tensor(const at::Tensor&, c10::string_view, c10::string_view, at::IntArrayRef,
                                        at::IntArrayRef, at::IntArrayRef, c10::optional<bool>)>();
  const auto [axes, tiles] = resolve_tiled_axes(x.sizes(), o.tiled_axes);
  return h.call(x, qtype, o.calibration_method, o.channelwise_axes, axes, tiles, o.clip_gradient);
}

at::Tensor fake_quant_with_scale(const at::Tensor& x, const at::Tensor& scale, const std::string& qtype,
                                 const c10::optional<at::Tensor>& zero_point, bool clip_gradient) {
  static auto h = op("qwix::fake_quant_with_scale")
                      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                        c10::string_view, bool)>();
  check_defined("fake_quant_with_scale", "x", x);
  check_defined("fake_quant_with_scale", "scale", scale);
  if (zero_point.has_value()) check_defined("fake_quant_with_scale", "zero_point", *zero_point);
  return h.call(x, scale, zero_point, qtype, clip_gradient);
}

std::vector<at::Tensor> calibrate(const at::Tensor& x, const std::string& method,
                                  const std::vector<int64_t>& channelwise_axes, const TiledAxes& tiled_axes) {
  check_defined("calibrate", "x", x);
  const auto [axes, tiles] = resolve_tiled_axes(x.sizes(), tiled_axes);
  return call_calibrate(x, method, channelwise_axes, axes, tiles);
}

std::vector<at::Tensor> compute_scale(const std::vector<at::Tensor>& calibration, const std::string& qtype) {
  // (the dispatcher cannot pick a kernel for an empty list: say what is expected instead)
  TORCH_CHECK_VALUE(!calibration.empty(), "qwix: compute_scale needs a calibration: [absmax] or [min, max] (as "
                    "qwix::calibrate returns), got an empty list");
  check_defined("compute_scale", "a calibration tensor", calibration);
  return call_compute_scale(calibration, qtype);
}

std::vector<at::Tensor> srq_scale(const at::Tensor& x, const at::Tensor& count, const std::vector<at::Tensor>& sums,
                                  const std::string& qtype, const std::string& method,
                                  const std::vector<int64_t>& channelwise_axes, const TiledAxes& tiled_axes) {
  static auto h = op("qwix::srq_scale")
                      .typed<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, at::TensorList,
                                                     c10::string_view, c10::string_view, at::IntArrayRef,
                                                     at::IntArrayRef, at::IntArrayRef)>();
  check_defined("srq_scale", "x", x);
  check_defined("srq_scale", "count", count);
  check_defined("srq_scale", "a statistic", sums);
  const auto [axes, tiles] = resolve_tiled_axes(x.sizes(), tiled_axes);
  return h.call(x, count, sums, qtype, method, channelwise_axes, axes, tiles);
}

void update_quant_stat(at::Tensor& count, std::vector<at::Tensor>& sums, const std::vector<at::Tensor>& calibration,
                       const std::vector<int64_t>& batch_axes, int64_t count_increment) {
  static auto h = op("qwix::update_quant_stat")
                      .typed<void(const at::Tensor&, at::TensorList, at::TensorList, at::IntArrayRef, int64_t)>();
  check_defined("update_quant_stat", "count", count);
  check_defined("update_quant_stat", "a statistic", sums);
  check_defined("update_quant_stat", "a calibration tensor", calibration);
  h.call(count, sums, calibration, batch_axes, count_increment);
}

}  // namespace qwix
