#pragma once
// Helpers of the TorchScript pass (csrc/jit/), not part of the public API.
#include <torch/csrc/jit/api/module.h>

#include <cstdint>
#include <functional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace qwix::jit_internal {

// ---- module tree cloning with control over type sharing (clone.cpp) ----

// The type a cloned object gets: `reuse` (kept as is: no methods cloned; its
// attribute layout must equal the source's), or else a fresh type shared by
// every clone whose source got the same `key` (methods, hooks, properties and
// constants are cloned once per key, from the first such source).
struct TypeChoice {
  c10::ClassTypePtr reuse;
  std::string key;
};
using TypeChooser = std::function<TypeChoice(const torch::jit::Module& source)>;

struct CloneResult {
  torch::jit::Module module;
  // source object -> its clone (a module shared in the tree is cloned once)
  std::unordered_map<const c10::ivalue::Object*, c10::intrusive_ptr<c10::ivalue::Object>> objects;
};

// Clones the module tree under `root`. copy_tensors: tensors (parameters,
// buffers, tensor attributes) become fresh copies (requires_grad kept, ties
// kept); otherwise the clone holds the same tensors. In the cloned methods the
// self argument and the prim::GetAttr results of submodules get the new types;
// any other module-typed value whose type was replaced is an error.
CloneResult clone_module_tree(const torch::jit::Module& root, const TypeChooser& choose, bool copy_tensors);

// ---- runtime probing (probe.cpp) ----

// What a probe saw of one operand.
struct OperandRecord {
  std::vector<int64_t> sizes;
  c10::ScalarType dtype = c10::ScalarType::Float;
  c10::Device device = c10::Device(c10::kCPU);
  bool floating = false;
  bool is_weight = false;  // a parameter, or a view of one (as the Python path's _is_weight)
};

struct ProbeEvent {
  int64_t id = 0;
  bool begin = false;  // a module's forward starts (op counts restart)
  OperandRecord lhs, rhs;
};

// A probe id names its pass's session (one per quantize_model call) and the probe: the interpreter may
// resume a forward on another thread (after torch.jit.fork / wait), so probes find their recorder by
// session, not by thread.
int64_t new_probe_session();
inline int64_t probe_id(int64_t session, int64_t index) { return (session << 32) | index; }
inline int64_t probe_index(int64_t id) { return id & 0xffffffff; }

// While alive, the probe operators of `session` record into `events` (from any thread).
class ProbeRecorder {
 public:
  ProbeRecorder(int64_t session, std::unordered_set<const c10::TensorImpl*> parameters);
  ~ProbeRecorder();
  ProbeRecorder(const ProbeRecorder&) = delete;
  ProbeRecorder& operator=(const ProbeRecorder&) = delete;

  std::vector<ProbeEvent> events;
  std::unordered_set<const c10::TensorImpl*> parameters;

 private:
  int64_t session_;
};

// The JIT-only operators the probe inserts (side-effecting, never saved):
//   qwix_jit::probe(int id, Tensor lhs, Tensor rhs) -> ()
//   qwix_jit::probe_begin(int id) -> ()
c10::Symbol probe_symbol();
c10::Symbol probe_begin_symbol();

}  // namespace qwix::jit_internal
