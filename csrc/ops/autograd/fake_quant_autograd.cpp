// Autograd kernels. Fake quant is straight-through: the gradient passes
// unchanged (nothing saved), or masked to the calibrated range with a
// bit-packed mask (1 bit per element). The scale gets no gradient. The other
// ops are not differentiable: their outputs never require grad.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "numerics/calibration.h"
#include "ops/forward_ops.h"

namespace qwix {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Saves the mask and the strides the forward walked, so the backward reads
// grad in the same memory order as the mask bits.
void save_mask(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& mask) {
  ctx->save_for_backward({mask});
  ctx->saved_data["strides"] = y.strides().vec();
}

at::Tensor masked_grad(AutogradContext* ctx, const at::Tensor& grad) {
  const at::Tensor mask = ctx->get_saved_variables()[0];
  const auto strides = ctx->saved_data["strides"].toIntVector();
  at::Tensor g = grad;
  if (g.strides() != c10::IntArrayRef(strides)) {
    g = at::empty_strided(grad.sizes(), strides, grad.options());
    g.copy_(grad);
  }
  return call_fake_quant_backward(g, mask);
}

class FakeQuantFn : public torch::autograd::Function<FakeQuantFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, c10::string_view qtype,
                            c10::string_view method, at::IntArrayRef ch, at::IntArrayRef tiled,
                            at::IntArrayRef tiles, c10::optional<bool> clip_gradient, bool need_grad) {
    const bool clip = clip_gradient.value_or(parse_calibration(std::string(method)).can_clip());
    const bool with_mask = clip && need_grad;
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mask] = call_fake_quant_forward(x, qtype, method, ch, tiled, tiles, with_mask);
    ctx->saved_data["masked"] = with_mask;
    if (with_mask) save_mask(ctx, y, mask);
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor g = ctx->saved_data["masked"].toBool() ? masked_grad(ctx, grads[0]) : grads[0];
    return {g, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class FakeQuantWithScaleFn : public torch::autograd::Function<FakeQuantWithScaleFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            const c10::optional<at::Tensor>& zero_point, c10::string_view qtype, bool clip_gradient,
                            bool need_grad) {
    const bool with_mask = clip_gradient && need_grad;
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mask] = call_fake_quant_with_scale_forward(x, scale, zero_point, qtype, with_mask);
    ctx->saved_data["masked"] = with_mask;
    if (with_mask) save_mask(ctx, y, mask);
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor g = ctx->saved_data["masked"].toBool() ? masked_grad(ctx, grads[0]) : grads[0];
    return {g, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// grad -> grad * mask is linear, so its derivative is itself (double backward).
class FakeQuantBackwardFn : public torch::autograd::Function<FakeQuantBackwardFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& mask) {
    ctx->save_for_backward({mask});
    ctx->saved_data["strides"] = dense_strides(grad);
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_fake_quant_backward(grad, mask);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {masked_grad(ctx, grads[0]), at::Tensor()};
  }
  static std::vector<int64_t> dense_strides(const at::Tensor& t) {
    return t.is_non_overlapping_and_dense() ? t.strides().vec() : t.contiguous().strides().vec();
  }
};

at::Tensor fake_quant_autograd(const at::Tensor& x, c10::string_view qtype, c10::string_view method,
                               at::IntArrayRef ch, at::IntArrayRef tiled, at::IntArrayRef tiles,
                               c10::optional<bool> clip_gradient) {
  return FakeQuantFn::apply(x, qtype, method, ch, tiled, tiles, clip_gradient, x.requires_grad());
}

at::Tensor fake_quant_with_scale_autograd(const at::Tensor& x, const at::Tensor& scale,
                                          const c10::optional<at::Tensor>& zero_point, c10::string_view qtype,
                                          bool clip_gradient) {
  return FakeQuantWithScaleFn::apply(x, scale, zero_point, qtype, clip_gradient, x.requires_grad());
}

at::Tensor fake_quant_backward_autograd(const at::Tensor& grad, const at::Tensor& mask) {
  return FakeQuantBackwardFn::apply(grad, mask);
}

// Non-differentiable ops: run below autograd; outputs do not require grad.
template <class Sig, Sig* F>
struct NoGrad;
template <class R, class... Args, R (*F)(Args...)>
struct NoGrad<R(Args...), F> {
  static R call(Args... args) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return F(args...);
  }
};

std::vector<at::Tensor> calibrate_redispatch(const at::Tensor& x, c10::string_view method, at::IntArrayRef ch,
                                             at::IntArrayRef tiled, at::IntArrayRef tiles) {
  return call_calibrate(x, method, ch, tiled, tiles);
}

std::vector<at::Tensor> compute_scale_redispatch(at::TensorList calibration, c10::string_view qtype) {
  return call_compute_scale(calibration, qtype);
}

std::tuple<at::Tensor, at::Tensor> fake_quant_forward_redispatch(const at::Tensor& x, c10::string_view qtype,
                                                                 c10::string_view method, at::IntArrayRef ch,
                                                                 at::IntArrayRef tiled, at::IntArrayRef tiles,
                                                                 bool with_mask) {
  return call_fake_quant_forward(x, qtype, method, ch, tiled, tiles, with_mask);
}

std::tuple<at::Tensor, at::Tensor> fake_quant_with_scale_forward_redispatch(
    const at::Tensor& x, const at::Tensor& scale, const c10::optional<at::Tensor>& zero_point, c10::string_view qtype,
    bool with_mask) {
  return call_fake_quant_with_scale_forward(x, scale, zero_point, qtype, with_mask);
}

std::vector<at::Tensor> srq_scale_redispatch(const at::Tensor& x, const at::Tensor& count, at::TensorList sums,
                                             c10::string_view qtype, c10::string_view method, at::IntArrayRef ch,
                                             at::IntArrayRef tiled, at::IntArrayRef tiles) {
  static auto h = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("qwix::srq_scale", "")
                      .typed<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, at::TensorList,
                                                     c10::string_view, c10::string_view, at::IntArrayRef,
                                                     at::IntArrayRef, at::IntArrayRef)>();
  return h.call(x, count, sums, qtype, method, ch, tiled, tiles);
}

void update_quant_stat_autograd(const at::Tensor& count, at::TensorList sums, at::TensorList calibration,
                                at::IntArrayRef batch_axes, int64_t count_increment) {
  static auto h = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("qwix::update_quant_stat", "")
                      .typed<void(const at::Tensor&, at::TensorList, at::TensorList, at::IntArrayRef, int64_t)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    h.call(count, sums, calibration, batch_axes, count_increment);
  }
  // In-place ops bump version counters so autograd can detect stale saves.
  torch::autograd::impl::bump_version(count);
  for (const auto& s : sums) torch::autograd::impl::bump_version(s);
}

}  // namespace

TORCH_LIBRARY_IMPL(qwix, Autograd, m) {
  m.impl("fake_quant", &fake_quant_autograd);
  m.impl("fake_quant_with_scale", &fake_quant_with_scale_autograd);
  m.impl("fake_quant_backward", &fake_quant_backward_autograd);
  m.impl("fake_quant_forward", &NoGrad<decltype(fake_quant_forward_redispatch), fake_quant_forward_redispatch>::call);
  m.impl("fake_quant_with_scale_forward",
         &NoGrad<decltype(fake_quant_with_scale_forward_redispatch), fake_quant_with_scale_forward_redispatch>::call);
  m.impl("calibrate", &NoGrad<decltype(calibrate_redispatch), calibrate_redispatch>::call);
  m.impl("compute_scale", &NoGrad<decltype(compute_scale_redispatch), compute_scale_redispatch>::call);
  m.impl("srq_scale", &NoGrad<decltype(srq_scale_redispatch), srq_scale_redispatch>::call);
  m.impl("update_quant_stat", &update_quant_stat_autograd);
}

}  // namespace qwix
