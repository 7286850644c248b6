#pragma once
// Lets the per-element math compile for both the host (CPU kernels) and CUDA.
#if defined(__CUDACC__)
#define QWIX_HD __host__ __device__ __forceinline__
#else
#define QWIX_HD inline
#endif
