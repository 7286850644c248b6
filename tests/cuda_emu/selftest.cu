// Kernels that check the CUDA emulator itself (test_cuda_emulated.py): shuffles
// and block barriers give CUDA's results, a missing barrier shows, and the
// faults a GPU would have (a barrier some threads never reach, a shuffle from a
// lane that takes no part, an invalid launch, an out-of-bounds read) are errors
// rather than garbage. Written as CUDA and translated like cuda/*.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
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
__global__ void __launch_bounds__(256) block_reverse_kernel(const int64_t* in, int64_t* out) {
  __shared__ int64_t tile[256];
  const int base = blockIdx.x * blockDim.x;
  tile[threadIdx.x] = in[base + threadIdx.x];
  __syncthreads();
  out[base + threadIdx.x] = tile[blockDim.x - 1 - threadIdx.x];
}

// The linear thread index t = x + 16 y of a (16, 4) block, xor-shuffled by `lane_mask` with `width`,
// from lanes < `active` only (the others exit first) under `mask`.
__global__ void shuffle_kernel(int64_t* out, int lane_mask, int width, unsigned mask, int active) {
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  if (t % 32 >= active) return;
  out[t] = __shfl_xor_sync(mask, static_cast<int64_t>(t), lane_mask, width);
}

// Sums in[] over the block twice through one shared array; `barrier`: with the __syncthreads that keeps
// the second sum's writes from overtaking the first's reads.
__global__ void block_sum_twice_kernel(const int64_t* in, int64_t* out, bool barrier) {
  __shared__ int64_t partial[4];
  int64_t total = 0;
  for (int pass = 0; pass < 2; ++pass) {
    int64_t v = in[threadIdx.x] * (pass + 1);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
    __syncthreads();
    for (int w = 0; w < 4; ++w) total += partial[w];
    if (barrier) __syncthreads();
  }
  out[threadIdx.x] = total;
}

// Block 0 writes all 64 __shared__ slots, block 1 only 32 and reads all 64 (32 never written in it).
__global__ void unwritten_shared_kernel(int64_t* out) {
  __shared__ int64_t slots[64];
  if (threadIdx.x < (blockIdx.x == 0 ? 64u : 32u)) slots[threadIdx.x] = threadIdx.x;
  __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = slots[threadIdx.x];
}

// Thread 0 leaves before the barrier the others wait at.
__global__ void early_exit_kernel(int64_t* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1;
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
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor block_reverse(const at::Tensor& in) {
  at::Tensor out = at::empty_like(in);
  block_reverse_kernel<<<static_cast<unsigned>(in.numel() / 256), 256>>>(in.data_ptr<int64_t>(),
                                                                         out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor shuffle(int64_t lane_mask, int64_t width, int64_t mask, int64_t active) {
  at::Tensor out = at::full({64}, -1, at::kLong);
  shuffle_kernel<<<1, dim3(16, 4)>>>(out.data_ptr<int64_t>(), static_cast<int>(lane_mask), static_cast<int>(width),
                                     static_cast<unsigned>(mask), static_cast<int>(active));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor block_sum_twice(const at::Tensor& in, bool barrier) {
  at::Tensor out = at::empty_like(in);
  block_sum_twice_kernel<<<1, 128>>>(in.data_ptr<int64_t>(), out.data_ptr<int64_t>(), barrier);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor unwritten_shared() {
  at::Tensor out = at::empty({128}, at::kLong);
  unwritten_shared_kernel<<<2, 64>>>(out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void launch_fault(c10::string_view which, bool check) {
  at::Tensor out = at::zeros({64}, at::kLong);
  at::Tensor in = at::zeros({7}, at::kFloat);
  if (which == "early_exit") {
    early_exit_kernel<<<1, 64>>>(out.data_ptr<int64_t>());
  } else if (which == "empty_grid") {
    block_reverse_kernel<<<0, 256>>>(out.data_ptr<int64_t>(), out.data_ptr<int64_t>());
  } else if (which == "big_block") {
    early_exit_kernel<<<1, 2048>>>(out.data_ptr<int64_t>());
  } else if (which == "over_launch_bounds") {
    block_reverse_kernel<<<1, 512>>>(out.data_ptr<int64_t>(), out.data_ptr<int64_t>());
  } else if (which == "out_of_bounds") {
    at::Tensor o = at::zeros({1}, at::kFloat);
    out_of_bounds_kernel<<<1, 1>>>(in.data_ptr<float>(), in.numel(), o.data_ptr<float>());
  } else {
    TORCH_CHECK_VALUE(false, "unknown fault ", which);
  }
  if (check) C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwix_cuda_emu_selftest, m) {
  m.def("lanes_sum", &lanes_sum);
  m.def("block_reverse", &block_reverse);
  m.def("shuffle", &shuffle);
  m.def("block_sum_twice", &block_sum_twice);
  m.def("unwritten_shared", &unwritten_shared);
  m.def("launch_fault", &launch_fault);
}
