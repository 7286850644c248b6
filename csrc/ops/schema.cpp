// The qwix operator schemas (one family: fake quant, its backward, calibration,
// SRQ statistics). Kernels register per backend in cpu/, meta/, autograd/, cuda/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(qwix, m) {
  m.def(
      "fake_quant(Tensor x, str qtype, str calibration_method=\"absmax\", int[] channelwise_axes=[], "
      "int[] tiled_axes=[], int[] tile_sizes=[], bool? clip_gradient=None) -> Tensor");
  m.def(
      "fake_quant_forward(Tensor x, str qtype, str calibration_method, int[] channelwise_axes, int[] tiled_axes, "
      "int[] tile_sizes, bool with_mask) -> (Tensor, Tensor)");
  m.def("fake_quant_with_scale(Tensor x, Tensor scale, Tensor? zero_point, str qtype, bool clip_gradient=False) -> Tensor");
  m.def(
      "fake_quant_with_scale_forward(Tensor x, Tensor scale, Tensor? zero_point, str qtype, bool with_mask) "
      "-> (Tensor, Tensor)");
  m.def("fake_quant_backward(Tensor grad, Tensor mask) -> Tensor");
  m.def(
      "calibrate(Tensor x, str calibration_method=\"absmax\", int[] channelwise_axes=[], int[] tiled_axes=[], "
      "int[] tile_sizes=[]) -> Tensor[]");
  m.def("compute_scale(Tensor[] calibration, str qtype) -> Tensor[]");
  m.def(
      "srq_scale(Tensor x, Tensor count, Tensor[] sums, str qtype, str calibration_method, int[] channelwise_axes=[], "
      "int[] tiled_axes=[], int[] tile_sizes=[]) -> Tensor[]");
  m.def(
      "update_quant_stat(Tensor(a!) count, Tensor(b!)[] sums, Tensor[] calibration, int[] batch_axes=[0], "
      "int count_increment=1) -> ()");
}
