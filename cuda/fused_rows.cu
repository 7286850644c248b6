// The fused kernel for row layouts (one contiguous run of L elements per group):
// each row is read from DRAM once into registers (kChunk-element vectors),
// reduced across the threads that own it, quantized and written, with the
// mask byte of each chunk when asked. Rows longer than the register cache are
// read a second time for the rest (L2 usually holds them).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "cuda/device_utils.cuh"
#include "cuda/kernels.h"
#include "ops/common.h"

namespace qwix {
namespace cuda {
namespace {

constexpr int kMinBlock = 256;

// Reduction over the TPR threads that own a row; every one gets the result.
template <int TPR>
__device__ __forceinline__ Stat row_reduce(Stat s, CalKind k) {
  if constexpr (TPR <= 32) {
    return lanes_reduce<TPR>(s, k);
  } else {
    constexpr int kBlock = TPR > kMinBlock ? TPR : kMinBlock;
    constexpr int kWarpsPerRow = TPR / 32;
    static_assert(kWarpsPerRow <= 32, "at most 32 warps per row");
    __shared__ Stat partial[kBlock / 32];
    s = lanes_reduce<32>(s, k);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = s;
    __syncthreads();  // called once per kernel: no barrier needed before `partial` is reused
    const int first = warp / kWarpsPerRow * kWarpsPerRow;
    Stat t = lane < kWarpsPerRow ? partial[first + lane] : Stat::empty();
    return lanes_reduce<32>(t, k);
  }
}

// TPR threads own a row; each caches up to CACHE chunks of it. MASK: also
// write the bit-packed mask (a template flag: no mask work otherwise).
template <typename T, QKind K, int TPR, int CACHE, bool MASK>
__global__ void __launch_bounds__(TPR > kMinBlock ? TPR : kMinBlock)
    fused_rows_kernel(const T* __restrict__ x, T* __restrict__ y, uint8_t* __restrict__ bits, int64_t rows,
                      int64_t L, CalKind ck, float mult, QParams q, bool symmetric) {
  constexpr int kRowsPerBlock = TPR >= kMinBlock ? 1 : kMinBlock / TPR;
  const int t = threadIdx.x % TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
  const bool active = row < rows;  // inactive threads still join the reduction
  const int64_t nchunks = L / kChunk;
  const int64_t base = (active ? row : 0) * L;
  const Chunk<T>* xc = reinterpret_cast<const Chunk<T>*>(x + base);
  Chunk<T>* yc = reinterpret_cast<Chunk<T>*>(y + base);

  Chunk<T> cache[CACHE];
  Stat s = Stat::empty();
#pragma unroll
  for (int c = 0; c < CACHE; ++c) {
    const int64_t i = t + static_cast<int64_t>(c) * TPR;
    if (active && i < nchunks) cache[c] = xc[i];
  }
#pragma unroll
  for (int c = 0; c < CACHE; ++c) {
    const int64_t i = t + static_cast<int64_t>(c) * TPR;
    if (active && i < nchunks) {
#pragma unroll
      for (int j = 0; j < kChunk; ++j) s.add(to_float(cache[c].v[j]), ck);
    }
  }
  for (int64_t i = t + static_cast<int64_t>(CACHE) * TPR; active && i < nchunks; i += TPR) {
    const Chunk<T> v = xc[i];
#pragma unroll
    for (int j = 0; j < kChunk; ++j) s.add(to_float(v.v[j]), ck);
  }
  s = row_reduce<TPR>(s, ck);
  if (!active) return;
  float a = 0.0f, b = 0.0f;
  s.finalize(ck, mult, L, &a, &b);
  const GroupParams p = symmetric ? symmetric_params(a, q) : asymmetric_params(a, b, q);
  const ReciprocalDiv div = ReciprocalDiv::of(p.scale);
  uint8_t* row_bits = MASK ? bits + base / kChunk : nullptr;

  // The per-element form is chosen once per row (rows whose values and
  // quotients are all finite -- every row in practice -- divide without checks).
  auto emit_all = [&](auto sym, const auto& d) {
    constexpr bool kSym = decltype(sym)::value;
    auto emit = [&](int64_t i, const Chunk<T>& v) {
      Chunk<T> o;
      const uint8_t m = quantize_chunk<T, K, kSym, MASK>(v, o, d, p, q);
      yc[i] = o;
      if constexpr (MASK) row_bits[i] = m;
    };
#pragma unroll
    for (int c = 0; c < CACHE; ++c) {
      const int64_t i = t + static_cast<int64_t>(c) * TPR;
      if (i < nchunks) emit(i, cache[c]);
    }
    for (int64_t i = t + static_cast<int64_t>(CACHE) * TPR; i < nchunks; i += TPR) emit(i, xc[i]);
  };
  with_division_form<K>(div.unchecked_ok(bits_float(s.amax_bits)), symmetric, div, div.unchecked(), emit_all);
}

// Calibration only (the calibrate op and SRQ statistics of row layouts): the
// same row reduction as fused_rows_kernel with the same threads per row (so rms
// sums add in the same order), one (a, b) per row, no write of x.
template <typename T, int TPR>
__global__ void __launch_bounds__(TPR > kMinBlock ? TPR : kMinBlock)
    row_stats_kernel(const T* __restrict__ x, int64_t rows, int64_t L, CalKind ck, float mult, float* __restrict__ a,
                     float* __restrict__ b, uint32_t* __restrict__ amax_bits) {
  constexpr int kRowsPerBlock = TPR >= kMinBlock ? 1 : kMinBlock / TPR;
  const int t = threadIdx.x % TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
  const bool active = row < rows;
  const int64_t nchunks = L / kChunk;
  const Chunk<T>* xc = reinterpret_cast<const Chunk<T>*>(x + (active ? row : 0) * L);
  Stat s = Stat::empty();
  for (int64_t i = t; active && i < nchunks; i += TPR) {
    const Chunk<T> v = xc[i];
#pragma unroll
    for (int j = 0; j < kChunk; ++j) s.add(to_float(v.v[j]), ck);
  }
  s = row_reduce<TPR>(s, ck);
  if (!active || t != 0) return;
  float va = 0.0f, vb = 0.0f;
  s.finalize(ck, mult, L, &va, &vb);
  a[row] = va;
  if (b) b[row] = vb;
  if (amax_bits) amax_bits[row] = s.amax_bits;
}

template <typename T, int TPR>
void launch_stats(const T* x, int64_t rows, int64_t L, const Calibration& c, float* a, float* b, uint32_t* amax_bits) {
  constexpr int kRowsPerBlock = TPR >= kMinBlock ? 1 : kMinBlock / TPR;
  constexpr int kBlock = TPR > kMinBlock ? TPR : kMinBlock;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "qwix: too many rows for one launch: ", rows);
  row_stats_kernel<T, TPR><<<static_cast<unsigned>(blocks), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x, rows, L, cal_kind(c), c.multiplier, a, b, amax_bits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, QKind K, int TPR, int CACHE>
void launch(const T* x, T* y, uint8_t* bits, int64_t rows, int64_t L, const Calibration& c, const QParams& q) {
  constexpr int kRowsPerBlock = TPR >= kMinBlock ? 1 : kMinBlock / TPR;
  constexpr int kBlock = TPR > kMinBlock ? TPR : kMinBlock;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "qwix: too many rows for one launch: ", rows);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(blocks));
  if (bits) {
    fused_rows_kernel<T, K, TPR, CACHE, true><<<grid, kBlock, 0, stream>>>(x, y, bits, rows, L, cal_kind(c),
                                                                          c.multiplier, q, c.symmetric());
  } else {
    fused_rows_kernel<T, K, TPR, CACHE, false><<<grid, kBlock, 0, stream>>>(x, y, bits, rows, L, cal_kind(c),
                                                                           c.multiplier, q, c.symmetric());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Threads per row by row length (chunks of 8 elements): short rows share a
// block; each thread caches <= CACHE chunks. For tiles of 128 16-bit elements,
// 4 threads x 4 chunks beat 8 x 2 on an H200 (81% vs 76% of copy bandwidth).
template <typename T, QKind K>
void launch_for_length(const T* x, T* y, uint8_t* bits, int64_t rows, int64_t L, const Calibration& c,
                       const QParams& q) {
  constexpr bool k16 = sizeof(T) == 2;
  if (L <= 128) {  // e.g. tiles of 128 and MX / nvfp4 blocks
    launch<T, K, k16 ? 4 : 8, k16 ? 4 : 2>(x, y, bits, rows, L, c, q);
  } else if (L <= 8 * 32 * 2) {
    launch<T, K, 32, 2>(x, y, bits, rows, L, c, q);  // <= 512
  } else if (L <= 8 * 64 * 4) {
    launch<T, K, 64, 4>(x, y, bits, rows, L, c, q);  // <= 2048
  } else if (L <= 8 * 256 * 4) {
    launch<T, K, 256, 4>(x, y, bits, rows, L, c, q);  // <= 8192
  } else {
    launch<T, K, 512, 4>(x, y, bits, rows, L, c, q);  // longer rows re-read past 16384
  }
}

}  // namespace

bool fused_rows(const at::Tensor& xd, at::Tensor& y, at::Tensor* mask, const Layout& l, const Calibration& c,
                const QParams& q) {
  if (!l.rows() || l.num_groups <= 1 || c.is_fixed() || xd.scalar_type() == at::kDouble) return false;
  const int64_t L = l.inner(), rows = l.runs();
  if (L % kChunk != 0 || !chunk_aligned(xd.const_data_ptr(), xd.element_size()) ||
      !chunk_aligned(y.const_data_ptr(), y.element_size())) {
    return false;
  }
  uint8_t* bits = mask ? mask->mutable_data_ptr<uint8_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xd.scalar_type(), "qwix_fused_rows_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      dispatch_kind(q.kind, [&](auto kind) {
        launch_for_length<scalar_t, decltype(kind)::value>(xd.const_data_ptr<scalar_t>(),
                                                           y.mutable_data_ptr<scalar_t>(), bits, rows, L, c, q);
      });
    }
  });
  return true;
}

bool rows_calibration(const at::Tensor& xd, const Layout& l, const Calibration& c, at::Tensor& a, at::Tensor& b,
                      at::Tensor* amax_bits) {
  if (!l.rows() || l.num_groups <= 1 || c.is_fixed()) return false;
  const int64_t L = l.inner(), rows = l.runs();
  if (L % kChunk != 0 || !chunk_aligned(xd.const_data_ptr(), xd.element_size())) return false;
  float* pa = a.mutable_data_ptr<float>();
  float* pb = b.defined() ? b.mutable_data_ptr<float>() : nullptr;
  uint32_t* pm = nullptr;
  if (amax_bits) {
    *amax_bits = at::empty({l.num_groups}, xd.options().dtype(at::kInt));
    pm = reinterpret_cast<uint32_t*>(amax_bits->mutable_data_ptr<int32_t>());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xd.scalar_type(), "qwix_row_stats_cuda", [&] {
    const scalar_t* x = xd.const_data_ptr<scalar_t>();
    if (L <= 128) {
      launch_stats<scalar_t, sizeof(scalar_t) == 2 ? 4 : 8>(x, rows, L, c, pa, pb, pm);
    } else if (L <= 512) {
      launch_stats<scalar_t, 32>(x, rows, L, c, pa, pb, pm);
    } else if (L <= 2048) {
      launch_stats<scalar_t, 64>(x, rows, L, c, pa, pb, pm);
    } else if (L <= 8 * 256 * 4) {
      launch_stats<scalar_t, 256>(x, rows, L, c, pa, pb, pm);
    } else {
      launch_stats<scalar_t, 512>(x, rows, L, c, pa, pb, pm);
    }
  });
  return true;
}

}  // namespace cuda
}  // namespace qwix
