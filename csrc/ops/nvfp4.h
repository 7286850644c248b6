#pragma once
// nvfp4 fake quant, composed from the qwix ops so that every backend runs it.
#include <ATen/core/Tensor.h>

#include <tuple>

namespace qwix {

// y = fake quant of x to nvfp4 (e2m1 elements in blocks of 16 along the last axis):
//   tensor_scale = absmax(x) / (448 * 6)
//   block_scale  = e4m3(absmax(block) / 6 / tensor_scale) * tensor_scale   (e4m3 saturating)
//   y = e2m1(x / block_scale) * block_scale
// Scales below sqrt(FLT_MIN) become 1 at each level, as everywhere in qwix. The
// mask (when asked) is each block's grid range [-6, 6] * block_scale.
std::tuple<at::Tensor, at::Tensor> nvfp4_fake_quant_forward(const at::Tensor& x, bool with_mask);

}  // namespace qwix
