// Autograd kernels. Fake quant is straight-through: the gradient passes
// unchanged (nothing saved), or masked to the calibrated range with a
// bit-packed mask (1 bit per element). The scale gets no gradient. The other
// ops are not differentiable: their outputs never require grad.
//
// The differentiable ops record their own graph Node, as PyTorch's native ops
// do, rather than a torch::autograd::Function: functorch (torch.func.grad,
// vjp, jvp, hessian) refuses C++ autograd Functions. Forward-mode AD gets the
// same straight-through rule: the tangent passes, masked alike.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <memory>
#include <type_traits>

#include "numerics/calibration.h"
#include "ops/forward_ops.h"

namespace qwix {
namespace {

using torch::autograd::variable_list;

// The memory order the kernels walk t in, so the order of its mask bits: t's
// own when dense, else row-major (the kernels read t.contiguous()). From t,
// not from the output, whose layout need not be t's under vmap (the rules'
// row-major batch). Strides are symbolic under torch.compile(dynamic=True):
// read as SymInts, they add no guard.
std::vector<c10::SymInt> mask_order(const at::Tensor& t) {
  if (t.is_non_overlapping_and_dense()) return t.sym_strides().vec();
  std::vector<c10::SymInt> strides(t.dim());
  c10::SymInt stride = 1;
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    strides[d] = stride;
    const c10::SymInt& size = t.sym_size(d);
    stride = stride * (size == 0 ? c10::SymInt(1) : size);
  }
  return strides;
}

// grad * mask, grad copied to the mask's order first (new_empty_strided: under
// vmap the copy is batched too).
at::Tensor apply_mask(const at::Tensor& grad, const at::Tensor& mask, c10::SymIntArrayRef strides) {
  at::Tensor g = grad;
  if (g.sym_strides() != strides) {
    g = grad.new_empty_strided_symint(grad.sym_sizes(), strides);
    g.copy_(grad);
  }
  return call_fake_quant_backward(g, mask);
}

// The backward of all three ops: the gradient of the first input is the
// incoming gradient, masked when a mask was saved; the other inputs (scale,
// zero point, mask) get none.
// (mask undefined: the identity, nothing saved; else the mask and its bits' order.)
class StraightThroughBackward : public torch::autograd::Node {
 public:
  StraightThroughBackward(const char* name, const at::Tensor& mask, std::vector<c10::SymInt> strides)
      : name_(name), masked_(mask.defined()), strides_(std::move(strides)) {
    if (masked_) mask_ = torch::autograd::SavedVariable(mask, /*is_output=*/false);
  }
  variable_list apply(variable_list&& grads) override {
    variable_list out(num_outputs());
    if (grads[0].defined() && should_compute_output(0)) {
      out[0] = masked_ ? apply_mask(grads[0], mask_.unpack(), strides_) : grads[0];
    }
    return out;
  }
  std::string name() const override { return name_; }
  void release_variables() override { mask_.reset_data(); }

 private:
  const char* name_;
  bool masked_;
  torch::autograd::SavedVariable mask_;
  std::vector<c10::SymInt> strides_;
};

// A new graph Node: torch 2.13 holds Nodes in c10::intrusive_ptr, torch < 2.13
// in std::shared_ptr.
template <class N, class... Args>
auto make_node(Args&&... args) {
  using NodePtr = decltype(torch::autograd::Edge::function);
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<N>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<N>(std::forward<Args>(args)...);
  }
}

bool has_forward_grad(const at::Tensor& x) { return x._fw_grad(/*level=*/0).defined(); }

// Connects y (computed below autograd from `inputs`, x first) to the graph and
// gives it x's tangent, masked when `mask` is defined (its bits in x's order).
void record(const char* name, at::Tensor& y, at::TensorList inputs, const at::Tensor& mask) {
  const at::Tensor& x = inputs[0];
  const bool backward = torch::autograd::compute_requires_grad(inputs);
  const bool forward = has_forward_grad(x);
  if (!backward && !forward) return;
  const std::vector<c10::SymInt> strides = mask.defined() ? mask_order(x) : std::vector<c10::SymInt>();
  if (backward) {
    auto node = make_node<StraightThroughBackward>(name, mask, strides);
    node->set_next_edges(torch::autograd::collect_next_edges(inputs));
    torch::autograd::set_history(y, node);
  }
  if (forward) {
    const at::Tensor x_t = x._fw_grad(0);
    y._set_fw_grad(mask.defined() ? apply_mask(x_t, mask, strides) : x_t.clone(), 0, /*is_inplace_op=*/false);
  }
}

// Whether y's gradient (or tangent) may be asked for: x requires grad or has a
// tangent here, or x is a functorch wrapper (an outer transform level may
// differentiate it, and needs the mask this level computes).
bool needs_backward(const at::Tensor& x) {
  return (at::GradMode::is_enabled() && x.requires_grad()) || has_forward_grad(x) ||
         x.key_set().has(c10::DispatchKey::FuncTorchGradWrapper);
}

// The public ops decide whether the gradient is masked and call the *_forward
// ops with autograd on: every functorch level then sees the *_forward op and
// applies its rule (with_mask: the gradient of y is masked; the mask output is
// not differentiable).
at::Tensor fake_quant_autograd(const at::Tensor& x, c10::string_view qtype, c10::string_view method,
                               at::IntArrayRef ch, at::IntArrayRef tiled, at::IntArrayRef tiles,
                               c10::optional<bool> clip_gradient) {
  const bool clip = clip_gradient.value_or(parse_calibration(std::string(method)).can_clip());
  return std::get<0>(call_fake_quant_forward(x, qtype, method, ch, tiled, tiles, clip && needs_backward(x)));
}

at::Tensor fake_quant_with_scale_autograd(const at::Tensor& x, const at::Tensor& scale,
                                          const c10::optional<at::Tensor>& zero_point, c10::string_view qtype,
                                          bool clip_gradient) {
  return std::get<0>(
      call_fake_quant_with_scale_forward(x, scale, zero_point, qtype, clip_gradient && needs_backward(x)));
}

std::tuple<at::Tensor, at::Tensor> fake_quant_forward_autograd(const at::Tensor& x, c10::string_view qtype,
                                                               c10::string_view method, at::IntArrayRef ch,
                                                               at::IntArrayRef tiled, at::IntArrayRef tiles,
                                                               bool with_mask) {
  auto [y, mask] = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_fake_quant_forward(x, qtype, method, ch, tiled, tiles, with_mask);
  }();
  record("FakeQuantBackward", y, {x}, with_mask ? mask : at::Tensor());
  return {y, mask};
}

std::tuple<at::Tensor, at::Tensor> fake_quant_with_scale_forward_autograd(const at::Tensor& x,
                                                                          const at::Tensor& scale,
                                                                          const c10::optional<at::Tensor>& zero_point,
                                                                          c10::string_view qtype, bool with_mask) {
  auto [y, mask] = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_fake_quant_with_scale_forward(x, scale, zero_point, qtype, with_mask);
  }();
  const at::Tensor zp = zero_point.value_or(at::Tensor());
  record("FakeQuantWithScaleBackward", y, {x, scale, zp}, with_mask ? mask : at::Tensor());
  return {y, mask};
}

// grad -> grad * mask is linear, so its derivative is itself (double backward).
at::Tensor fake_quant_backward_autograd(const at::Tensor& grad, const at::Tensor& mask) {
  at::Tensor g = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_fake_quant_backward(grad, mask);
  }();
  record("FakeQuantBackwardBackward", g, {grad, mask}, mask);
  return g;
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
  // The update has no derivative: a statistic that requires grad would leave autograd's graph wrong (torch's own
  // in-place ops refuse a leaf that requires grad, as here).
  if (at::GradMode::is_enabled()) {
    for (size_t i = 0; i < sums.size(); ++i)
      TORCH_CHECK_VALUE(!sums[i].requires_grad(), "qwix: update_quant_stat updates statistic ", i, " in place "
                        "without autograd, but it requires grad: statistics are buffers (requires_grad=False)");
    TORCH_CHECK_VALUE(!count.requires_grad(), "qwix: update_quant_stat got a count that requires grad");
  }
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
  m.impl("fake_quant_forward", &fake_quant_forward_autograd);
  m.impl("fake_quant_with_scale_forward", &fake_quant_with_scale_forward_autograd);
  m.impl("calibrate", &NoGrad<decltype(calibrate_redispatch), calibrate_redispatch>::call);
  m.impl("compute_scale", &NoGrad<decltype(compute_scale_redispatch), compute_scale_redispatch>::call);
  m.impl("srq_scale", &NoGrad<decltype(srq_scale_redispatch), srq_scale_redispatch>::call);
  m.impl("update_quant_stat", &update_quant_stat_autograd);
}

}  // namespace qwix
