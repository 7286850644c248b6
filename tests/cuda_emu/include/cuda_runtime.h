#pragma once
// A CUDA emulator for the CPU: just enough of CUDA C++ to run qwix's kernels
// (cuda/*.cu, rewritten by tests/cuda_emu/translate.py) without a GPU, so CI
// exercises their indexing, reductions, tails and layout choices. Each CUDA
// thread is a fiber; a block's threads run interleaved on one OS thread and
// meet at __syncthreads and warp shuffles, which are real barriers here
// (a shuffle's among the non-exited lanes of its mask). Each warp runs ahead
// until it blocks before the next one starts, in alternating order from block
// to block, so a missing barrier shows as wrong results; no data race is
// detected as such. Errors (a GPU would hang, refuse or return undefined
// values): a __syncthreads some threads never reach, a shuffle reading a lane
// that does not take part, a launch exceeding the grid limits or the kernel's
// __launch_bounds__. __shared__ arrays start each block as garbage (0xA5
// bytes; translate.py adds the fill). Blocks run one after another and fibers
// are never preempted, so atomics are plain read-modify-writes. FMA
// contraction is GCC's (Makefile), not nvcc's own choices. Not emulated: the
// numerics' device-only branches (`__CUDA_ARCH__`), speed.
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
#define __launch_bounds__(...)  // translate.py checks the bound at the kernel's entry
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The running fiber's coordinates (set by the scheduler before it resumes a thread).
extern dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace qwix_emu {

// Runs the kernel body on every thread of the grid. An invalid configuration or a
// fault is kept as the launch's error, raised by C10_CUDA_KERNEL_LAUNCH_CHECK.
void run_grid(dim3 grid, dim3 block, const std::function<void()>& thread_body);
void check_last_launch();
// A shuffle: publishes `mine` to the lanes of `mask`, returns lane `src`'s value
// (lanes of the caller's warp; a barrier of the mask's non-exited lanes).
uint64_t warp_exchange(unsigned mask, uint64_t mine, unsigned src);
void block_barrier();
void check_launch_bounds(long long max_threads);
// A fault of the running thread: ends the launch with this error.
[[noreturn]] void fault(const char* what);
// Fills a __shared__ variable with garbage once per block (the first thread to declare it).
void shared_garbage(void* p, size_t bytes);

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

// The calling thread's lane: CUDA numbers a block's threads x fastest, then y, then z.
inline unsigned lane_id() { return ((threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x) % 32; }

}  // namespace qwix_emu

inline void __syncthreads() { qwix_emu::block_barrier(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move up to 8 bytes");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    qwix_emu::fault("__shfl_xor_sync: the width must be a power of two in [1, 32]");
  }
  const unsigned lane = qwix_emu::lane_id(), src = lane ^ (static_cast<unsigned>(lane_mask) & 31u);
  // A source lane in a later group of `width` lanes returns the caller's own value (PTX shfl.bfly).
  const bool own = src / width > lane / width;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  const uint64_t got = qwix_emu::warp_exchange(mask, bits, own ? lane : src);
  T r;
  std::memcpy(&r, &got, sizeof(T));
  return r;
}

// Fibers are never preempted and blocks run one at a time: atomics are plain read-modify-writes
// (CUDA's int and unsigned int overloads of max / min, double of add).
template <typename T>
T atomicMax(T* p, T v) {
  const T o = *p;
  *p = v > o ? v : o;
  return o;
}
template <typename T>
T atomicMin(T* p, T v) {
  const T o = *p;
  *p = v < o ? v : o;
  return o;
}
template <typename T>
T atomicAdd(T* p, T v) {
  const T o = *p;
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
