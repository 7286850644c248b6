// CUDA kernel of fake_quant_backward: grad * unpack(mask); each thread owns one
// mask byte (8 consecutive elements).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/common.h"

namespace qwix {
namespace cuda {
namespace {

template <typename T>
__global__ void masked_copy_kernel(const T* __restrict__ g, const uint8_t* __restrict__ bits, T* __restrict__ out,
                                   int64_t n) {
  const int64_t byte = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t begin = byte * 8;
  if (begin >= n) return;
  const uint8_t m = bits[byte];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (begin + j < n) out[begin + j] = ((m >> j) & 1) ? g[begin + j] : T(0);
  }
}

at::Tensor fake_quant_backward_cuda(const at::Tensor& grad, const at::Tensor& mask) {
  const c10::cuda::CUDAGuard guard(grad.device());
  check_float_input(grad, "grad");
  const at::Tensor gd = dense_input(grad);
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kByte && mask.dim() == 1 && mask.numel() == mask_bytes(gd.numel(), true),
                    "qwix: mask must be a 1-D uint8 tensor of ceil(numel/8) = ", mask_bytes(gd.numel(), true),
                    " bytes, got ", mask.scalar_type(), " of shape ", mask.sizes());
  at::Tensor out = at::empty_like(gd);
  if (gd.numel() == 0) return out;
  const at::Tensor m = mask.contiguous();
  constexpr int kThreads = 256;
  const int64_t blocks = ((gd.numel() + 7) / 8 + kThreads - 1) / kThreads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gd.scalar_type(), "qwix_backward_cuda", [&] {
    masked_copy_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        gd.const_data_ptr<scalar_t>(), m.const_data_ptr<uint8_t>(), out.mutable_data_ptr<scalar_t>(), gd.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qwix, CUDA, m) { m.impl("fake_quant_backward", &fake_quant_backward_cuda); }

}  // namespace cuda
}  // namespace qwix
