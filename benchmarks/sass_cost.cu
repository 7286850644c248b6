// Micro-kernels for benchmarks/sass_cost.py: each fake-quantizes one chunk of
// 8 elements per thread with one per-element form of cuda/device_utils.cuh, so
// its SASS, minus the copy kernel's, is that form's cost per chunk. Compiled
// only by that script (never linked into the extension).
#include "cuda/device_utils.cuh"

namespace qwix {
namespace cuda {

template <typename T>
__global__ void copy_chunk(const Chunk<T>* x, Chunk<T>* y) {
  y[threadIdx.x] = x[threadIdx.x];
}

// FORM: 0 = ReciprocalDiv (per-element checks), 1 = UncheckedDiv,
// 2 = UncheckedDiv + symmetric integer form, 3 = chosen per chunk
// (quantize_group_chunk, as the per-tensor apply kernel runs it).
template <typename T, QKind K, int FORM>
__global__ void cost_chunk(const Chunk<T>* x, Chunk<T>* y, PackedParams pp, QParams q) {
  const GroupParams p{pp.scale, pp.zero_point, pp.lo, pp.hi};
  Chunk<T> o;
  if constexpr (FORM == 0) quantize_chunk<T, K, false, false>(x[threadIdx.x], o, pp.div(), p, q);
  if constexpr (FORM == 1) quantize_chunk<T, K, false, false>(x[threadIdx.x], o, pp.div().unchecked(), p, q);
  if constexpr (FORM == 2) quantize_chunk<T, K, true, false>(x[threadIdx.x], o, pp.div().unchecked(), p, q);
  if constexpr (FORM == 3) quantize_group_chunk<T, K, false>(x[threadIdx.x], o, pp, q);
  y[threadIdx.x] = o;
}

#define QWIX_COST(T)                                                     \
  template __global__ void copy_chunk<T>(const Chunk<T>*, Chunk<T>*);    \
  QWIX_COST_K(T, QKind::Int, 0)                                          \
  QWIX_COST_K(T, QKind::Int, 1)                                          \
  QWIX_COST_K(T, QKind::Int, 2)                                          \
  QWIX_COST_K(T, QKind::Int, 3)                                          \
  QWIX_COST_K(T, QKind::Float, 0)                                        \
  QWIX_COST_K(T, QKind::Float, 1)                                        \
  QWIX_COST_K(T, QKind::Float, 3)                                        \
  QWIX_COST_K(T, QKind::NF4, 0)                                          \
  QWIX_COST_K(T, QKind::NF4, 1)
#define QWIX_COST_K(T, K, F) \
  template __global__ void cost_chunk<T, K, F>(const Chunk<T>*, Chunk<T>*, PackedParams, QParams);
QWIX_COST(float)
QWIX_COST(c10::BFloat16)

}  // namespace cuda
}  // namespace qwix
