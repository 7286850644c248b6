// The Python extension qwix_torch._C. Importing it registers torch.ops.qwix.*
// (the TORCH_LIBRARY blocks in csrc/ops); Python-facing helpers live here.
#include <torch/extension.h>

#include "numerics/calibration.h"
#include "numerics/qtype.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "qwix-torch C++ core: registers torch.ops.qwix.*";
  m.def("valid_qtype_names", &qwix::valid_qtype_names, "The qtype names the ops accept, comma separated.");
  m.def(
      "check_qtype", [](const std::string& name) { return qwix::parse_qtype(name).name; },
      "Validates a qtype name; returns its canonical spelling (raises ValueError listing the valid names).");
  m.def(
      "calibration_can_clip", [](const std::string& method) { return qwix::parse_calibration(method).can_clip(); },
      "Validates a calibration method; True when its range can clip the data (masked gradient by default).");
  m.def(
      "calibration_is_symmetric",
      [](const std::string& method) { return qwix::parse_calibration(method).symmetric(); },
      "Validates a calibration method; True when it calibrates absmax (one statistic), False for min/max.");
}
