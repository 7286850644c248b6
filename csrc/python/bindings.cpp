// The Python extension qwix_torch._C. Importing it registers torch.ops.qwix.*
// (the TORCH_LIBRARY blocks in csrc/ops); Python-facing helpers live here.
#include <torch/extension.h>

// pybind11 (as bundled with torch) warns that its hidden-visibility internals
// capture our default-visibility types (qwix::QuantizationRule, ...); harmless.
#pragma GCC diagnostic ignored "-Wattributes"

#include "numerics/calibration.h"
#include "numerics/qtype.h"
#include "qwix/qwix.h"

namespace {

qwix::Operand parse_operand(const std::string& s) {
  if (s == "lhs") return qwix::Operand::Lhs;
  if (s == "rhs") return qwix::Operand::Rhs;
  TORCH_CHECK_VALUE(false, "qwix: operand must be 'lhs' or 'rhs', got '", s, "'");
  return qwix::Operand::Lhs;
}

}  // namespace

void qwix_init_jit_bindings(pybind11::module_& m);  // csrc/python/jit_bindings.cpp

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

  // ---- rules and providers (csrc/rules): the one engine of the per-op decisions ----
  namespace py = pybind11;
  m.def("valid_op_names", &qwix::valid_op_names, "The op names a rule's op_names can list.");

  py::class_<qwix::QuantizationRule>(m, "QuantizationRule",
                                     "The C++ QuantizationRule (use qwix_torch.QuantizationRule in Python).")
      .def(py::init<>())
      .def_readwrite("module_path", &qwix::QuantizationRule::module_path)
      .def_readwrite("op_names", &qwix::QuantizationRule::op_names)
      .def_readwrite("weight_qtype", &qwix::QuantizationRule::weight_qtype)
      .def_readwrite("act_qtype", &qwix::QuantizationRule::act_qtype)
      .def_readwrite("tile_size", &qwix::QuantizationRule::tile_size)
      .def_readwrite("act_static_scale", &qwix::QuantizationRule::act_static_scale)
      .def_readwrite("weight_calibration_method", &qwix::QuantizationRule::weight_calibration_method)
      .def_readwrite("act_calibration_method", &qwix::QuantizationRule::act_calibration_method)
      .def_readwrite("act_batch_axes", &qwix::QuantizationRule::act_batch_axes)
      .def_readwrite("clip_gradient", &qwix::QuantizationRule::clip_gradient)
      .def("__repr__", &qwix::rule_repr);
  m.def("validate_rule", &qwix::validate_rule, "Raises ValueError naming the bad field and value.");

  py::class_<qwix::OperandPlan>(m, "OperandPlan", "What to do with one operand of an intercepted op.")
      .def_readonly("quantize", &qwix::OperandPlan::quantize)
      .def_readonly("is_weight", &qwix::OperandPlan::is_weight)
      .def_readonly("qtype", &qwix::OperandPlan::qtype)
      .def_readonly("calibration_method", &qwix::OperandPlan::calibration_method)
      .def_readonly("channelwise_axes", &qwix::OperandPlan::channelwise_axes)
      .def_readonly("tiled_axes", &qwix::OperandPlan::tiled_axes)
      .def_readonly("static_scale", &qwix::OperandPlan::static_scale)
      .def_readonly("batch_axes", &qwix::OperandPlan::batch_axes)
      .def_readonly("clip_gradient", &qwix::OperandPlan::clip_gradient);
  py::class_<qwix::OpPlan>(m, "OpPlan")
      .def_readonly("rule_index", &qwix::OpPlan::rule_index)
      .def_readonly("lhs", &qwix::OpPlan::lhs)
      .def_readonly("rhs", &qwix::OpPlan::rhs);

  m.def(
      "plan_operand",
      [](const qwix::QuantizationRule& rule, const std::string& op, const std::string& operand, bool is_weight,
         int64_t rank, const std::string& equation, int64_t groups) {
        return qwix::plan_operand(rule, op, parse_operand(operand), is_weight, rank, equation, groups);
      },
      py::arg("rule"), py::arg("op_name"), py::arg("operand"), py::arg("is_weight"), py::arg("rank"),
      py::arg("einsum_equation") = "", py::arg("groups") = 1);

  py::class_<qwix::QatProvider>(m, "QatProvider", "The C++ QatProvider (use qwix_torch.QatProvider in Python).")
      .def(py::init<std::vector<qwix::QuantizationRule>>(), py::arg("rules"))
      .def_property_readonly("rules", &qwix::QatProvider::rules)
      .def("match_rule", &qwix::QatProvider::match_rule)
      .def("find_rule", &qwix::QatProvider::find_rule)
      .def(
          "plan",
          [](qwix::QatProvider& p, const std::string& path, const std::string& op, int64_t lhs_rank, bool lhs_is_weight,
             int64_t rhs_rank, bool rhs_is_weight, const std::string& equation, int64_t groups) {
            return p.plan(path, op, {lhs_rank, lhs_is_weight, groups}, {rhs_rank, rhs_is_weight, groups}, equation);
          },
          py::arg("module_path"), py::arg("op_name"), py::arg("lhs_rank"), py::arg("lhs_is_weight"),
          py::arg("rhs_rank"), py::arg("rhs_is_weight"), py::arg("einsum_equation") = "", py::arg("groups") = 1)
      .def("decomposes_attention", &qwix::QatProvider::decomposes_attention, py::arg("module_path"))
      .def("unused_rule_indices", &qwix::QatProvider::unused_rule_indices)
      .def("is_used", &qwix::QatProvider::is_used)
      .def("mark_used", &qwix::QatProvider::mark_used)
      .def("nothing_matched_warning", &qwix::QatProvider::nothing_matched_warning, py::arg("module_paths"),
           py::arg("ran_forward"))
      .def("may_quantize", &qwix::QatProvider::may_quantize, py::arg("module_paths"));

  // The C++ application of a plan (what the C++ and TorchScript passes run), for tests that
  // check it against the Python pass. stat: (count, sums) or None.
  m.def(
      "quantize_operand",
      [](const at::Tensor& x, const qwix::OperandPlan& plan, std::optional<at::Tensor> count,
         std::optional<std::vector<at::Tensor>> sums, bool update) {
        if (!plan.static_scale) return qwix::quantize_operand(x, plan);
        TORCH_CHECK_VALUE(count && sums, "qwix: a static-scale plan needs count and sums");
        qwix::QuantStatTensors stat{*count, *sums};
        if (update) qwix::update_operand_stat(stat, qwix::calibrate_operand(x, plan), plan);
        return qwix::quantize_operand(x, plan, &stat);
      },
      py::arg("x"), py::arg("plan"), py::arg("count") = py::none(), py::arg("sums") = py::none(),
      py::arg("update") = false);
  m.def("decomposed_attention_source", &qwix::decomposed_attention_source,
        "scaled_dot_product_attention decomposed into two matmuls, as TorchScript source (also Python).");
  // The C++ form with plain matmuls, for tests that tie it to the source form.
  m.def(
      "decomposed_attention",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::optional<at::Tensor> attn_mask,
         double dropout_p, bool is_causal, std::optional<double> scale, bool enable_gqa) {
        auto matmul = [](const at::Tensor& a, const at::Tensor& b) { return at::matmul(a, b); };
        return qwix::decomposed_attention(matmul, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa);
      },
      py::arg("query"), py::arg("key"), py::arg("value"), py::arg("attn_mask") = py::none(),
      py::arg("dropout_p") = 0.0, py::arg("is_causal") = false, py::arg("scale") = py::none(),
      py::arg("enable_gqa") = false);
  qwix_init_jit_bindings(m);
}
