#pragma once
// qwix-torch: quantization-aware training for LibTorch. The one public C++ header.
//
//   #include <qwix/qwix.h>
//   at::Tensor y = qwix::fake_quant(x, "int8", {.channelwise_axes = {0}});
//
// The functions call the registered torch.ops.qwix.* operators through the
// dispatcher, so autograd, CPU/CUDA kernels and TorchScript all apply.
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <utility>
#include <vector>

namespace qwix {

// {axis: tile}. A tile >= 1 counts elements (must be an integer); a tile in
// (0, 1) is a fraction of the axis (tile = round(dim * f)), as in Qwix.
using TiledAxes = std::vector<std::pair<int64_t, double>>;

struct FakeQuantOptions {
  std::string calibration_method = "absmax";
  std::vector<int64_t> channelwise_axes = {};
  TiledAxes tiled_axes = {};
  // Mask the straight-through gradient to the calibrated range. Default: only
  // when the method can clip (absmax,s / minmax,s with s < 1, rms, fixed).
  c10::optional<bool> clip_gradient = c10::nullopt;
};

// Quantize-dequantize with a scale computed from x (DESIGN section 2).
at::Tensor fake_quant(const at::Tensor& x, const std::string& qtype, const FakeQuantOptions& options = {});

// Quantize-dequantize with a given scale (and zero point, integer qtypes).
// scale's shape gives the granularity: per dim 1, the dim, or a divisor (tiles).
at::Tensor fake_quant_with_scale(const at::Tensor& x, const at::Tensor& scale, const std::string& qtype,
                                 const c10::optional<at::Tensor>& zero_point = c10::nullopt,
                                 bool clip_gradient = false);

// [absmax] or [min, max], float32, keepdim shapes (tiled axes: one entry per tile).
std::vector<at::Tensor> calibrate(const at::Tensor& x, const std::string& calibration_method = "absmax",
                                  const std::vector<int64_t>& channelwise_axes = {}, const TiledAxes& tiled_axes = {});

// [scale] (symmetric calibration) or [scale, zero_point] (asymmetric).
std::vector<at::Tensor> compute_scale(const std::vector<at::Tensor>& calibration, const std::string& qtype);

// SRQ: the scale from statistics (sums / count), or x's own while count is 0.
std::vector<at::Tensor> srq_scale(const at::Tensor& x, const at::Tensor& count, const std::vector<at::Tensor>& sums,
                                  const std::string& qtype, const std::string& calibration_method = "absmax",
                                  const std::vector<int64_t>& channelwise_axes = {}, const TiledAxes& tiled_axes = {});

// SRQ, in place: count += count_increment; sums[i] += calibration[i].mean(batch_axes, keepdim).
void update_quant_stat(at::Tensor& count, std::vector<at::Tensor>& sums, const std::vector<at::Tensor>& calibration,
                       const std::vector<int64_t>& batch_axes = {0}, int64_t count_increment = 1);

// Splits {axis: tile} into the ops' (tiled_axes, tile_sizes), resolving fractions.
std::pair<std::vector<int64_t>, std::vector<int64_t>> resolve_tiled_axes(c10::IntArrayRef sizes,
                                                                         const TiledAxes& tiled_axes);

}  // namespace qwix
