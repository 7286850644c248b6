// CUDA kernel of fake_quant_backward: grad * unpack(mask). Each thread owns one
// mask byte and the 8 gradients it covers (one vector access when aligned).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "cuda/device_utils.cuh"
#include "cuda/kernels.h"
#include "ops/common.h"

namespace qwix {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    masked_copy_kernel(const T* __restrict__ g, const uint8_t* __restrict__ bits, T* __restrict__ out, int64_t n,
                       bool aligned) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t begin = c * kChunk;
  if (begin >= n) return;
  const uint8_t m = bits[c];
  if (aligned && begin + kChunk <= n) {
    const Chunk<T> v = reinterpret_cast<const Chunk<T>*>(g)[c];
    Chunk<T> o;
#pragma unroll
    for (int j = 0; j < kChunk; ++j) o.v[j] = ((m >> j) & 1) ? v.v[j] : T(0);
    reinterpret_cast<Chunk<T>*>(out)[c] = o;
  } else {
    for (int j = 0; j < kChunk && begin + j < n; ++j) out[begin + j] = ((m >> j) & 1) ? g[begin + j] : T(0);
  }
}

at::Tensor fake_quant_backward_cuda(const at::Tensor& grad, const at::Tensor& mask) {
  check_backward_args(grad, mask);  // first: a CPU operand fails the guard
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor gd = dense_input(grad);
  at::Tensor out = at::empty_like(gd);
  if (gd.numel() == 0) return out;
  const at::Tensor m = mask.contiguous();
  const int64_t blocks = (mask_bytes(gd.numel(), true) + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "qwix: tensor too large for one launch");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gd.scalar_type(), "qwix_backward_cuda", [&] {
    const bool aligned = chunk_aligned(gd.const_data_ptr(), sizeof(scalar_t)) &&
                         chunk_aligned(out.const_data_ptr(), sizeof(scalar_t));
    masked_copy_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        gd.const_data_ptr<scalar_t>(), m.const_data_ptr<uint8_t>(), out.mutable_data_ptr<scalar_t>(), gd.numel(),
        aligned);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qwix, CUDA, m) { m.impl("fake_quant_backward", &fake_quant_backward_cuda); }

}  // namespace cuda
}  // namespace qwix
