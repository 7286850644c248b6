#pragma once
// CUDA emulator stand-in: one in-order "stream" (kernels run to completion at launch).
namespace c10 {
namespace cuda {
struct CUDAStream {};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace cuda
}  // namespace c10
