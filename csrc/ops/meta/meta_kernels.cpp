// Meta kernels: output shapes only (FakeTensor, torch.compile), SymInt-safe.
// They validate exactly as the real kernels do where sizes are concrete.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/common.h"

namespace qwix {
namespace {

bool has_symbolic_sizes(const at::Tensor& x) { return x.unsafeGetTensorImpl()->has_symbolic_sizes_strides(); }

at::Tensor meta_mask(const at::Tensor& x, bool with_mask) {
  return at::empty_symint({with_mask ? (x.sym_numel() + 7) / 8 : c10::SymInt(0)}, x.options().dtype(at::kByte));
}

// The calibration shape, symbolic where x's sizes are.
std::vector<c10::SymInt> sym_groups(const at::Tensor& x, const Calibration& cal, at::IntArrayRef ch,
                                    at::IntArrayRef tiled, at::IntArrayRef tiles) {
  const int64_t rank = x.dim();
  std::vector<c10::SymInt> g(rank, c10::SymInt(1));
  if (cal.is_fixed()) return g;
  for (int64_t a : ch) {
    const int64_t ax = a < 0 ? a + rank : a;
    g[ax] = x.sym_size(ax);
  }
  for (size_t i = 0; i < tiled.size(); ++i) {
    const int64_t ax = tiled[i] < 0 ? tiled[i] + rank : tiled[i];
    g[ax] = x.sym_size(ax) / tiles[i];
  }
  return g;
}

// Validates like the real kernels (sizes-dependent checks only when concrete).
DynamicSpec meta_spec(const at::Tensor& x, const std::string* qtype, c10::string_view method, at::IntArrayRef ch,
                      at::IntArrayRef tiled, at::IntArrayRef tiles) {
  if (!has_symbolic_sizes(x)) return make_dynamic_spec(x, qtype, std::string(method), ch, tiled, tiles);
  // Symbolic sizes: check what does not depend on them (the last dim of the stand-in is
  // one MX block, which every tile of 1 divides too).
  std::vector<int64_t> ones(x.dim(), 1);
  if (!ones.empty()) ones.back() = kMxBlock;
  std::vector<int64_t> fake_tiles(tiles.size(), 1);
  return make_dynamic_spec(at::empty(ones, x.options().device(at::kMeta)), qtype, std::string(method), ch, tiled,
                           fake_tiles);
}

std::tuple<at::Tensor, at::Tensor> fake_quant_forward_meta(const at::Tensor& x, c10::string_view qtype,
                                                           c10::string_view method, at::IntArrayRef ch,
                                                           at::IntArrayRef tiled, at::IntArrayRef tiles,
                                                           bool with_mask) {
  const std::string q(qtype);
  meta_spec(x, &q, method, ch, tiled, tiles);
  return {at::empty_like(dense_input(x)), meta_mask(x, with_mask)};
}

std::tuple<at::Tensor, at::Tensor> fake_quant_with_scale_forward_meta(const at::Tensor& x, const at::Tensor& scale,
                                                                      const c10::optional<at::Tensor>& zero_point,
                                                                      c10::string_view qtype, bool with_mask) {
  const QType qt = parse_qtype(std::string(qtype));
  if (!has_symbolic_sizes(x) && !has_symbolic_sizes(scale)) check_scale_args(x, scale, zero_point, qt);
  return {at::empty_like(dense_input(x)), meta_mask(x, with_mask)};
}

at::Tensor fake_quant_backward_meta(const at::Tensor& grad, const at::Tensor& mask) {
  check_backward_args(grad, mask);
  return at::empty_like(dense_input(grad));
}

std::vector<at::Tensor> calibrate_meta(const at::Tensor& x, c10::string_view method, at::IntArrayRef ch,
                                       at::IntArrayRef tiled, at::IntArrayRef tiles) {
  const DynamicSpec spec = meta_spec(x, nullptr, method, ch, tiled, tiles);
  const auto shape = sym_groups(x, spec.calibration, ch, tiled, tiles);
  const auto opts = x.options().dtype(at::kFloat);
  if (spec.calibration.symmetric()) return {at::empty_symint(shape, opts)};
  return {at::empty_symint(shape, opts), at::empty_symint(shape, opts)};
}

std::vector<at::Tensor> compute_scale_meta(at::TensorList calibration, c10::string_view qtype) {
  const QType qt = parse_qtype(std::string(qtype));
  check_calibration_list(calibration, &qt);
  std::vector<at::Tensor> out;
  for (const auto& c : calibration) out.push_back(at::empty_symint(c.sym_sizes(), c.options()));
  return out;
}

// The CompositeExplicitAutograd kernel reads concrete sizes (the groups that the statistics broadcast to),
// so under symbolic shapes (torch.compile dynamic=True, torch.export with dims) it would specialize every
// size; this one keeps them symbolic and checks what does not depend on them.
std::vector<at::Tensor> srq_scale_meta(const at::Tensor& x, const at::Tensor& count, at::TensorList sums,
                                       c10::string_view qtype, c10::string_view method, at::IntArrayRef ch,
                                       at::IntArrayRef tiled, at::IntArrayRef tiles) {
  const std::string q(qtype);
  const DynamicSpec spec = meta_spec(x, &q, method, ch, tiled, tiles);
  check_srq_stats(x, count, sums, spec, method);
  std::vector<c10::SymInt> shape;
  if (spec.qtype.is_block_format()) {  // MX: the qtype's own blocks, as srq_scale's dynamic branch
    std::vector<int64_t> all_but_last(x.dim() - 1);
    for (int64_t i = 0; i + 1 < x.dim(); ++i) all_but_last[i] = i;
    const int64_t last = x.dim() - 1, block = spec.qtype.p.block;
    shape = sym_groups(x, spec.calibration, all_but_last, at::IntArrayRef(&last, 1), at::IntArrayRef(&block, 1));
  } else {
    shape = sym_groups(x, spec.calibration, ch, tiled, tiles);
  }
  for (const auto& sum : sums) {
    TORCH_CHECK_VALUE(sum.dim() <= static_cast<int64_t>(shape.size()), "qwix: statistic of shape ", sum.sym_sizes(),
                      " does not fit the calibration shape ", c10::SymIntArrayRef(shape));
    for (int64_t i = 0; i < sum.dim(); ++i) {
      const c10::SymInt& g = shape[shape.size() - sum.dim() + i];
      const c10::SymInt& n = sum.sym_size(i);
      if (!g.is_symbolic() && !n.is_symbolic())
        TORCH_CHECK_VALUE(n == 1 || n == g, "qwix: statistic of shape ", sum.sym_sizes(),
                          " does not broadcast to the calibration shape ", c10::SymIntArrayRef(shape));
    }
  }
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < sums.size(); ++i) out.push_back(at::empty_symint(shape, x.options().dtype(at::kFloat)));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qwix, Meta, m) {
  m.impl("srq_scale", &srq_scale_meta);
  m.impl("fake_quant_forward", &fake_quant_forward_meta);
  m.impl("fake_quant_with_scale_forward", &fake_quant_with_scale_forward_meta);
  m.impl("fake_quant_backward", &fake_quant_backward_meta);
  m.impl("calibrate", &calibrate_meta);
  m.impl("compute_scale", &compute_scale_meta);
}

}  // namespace qwix
