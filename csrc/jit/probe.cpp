// Runtime probes of the TorchScript pass: two JIT-only operators (registered
// with the JIT operator registry, not the dispatcher, so they never show up in
// torch.ops) that record what the example forward passes to each intercepted
// op. They are conservative (side-effecting), so no graph pass removes them.
#include <c10/util/Exception.h>
#include <torch/csrc/jit/runtime/custom_operator.h>
#include <torch/csrc/jit/runtime/operator.h>

#include <atomic>
#include <mutex>
#include <unordered_map>

#include "jit/internal.h"

namespace qwix::jit_internal {
namespace {

// The live recorders by session (a quantize_model call's probes may run on several threads).
std::mutex recorders_mutex;
std::unordered_map<int64_t, ProbeRecorder*>& recorders() {
  static std::unordered_map<int64_t, ProbeRecorder*> r;
  return r;
}

// Appends the event of probe `id` to its session's recorder, if one is alive.
template <typename Fill>
void record(int64_t id, Fill fill) {
  const std::lock_guard<std::mutex> lock(recorders_mutex);
  const auto found = recorders().find(id >> 32);
  if (found == recorders().end()) return;
  ProbeEvent e;
  e.id = probe_index(id);
  fill(e, *found->second);
  found->second->events.push_back(std::move(e));
}

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
  record(id, [&](ProbeEvent& e, const ProbeRecorder& r) {
    e.lhs = describe(lhs, r);
    e.rhs = describe(rhs, r);
  });
}

void probe_begin(torch::jit::Stack& stack) {
  const int64_t id = torch::jit::pop(stack).toInt();
  record(id, [](ProbeEvent& e, const ProbeRecorder&) { e.begin = true; });
}

torch::jit::RegisterOperators registry({
    torch::jit::Operator("qwix_jit::probe(int id, Tensor lhs, Tensor rhs) -> ()", probe,
                         c10::AliasAnalysisKind::CONSERVATIVE),
    torch::jit::Operator("qwix_jit::probe_begin(int id) -> ()", probe_begin, c10::AliasAnalysisKind::CONSERVATIVE),
});

}  // namespace

int64_t new_probe_session() {
  static std::atomic<int64_t> next{1};
  return next.fetch_add(1) & 0x7fffffff;  // (ids stay positive int64 constants)
}

ProbeRecorder::ProbeRecorder(int64_t session, std::unordered_set<const c10::TensorImpl*> params)
    : parameters(std::move(params)), session_(session) {
  const std::lock_guard<std::mutex> lock(recorders_mutex);
  recorders()[session_] = this;
}

ProbeRecorder::~ProbeRecorder() {
  const std::lock_guard<std::mutex> lock(recorders_mutex);
  recorders().erase(session_);
}

c10::Symbol probe_symbol() {
  static const c10::Symbol s = c10::Symbol::fromQualString("qwix_jit::probe");
  return s;
}

c10::Symbol probe_begin_symbol() {
  static const c10::Symbol s = c10::Symbol::fromQualString("qwix_jit::probe_begin");
  return s;
}

}  // namespace qwix::jit_internal
