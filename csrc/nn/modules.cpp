// The LibTorch QAT wrappers: the statistics module and the wrappers' forwards.
#include <c10/util/Exception.h>

#include "qwix/nn.h"

namespace qwix {
namespace nn {

QuantStatImpl::QuantStatImpl(QuantStatTensors init) : t_(std::move(init)) {
  t_.count = register_buffer("count", t_.count);
  if (t_.sums.size() == 1) {
    t_.sums[0] = register_buffer("sum_of_absmax", t_.sums[0]);
  } else {
    TORCH_INTERNAL_ASSERT(t_.sums.size() == 2, "a QuantStat keeps 1 or 2 sums");
    t_.sums[0] = register_buffer("sum_of_min", t_.sums[0]);
    t_.sums[1] = register_buffer("sum_of_max", t_.sums[1]);
  }
}

void QuantStatImpl::to(torch::Dtype, bool) {}
void QuantStatImpl::to(torch::Device device, torch::Dtype, bool non_blocking) {
  torch::nn::Module::to(device, non_blocking);  // (buffers move in place: t_ follows)
}

namespace {

// A ConvNd's options as its constructor takes them (the module stores the generic form).
template <size_t D>
torch::nn::ConvOptions<D> conv_options(const torch::nn::detail::ConvNdOptions<D>& o) {
  return torch::nn::ConvOptions<D>(o.in_channels(), o.out_channels(), o.kernel_size())
      .stride(o.stride())
      .padding(o.padding())
      .dilation(o.dilation())
      .groups(o.groups())
      .bias(o.bias())
      .padding_mode(o.padding_mode());
}

// A ConvTransposeNd's options as its constructor takes them.
template <size_t D>
torch::nn::ConvTransposeOptions<D> conv_transpose_options(const torch::nn::detail::ConvNdOptions<D>& o) {
  return torch::nn::ConvTransposeOptions<D>(o.in_channels(), o.out_channels(), o.kernel_size())
      .stride(o.stride())
      .padding(std::get<torch::ExpandingArray<D>>(o.padding()))  // never 'same' / 'valid' for transposed convs
      .output_padding(o.output_padding())
      .groups(o.groups())
      .bias(o.bias())
      .dilation(o.dilation())
      .padding_mode(o.padding_mode());
}

}  // namespace

LinearImpl::LinearImpl(const torch::nn::LinearImpl& plain)
    : QatModule<torch::nn::LinearImpl, LinearImpl>(plain.options) {
  share_parameters(plain);
}
at::Tensor LinearImpl::forward(const at::Tensor& input) { return forward_quantized("linear", 1, input); }

Conv1dImpl::Conv1dImpl(const torch::nn::Conv1dImpl& plain)
    : QatModule<torch::nn::Conv1dImpl, Conv1dImpl>(conv_options<1>(plain.options)) {
  share_parameters(plain);
}
at::Tensor Conv1dImpl::forward(const at::Tensor& input) { return forward_quantized("conv1d", options.groups(), input); }

Conv2dImpl::Conv2dImpl(const torch::nn::Conv2dImpl& plain)
    : QatModule<torch::nn::Conv2dImpl, Conv2dImpl>(conv_options<2>(plain.options)) {
  share_parameters(plain);
}
at::Tensor Conv2dImpl::forward(const at::Tensor& input) { return forward_quantized("conv2d", options.groups(), input); }

Conv3dImpl::Conv3dImpl(const torch::nn::Conv3dImpl& plain)
    : QatModule<torch::nn::Conv3dImpl, Conv3dImpl>(conv_options<3>(plain.options)) {
  share_parameters(plain);
}
at::Tensor Conv3dImpl::forward(const at::Tensor& input) { return forward_quantized("conv3d", options.groups(), input); }

ConvTranspose1dImpl::ConvTranspose1dImpl(const torch::nn::ConvTranspose1dImpl& plain)
    : QatModule<torch::nn::ConvTranspose1dImpl, ConvTranspose1dImpl>(conv_transpose_options<1>(plain.options)) {
  share_parameters(plain);
}
at::Tensor ConvTranspose1dImpl::forward(const at::Tensor& input, const std::optional<at::IntArrayRef>& output_size) {
  return forward_quantized("conv_transpose1d", options.groups(), input, output_size);
}

ConvTranspose2dImpl::ConvTranspose2dImpl(const torch::nn::ConvTranspose2dImpl& plain)
    : QatModule<torch::nn::ConvTranspose2dImpl, ConvTranspose2dImpl>(conv_transpose_options<2>(plain.options)) {
  share_parameters(plain);
}
at::Tensor ConvTranspose2dImpl::forward(const at::Tensor& input, const std::optional<at::IntArrayRef>& output_size) {
  return forward_quantized("conv_transpose2d", options.groups(), input, output_size);
}

ConvTranspose3dImpl::ConvTranspose3dImpl(const torch::nn::ConvTranspose3dImpl& plain)
    : QatModule<torch::nn::ConvTranspose3dImpl, ConvTranspose3dImpl>(conv_transpose_options<3>(plain.options)) {
  share_parameters(plain);
}
at::Tensor ConvTranspose3dImpl::forward(const at::Tensor& input, const std::optional<at::IntArrayRef>& output_size) {
  return forward_quantized("conv_transpose3d", options.groups(), input, output_size);
}

}  // namespace nn
}  // namespace qwix
