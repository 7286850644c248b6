// Kernels that check the CUDA emulator itself (test_cuda_emulated.py): shuffles
// and block barriers give CUDA's results, and the faults a GPU would have (a
// barrier some threads never reach, a shuffle naming a missing lane, an
// invalid launch, an out-of-bounds read) are errors rather than garbage.
// Written as CUDA and translated like cuda/*.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

namespace {

// out[t] = sum over t's group of WIDTH lanes of in[], by xor-butterfly.
template <int WIDTH>
__global__ void lanes_sum_kernel(const int64_t* in, int64_t* out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  int64_t v = in[t];
  for (int o = WIDTH / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o, WIDTH);
  out[t] = v;
}

// out[t] = in[t] reversed within the block, through shared memory.
__global__ void block_reverse_kernel(const int64_t* in, int64_t* out) {
  __shared__ int64_t tile[256];
  const int base = blockIdx.x * blockDim.x;
  tile[threadIdx.x] = in[base + threadIdx.x];
  __syncthreads();
  out[base + threadIdx.x] = tile[blockDim.x - 1 - threadIdx.x];
}

// Thread 0 leaves before the barrier the others wait at.
__global__ void early_exit_kernel(int64_t* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// A full-mask shuffle in a block of 48 threads: the second warp has 16 lanes.
__global__ void partial_warp_shuffle_kernel(int64_t* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int64_t>(threadIdx.x), 1);
}

// Reads one element past the end of `in`.
__global__ void out_of_bounds_kernel(const float* in, int64_t n, float* out) { out[0] = in[n]; }

at::Tensor lanes_sum(const at::Tensor& in, int64_t width) {
  at::Tensor out = at::empty_like(in);
  const auto blocks = static_cast<unsigned>(in.numel() / 64);
  if (width == 8) {
    lanes_sum_kernel<8><<<blocks, 64, 0, c10::cuda::getCurrentCUDAStream()>>>(in.data_ptr<int64_t>(),
                                                                               out.data_ptr<int64_t>());
  } else {
    lanes_sum_kernel<32><<<blocks, 64>>>(in.data_ptr<int64_t>(), out.data_ptr<int64_t>());
  }
  return out;
}

at::Tensor block_reverse(const at::Tensor& in) {
  at::Tensor out = at::empty_like(in);
  block_reverse_kernel<<<static_cast<unsigned>(in.numel() / 256), 256>>>(in.data_ptr<int64_t>(),
                                                                         out.data_ptr<int64_t>());
  return out;
}

at::Tensor launch_fault(c10::string_view which) {
  at::Tensor out = at::zeros({64}, at::kLong);
  at::Tensor in = at::zeros({7}, at::kFloat);
  if (which == "early_exit") {
    early_exit_kernel<<<1, 64>>>(out.data_ptr<int64_t>());
  } else if (which == "partial_warp") {
    partial_warp_shuffle_kernel<<<1, 48>>>(out.data_ptr<int64_t>());
  } else if (which == "empty_grid") {
    block_reverse_kernel<<<0, 256>>>(out.data_ptr<int64_t>(), out.data_ptr<int64_t>());
  } else if (which == "big_block") {
    early_exit_kernel<<<1, 2048>>>(out.data_ptr<int64_t>());
  } else if (which == "out_of_bounds") {
    at::Tensor o = at::zeros({1}, at::kFloat);
    out_of_bounds_kernel<<<1, 1>>>(in.data_ptr<float>(), in.numel(), o.data_ptr<float>());
  } else {
    TORCH_CHECK_VALUE(false, "unknown fault ", which);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwix_cuda_emu_selftest, m) {
  m.def("lanes_sum", &lanes_sum);
  m.def("block_reverse", &block_reverse);
  m.def("launch_fault", &launch_fault);
}
