// Python bindings of the TorchScript path (qwix::jit, csrc/jit). Used by
// python/qwix_torch/jit.py; called from bindings.cpp's PYBIND11_MODULE.
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/extension.h>

#pragma GCC diagnostic ignored "-Wattributes"

#include "qwix/qwix.h"

namespace py = pybind11;

namespace {

torch::jit::Module as_script_module(const py::handle& obj) {
  if (auto m = torch::jit::as_module(obj)) return *m;
  return py::cast<torch::jit::Module>(obj);  // a torch._C.ScriptModule
}

// Converts Python example inputs with the types of forward's schema (as calling forward would).
std::vector<c10::IValue> forward_inputs(const torch::jit::Module& m, const py::tuple& args, const py::dict& kwargs) {
  auto forward = m.find_method("forward");
  TORCH_CHECK_VALUE(forward.has_value(), "qwix: quantize_model needs a TorchScript module with a forward method");
  torch::jit::Stack stack;
  try {
    stack = torch::jit::createStackForSchema(forward->function().getSchema(), args, py::kwargs(kwargs), m._ivalue());
  } catch (const std::exception& e) {
    const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
    TORCH_CHECK_VALUE(false, "qwix: quantize_model runs the example inputs through the TorchScript module's forward ",
                      "once (to learn each op's operands and order), so it needs example inputs that forward "
                      "accepts: ", c10_error ? c10_error->what_without_backtrace() : e.what(),
                      args.empty() && kwargs.empty() ? " (none were given: quantize_model(ts, provider, x))" : "");
  }
  stack.erase(stack.begin());  // self
  return stack;
}

}  // namespace

void qwix_init_jit_bindings(pybind11::module_& m) {
  m.def(
      "jit_quantize_model",
      [](const py::object& module, qwix::QatProvider& provider, const py::tuple& example_inputs, bool inplace,
         const py::dict& example_kwargs) -> torch::jit::Module {
        HANDLE_TH_ERRORS
        torch::jit::Module mod = as_script_module(module);
        std::vector<c10::IValue> inputs = forward_inputs(mod, example_inputs, example_kwargs);
        py::gil_scoped_release no_gil;
        return qwix::jit::quantize_model(mod, provider, std::move(inputs), inplace);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      py::arg("module"), py::arg("provider"), py::arg("example_inputs"), py::arg("inplace") = false,
      py::arg("example_kwargs") = py::dict(), "The TorchScript pass (qwix::jit::quantize_model): returns the quantized torch._C.ScriptModule.");
  m.def(
      "jit_is_quantized", [](const py::object& module) { return qwix::jit::is_quantized(as_script_module(module)); },
      py::arg("module"));
}
