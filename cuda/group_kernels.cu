// Kernels for the layouts the fused row kernel does not cover: per-group
// statistics, calibration -> parameters, and apply. Per-tensor reads x once per
// pass with a block reduction; "columns" layouts (groups along the innermost,
// contiguous axis, e.g. per-channel of the last axis) give each thread 8
// adjacent columns over a span of rows, so loads stay coalesced 16-byte vectors
// and each group's parameters are read once; any other layout walks elements.
// In apply, each thread owns 8 consecutive elements: one byte of the mask.
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

constexpr int kThreads = 256;
constexpr int64_t kSpan = 16;  // chunks (per-tensor) or elements (grouped) per thread

__device__ __forceinline__ void flush(const Stat& s, int64_t g, CalKind ck, uint32_t* abs_bits, int32_t* mn,
                                      int32_t* mx, double* sumsq) {
  atomicMax(abs_bits + g, s.amax_bits);
  if (ck == CalKind::MinMax) {
    atomicMin(mn + g, s.mn);
    atomicMax(mx + g, s.mx);
  } else if (ck == CalKind::Rms) {
    atomicAdd(sumsq + g, s.sumsq);
  }
}

// Per-tensor: coalesced chunk reads (scalar when x is not aligned), one block
// reduction and one atomic per block.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    tensor_stats_kernel(const T* __restrict__ x, int64_t n, bool aligned, CalKind ck, uint32_t* abs_bits,
                        int32_t* mn, int32_t* mx, double* sumsq) {
  Stat s = Stat::empty();
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads * kSpan + threadIdx.x;
  if (aligned) {
    const int64_t nchunks = n / kChunk;
    const Chunk<T>* xc = reinterpret_cast<const Chunk<T>*>(x);
#pragma unroll 4
    for (int64_t k = 0; k < kSpan; ++k) {
      const int64_t c = first + k * kThreads;
      if (c < nchunks) {
        const Chunk<T> v = xc[c];
#pragma unroll
        for (int j = 0; j < kChunk; ++j) s.add(to_float(v.v[j]), ck);
      }
    }
    // The tail past the last whole chunk (< 8 elements) goes to block 0.
    if (blockIdx.x == 0 && threadIdx.x < n - nchunks * kChunk) s.add(to_float(x[nchunks * kChunk + threadIdx.x]), ck);
  } else {
    for (int64_t k = 0; k < kSpan * kChunk; ++k) {
      const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads * kSpan * kChunk + k * kThreads + threadIdx.x;
      if (i < n) s.add(to_float(x[i]), ck);
    }
  }
  s = block_reduce_all<kThreads>(s, ck);
  if (threadIdx.x == 0) flush(s, 0, ck, abs_bits, mn, mx, sumsq);
}

// Any grouping: each thread walks kSpan consecutive elements, flushing its
// statistic with atomics when the group changes.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    grouped_stats_kernel(const T* __restrict__ x, int64_t n, DeviceLayout l, CalKind ck, uint32_t* abs_bits,
                         int32_t* mn, int32_t* mx, double* sumsq) {
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kSpan;
  if (begin >= n) return;
  Stat s = Stat::empty();
  int64_t g = l.group_of(begin);
  for (int64_t i = begin; i < n && i < begin + kSpan; ++i) {
    const int64_t gi = l.group_of(i);
    if (gi != g) {
      flush(s, g, ck, abs_bits, mn, mx, sumsq);
      s = Stat::empty();
      g = gi;
    }
    s.add(to_float(x[i]), ck);
  }
  flush(s, g, ck, abs_bits, mn, mx, sumsq);
}

// Per group: raw statistic -> calibration (a, b).
__global__ void finalize_kernel(int64_t groups, int64_t count, CalKind ck, float mult, const uint32_t* abs_bits,
                                const int32_t* mn, const int32_t* mx, const double* sumsq, float* a, float* b) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  Stat s{abs_bits[g], mn[g], mx[g], sumsq[g]};
  float va = 0.0f, vb = 0.0f;
  s.finalize(ck, mult, count, &va, &vb);
  a[g] = va;
  if (b) b[g] = vb;
}

__global__ void params_kernel(int64_t groups, ParamsFrom from, QParams q, const float* a, const float* b,
                              const uint32_t* amax_bits, PackedParams* out) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  const GroupParams p = from == ParamsFrom::Symmetric    ? symmetric_params(a[g], q)
                        : from == ParamsFrom::Asymmetric ? asymmetric_params(a[g], b[g], q)
                                                         : given_params(a[g], b ? b[g] : 0.0f, q);
  const float amax = amax_bits ? bits_float(amax_bits[g]) : __int_as_float(0x7f800000);  // +Inf: unknown
  out[g] = PackedParams{p.scale, 1.0f / p.scale, p.zero_point, p.lo, p.hi, amax, {0.0f, 0.0f}};
}

template <typename T, QKind K>
__device__ __forceinline__ T apply_one(T xv, const PackedParams& p, const ReciprocalDiv& div, const QParams& q,
                                       uint8_t& m, int j) {
  const float v = to_float(xv);
  m |= static_cast<uint8_t>(in_range(v, p.lo, p.hi)) << j;
  return from_float<T>(fake_quant_value<K>(v, div, p.scale, p.zero_point, q));
}

// Parameters of the last group seen, reloaded when the group changes.
struct GroupCache {
  int64_t g = -1;
  PackedParams p;
  ReciprocalDiv div;
  __device__ __forceinline__ void at(int64_t group, const PackedParams* P) {
    if (group != g) {
      g = group;
      p = P[group];
      div = p.div();
    }
  }
};

template <typename T, QKind K>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n, bool aligned, bool chunk_groups,
                 DeviceLayout l, QParams q, const PackedParams* __restrict__ P, uint8_t* __restrict__ bits) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t begin = c * kChunk;
  if (begin >= n) return;
  uint8_t m = 0;
  GroupCache gc;
  if (aligned && begin + kChunk <= n) {
    const Chunk<T> v = reinterpret_cast<const Chunk<T>*>(x)[c];
    Chunk<T> o;
    if (chunk_groups) {  // the chunk's 8 elements share one group
      const PackedParams& p = P[l.group_of(begin)];
      m = bits ? quantize_group_chunk<T, K, true>(v, o, p, q) : quantize_group_chunk<T, K, false>(v, o, p, q);
    } else {
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        gc.at(l.group_of(begin + j), P);
        o.v[j] = apply_one<T, K>(v.v[j], gc.p, gc.div, q, m, j);
      }
    }
    reinterpret_cast<Chunk<T>*>(y)[c] = o;
  } else {
    for (int j = 0; j < kChunk && begin + j < n; ++j) {
      gc.at(l.group_of(begin + j), P);
      y[begin + j] = apply_one<T, K>(x[begin + j], gc.p, gc.div, q, m, j);
    }
  }
  if (bits) bits[c] = m;
}

// ---------------------------------------------------------------- columns
// x viewed as [outer, rows, cols] with group (o, c): blockIdx.z = o, blockIdx.y
// = a span of kRowSpan rows, threads = chunks of 8 columns.
constexpr int64_t kRowSpan = 64;
// Columns apply: rows whose chunks a thread loads before computing any (64 bytes in flight).
template <typename T>
constexpr int kRowsInFlight = sizeof(Chunk<T>) >= 64 ? 1 : static_cast<int>(64 / sizeof(Chunk<T>));
struct Columns {
  int64_t outer, rows, cols;
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    columns_stats_kernel(const T* __restrict__ x, Columns cs, CalKind ck, uint32_t* abs_bits, int32_t* mn,
                         int32_t* mx, double* sumsq) {
  const int64_t cc = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (cc * kChunk >= cs.cols) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRowSpan, o = blockIdx.z;
  const int64_t r1 = r0 + kRowSpan < cs.rows ? r0 + kRowSpan : cs.rows;
  const T* base = x + o * cs.rows * cs.cols + cc * kChunk;
  Stat s[kChunk];
#pragma unroll
  for (int j = 0; j < kChunk; ++j) s[j] = Stat::empty();
#pragma unroll 4
  for (int64_t r = r0; r < r1; ++r) {
    const Chunk<T> v = *reinterpret_cast<const Chunk<T>*>(base + r * cs.cols);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) s[j].add(to_float(v.v[j]), ck);
  }
#pragma unroll
  for (int j = 0; j < kChunk; ++j) flush(s[j], o * cs.cols + cc * kChunk + j, ck, abs_bits, mn, mx, sumsq);
}

template <typename T, QKind K>
__global__ void __launch_bounds__(kThreads)
    columns_apply_kernel(const T* __restrict__ x, T* __restrict__ y, Columns cs, QParams q,
                         const PackedParams* __restrict__ P, uint8_t* __restrict__ bits) {
  const int64_t cc = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (cc * kChunk >= cs.cols) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRowSpan, o = blockIdx.z;
  const int64_t r1 = r0 + kRowSpan < cs.rows ? r0 + kRowSpan : cs.rows;
  PackedParams p[kChunk];
  ReciprocalDiv div[kChunk];
  UncheckedDiv fast[kChunk];
  bool unchecked = true, symmetric = true;  // all 8 columns' groups (from their statistics)
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    p[j] = P[o * cs.cols + cc * kChunk + j];
    div[j] = p[j].div();
    fast[j] = div[j].unchecked();
    unchecked &= div[j].unchecked_ok(p[j].amax);
    symmetric &= p[j].zero_point == 0.0f;
  }
  // This thread's chunk of row 0 of its outer slice, and the chunk stride between rows. Vector
  // pointers computed once: indexing T pointers (y + e) left nvcc unsure of their alignment, and it
  // split each 16-byte store of 16-bit types into 4-byte and 2-byte stores.
  const int64_t first = (o * cs.rows) * cs.cols / kChunk + cc, stride = cs.cols / kChunk;
  const Chunk<T>* __restrict__ xc = reinterpret_cast<const Chunk<T>*>(x) + first;
  Chunk<T>* __restrict__ yc = reinterpret_cast<Chunk<T>*>(y) + first;
  // The per-element form is chosen once per thread, for its 8 columns together. kRowsInFlight rows
  // are loaded before any is computed: one load in flight per thread left the kernel latency-bound
  // (bf16 took as long as fp32 on an H200: 18% of copy bandwidth).
  auto rows_loop = [&](auto sym, const auto& d) {
    for (int64_t r = r0; r < r1; r += kRowsInFlight<T>) {
      Chunk<T> v[kRowsInFlight<T>];
#pragma unroll
      for (int u = 0; u < kRowsInFlight<T>; ++u)
        if (r + u < r1) v[u] = xc[(r + u) * stride];
#pragma unroll
      for (int u = 0; u < kRowsInFlight<T>; ++u) {
        if (r + u >= r1) break;
        Chunk<T> out;
        uint8_t m = 0;
#pragma unroll
        for (int j = 0; j < kChunk; ++j) {
          const float f = to_float(v[u].v[j]);
          m |= static_cast<uint8_t>(in_range(f, p[j].lo, p[j].hi)) << j;
          out.v[j] =
              from_float<T>(fake_quant_value<K, decltype(sym)::value>(f, d[j], p[j].scale, p[j].zero_point, q));
        }
        yc[(r + u) * stride] = out;
        if (bits) bits[first + (r + u) * stride] = m;
      }
    }
  };
  with_division_form<K>(unchecked, symmetric, div, fast, rows_loop);
}

// The columns view of a layout, when it has one the kernels can launch.
bool columns_of(const Layout& l, const void* x, const void* y, size_t elem, Columns* cs) {
  const size_t n = l.seg_size.size();
  if (!l.inner_kept() || n < 2 || n > 3) return false;  // segments alternate: [kept,] reduced, kept
  *cs = Columns{n == 3 ? l.seg_size[0] : 1, l.seg_size[n - 2], l.seg_size[n - 1]};
  return cs->cols % kChunk == 0 && chunk_aligned(x, elem) && (y == nullptr || chunk_aligned(y, elem)) &&
         cs->outer <= 65535 && (cs->rows + kRowSpan - 1) / kRowSpan <= 65535;
}

dim3 columns_grid(const Columns& cs) {
  return dim3(static_cast<unsigned>((cs.cols / kChunk + kThreads - 1) / kThreads),
              static_cast<unsigned>((cs.rows + kRowSpan - 1) / kRowSpan), static_cast<unsigned>(cs.outer));
}

// Tensors of up to this many elements take 32-bit index math in group_of (the CUDA emulator's build
// lowers it, so its tests run the 64-bit path too).
#ifndef QWIX_CUDA_INDEX32_MAX
#define QWIX_CUDA_INDEX32_MAX 2147483647LL
#endif

DeviceLayout device_layout(const Layout& l) {
  TORCH_CHECK(static_cast<int>(l.seg_size.size()) <= kMaxSegments, "qwix: layout with ", l.seg_size.size(),
              " segments exceeds the CUDA kernels' limit of ", kMaxSegments);
  DeviceLayout d{};
  d.nseg = static_cast<int>(l.seg_size.size());
  d.small = l.numel <= QWIX_CUDA_INDEX32_MAX;
  for (int s = 0; s < d.nseg; ++s) {  // innermost first
    d.size[s] = l.seg_size[d.nseg - 1 - s];
    d.kept[s] = l.seg_kept[d.nseg - 1 - s];
    if (d.small) d.div32[s] = at::cuda::detail::IntDivider<unsigned int>(static_cast<unsigned int>(d.size[s]));
  }
  d.num_groups = l.num_groups;
  return d;
}

unsigned blocks_for(int64_t n, int64_t per_block) {
  const int64_t b = (n + per_block - 1) / per_block;
  TORCH_CHECK(b <= std::numeric_limits<int32_t>::max(), "qwix: tensor too large for one launch (", n, " items)");
  return static_cast<unsigned>(b);
}

}  // namespace

void group_calibration(const at::Tensor& xd, const Layout& l, const Calibration& c, at::Tensor& a, at::Tensor& b,
                       at::Tensor* amax_bits) {
  const int64_t G = l.num_groups;
  auto opts = xd.options();
  a = at::empty({G}, opts.dtype(at::kFloat));
  b = c.symmetric() ? at::Tensor() : at::empty({G}, opts.dtype(at::kFloat));
  if (c.is_fixed() || l.numel == 0) {
    a.fill_(c.is_fixed() ? (c.symmetric() ? c.fixed_hi : c.fixed_lo) : 0.0f);
    if (b.defined()) b.fill_(c.is_fixed() ? c.fixed_hi : 0.0f);
    return;
  }
  if (rows_calibration(xd, l, c, a, b, amax_bits)) return;
  const CalKind ck = cal_kind(c);
  at::Tensor abs_bits = at::zeros({G}, opts.dtype(at::kInt));
  at::Tensor mn = at::full({G}, std::numeric_limits<int32_t>::max(), opts.dtype(at::kInt));
  at::Tensor mx = at::full({G}, std::numeric_limits<int32_t>::min(), opts.dtype(at::kInt));
  at::Tensor ss = at::zeros({G}, opts.dtype(at::kDouble));
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto* pa = reinterpret_cast<uint32_t*>(abs_bits.mutable_data_ptr<int32_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xd.scalar_type(), "qwix_stats_cuda", [&] {
    const scalar_t* px = xd.const_data_ptr<scalar_t>();
    if (G == 1) {
      const bool aligned = chunk_aligned(px, sizeof(scalar_t));
      const int64_t items = aligned ? l.numel / kChunk : (l.numel + kChunk - 1) / kChunk;
      tensor_stats_kernel<scalar_t><<<blocks_for(std::max<int64_t>(items, 1), kThreads * kSpan), kThreads, 0,
                                      stream>>>(px, l.numel, aligned, ck, pa, mn.mutable_data_ptr<int32_t>(),
                                                mx.mutable_data_ptr<int32_t>(), ss.mutable_data_ptr<double>());
    } else if (Columns cs; columns_of(l, px, nullptr, sizeof(scalar_t), &cs)) {
      columns_stats_kernel<scalar_t><<<columns_grid(cs), kThreads, 0, stream>>>(
          px, cs, ck, pa, mn.mutable_data_ptr<int32_t>(), mx.mutable_data_ptr<int32_t>(), ss.mutable_data_ptr<double>());
    } else {
      grouped_stats_kernel<scalar_t><<<blocks_for(l.numel, kThreads * kSpan), kThreads, 0, stream>>>(
          px, l.numel, device_layout(l), ck, pa, mn.mutable_data_ptr<int32_t>(), mx.mutable_data_ptr<int32_t>(),
          ss.mutable_data_ptr<double>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  finalize_kernel<<<blocks_for(G, 256), 256, 0, stream>>>(G, l.numel / G, ck, c.multiplier, pa,
                                                          mn.const_data_ptr<int32_t>(), mx.const_data_ptr<int32_t>(),
                                                          ss.const_data_ptr<double>(), a.mutable_data_ptr<float>(),
                                                          b.defined() ? b.mutable_data_ptr<float>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (amax_bits) *amax_bits = abs_bits;
}

DeviceParams device_params(ParamsFrom from, const QParams& q, const at::Tensor& a, const at::Tensor& b,
                           const at::Tensor& amax_bits) {
  const int64_t G = a.numel();
  DeviceParams p{at::empty({G, 8}, a.options().dtype(at::kFloat))};
  if (G == 0) return p;
  params_kernel<<<blocks_for(G, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      G, from, q, a.const_data_ptr<float>(), b.defined() ? b.const_data_ptr<float>() : nullptr,
      amax_bits.defined() ? reinterpret_cast<const uint32_t*>(amax_bits.const_data_ptr<int32_t>()) : nullptr,
      reinterpret_cast<PackedParams*>(p.packed.mutable_data_ptr<float>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return p;
}

void apply(const at::Tensor& xd, at::Tensor& y, at::Tensor* mask, const Layout& l, const QParams& q,
           const DeviceParams& p) {
  if (l.numel == 0) return;
  const auto* P = reinterpret_cast<const PackedParams*>(p.packed.const_data_ptr<float>());
  uint8_t* bits = mask ? mask->mutable_data_ptr<uint8_t>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xd.scalar_type(), "qwix_apply_cuda", [&] {
    const scalar_t* px = xd.const_data_ptr<scalar_t>();
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    Columns cs;
    const bool columns = l.num_groups > 1 && columns_of(l, px, py, sizeof(scalar_t), &cs);
    const bool aligned = chunk_aligned(px, sizeof(scalar_t)) && chunk_aligned(py, sizeof(scalar_t));
    const DeviceLayout d = columns ? DeviceLayout{} : device_layout(l);
    // Groups constant over runs of a multiple of 8 elements (per-tensor; SRQ's per-token
    // scales [1, T, 1] of [B, T, E] activations): one parameter lookup per chunk.
    const bool chunk_groups = l.num_groups == 1 || (!l.inner_kept() && l.inner() % kChunk == 0);
    dispatch_kind(q.kind, [&](auto kind) {
      constexpr QKind K = decltype(kind)::value;
      if (columns) {
        columns_apply_kernel<scalar_t, K><<<columns_grid(cs), kThreads, 0, stream>>>(px, py, cs, q, P, bits);
      } else {
        apply_kernel<scalar_t, K><<<blocks_for((l.numel + kChunk - 1) / kChunk, kThreads), kThreads, 0, stream>>>(
            px, py, l.numel, aligned, chunk_groups, d, q, P, bits);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace cuda
}  // namespace qwix
