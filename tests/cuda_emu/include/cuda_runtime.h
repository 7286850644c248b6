#pragma once
// A CUDA emulator for the CPU: just enough of CUDA C++ to run qwix's kernels
// (cuda/*.cu, rewritten by tests/cuda_emu/translate.py) without a GPU, so CI
// exercises their indexing, reductions, tails and layout choices. Each CUDA
// thread is a fiber; a block's threads run interleaved on one OS thread and
// meet at __syncthreads and warp shuffles, which are real barriers here. A
// barrier that can never complete (a thread exits or diverges before it), a
// full-mask shuffle with a missing lane, and an invalid launch configuration
// are errors, as they are faults (or undefined) on a GPU. Blocks run one after
// another, so __shared__ is a function-local static and atomics are plain
// read-modify-writes. Not emulated: the device-only branches of the numerics
// (`__CUDA_ARCH__`), nvcc's FMA contraction, memory-model races.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The running fiber's coordinates (set by the scheduler before it resumes a thread).
extern dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace qwix_emu {

// The kernel body every thread of the grid runs.
void run_grid(dim3 grid, dim3 block, const std::function<void()>& thread_body);
// Lane exchange of a warp shuffle: publishes `mine`, returns lane `src`'s value
// (of the calling thread's warp). A barrier of the warp's lanes.
uint64_t warp_exchange(unsigned mask, uint64_t mine, unsigned src);
void block_barrier();

struct Config {
  dim3 grid, block;
  template <typename Stream = int>
  Config(dim3 g, dim3 b, size_t /*shared bytes*/ = 0, Stream = {}) : grid(g), block(b) {}
};

// kernel<<<cfg>>>(args...): every thread calls the kernel with its own copy of the arguments.
template <typename... P, typename... A>
void launch(const Config& c, void (*kernel)(P...), A&&... args) {
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  run_grid(c.grid, c.block, [&] { std::apply(kernel, params); });
}

}  // namespace qwix_emu

inline void __syncthreads() { qwix_emu::block_barrier(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move up to 8 bytes");
  const unsigned lane = threadIdx.x % 32, src = lane ^ static_cast<unsigned>(lane_mask);
  // A source lane in a later group of `width` lanes returns the caller's own value.
  const bool own = src / width > lane / width;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  const uint64_t got = qwix_emu::warp_exchange(mask, bits, own ? lane : src);
  T r;
  std::memcpy(&r, &got, sizeof(T));
  return r;
}

// Blocks run one at a time, so atomics are plain read-modify-writes.
inline unsigned atomicMax(unsigned* p, unsigned v) {
  const unsigned o = *p;
  *p = v > o ? v : o;
  return o;
}
inline int atomicMax(int* p, int v) {
  const int o = *p;
  *p = v > o ? v : o;
  return o;
}
inline int atomicMin(int* p, int v) {
  const int o = *p;
  *p = v < o ? v : o;
  return o;
}
inline double atomicAdd(double* p, double v) {
  const double o = *p;
  *p = o + v;
  return o;
}

inline float __int_as_float(int v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
inline unsigned __float_as_uint(float v) {
  unsigned u;
  std::memcpy(&u, &v, 4);
  return u;
}
