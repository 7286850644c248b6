// Runtime probes of the TorchScript pass: two JIT-only operators (registered
// with the JIT operator registry, not the dispatcher, so they never show up in
// torch.ops) that record what the example forward passes to each intercepted
// op. They are conservative (side-effecting), so no graph pass removes them.
#include <c10/util/Exception.h>
#include <torch/csrc/jit/runtime/custom_operator.h>
#include <torch/csrc/jit/runtime/operator.h>

#include "jit/internal.h"

namespace qwix::jit_internal {
namespace {

thread_local ProbeRecorder* current = nullptr;

OperandRecord describe(const at::Tensor& t, const ProbeRecorder& r) {
  OperandRecord o;
  if (!t.defined()) return o;
  o.sizes = t.sizes().vec();
  o.dtype = t.scalar_type();
  o.device = t.device();
  o.floating = t.is_floating_point();
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (r.parameters.count(impl)) {
    o.is_weight = true;
  } else if (t.is_view()) {
    const auto& base = t._base();
    o.is_weight = base.defined() && r.parameters.count(base.unsafeGetTensorImpl()) > 0;
  }
  return o;
}

void probe(torch::jit::Stack& stack) {
  at::Tensor rhs = torch::jit::pop(stack).toTensor();
  at::Tensor lhs = torch::jit::pop(stack).toTensor();
  const int64_t id = torch::jit::pop(stack).toInt();
  if (current == nullptr) return;
  ProbeEvent e;
  e.id = id;
  e.lhs = describe(lhs, *current);
  e.rhs = describe(rhs, *current);
  current->events.push_back(std::move(e));
}

void probe_begin(torch::jit::Stack& stack) {
  const int64_t id = torch::jit::pop(stack).toInt();
  if (current == nullptr) return;
  ProbeEvent e;
  e.id = id;
  e.begin = true;
  current->events.push_back(std::move(e));
}

torch::jit::RegisterOperators registry({
    torch::jit::Operator("qwix_jit::probe(int id, Tensor lhs, Tensor rhs) -> ()", probe,
                         c10::AliasAnalysisKind::CONSERVATIVE),
    torch::jit::Operator("qwix_jit::probe_begin(int id) -> ()", probe_begin, c10::AliasAnalysisKind::CONSERVATIVE),
});

}  // namespace

ProbeRecorder::ProbeRecorder(std::unordered_set<const c10::TensorImpl*> params)
    : parameters(std::move(params)), previous_(current) {
  current = this;
}

ProbeRecorder::~ProbeRecorder() { current = previous_; }

c10::Symbol probe_symbol() {
  static const c10::Symbol s = c10::Symbol::fromQualString("qwix_jit::probe");
  return s;
}

c10::Symbol probe_begin_symbol() {
  static const c10::Symbol s = c10::Symbol::fromQualString("qwix_jit::probe_begin");
  return s;
}

}  // namespace qwix::jit_internal
