// CPU kernels of fake_quant_forward and fake_quant_with_scale_forward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "ops/common.h"
#include "ops/cpu/group_stats.h"
#include "ops/cpu/huge_pages.h"
#include "ops/cpu/loops.h"
#include "ops/cpu/parallel.h"
#include "ops/nvfp4.h"

namespace qwix {
namespace cpu {
namespace {

constexpr int64_t kMaskPiece = 2048;  // elements whose mask bytes are staged on the stack

// Per-group parameters, structure of arrays (the inner-kept loop reads them as vectors).
struct ParamArrays {
  std::vector<float> scale, zp, lo, hi;
  explicit ParamArrays(int64_t n) : scale(n), zp(n), lo(n), hi(n) {}
  void set(int64_t g, const GroupParams& p) {
    scale[g] = p.scale;
    zp[g] = p.zero_point;
    lo[g] = p.lo;
    hi[g] = p.hi;
  }
  GroupParams get(int64_t g) const { return {scale[g], zp[g], lo[g], hi[g]}; }
};

// Applies one group's parameters to a run, staging mask bytes when a mask is wanted.
template <typename T, QKind K>
void apply_piece(const T* x, T* y, int64_t pos, int64_t len, const GroupParams& p, const QParams& q,
                 uint8_t* bits) {
  if (!bits) return apply_run<T, K>(x + pos, y + pos, len, p, q, nullptr);
  uint8_t m[kMaskPiece];
  for (int64_t o = 0; o < len; o += kMaskPiece) {
    const int64_t n = std::min(kMaskPiece, len - o);
    apply_run<T, K>(x + pos + o, y + pos + o, n, p, q, m);
    pack_bits(m, n, bits, pos + o);
  }
}

template <typename T, QKind K>
void apply_groups(const T* x, T* y, uint8_t* bits, const Layout& l, const ParamArrays& P, const QParams& q) {
  parallel_chunks(l.numel, 8, kMinChunk, [&](int64_t, int64_t b, int64_t e) {
    for_each_piece(l, b, e, [&](int64_t pos, int64_t len, int64_t g) {
      if (!l.inner_kept()) return apply_piece<T, K>(x, y, pos, len, P.get(g), q, bits);
      uint8_t m[kMaskPiece];
      for (int64_t o = 0; o < len; o += kMaskPiece) {
        const int64_t n = std::min(kMaskPiece, len - o), gg = g + o;
        apply_run_grouped<T, K>(x + pos + o, y + pos + o, n, &P.scale[gg], &P.zp[gg], &P.lo[gg], &P.hi[gg], q,
                                bits ? m : nullptr);
        if (bits) pack_bits(m, n, bits, pos + o);
      }
    });
  });
}

// One pass over memory: each row (a whole group) is calibrated and quantized while it is in cache.
template <typename T, QKind K>
void fused_rows(const T* x, T* y, uint8_t* bits, const Layout& l, const Calibration& c, const QParams& q) {
  const int64_t L = l.inner(), rows = l.runs();
  parallel_chunks(rows, rows_align(L), std::max<int64_t>(1, kMinChunk / L), [&](int64_t, int64_t r0, int64_t r1) {
    if (!bits && c.kind == Calibration::Kind::AbsMax) {
      return fused_absmax_rows<T, K>(x + r0 * L, y + r0 * L, r1 - r0, L, c.multiplier, q);
    }
    for (int64_t r = r0; r < r1; ++r) {
      float a = 0.0f, b = 0.0f;
      run_calibration(x + r * L, L, c, &a, &b);
      apply_piece<T, K>(x, y, r * L, L, params_from_calibration(c, q, a, b), q, bits);
    }
  });
}

at::Tensor new_mask(const at::Tensor& x, bool with_mask) {
  return at::zeros({mask_bytes(x.numel(), with_mask)}, x.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> fake_quant_forward_cpu(const at::Tensor& x, c10::string_view qtype,
                                                          c10::string_view method, at::IntArrayRef channelwise_axes,
                                                          at::IntArrayRef tiled_axes, at::IntArrayRef tile_sizes,
                                                          bool with_mask) {
  const std::string qname(qtype);
  const DynamicSpec spec = make_dynamic_spec(x, &qname, std::string(method), channelwise_axes, tiled_axes, tile_sizes);
  if (spec.qtype.two_level && x.numel() > 0) return nvfp4_fake_quant_forward(x, with_mask);
  const at::Tensor xd = dense_input(x);
  at::Tensor y = at::empty_like(xd);
  advise_huge_pages(y);
  at::Tensor mask = new_mask(x, with_mask);
  if (x.numel() == 0) return {y, mask};
  const Layout l = make_layout(xd.sizes(), xd.strides(), spec.groups);
  const QParams q = spec.qtype.p;
  uint8_t* bits = with_mask ? mask.data_ptr<uint8_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "qwix_fake_quant", [&] {
    const scalar_t* px = xd.const_data_ptr<scalar_t>();
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    dispatch_kind(q.kind, [&](auto kind) {
      constexpr QKind K = decltype(kind)::value;
      if (l.rows() && l.num_groups > 1 && !spec.calibration.is_fixed()) {
        return fused_rows<scalar_t, K>(px, py, bits, l, spec.calibration, q);
      }
      std::vector<float> a(l.num_groups), b(l.num_groups);
      group_calibration(xd, l, spec.calibration, a.data(), b.data());
      ParamArrays P(l.num_groups);
      for (int64_t g = 0; g < l.num_groups; ++g) P.set(g, params_from_calibration(spec.calibration, q, a[g], b[g]));
      apply_groups<scalar_t, K>(px, py, bits, l, P, q);
    });
  });
  return {y, mask};
}

// The scale (or zero point) as float32 values in x's group order.
std::vector<float> in_group_order(const at::Tensor& t, const Groups& groups, const Layout& l) {
  const at::Tensor c = to_group_order(t, groups, l);
  return std::vector<float>(c.const_data_ptr<float>(), c.const_data_ptr<float>() + c.numel());
}

std::tuple<at::Tensor, at::Tensor> fake_quant_with_scale_forward_cpu(const at::Tensor& x, const at::Tensor& scale,
                                                                     const c10::optional<at::Tensor>& zero_point,
                                                                     c10::string_view qtype, bool with_mask) {
  const QType qt = parse_qtype(std::string(qtype));
  const Groups groups = check_scale_args(x, scale, zero_point, qt);
  const at::Tensor xd = dense_input(x);
  at::Tensor y = at::empty_like(xd);
  advise_huge_pages(y);
  at::Tensor mask = new_mask(x, with_mask);
  if (x.numel() == 0) return {y, mask};
  const Layout l = make_layout(xd.sizes(), xd.strides(), groups);
  const std::vector<float> s = in_group_order(scale, groups, l);
  const std::vector<float> z =
      zero_point.has_value() ? in_group_order(*zero_point, groups, l) : std::vector<float>(s.size(), 0.0f);
  ParamArrays P(l.num_groups);
  for (int64_t g = 0; g < l.num_groups; ++g) P.set(g, given_params(s[g], z[g], qt.p));
  uint8_t* bits = with_mask ? mask.data_ptr<uint8_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "qwix_fake_quant_with_scale", [&] {
    dispatch_kind(qt.p.kind, [&](auto kind) {
      apply_groups<scalar_t, decltype(kind)::value>(xd.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                                    bits, l, P, qt.p);
    });
  });
  return {y, mask};
}

at::Tensor fake_quant_backward_cpu(const at::Tensor& grad, const at::Tensor& mask) {
  check_backward_args(grad, mask);
  const at::Tensor gd = dense_input(grad);
  at::Tensor out = at::empty_like(gd);
  advise_huge_pages(out);
  const at::Tensor m = mask.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gd.scalar_type(), "qwix_fake_quant_backward", [&] {
    const scalar_t* g = gd.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const uint8_t* bits = m.const_data_ptr<uint8_t>();
    parallel_chunks(gd.numel(), 8, kMinChunk, [&](int64_t, int64_t b, int64_t e) {
      masked_copy(g + b, bits + b / 8, o + b, e - b);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qwix, CPU, m) {
  m.impl("fake_quant_forward", &fake_quant_forward_cpu);
  m.impl("fake_quant_with_scale_forward", &fake_quant_with_scale_forward_cpu);
  m.impl("fake_quant_backward", &fake_quant_backward_cpu);
}

}  // namespace cpu
}  // namespace qwix
