#include "ops/nvfp4.h"

#include <ATen/ATen.h>

#include <numeric>
#include <vector>

#include "numerics/qtype.h"
#include "ops/forward_ops.h"

namespace qwix {

std::tuple<at::Tensor, at::Tensor> nvfp4_fake_quant_forward(const at::Tensor& x, bool with_mask) {
  const int64_t rank = x.dim();
  std::vector<int64_t> leading(rank - 1);
  std::iota(leading.begin(), leading.end(), 0);
  // Both statistics from the detached input; the straight-through gradient flows through x only.
  const at::Tensor xd = x.detach();
  const at::Tensor block_amax = call_calibrate(xd, "absmax", leading, {rank - 1}, {kNvfp4Block})[0];
  // The tensor's absmax is the max of its blocks' (exact; a NaN block -- NaN/Inf inside -- stays
  // NaN), so x is read twice in all: once here, once to quantize.
  const at::Tensor tensor_amax = block_amax.amax().reshape(std::vector<int64_t>(rank, 1));
  // fp32 / fp32 divisions as the reference's div32, by tensors on x's device: CUDA divides by a number as a
  // multiply by its rounded reciprocal, one ulp off the true quotient.
  auto divided = [](const at::Tensor& t, float d) { return t / at::scalar_tensor(d, t.options()); };
  const at::Tensor tensor_scale = divided(tensor_amax, 448.0f * 6.0f);
  const at::Tensor block_scale = std::get<0>(
      call_fake_quant_with_scale_forward(divided(block_amax, 6.0f), tensor_scale, c10::nullopt, "float8_e4m3fn", false));
  auto out = call_fake_quant_with_scale_forward(x, block_scale, c10::nullopt, "float4_e2m1fn", with_mask);
  // A block whose e4m3 scale rounds to 0 (its absmax under 2^-10 of the tensor scale's 6 * 448th) decodes
  // to zeros in nvfp4; the given-scale kernel would guard the 0 to 1, a grid nvfp4 cannot represent. (In
  // place: the output keeps the kernel's strides.)
  std::vector<int64_t> blocks = block_scale.sizes().vec();
  blocks.push_back(kNvfp4Block);
  std::get<0>(out).masked_fill_(
      (block_scale == 0).unsqueeze(-1).expand(blocks).reshape(x.sizes()), 0.0);
  return out;
}

}  // namespace qwix
