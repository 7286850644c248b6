#pragma once
// Typed dispatcher calls of the qwix ops, for kernels that compose them.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>
#include <vector>

namespace qwix {

inline std::tuple<at::Tensor, at::Tensor> call_fake_quant_forward(const at::Tensor& x, c10::string_view qtype,
                                                                  c10::string_view method, at::IntArrayRef ch,
                                                                  at::IntArrayRef tiled, at::IntArrayRef tiles,
                                                                  bool with_mask) {
  static auto h = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("qwix::fake_quant_forward", "")
                      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, c10::string_view, c10::string_view,
                                                                at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                                                bool)>();
  return h.call(x, qtype, method, ch, tiled, tiles, with_mask);
}

inline std::tuple<at::Tensor, at::Tensor> call_fake_quant_with_scale_forward(
    const at::Tensor& x, const at::Tensor& scale, const c10::optional<at::Tensor>& zero_point, c10::string_view qtype,
    bool with_mask) {
  static auto h = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("qwix::fake_quant_with_scale_forward", "")
                      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const c10::optional<at::Tensor>&, c10::string_view,
                                                                bool)>();
  return h.call(x, scale, zero_point, qtype, with_mask);
}

inline at::Tensor call_fake_quant_backward(const at::Tensor& grad, const at::Tensor& mask) {
  static auto h = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("qwix::fake_quant_backward", "")
                      .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return h.call(grad, mask);
}

inline std::vector<at::Tensor> call_calibrate(const at::Tensor& x, c10::string_view method, at::IntArrayRef ch,
                                              at::IntArrayRef tiled, at::IntArrayRef tiles) {
  static auto h = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("qwix::calibrate", "")
                      .typed<std::vector<at::Tensor>(const at::Tensor&, c10::string_view, at::IntArrayRef,
                                                     at::IntArrayRef, at::IntArrayRef)>();
  return h.call(x, method, ch, tiled, tiles);
}

inline std::vector<at::Tensor> call_compute_scale(at::TensorList calibration, c10::string_view qtype) {
  static auto h = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("qwix::compute_scale", "")
                      .typed<std::vector<at::Tensor>(at::TensorList, c10::string_view)>();
  return h.call(calibration, qtype);
}

}  // namespace qwix
