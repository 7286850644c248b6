// CUDA kernels of fake_quant_forward, fake_quant_with_scale_forward, calibrate
// and compute_scale. Same per-element math as the CPU (csrc/numerics), same
// validation and layout (csrc/ops/common, csrc/numerics/granularity).
//
// - rows layout (one contiguous run per group: per-token, per-channel, tiles of
//   the last axis), no mask: one kernel; each row is read once from DRAM into
//   registers, reduced, quantized and written with 16-byte vectors;
// - everything else: a statistics kernel (block-reduced, atomics per group),
//   a per-group parameter kernel and an apply kernel in which each thread owns 8
//   consecutive elements and so one byte of the bit-packed mask.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/device_utils.cuh"
#include "ops/common.h"

namespace qwix {
namespace cuda {
namespace {

constexpr int kApplyThreads = 256;

// ---------------------------------------------------------------- rows, fused
// THREADS threads own one row of length L; each caches up to CACHE vectors.
template <typename T, QKind K, int VEC, int THREADS, int CACHE>
__global__ void fused_rows_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int64_t L, CalKind ck,
                                  float mult, QParams q, bool symmetric) {
  constexpr int kRowsPerBlock = (THREADS >= 256 ? 1 : 256 / THREADS);
  const int sub = threadIdx.x / THREADS, t = threadIdx.x % THREADS;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + sub;
  const bool active = row < rows;
  const int64_t nvec = L / VEC;
  using V = Vec<T, VEC>;
  const V* xv = reinterpret_cast<const V*>(x + (active ? row : 0) * L);
  V* yv = reinterpret_cast<V*>(y + (active ? row : 0) * L);

  V cache[CACHE];
  Stat s = Stat::empty();
#pragma unroll
  for (int c = 0; c < CACHE; ++c) {
    const int64_t i = t + static_cast<int64_t>(c) * THREADS;
    if (active && i < nvec) {
      cache[c] = xv[i];
#pragma unroll
      for (int j = 0; j < VEC; ++j) s.add(to_float(cache[c].v[j]), ck);
    }
  }
  for (int64_t i = t + static_cast<int64_t>(CACHE) * THREADS; active && i < nvec; i += THREADS) {
    const V v = xv[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) s.add(to_float(v.v[j]), ck);
  }
  if constexpr (THREADS == 32 || THREADS >= 256) {
    s = block_reduce_all<THREADS>(s);
  }
  float a = 0.0f, b = 0.0f;
  s.finalize(ck, mult, L, &a, &b);
  const GroupParams p = symmetric ? symmetric_params(a, q) : asymmetric_params(a, b, q);
  if (!active) return;
#pragma unroll
  for (int c = 0; c < CACHE; ++c) {
    const int64_t i = t + static_cast<int64_t>(c) * THREADS;
    if (i < nvec) {
      V o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) o.v[j] = from_float<T>(fake_quant_value<K>(to_float(cache[c].v[j]), p.scale, p.zero_point, q));
      yv[i] = o;
    }
  }
  for (int64_t i = t + static_cast<int64_t>(CACHE) * THREADS; i < nvec; i += THREADS) {
    const V v = xv[i];
    V o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = from_float<T>(fake_quant_value<K>(to_float(v.v[j]), p.scale, p.zero_point, q));
    yv[i] = o;
  }
}

// ------------------------------------------------------------ generic: stats
// Each thread walks a contiguous span, flushing its statistic when the group changes.
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

template <typename T>
__global__ void stats_kernel(const T* __restrict__ x, int64_t n, DeviceLayout l, CalKind ck, int64_t span,
                             uint32_t* abs_bits, int32_t* mn, int32_t* mx, double* sumsq) {
  Stat s = Stat::empty();
  if (l.num_groups == 1) {  // per-tensor: coalesced reads, block reduce, one atomic per block
    const int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x * span + threadIdx.x;
    for (int64_t k = 0; k < span; ++k) {
      const int64_t i = base + k * blockDim.x;
      if (i < n) s.add(to_float(x[i]), ck);
    }
    s = block_reduce_all<kApplyThreads>(s);
    if (threadIdx.x == 0) flush(s, 0, ck, abs_bits, mn, mx, sumsq);
    return;
  }
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * span;
  if (begin >= n) return;
  int64_t g = l.group_of(begin);
  for (int64_t i = begin; i < n && i < begin + span; ++i) {
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

// Per group: raw statistic -> calibration (a, b); optionally -> parameters.
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

// Calibration -> parameters (kind 0: symmetric; 1: asymmetric; 2: given scale/zero point).
__global__ void params_kernel(int64_t groups, int kind, QParams q, const float* a, const float* b, float* scale,
                              float* zp, float* lo, float* hi) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  const GroupParams p = kind == 0   ? symmetric_params(a[g], q)
                        : kind == 1 ? asymmetric_params(a[g], b[g], q)
                                    : given_params(a[g], b ? b[g] : 0.0f, q);
  scale[g] = p.scale;
  if (zp) zp[g] = p.zero_point;
  if (lo) lo[g] = p.lo;
  if (hi) hi[g] = p.hi;
}

// ------------------------------------------------------------ generic: apply
template <typename T, QKind K>
__global__ void apply_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n, DeviceLayout l, QParams q,
                             const float* __restrict__ scale, const float* __restrict__ zp,
                             const float* __restrict__ lo, const float* __restrict__ hi, uint8_t* __restrict__ bits) {
  const int64_t byte = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t begin = byte * 8;
  if (begin >= n) return;
  uint8_t m = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int64_t i = begin + j;
    if (i < n) {
      const int64_t g = l.group_of(i);
      const float v = to_float(x[i]);
      y[i] = from_float<T>(fake_quant_value<K>(v, scale[g], zp[g], q));
      m |= static_cast<uint8_t>(in_range(v, lo[g], hi[g])) << j;
    }
  }
  if (bits) bits[byte] = m;
}

// ------------------------------------------------------------------- host side
DeviceLayout device_layout(const Layout& l) {
  TORCH_CHECK(static_cast<int>(l.seg_size.size()) <= kMaxSegments, "qwix: layout with ", l.seg_size.size(),
              " segments exceeds the CUDA kernels' limit of ", kMaxSegments);
  DeviceLayout d{};
  d.nseg = static_cast<int>(l.seg_size.size());
  for (int s = 0; s < d.nseg; ++s) {  // innermost first
    d.size[s] = l.seg_size[d.nseg - 1 - s];
    d.kept[s] = l.seg_kept[d.nseg - 1 - s];
  }
  d.num_groups = l.num_groups;
  return d;
}

int64_t blocks_for(int64_t n, int64_t per_block) { return (n + per_block - 1) / per_block; }

// Per-group calibration [a, b] (b only for asymmetric methods) in group order.
void group_calibration(const at::Tensor& xd, const Layout& l, const Calibration& c, at::Tensor& a, at::Tensor& b) {
  const int64_t G = l.num_groups;
  auto opts = xd.options();
  a = at::empty({G}, opts.dtype(at::kFloat));
  b = c.symmetric() ? at::Tensor() : at::empty({G}, opts.dtype(at::kFloat));
  if (c.is_fixed() || l.numel == 0) {
    a.fill_(c.is_fixed() ? (c.symmetric() ? c.fixed_hi : c.fixed_lo) : 0.0f);
    if (b.defined()) b.fill_(c.is_fixed() ? c.fixed_hi : 0.0f);
    return;
  }
  const CalKind ck = cal_kind(c);
  at::Tensor abs_bits = at::zeros({G}, opts.dtype(at::kInt));
  at::Tensor mn = at::full({G}, std::numeric_limits<int32_t>::max(), opts.dtype(at::kInt));
  at::Tensor mx = at::full({G}, std::numeric_limits<int32_t>::min(), opts.dtype(at::kInt));
  at::Tensor ss = at::zeros({G}, opts.dtype(at::kDouble));
  const DeviceLayout d = device_layout(l);
  const int64_t span = 16;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xd.scalar_type(), "qwix_stats_cuda", [&] {
    stats_kernel<scalar_t><<<blocks_for(l.numel, kApplyThreads * span), kApplyThreads, 0, stream>>>(
        xd.const_data_ptr<scalar_t>(), l.numel, d, ck, span, reinterpret_cast<uint32_t*>(abs_bits.data_ptr<int32_t>()),
        mn.data_ptr<int32_t>(), mx.data_ptr<int32_t>(), ss.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  finalize_kernel<<<blocks_for(G, 256), 256, 0, stream>>>(
      G, l.numel / G, ck, c.multiplier, reinterpret_cast<const uint32_t*>(abs_bits.const_data_ptr<int32_t>()),
      mn.const_data_ptr<int32_t>(), mx.const_data_ptr<int32_t>(), ss.const_data_ptr<double>(),
      a.mutable_data_ptr<float>(), b.defined() ? b.mutable_data_ptr<float>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct DeviceParams {
  at::Tensor scale, zp, lo, hi;
};

DeviceParams device_params(int kind, const QParams& q, const at::Tensor& a, const at::Tensor& b) {
  const int64_t G = a.numel();
  DeviceParams p{at::empty_like(a), at::empty_like(a), at::empty_like(a), at::empty_like(a)};
  params_kernel<<<blocks_for(G, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      G, kind, q, a.const_data_ptr<float>(), b.defined() ? b.const_data_ptr<float>() : nullptr,
      p.scale.mutable_data_ptr<float>(), p.zp.mutable_data_ptr<float>(), p.lo.mutable_data_ptr<float>(),
      p.hi.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return p;
}

void apply(const at::Tensor& xd, at::Tensor& y, at::Tensor& mask, bool with_mask, const Layout& l, const QParams& q,
           const DeviceParams& p) {
  const DeviceLayout d = device_layout(l);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xd.scalar_type(), "qwix_apply_cuda", [&] {
    dispatch_kind(q.kind, [&](auto kind) {
      apply_kernel<scalar_t, decltype(kind)::value>
          <<<blocks_for((l.numel + 7) / 8, kApplyThreads), kApplyThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              xd.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), l.numel, d, q,
              p.scale.const_data_ptr<float>(), p.zp.const_data_ptr<float>(), p.lo.const_data_ptr<float>(),
              p.hi.const_data_ptr<float>(), with_mask ? mask.mutable_data_ptr<uint8_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

template <typename T, QKind K, int VEC, int THREADS, int CACHE>
void launch_fused_rows(const T* x, T* y, int64_t rows, int64_t L, const Calibration& c, const QParams& q) {
  constexpr int kRowsPerBlock = THREADS >= 256 ? 1 : 256 / THREADS;
  constexpr int kBlock = THREADS >= 256 ? THREADS : 256;
  fused_rows_kernel<T, K, VEC, THREADS, CACHE>
      <<<blocks_for(rows, kRowsPerBlock), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x, y, rows, L, cal_kind(c), c.multiplier, q, c.symmetric());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One row per warp for short rows, one per 512-thread block for long ones.
template <typename T, QKind K>
bool try_fused_rows(const at::Tensor& xd, at::Tensor& y, const Layout& l, const Calibration& c, const QParams& q) {
  constexpr int V = kVec<T>;
  const int64_t L = l.inner(), rows = l.runs();
  const bool aligned = reinterpret_cast<uintptr_t>(xd.const_data_ptr()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(y.const_data_ptr()) % 16 == 0 && L % V == 0;
  if (!aligned || rows > std::numeric_limits<int32_t>::max()) return false;
  const T* px = xd.const_data_ptr<T>();
  T* py = y.mutable_data_ptr<T>();
  if (L <= 32 * V * 8) {
    launch_fused_rows<T, K, V, 32, 8>(px, py, rows, L, c, q);
  } else {
    launch_fused_rows<T, K, V, 512, 8>(px, py, rows, L, c, q);
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor> fake_quant_forward_cuda(const at::Tensor& x, c10::string_view qtype,
                                                           c10::string_view method, at::IntArrayRef ch,
                                                           at::IntArrayRef tiled, at::IntArrayRef tiles,
                                                           bool with_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  const std::string qname(qtype);
  const DynamicSpec spec = make_dynamic_spec(x, &qname, std::string(method), ch, tiled, tiles);
  const at::Tensor xd = dense_input(x);
  at::Tensor y = at::empty_like(xd);
  at::Tensor mask = at::zeros({mask_bytes(x.numel(), with_mask)}, x.options().dtype(at::kByte));
  if (x.numel() == 0) return {y, mask};
  const Layout l = make_layout(xd.sizes(), xd.strides(), spec.groups);
  const QParams q = spec.qtype.p;
  const Calibration& c = spec.calibration;
  if (!with_mask && l.rows() && l.num_groups > 1 && !c.is_fixed() && xd.scalar_type() != at::kDouble) {
    bool done = false;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xd.scalar_type(), "qwix_fused_rows_cuda", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        dispatch_kind(q.kind, [&](auto kind) { done = try_fused_rows<scalar_t, decltype(kind)::value>(xd, y, l, c, q); });
      }
    });
    if (done) return {y, mask};
  }
  at::Tensor a, b;
  group_calibration(xd, l, c, a, b);
  apply(xd, y, mask, with_mask, l, q, device_params(c.symmetric() ? 0 : 1, q, a, b));
  return {y, mask};
}

std::tuple<at::Tensor, at::Tensor> fake_quant_with_scale_forward_cuda(const at::Tensor& x, const at::Tensor& scale,
                                                                      const c10::optional<at::Tensor>& zero_point,
                                                                      c10::string_view qtype, bool with_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  const QType qt = parse_qtype(std::string(qtype));
  const Groups groups = check_scale_args(x, scale, zero_point, qt);
  const at::Tensor xd = dense_input(x);
  at::Tensor y = at::empty_like(xd);
  at::Tensor mask = at::zeros({mask_bytes(x.numel(), with_mask)}, x.options().dtype(at::kByte));
  if (x.numel() == 0) return {y, mask};
  const Layout l = make_layout(xd.sizes(), xd.strides(), groups);
  const at::Tensor s = to_group_order(scale, groups, l);
  const at::Tensor z = zero_point.has_value() ? to_group_order(*zero_point, groups, l) : at::Tensor();
  apply(xd, y, mask, with_mask, l, qt.p, device_params(2, qt.p, s, z));
  return {y, mask};
}

std::vector<at::Tensor> calibrate_cuda(const at::Tensor& x, c10::string_view method, at::IntArrayRef ch,
                                       at::IntArrayRef tiled, at::IntArrayRef tiles) {
  const c10::cuda::CUDAGuard guard(x.device());
  const DynamicSpec spec = make_dynamic_spec(x, nullptr, std::string(method), ch, tiled, tiles);
  const at::Tensor xd = dense_input(x);
  const Layout l = make_layout(xd.sizes(), xd.strides(), spec.groups);
  at::Tensor a, b;
  group_calibration(xd, l, spec.calibration, a, b);
  if (!b.defined()) return {from_group_order(a, spec.groups, l)};
  return {from_group_order(a, spec.groups, l), from_group_order(b, spec.groups, l)};
}

std::vector<at::Tensor> compute_scale_cuda(at::TensorList calibration, c10::string_view qtype) {
  const c10::cuda::CUDAGuard guard(calibration[0].device());
  const QType qt = parse_qtype(std::string(qtype));
  check_calibration_list(calibration, &qt);
  const at::Tensor a = calibration[0].contiguous();
  const at::Tensor b = calibration.size() == 2 ? calibration[1].contiguous() : at::Tensor();
  const DeviceParams p = device_params(b.defined() ? 1 : 0, qt.p, a, b);
  if (!b.defined()) return {p.scale.view(a.sizes())};
  return {p.scale.view(a.sizes()), p.zp.view(a.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(qwix, CUDA, m) {
  m.impl("fake_quant_forward", &fake_quant_forward_cuda);
  m.impl("fake_quant_with_scale_forward", &fake_quant_with_scale_forward_cuda);
  m.impl("calibrate", &calibrate_cuda);
  m.impl("compute_scale", &compute_scale_cuda);
}

}  // namespace cuda
}  // namespace qwix
