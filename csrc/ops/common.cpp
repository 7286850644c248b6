#include "ops/common.h"

#include <ATen/ATen.h>

#include <cmath>

namespace qwix {

void check_float_input(const at::Tensor& x, const char* what) {
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, "qwix: ", what,
                   " must be a floating tensor (float32, float16, bfloat16 or float64), got ", st);
}

at::Tensor dense_input(const at::Tensor& x) { return x.is_non_overlapping_and_dense() ? x : x.contiguous(); }

int64_t mask_bytes(int64_t numel, bool with_mask) { return with_mask ? (numel + 7) / 8 : 0; }

Groups mx_groups(c10::IntArrayRef sizes, const QType& qtype) {
  const int64_t rank = static_cast<int64_t>(sizes.size());
  TORCH_CHECK_VALUE(rank >= 1 && sizes[rank - 1] % qtype.p.block == 0, "qwix: qtype '", qtype.name,
                    "' quantizes blocks of ", qtype.p.block, " elements along the last axis, which must be a multiple of ",
                    qtype.p.block, "; got an input of shape ", sizes);
  Groups g(sizes.begin(), sizes.end());
  g[rank - 1] = sizes[rank - 1] / qtype.p.block;
  return g;
}

DynamicSpec make_dynamic_spec(const at::Tensor& x, const std::string* qtype, const std::string& method,
                              c10::IntArrayRef channelwise_axes, c10::IntArrayRef tiled_axes,
                              c10::IntArrayRef tile_sizes) {
  check_float_input(x, "input");
  DynamicSpec s;
  if (qtype) s.qtype = parse_qtype(*qtype);
  s.calibration = parse_calibration(method);
  if (qtype && s.qtype.two_level) {  // (first: nvfp4 takes absmax only, not any symmetric method)
    TORCH_CHECK_VALUE(s.calibration.is_plain_absmax(),
                      "qwix: qtype 'nvfp4' computes its two-level scales from absmax; calibration method '", method,
                      "' is not supported with it (use 'absmax')");
  }
  if (qtype) {
    TORCH_CHECK_VALUE(s.qtype.is_integer() || s.calibration.symmetric(), "qwix: calibration method '", method,
                      "' is asymmetric, which needs an integer qtype; '", *qtype,
                      "' is a floating-point qtype (use absmax, rms or a symmetric fixed range)");
  }
  s.groups = qtype && s.qtype.is_block_format() ? mx_groups(x.sizes(), s.qtype)
                                                 : groups_from_axes(x.sizes(), channelwise_axes, tiled_axes, tile_sizes);
  if (s.calibration.is_fixed()) s.groups.assign(s.groups.size(), 1);
  return s;
}

Groups check_scale_args(const at::Tensor& x, const at::Tensor& scale, const c10::optional<at::Tensor>& zero_point,
                        const QType& qtype) {
  check_float_input(x, "input");
  TORCH_CHECK_VALUE(!qtype.two_level, "qwix: qtype 'nvfp4' has dynamic two-level scales (an fp32 tensor scale times "
                    "e4m3 block scales); a given scale is not supported with it");
  TORCH_CHECK_TYPE(at::isFloatingType(scale.scalar_type()), "qwix: scale must be a floating tensor, got ",
                   scale.scalar_type());
  TORCH_CHECK_VALUE(scale.device() == x.device(), "qwix: scale is on ", scale.device(), " but the input is on ",
                    x.device());
  Groups g = groups_from_scale_shape(x.sizes(), scale.sizes(), "scale");
  if (zero_point.has_value()) {
    TORCH_CHECK_VALUE(qtype.is_integer(), "qwix: a zero point needs an integer qtype; '", qtype.name,
                      "' is symmetric only");
    TORCH_CHECK_VALUE(zero_point->device() == x.device(), "qwix: zero_point is on ", zero_point->device(),
                      " but the input is on ", x.device());
    TORCH_CHECK_TYPE(zero_point->scalar_type() != at::kBool && !at::isComplexType(zero_point->scalar_type()),
                     "qwix: zero_point must be a real tensor, got ", zero_point->scalar_type());
    TORCH_CHECK_VALUE(zero_point->sizes() == scale.sizes(), "qwix: zero_point of shape ", zero_point->sizes(),
                      " must have the scale's shape ", scale.sizes());
    // A zero point is a grid value (compute_scale makes it one; NaN for a group holding NaN/Inf, which then
    // comes out NaN). Checked where reading it is no device sync: on the CPU (on CUDA the values are not).
    if (zero_point->device().is_cpu() && zero_point->numel() > 0) {
      const at::Tensor zp = zero_point->to(at::kDouble).nan_to_num(qtype.p.qmin, INFINITY, -INFINITY);
      const double lo = zp.min().item<double>(), hi = zp.max().item<double>();
      const bool integral = at::equal(zp, zp.round());
      TORCH_CHECK_VALUE(integral && lo >= qtype.p.qmin && hi <= qtype.p.qmax,
                        "qwix: zero_point values must be integers in [", qtype.p.qmin, ", ", qtype.p.qmax,
                        "] (the '", qtype.name, "' grid), got values in [", lo, ", ", hi, "]",
                        integral ? "" : ", not all integers");
    }
  }
  return g;
}

void check_device(const at::Tensor& t, const std::string& what, const at::Tensor& ref, const char* ref_what) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "qwix: ", what, " is on ", t.device(), " but ", ref_what, " is on ",
                    ref.device());
}

void check_backward_args(const at::Tensor& grad, const at::Tensor& mask) {
  check_float_input(grad, "grad");
  const bool symbolic = grad.unsafeGetTensorImpl()->has_symbolic_sizes_strides() ||
                        mask.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kByte && mask.dim() == 1 &&
                        (symbolic || mask.numel() == mask_bytes(grad.numel(), true)),
                    "qwix: mask must be a 1-D uint8 tensor of ceil(numel/8) bytes for a grad of ", grad.sym_numel(),
                    " elements, got ", mask.scalar_type(), " of shape ", mask.sym_sizes());
  check_device(mask, "mask", grad, "grad");
}

void check_count(const at::Tensor& count) {
  TORCH_CHECK_VALUE(count.numel() == 1 && (count.scalar_type() == at::kInt || count.scalar_type() == at::kLong),
                    "qwix: count must be an int32 or int64 scalar tensor, got ", count.scalar_type(), " of shape ",
                    count.sizes());
}

void check_srq_stats(const at::Tensor& x, const at::Tensor& count, at::TensorList sums, const DynamicSpec& spec,
                     c10::string_view method) {
  TORCH_CHECK_VALUE(!spec.qtype.two_level, "qwix: qtype 'nvfp4' has dynamic two-level scales (an fp32 tensor scale "
                    "times e4m3 block scales); static (SRQ) scales are not supported with it");
  const size_t want = spec.calibration.symmetric() ? 1 : 2;
  TORCH_CHECK_VALUE(sums.size() == want, "qwix: calibration method '", method, "' keeps ", want,
                    " statistic(s), got ", sums.size());
  check_count(count);
  if (!(count.device().is_cpu() && count.dim() == 0)) check_device(count, "count", x, "the input");
  for (size_t i = 0; i < sums.size(); ++i) {
    TORCH_CHECK_TYPE(sums[i].scalar_type() == at::kFloat, "qwix: statistics are float32, got ",
                     sums[i].scalar_type(), " for statistic ", i);
    check_device(sums[i], "statistic " + std::to_string(i), x, "the input");
  }
}

void check_calibration_list(at::TensorList calibration, const QType* qtype) {
  TORCH_CHECK_VALUE(calibration.size() == 1 || calibration.size() == 2,
                    "qwix: a calibration is [absmax] or [min, max], got ", calibration.size(), " tensors");
  for (const auto& t : calibration) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "qwix: calibration tensors are float32, got ", t.scalar_type());
    check_device(t, "a calibration tensor", calibration[0], "the first");
  }
  TORCH_CHECK_VALUE(!qtype || !qtype->two_level, "qwix: qtype 'nvfp4' has dynamic two-level scales (an fp32 tensor "
                    "scale times e4m3 block scales); compute_scale / static (SRQ) scales are not supported with it");
  if (calibration.size() == 2) {
    TORCH_CHECK_VALUE(calibration[0].sizes() == calibration[1].sizes(), "qwix: calibration min of shape ",
                      calibration[0].sizes(), " and max of shape ", calibration[1].sizes(), " differ");
    TORCH_CHECK_VALUE(!qtype || qtype->is_integer(), "qwix: a [min, max] calibration needs an integer qtype; '",
                      qtype->name, "' is symmetric only");
  }
}

at::Tensor to_group_order(const at::Tensor& t, const Groups& groups, const Layout& l) {
  std::vector<int64_t> shape(groups.size() - t.dim(), 1);
  shape.insert(shape.end(), t.sizes().begin(), t.sizes().end());
  return t.to(at::kFloat).reshape(shape).expand(groups).permute(l.perm).contiguous().reshape({-1});
}

at::Tensor from_group_order(const at::Tensor& flat, const Groups& groups, const Layout& l) {
  std::vector<int64_t> permuted, inverse(l.perm.size());
  for (size_t i = 0; i < l.perm.size(); ++i) {
    permuted.push_back(groups[l.perm[i]]);
    inverse[l.perm[i]] = static_cast<int64_t>(i);
  }
  return flat.reshape(permuted).permute(inverse).contiguous();
}

}  // namespace qwix
