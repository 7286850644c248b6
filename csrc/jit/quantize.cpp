// The TorchScript pass (DESIGN sections 1 and 3): qwix::jit::quantize_model.
//
// Per module of the tree, the ops linear / conv1d-3d / conv_transpose1d-3d / matmul (and mm, addmm's
// product) / bmm (and baddbmm's product) / einsum (two operands) of its own `forward` are quantized as
// the provider's plan says, the same decisions and ops as the Python nn.Module path:
//
//  1. Each module's forward is its own graph (submodule calls stay
//     prim::CallMethod "forward", the boundary of a module as a forward hook is
//     in Python). Calls to free functions and to other methods (self._conv_forward,
//     F.multi_head_attention_forward, ...) whose code holds such ops are inlined,
//     so those ops belong to the calling module, as they do in Python. Where the
//     provider decomposes attention, aten::scaled_dot_product_attention is
//     replaced by the body of qwix::decomposed_attention (two matmuls).
//  2. Shapes come from running the example inputs once: every module that some
//     rule can match gets its own type (a TorchScript type is shared by all
//     instances of a class), probe operators are inserted before each op and at
//     the start of forward, and the forward runs under no_grad. The probes see
//     the real operands: their ranks, dtypes, devices, whether each is a
//     parameter or a view of one (the Python path's test), and the order in
//     which a module's ops run, which gives the op ids (linear0, linear1, ...).
//  3. The probes are removed and quantization nodes inserted: qwix::fake_quant
//     (dynamic), or for SRQ a QuantStat submodule <op id>_lhs/_rhs and
//     `if training: calibrate + update_quant_stat`, then srq_scale +
//     fake_quant_with_scale. An op that a rule matches but the example did not
//     run gets a prim::RaiseException guard (and a warning): it is never left in
//     floating point silently.
//  4. The tree is cloned once more so that instances whose code came out the
//     same share one type again and untouched subtrees keep their original types.
#include <ATen/ATen.h>
#include <ATen/core/Generator.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <c10/util/Exception.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/frontend/resolver.h>
#include <torch/csrc/jit/frontend/sugared_value.h>

#include <algorithm>
#include <map>
#include <set>
#include <sstream>

#include "jit/internal.h"
#include "qwix/qwix.h"
#include "rules/internal.h"

namespace qwix::jit {
namespace {

using jit_internal::OperandRecord;
using jit_internal::ProbeEvent;
using torch::jit::Block;
using torch::jit::Graph;
using torch::jit::Module;
using torch::jit::NamedValue;
using torch::jit::Node;
using torch::jit::Value;
using torch::jit::WithInsertPoint;

constexpr const char* kQuantizedAttr = "_qwix_quantized";
constexpr const char* kUpdateAttr = "_qwix_update_stats";
constexpr const char* kForceAttr = "_qwix_force_update";
constexpr const char* kPathAttr = "_qwix_path";

// torch.jit.trace records convolutions below the nn call: aten::_convolution(input, weight, bias, stride,
// padding, dilation, transposed, output_padding, groups, ...), or with string padding ('same', 'valid')
// aten::_convolution_mode(input, weight, bias, stride, padding, dilation, groups). The op name follows
// from `transposed` and the number of spatial dims (stride's length), constants in a trace. nullopt: not
// a constant.
bool is_convolution(const Node* n) { return n->kind() == c10::aten::_convolution; }
bool is_convolution_mode(const Node* n) { return n->kind() == c10::Symbol::aten("_convolution_mode"); }

std::optional<std::string> convolution_op_name(const Node* n) {
  const Node* stride = n->input(3)->node();
  std::optional<size_t> dims;
  if (auto s = torch::jit::toIValue(n->input(3)); s && s->isIntList()) dims = s->toIntList().size();
  else if (stride->kind() == c10::prim::ListConstruct) dims = stride->inputs().size();
  if (!dims || *dims < 1 || *dims > 3) return std::nullopt;
  bool transposed = false;
  if (is_convolution(n)) {
    const auto t = torch::jit::toIValue(n->input(6));
    if (!t || !t->isBool()) return std::nullopt;
    transposed = t->toBool();
  }
  return std::string(transposed ? "conv_transpose" : "conv") + std::to_string(*dims) + "d";
}

std::optional<std::string> intercepted_op(const Node* n) {
  static const std::vector<std::pair<c10::Symbol, std::string>> kinds = {
      {c10::aten::linear, "linear"}, {c10::aten::conv1d, "conv1d"}, {c10::aten::conv2d, "conv2d"},
      {c10::aten::conv3d, "conv3d"}, {c10::aten::conv_transpose1d, "conv_transpose1d"},
      {c10::aten::conv_transpose2d, "conv_transpose2d"}, {c10::aten::conv_transpose3d, "conv_transpose3d"},
      {c10::aten::matmul, "matmul"}, {c10::aten::bmm, "bmm"},
      {c10::aten::baddbmm, "bmm"},  // input + batch1 @ batch2: its product is a bmm (as in Python)
      {c10::aten::mm, "matmul"},    {c10::aten::addmm, "matmul"},  // a 2-D matmul; input + mat1 @ mat2
      {c10::aten::einsum, "einsum"},
  };
  // out= overloads (mutable schemas) are not intercepted, as in Python: they have no autograd.
  if (const auto* schema = n->maybeSchema(); schema && schema->is_mutable()) return std::nullopt;
  if (is_convolution(n) || is_convolution_mode(n)) return convolution_op_name(n).value_or("convolution");
  for (const auto& [k, name] : kinds)
    if (n->kind() == k) return name;
  return std::nullopt;
}

std::string quote(const std::string& s) { return "'" + s + "'"; }

std::string location(const Node* n) {
  if (auto flc = n->sourceRange().file_line_col()) {
    const auto& [file, line, col] = *flc;
    // An installed package's code (torch's own modules) by its import path: "torch/nn/functional.py:6229".
    const std::string packages = "/site-packages/";
    const size_t at = file.rfind(packages);
    return (at == std::string::npos ? file : file.substr(at + packages.size())) + ":" + std::to_string(line);
  }
  return "";
}

std::string join_ints(const std::vector<int64_t>& v) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  os << "]";
  return os.str();
}

// Inserts a call of an op that returns nothing (Graph::insert packs "no outputs" as an empty tuple).
void insert_void(Graph& g, c10::Symbol op, std::vector<NamedValue> args) {
  Value* packed = g.insert(op, args);
  if (!packed->hasUses() && packed->node()->kind() == c10::prim::TupleConstruct) packed->node()->destroy();
}

// ---- inlining of calls whose code holds intercepted ops ----

// torch.jit.trace records a submodule called several times as calls of its methods forward, forward1,
// forward2, ...: each is a call of the submodule, as in Python. TorchScript does not mark traced code, so
// a forwardN called on another module counts as such a call when its code is that module's forward's
// (Pass::collect_numbered_forward_calls); otherwise it is a helper method, inlined into the caller as any
// other (a scripted child's own `forward1`). TracedForwards: module type -> its traced forwardN.
using TracedForwards = std::unordered_map<const c10::ClassType*, std::set<std::string>>;

bool is_numbered_forward(const std::string& name) {
  return name.size() > 7 && name.compare(0, 7, "forward") == 0 &&
         std::all_of(name.begin() + 7, name.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// A call of a submodule: its forward (or a traced forwardN) on another module than the graph's own.
bool is_submodule_call(const Node* n, const TracedForwards& traced) {
  if (n->kind() != c10::prim::CallMethod) return false;
  auto cls = n->input(0)->type()->cast<c10::ClassType>();
  if (!cls || !cls->is_module()) return false;
  const std::string& name = n->s(c10::attr::name);
  if (name == "forward") return true;
  const auto it = traced.find(cls.get());
  return it != traced.end() && it->second.count(name) && n->input(0) != n->owningGraph()->inputs()[0];
}

// The function a CallFunction or CallMethod node calls; nullptr for other nodes and for calls of an
// interface (dispatched at run time).
torch::jit::Function* callee_of(const Node* n) {
  if (n->kind() == c10::prim::CallFunction) {
    auto ft = n->input(0)->type()->cast<c10::FunctionType>();
    return ft ? ft->function() : nullptr;
  }
  if (n->kind() == c10::prim::CallMethod) {
    auto cls = n->input(0)->type()->cast<c10::ClassType>();
    return cls ? cls->findMethod(n->s(c10::attr::name)) : nullptr;
  }
  return nullptr;
}

torch::jit::Function* inlinable_callee(const Node* n, const TracedForwards& traced) {
  return is_submodule_call(n, traced) ? nullptr : callee_of(n);  // a submodule call: its own module
}

// The names the decomposed attention's source uses (see decomposed_attention_source); TorchScript's own
// builtins do the rest.
struct AttentionSourceResolver : torch::jit::Resolver {
  std::shared_ptr<torch::jit::SugaredValue> resolveValue(const std::string& name, torch::jit::GraphFunction& m,
                                                         const torch::jit::SourceRange& loc) override {
    if (name == "torch") return std::make_shared<torch::jit::BuiltinModule>("aten");  // torch.matmul: aten::matmul
    if (name == "ValueError") return std::make_shared<torch::jit::ExceptionValue>("ValueError");
    if (name == "safe_softmax")
      return std::make_shared<torch::jit::BuiltinFunction>(c10::Symbol::aten("_safe_softmax"), std::nullopt);
    if (name == "bool_dtype")  // a dtype is an int in TorchScript
      return std::make_shared<torch::jit::SimpleValue>(m.graph()->insertConstant(c10::IValue(c10::kBool), loc));
    return nullptr;
  }
  c10::TypePtr resolveType(const std::string&, const torch::jit::SourceRange&) override { return nullptr; }
};

// F.scaled_dot_product_attention decomposed into its two matmuls (qwix::decomposed_attention), as a
// TorchScript function compiled once.
torch::jit::GraphFunction& decomposed_attention_function() {
  static const std::shared_ptr<torch::jit::CompilationUnit> cu = [] {
    auto unit = std::make_shared<torch::jit::CompilationUnit>();
    unit->define(std::nullopt, decomposed_attention_source(), std::make_shared<AttentionSourceResolver>(), nullptr);
    return unit;
  }();
  return torch::jit::toGraphFunction(cu->get_function("scaled_dot_product_attention"));
}

// Whether the list may change after it is built. Only reads are allowed (einsum itself, len, indexing,
// unpacking): any other use, even one that does not write it (put in a container, passed to a call),
// could let a write reach it through an alias.
bool may_be_mutated(const Value* list) {
  for (const auto& use : list->uses()) {
    const c10::Symbol k = use.user->kind();
    const bool read = k == c10::aten::einsum || k == c10::prim::ListUnpack || k == c10::aten::len ||
                      (k == c10::aten::__getitem__ && use.offset == 0);
    if (!read) return true;
  }
  return false;
}

bool is_attention(const Node* n) { return n->kind() == c10::aten::scaled_dot_product_attention; }

// The input a node's output is a view of, per its schema's alias annotations (`t(Tensor(a) self) -> Tensor(a)`);
// nullptr for other nodes.
const Value* viewed_input(const Node* n) {
  const c10::FunctionSchema* schema = n->maybeSchema();
  if (schema == nullptr || schema->is_mutable() || schema->returns().size() != 1) return nullptr;
  const c10::AliasInfo* out = schema->returns()[0].alias_info();
  if (out != nullptr && out->beforeSets().empty() && !out->containedTypes().empty())
    out = &out->containedTypes()[0];  // a list of views (`chunk(...) -> Tensor(a)[]`)
  if (out == nullptr || out->isWildcardBefore() || out->beforeSets().empty()) return nullptr;
  for (size_t i = 0; i < schema->arguments().size() && i < n->inputs().size(); ++i) {
    const c10::AliasInfo* in = schema->arguments()[i].alias_info();
    if (in != nullptr && in->beforeSets() == out->beforeSets()) return n->input(i);
  }
  return nullptr;
}

// The value a call returns at `offset`, in the callee's graph (calls without intercepted ops stay calls);
// v itself for other values.
const Value* through_calls(const Value* v) {
  torch::jit::Function* fn = callee_of(v->node());
  if (fn == nullptr || !fn->isGraphFunction()) return v;
  return through_calls(torch::jit::toGraphFunction(*fn).graph()->outputs().at(v->offset()));
}

// Whether an operand is a parameter (or a view of one) on every run (`must`), or may be one on some run
// (`may`: through a branch one of whose results is a parameter), from the graph alone. The probes see one
// run; an operand whose kind can change between runs keeps the example's plan in TorchScript.
bool parameter_on_runs(const Value* v, bool must) {
  // Several values that may reach the operand (list elements, branch results): all of them, or any.
  auto over = [must](const auto& values) {
    bool all = !values.empty(), any = false;
    for (const Value* e : values) {
      const bool p = parameter_on_runs(e, must);
      all = all && p;
      any = any || p;
    }
    return must ? all : any;
  };
  v = through_calls(v);
  const Node* n = v->node();
  if (n->kind() == c10::prim::GetAttr) {
    auto cls = n->input()->type()->cast<c10::ClassType>();
    const auto slot = cls ? cls->findAttributeSlot(n->s(c10::attr::name)) : std::nullopt;
    return slot && cls->is_parameter(*slot);
  }
  // Ops that return their input or a copy depending on its layout or dtype: a parameter's layout and dtype
  // do not change between runs, so the example's answer holds (followed only for `must`).
  static const std::set<c10::Symbol> kViewOrCopy = {
      c10::aten::contiguous, c10::aten::reshape, c10::aten::reshape_as, c10::aten::to, c10::aten::type_as,
      c10::aten::flatten};
  if (!must && kViewOrCopy.count(n->kind())) return false;
  if (n->kind() == c10::aten::detach) return false;  // not a view of the parameter for Python's test either
  // An element of a tuple built in the graph (a helper returning `self.w, self.b`, inlined).
  if (n->kind() == c10::prim::TupleUnpack || n->kind() == c10::prim::TupleIndex) {
    const Node* tuple = through_calls(n->input(0))->node();
    if (tuple->kind() != c10::prim::TupleConstruct) return false;
    if (n->kind() == c10::prim::TupleUnpack) return parameter_on_runs(tuple->input(v->offset()), must);
    const auto index = torch::jit::constant_as<int64_t>(n->input(1));
    return index && *index >= 0 && static_cast<size_t>(*index) < tuple->inputs().size() &&
           parameter_on_runs(tuple->input(*index), must);
  }
  if (const Value* base = viewed_input(n)) return parameter_on_runs(base, must);
  if (n->kind() == c10::prim::unchecked_cast) return parameter_on_runs(n->input(0), must);  // Optional refined
  // An element of a list: of a ListConstruct (any element, index unknown), or of a list of views.
  if (n->kind() == c10::prim::ListUnpack || n->kind() == c10::aten::__getitem__) {
    const Node* list = n->input(0)->node();
    if (list->kind() == c10::prim::ListConstruct) {
      if (may_be_mutated(list->output())) return false;  // (appended to: its elements are not its inputs)
      if (n->kind() == c10::prim::ListUnpack) return parameter_on_runs(list->input(v->offset()), must);
      return over(list->inputs());
    }
    if (const Value* base = viewed_input(list)) return parameter_on_runs(base, must);
    return false;
  }
  if (n->kind() == c10::prim::If) {
    std::vector<const Value*> results;
    for (const Block* b : n->blocks()) {
      const Value* out = b->outputs()[v->offset()];
      if (out->node()->kind() != c10::prim::Uninitialized) results.push_back(out);  // (Uninitialized: it raises)
    }
    return over(results);
  }
  return false;
}

// Replaces every sdpa node of the block (and its sub-blocks) by the decomposed function's body. `where`
// gets, for each node it inlines, the sdpa call's location (theirs is the function's source text).
void decompose_attention(Block* b, std::unordered_map<const Node*, std::string>& where) {
  static const char* const kSchema =
      "aten::scaled_dot_product_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, "
      "float dropout_p=0., bool is_causal=False, *, float? scale=None, bool enable_gqa=False) -> Tensor";
  for (auto it = b->nodes().begin(); it != b->nodes().end();) {
    Node* n = *it;
    ++it;
    if (is_attention(n)) {
      TORCH_CHECK_VALUE(n->matches(kSchema), "qwix: cannot decompose a scaled_dot_product_attention call whose "
                        "schema is not ", kSchema, " (this torch's differs from the one qwix knows)");
      Node* before = n->prev();
      const std::string call = location(n);
      const std::string here = (call.empty() ? "" : call + ", ") + "in scaled_dot_product_attention";
      torch::jit::inlineCallTo(n, &decomposed_attention_function());
      for (Node* m = before->next(); m != *it; m = m->next()) where[m] = here;
      continue;
    }
    for (Block* sb : n->blocks()) decompose_attention(sb, where);
  }
}

// attention: scaled_dot_product_attention counts as an op (it will be decomposed into two matmuls).
class Inliner {
 public:
  Inliner(bool attention, const TracedForwards& traced) : attention_(attention), traced_(traced) {}
  void run(Graph& g) {
    while (inline_block(g.block())) {
    }
  }
  // Whether g or a function it calls runs an intercepted op.
  bool has_ops(Graph& g) { return block_has_ops(g.block()); }

 private:
  bool has_ops(torch::jit::Function* fn) {
    if (!fn->isGraphFunction()) return false;
    if (auto it = memo_.find(fn); it != memo_.end()) return it->second;
    memo_[fn] = false;  // TorchScript has no recursion; this only guards the walk
    const bool r = block_has_ops(torch::jit::toGraphFunction(*fn).graph()->block());
    memo_[fn] = r;
    return r;
  }

  bool block_has_ops(Block* b) {
    for (Node* n : b->nodes()) {
      if (intercepted_op(n) || (attention_ && is_attention(n))) return true;
      if (auto* fn = inlinable_callee(n, traced_); fn && has_ops(fn)) return true;
      // (a fork's function: not quantized, but inlining its caller lets the pass see the fork and warn)
      if (n->kind() == c10::prim::fork && n->hasAttribute(torch::jit::attr::Subgraph) &&
          block_has_ops(n->g(torch::jit::attr::Subgraph)->block()))
        return true;
      for (Block* sb : n->blocks())
        if (block_has_ops(sb)) return true;
    }
    return false;
  }

  bool inline_block(Block* b) {
    bool changed = false;
    for (auto it = b->nodes().begin(); it != b->nodes().end();) {
      Node* n = *it;
      ++it;
      if (auto* fn = inlinable_callee(n, traced_); fn && has_ops(fn)) {
        if (n->kind() == c10::prim::CallFunction) n->removeInput(0);
        torch::jit::inlineCallTo(n, &torch::jit::toGraphFunction(*fn));
        changed = true;
        continue;
      }
      for (Block* sb : n->blocks()) changed |= inline_block(sb);
    }
    return changed;
  }

  bool attention_;
  const TracedForwards& traced_;
  std::unordered_map<torch::jit::Function*, bool> memo_;
};

// ---- PyTorch's fused inference fast paths ----

// nn.MultiheadAttention, nn.TransformerEncoderLayer and nn.TransformerEncoder take a fused kernel in eval
// mode without gradients, reading their children's weights directly, so no op of theirs would be
// quantized. In Python the QAT mode keeps them on the regular path (a mode is a "torch function"
// argument, which their fast path refuses); TorchScript compiles that check away, so the pass takes the
// branch that leads to the fused op out of the code instead. Returns whether the graph changed.
bool disable_fused_fast_paths(Graph& g, const std::string& path) {
  static const std::vector<c10::Symbol> kFused = {
      c10::Symbol::aten("_native_multi_head_attention"), c10::Symbol::aten("_transformer_encoder_layer_fwd"),
      c10::Symbol::aten("_nested_tensor_from_mask")};
  bool changed = false;
  std::function<void(Block*)> walk = [&](Block* b) {
    for (Node* n : b->nodes()) {
      for (Block* sb : n->blocks()) walk(sb);
      if (std::find(kFused.begin(), kFused.end(), n->kind()) == kFused.end()) continue;
      Node* branch = n->owningBlock()->owningNode();
      TORCH_CHECK_VALUE(branch && branch->kind() == c10::prim::If, "qwix: module '", path, "' calls ",
                        n->kind().toQualString(), " outside a branch (", location(n), "); this fused op reads "
                        "the weights of modules that rules quantize, and there is no regular path to take instead "
                        "(torch.jit.trace in eval mode under no_grad records only the fused op: trace in training "
                        "mode or with gradients enabled, or use torch.jit.script)");
      const bool then_branch = branch->blocks()[0] == n->owningBlock();
      WithInsertPoint ip(branch);
      branch->replaceInput(0, g.insertConstant(!then_branch));
      changed = true;
    }
  };
  walk(g.block());
  return changed;
}

// ---- per module bookkeeping ----

struct Site {
  Node* node = nullptr;
  std::string op;
  Value* lhs = nullptr;
  Value* rhs = nullptr;
  size_t lhs_pos = 0, rhs_pos = 1;  // their input positions (baddbmm, addmm: 1, 2)
  std::string equation;
  int64_t groups = 1;  // conv_transpose: its groups (a constant of the graph)
  std::string where;
  // what the example forward showed
  int64_t executions = 0;
  std::set<int64_t> indices;  // n of the op ids <op><n> it ran as
  OperandRecord lhs_rec, rhs_rec;
  std::string inconsistency;  // non-empty: operands differed between runs
};

struct Instance {
  Module module;  // in the working tree
  std::string path;
  c10::ClassTypePtr orig_type;
  bool candidate = false;  // some rule matches this path for some op
  bool modified = false;
  std::string signature;
  std::vector<Site> sites;
  std::map<std::string, int64_t> counts;  // op counts of the running forward (probing)
  std::map<std::string, std::pair<bool, std::vector<int64_t>>> stats;  // QuantStats added: symmetric, shape
  bool ran = false;                       // its forward ran in the example forward
  bool above_candidate = false;           // it or a descendant is a candidate
};

std::string site_name(const Instance& inst, const Site& s) {
  std::string r = "module " + quote(inst.path) + ", op " + s.op;
  if (s.indices.size() == 1) r += std::to_string(*s.indices.begin());
  if (!s.where.empty()) r += " (" + s.where + ")";
  return r;
}

// Everything the inserted code depends on: instances whose signatures are equal share one type (finish).
// An activation's code has a rank check that a weight's has not.
std::string operand_signature(const OperandPlan& p) {
  std::ostringstream os;
  os << (p.is_weight ? "w:" : "a:") << p.qtype << "/" << p.calibration_method << "/"
     << join_ints(p.channelwise_axes) << "/";
  for (const auto& [a, t] : p.tiled_axes) os << a << ":" << t << ",";
  os << "/" << p.static_scale << join_ints(p.batch_axes) << "/"
     << (p.clip_gradient ? (*p.clip_gradient ? "1" : "0") : "n");
  return os.str();
}

// ---- QuantStat submodules ----

c10::ClassTypePtr quant_stat_type(const std::shared_ptr<torch::jit::CompilationUnit>& cu, bool symmetric) {
  const c10::QualifiedName name(symmetric ? "__torch__.qwix_torch.jit.QuantStat"
                                          : "__torch__.qwix_torch.jit.minmax.QuantStat");
  const std::vector<std::string> attrs = symmetric ? std::vector<std::string>{"training", "count", "sum_of_absmax"}
                                                   : std::vector<std::string>{"training", "count", "sum_of_min",
                                                                              "sum_of_max"};
  if (auto t = cu->get_class(name); t && t->is_module() && t->numAttributes() == attrs.size() && t->methods().empty()) {
    bool same = true;
    for (size_t i = 0; i < attrs.size(); ++i) same = same && t->getAttributeName(i) == attrs[i];
    if (same) return t;
  }
  Module proto(name, cu, /*shouldMangle=*/true);
  auto t = proto.type();
  t->addAttribute("training", c10::BoolType::get());
  for (size_t i = 1; i < attrs.size(); ++i)
    t->addAttribute(attrs[i], c10::TensorType::get(), /*is_parameter=*/false, /*is_buffer=*/true);
  return t;
}

std::vector<std::string> stat_sum_names(bool symmetric) {
  return symmetric ? std::vector<std::string>{"sum_of_absmax"} : std::vector<std::string>{"sum_of_min", "sum_of_max"};
}

// Saves the buffers and the RNG states (CPU, and the CUDA devices the module uses) and restores
// them when destroyed.
class StateRestorer {
 public:
  explicit StateRestorer(const Module& m) {
    std::set<c10::DeviceIndex> cuda;
    for (const auto& b : m.buffers()) {
      if (!b.defined()) continue;
      buffers_.emplace_back(b, b.clone());
      if (b.is_cuda()) cuda.insert(b.device().index());
    }
    for (const auto& p : m.parameters())
      if (p.is_cuda()) cuda.insert(p.device().index());
    save(at::detail::getDefaultCPUGenerator());
    for (c10::DeviceIndex i : cuda) save(at::globalContext().defaultGenerator(c10::Device(c10::kCUDA, i)));
  }
  ~StateRestorer() {
    for (auto& [gen, state] : rngs_) {
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_state(state);
    }
    for (auto& [b, saved] : buffers_) b.copy_(saved);
  }
  StateRestorer(const StateRestorer&) = delete;
  StateRestorer& operator=(const StateRestorer&) = delete;

 private:
  void save(at::Generator gen) {
    std::lock_guard<std::mutex> lock(gen.mutex());
    rngs_.emplace_back(gen, gen.get_state());
  }
  std::vector<std::pair<at::Tensor, at::Tensor>> buffers_;
  std::vector<std::pair<at::Generator, at::Tensor>> rngs_;
};

// ---- the pass ----

class Pass {
 public:
  Pass(QatProvider& provider, bool inplace) : provider_(provider), inplace_(inplace) {}

  Module run(const Module& m, std::vector<c10::IValue> inputs) {
    // Under InferenceMode, copies and statistics would be inference tensors, which training cannot update.
    const c10::InferenceMode not_inference(false);
    TORCH_CHECK_VALUE(!m.type()->hasAttribute(kQuantizedAttr),
                      "qwix: this TorchScript module is already quantized (quantize_model was applied to it)");
    TORCH_CHECK_VALUE(m.find_method("forward").has_value(),
                      "qwix: quantize_model needs a TorchScript module with a forward method");
    // torch.jit.freeze folds every parameter into a constant: a tree without parameters whose ops read
    // constant tensors looks frozen (see add_site).
    has_parameters_ = m.parameters().size() > 0;
    collect(m);
    make_working_tree(m);
    collect_numbered_forward_calls();
    for (Instance& inst : instances_) {
      if (inst.above_candidate) keep_off_fast_paths(inst);
      if (inst.candidate) prepare(inst);
    }
    const bool example_ran = !inputs.empty() || !probes_.empty();
    probe(std::move(inputs));
    for (Instance& inst : instances_)
      if (inst.candidate) transform(inst);
    warn_unexecuted();
    warn_unseen_calls();
    warn_kind_may_change();
    warn_numbered_helpers();
    warn_if_nothing_matched(example_ran);
    return finish();
  }

 private:
  // Paths (first occurrence, pre-order, as named_modules()) and which modules a rule can match.
  void collect(const Module& root) {
    std::function<void(const Module&, const std::string&, bool)> walk = [&](const Module& mod, const std::string& path,
                                                                            bool in_parametrization) {
      if (!seen_.emplace(mod._ivalue().get(), orig_.size()).second) return;
      TORCH_CHECK_VALUE(!mod.type()->hasAttribute(kQuantizedAttr), "qwix: submodule ", quote(path),
                        " of this TorchScript module is already quantized (it came from quantize_model); quantizing "
                        "it again would fake-quantize its ops twice: quantize the floating-point model instead");
      orig_.push_back({mod, path});
      in_parametrization = in_parametrization || is_parametrization_list(*mod.type());
      if (in_parametrization) in_parametrization_.insert(path);
      for (const auto& c : mod.named_children())
        walk(c.value, path.empty() ? c.name : path + "." + c.name, in_parametrization);
    };
    walk(root, "", false);
    std::function<bool(const Module&)> subtree = [&](const Module& mod) -> bool {
      const auto* key = mod._ivalue().get();
      if (auto it = subtree_.find(key); it != subtree_.end()) return it->second;
      bool any = is_candidate(orig_[seen_.at(key)].second);
      for (const auto& c : mod.children()) any = subtree(c) || any;
      subtree_[key] = any;
      return any;
    };
    subtree(root);
  }

  // torch.nn.utils.parametrize's container (a trace records its modules as submodules): their ops compute
  // a weight whenever it is read and are never quantized, as on the Python path.
  static bool is_parametrization_list(const c10::ClassType& type) {
    if (!type.name()) return false;
    const std::string qualified = type.name()->qualifiedName();
    return type.name()->name() == "ParametrizationList" &&
           qualified.find("torch.nn.utils.parametrize.") != std::string::npos;
  }

  bool is_candidate(const std::string& path) const {
    if (in_parametrization_.count(path)) return false;
    for (const auto& op : valid_op_names())
      if (provider_.match_rule(path, op)) return true;
    return false;
  }

  // The working tree: modules on a path to a candidate get a type of their own.
  void make_working_tree(const Module& root) {
    auto choose = [&](const Module& src) -> jit_internal::TypeChoice {
      if (!subtree_.at(src._ivalue().get())) return {src.type(), ""};
      std::ostringstream key;
      key << "instance:" << static_cast<const void*>(src._ivalue().get());
      return {nullptr, key.str()};
    };
    auto result = jit_internal::clone_module_tree(root, choose, /*copy_tensors=*/!inplace_);
    work_ = result.module;
    for (const auto& [mod, path] : orig_) {
      Instance inst;
      inst.module = Module(result.objects.at(mod._ivalue().get()));
      inst.path = path;
      inst.orig_type = mod.type();
      inst.candidate = is_candidate(path);
      inst.above_candidate = subtree_.at(mod._ivalue().get());
      index_[inst.module._ivalue().get()] = instances_.size();
      instances_.push_back(std::move(inst));
    }
  }

  std::shared_ptr<Graph> forward_graph(const Instance& inst, const std::string& method = "forward") const {
    torch::jit::Function* fn = inst.module.type()->findMethod(method);
    if (fn == nullptr || !fn->isGraphFunction()) return nullptr;
    return torch::jit::toGraphFunction(*fn).graph();
  }

  void keep_off_fast_paths(Instance& inst) {
    for (const std::string& method : forward_methods(inst)) {
      if (auto g = forward_graph(inst, method); g && disable_fused_fast_paths(*g, inst.path)) {
        inst.signature += "|no fast path in " + method;
        inst.modified = true;
      }
    }
  }

  // A method's code with every call followed into its callee, as the kinds of its nodes in order
  // (constants left out: a trace bakes the example's sizes into them); whether it runs an intercepted op.
  // Read only: torch::jit::Inline would make the callees cache optimized graphs without the probes.
  static std::pair<std::vector<c10::Symbol>, bool> inlined_code(const c10::ClassType& cls, const std::string& method) {
    std::vector<c10::Symbol> kinds;
    bool ops = false;
    std::function<void(const Block*)> walk = [&](const Block* b) {
      for (const Node* n : b->nodes()) {
        torch::jit::Function* callee = callee_of(n);
        if (callee != nullptr && callee->isGraphFunction()) {
          walk(torch::jit::toGraphFunction(*callee).graph()->block());
          continue;
        }
        if (n->kind() != c10::prim::Constant) kinds.push_back(n->kind());
        ops = ops || intercepted_op(n) || is_attention(n);
        for (const Block* sb : n->blocks()) walk(sb);
      }
    };
    torch::jit::Function* fn = cls.findMethod(method);
    if (fn != nullptr && fn->isGraphFunction()) walk(torch::jit::toGraphFunction(*fn).graph()->block());
    return {kinds, ops};
  }

  // The traced forwardN methods that some graph of the tree calls on a submodule (see TracedForwards): those
  // whose code, inlined, is the module's forward's, node for node. Decided on the untouched graphs, before
  // any is prepared. A forwardN with ops and other code is a helper; a warning lists those of modules a rule
  // may quantize (a traced repeat call that took another branch is one too, and its ops then count as the
  // caller's).
  void collect_numbered_forward_calls() {
    std::set<std::tuple<const c10::ClassType*, std::string, bool>> helpers;  // callee type, method, caller candidate
    bool caller_candidate = false;
    std::function<void(Block*)> walk = [&](Block* b) {
      for (Node* n : b->nodes()) {
        for (Block* sb : n->blocks()) walk(sb);
        if (n->kind() != c10::prim::CallMethod || n->input(0) == n->owningGraph()->inputs()[0]) continue;
        auto cls = n->input(0)->type()->cast<c10::ClassType>();
        const std::string& name = n->s(c10::attr::name);
        if (!cls || !cls->is_module() || !is_numbered_forward(name)) continue;
        const auto [code, ops] = inlined_code(*cls, name);
        if (code == inlined_code(*cls, "forward").first) numbered_forwards_[cls.get()].insert(name);
        else if (ops) helpers.emplace(cls.get(), name, caller_candidate);
      }
    };
    for (const Instance& inst : instances_) {
      caller_candidate = inst.candidate;
      for (torch::jit::Function* fn : inst.module.type()->methods())
        if (fn->isGraphFunction()) walk(torch::jit::toGraphFunction(*fn).graph()->block());
    }
    for (const Instance& inst : instances_)  // where a rule may quantize the caller's or the callee's ops
      for (const auto& [type, name, by_candidate] : helpers)
        if (type == inst.module.type().get() && (by_candidate || inst.above_candidate))
          numbered_helpers_.insert(quote(inst.path) + "." + name);
  }

  void warn_numbered_helpers() const {
    if (numbered_helpers_.empty()) return;
    std::string list;
    for (const auto& h : numbered_helpers_) list += (list.empty() ? "" : ", ") + h;
    TORCH_WARN("qwix: these methods are called on their module by another module and named like a traced repeat "
               "call (forward1, ...), but their code differs from the module's forward: their ops count as the "
               "caller's, as a scripted helper method's do (in Python, as ops run outside the module's forward). "
               "If one is a traced call of the module that took another branch, quantize the nn.Module instead: ",
               list);
  }

  // The methods that run as the module's forward: forward, and the forwardN a trace calls.
  std::vector<std::string> forward_methods(const Instance& inst) const {
    std::vector<std::string> names{"forward"};
    if (auto it = numbered_forwards_.find(inst.module.type().get()); it != numbered_forwards_.end())
      names.insert(names.end(), it->second.begin(), it->second.end());
    return names;
  }

  void prepare(Instance& inst) {
    for (const std::string& method : forward_methods(inst)) prepare_method(inst, method);
  }

  // Inline, find the intercepted ops, insert the probes.
  void prepare_method(Instance& inst, const std::string& method) {
    auto g = forward_graph(inst, method);
    if (!g) return;
    const size_t first_site = inst.sites.size();
    const bool attention = provider_.decomposes_attention(inst.path);
    Inliner(attention, numbered_forwards_).run(*g);
    if (attention) decompose_attention(g->block(), where_);
    const size_t ii = &inst - instances_.data();
    std::function<void(Block*)> walk = [&](Block* b) {
      for (Node* n : b->nodes()) {
        if (auto op = intercepted_op(n)) add_site(inst, n, *op);
        if (const std::string call = unseen_call(n); !call.empty() && provider_.may_quantize({inst.path})) {
          const std::string where = location(n);
          unseen_calls_[inst.path].push_back(call + (where.empty() ? "" : " (" + where + ")"));
        }
        for (Block* sb : n->blocks()) walk(sb);
      }
    };
    walk(g->block());
    if (inst.sites.size() == first_site) return;

    Node* begin = g->create(jit_internal::probe_begin_symbol(), 0);
    g->block()->prependNode(begin);
    add_probe_input(*g, begin, jit_internal::probe_id(session_, static_cast<int64_t>(targets_.size())));
    targets_.emplace_back(ii, -1);
    for (size_t si = first_site; si < inst.sites.size(); ++si) {
      Site& s = inst.sites[si];
      WithInsertPoint ip(s.node);
      Node* p = g->insertNode(g->create(jit_internal::probe_symbol(), 0));
      add_probe_input(*g, p, jit_internal::probe_id(session_, static_cast<int64_t>(targets_.size())));
      p->addInput(s.lhs);
      p->addInput(s.rhs);
      targets_.emplace_back(ii, static_cast<int64_t>(si));
    }
  }

  void add_probe_input(Graph& g, Node* probe, int64_t id) {
    WithInsertPoint ip(probe);
    probe->addInput(g.insertConstant(id));
    probes_.push_back(probe);
  }

  void add_site(Instance& inst, Node* n, const std::string& op) {
    Site s;
    s.node = n;
    s.op = op;
    const auto it = where_.find(n);
    s.where = it != where_.end() ? it->second : location(n);
    if (op == "einsum") {
      auto eq = torch::jit::toIValue(n->input(0));
      Node* list = n->input(1)->node();
      // A list changed after it was built (ops[1] = w, ops.append(v)) holds other operands than the
      // ListConstruct's inputs.
      const bool literal = list->kind() == c10::prim::ListConstruct && !may_be_mutated(list->output());
      if (literal && list->inputs().size() != 2) return;  // not a two-operand einsum: not intercepted
      if (!eq || !eq->isString() || !literal) {
        TORCH_CHECK_VALUE(!provider_.match_rule(inst.path, op), "qwix: ", site_name(inst, s),
                          ": cannot quantize an einsum whose equation is not a constant or whose operands are not "
                          "a literal list of two tensors (write torch.einsum(\"...\", a, b))");
        return;
      }
      s.equation = eq->toStringRef();
      s.lhs = list->input(0);
      s.rhs = list->input(1);
    } else {
      if (n->kind() == c10::aten::baddbmm || n->kind() == c10::aten::addmm) {
        s.lhs_pos = 1;
        s.rhs_pos = 2;
      }
      if (op == "convolution") {  // aten::_convolution whose kind is not constant
        for (const auto& name : valid_op_names())
          TORCH_CHECK_VALUE(name.rfind("conv", 0) != 0 || !provider_.match_rule(inst.path, name), "qwix: ",
                            site_name(inst, s), ": cannot quantize an aten::_convolution(_mode) whose `transposed` flag or "
                            "stride is not a constant (its op name, conv or conv_transpose 1d-3d, depends on them)");
        return;
      }
      if (op.rfind("conv_transpose", 0) == 0) {
        // conv_transposeNd(input, weight, bias, stride, padding, output_padding, groups, ...);
        // _convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, ...)
        const size_t at = is_convolution(n) ? 8 : 6;
        const auto groups = n->inputs().size() > at ? torch::jit::toIValue(n->input(at)) : std::nullopt;
        if (!groups || !groups->isInt()) {
          TORCH_CHECK_VALUE(!provider_.match_rule(inst.path, op), "qwix: ", site_name(inst, s),
                            ": cannot quantize a transposed convolution whose groups are not a constant (its weight's "
                            "per-output-channel scales depend on them)");
          return;
        }
        s.groups = groups->toInt();
      }
      s.lhs = n->input(s.lhs_pos);
      s.rhs = n->input(s.rhs_pos);
    }
    for (const Value* v : {s.lhs, s.rhs})
      TORCH_CHECK_VALUE(has_parameters_ || v->node()->kind() != c10::prim::Constant ||
                            !v->type()->cast<c10::TensorType>() || !provider_.match_rule(inst.path, op),
                        "qwix: ", site_name(inst, s), ": an operand is a constant tensor and the module has no "
                        "parameters, as after torch.jit.freeze (which folds them into constants: neither weights "
                        "nor trainable); quantize the module before freezing it");
    inst.sites.push_back(std::move(s));
  }

  // Runs the example forward as the Python path does: in the module's current mode, without
  // gradients, leaving everything else as it was (buffers such as batch-norm statistics and the
  // RNG states are restored afterwards).
  void probe(std::vector<c10::IValue> inputs) {
    if (probes_.empty() && inputs.empty()) return;
    if (inputs.empty()) {
      const auto& args = work_.get_method("forward").function().getSchema().arguments();
      const bool needs = std::any_of(args.begin() + 1, args.end(), [](const c10::Argument& a) {
        return !a.default_value().has_value();
      });
      TORCH_CHECK_VALUE(!needs, "qwix: quantize_model of a TorchScript module needs example inputs for its forward ",
                        "(it runs them once to learn each op's operands and order), e.g. quantize_model(ts, provider, "
                        "x); none were given");
    }
    std::unordered_set<const c10::TensorImpl*> params;
    for (const auto& p : work_.parameters()) params.insert(p.unsafeGetTensorImpl());
    jit_internal::ProbeRecorder recorder(session_, std::move(params));
    {
      at::NoGradGuard no_grad;
      StateRestorer restore(work_);
      try {
        work_.get_method("forward")(std::move(inputs));
      } catch (const std::exception& e) {
        const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
        TORCH_CHECK(false, "qwix: quantize_model runs the example inputs through the TorchScript module once (to "
                    "learn the operands' ranks and the op order), and that forward failed: ",
                    c10_error ? c10_error->what_without_backtrace() : e.what());
      }
    }
    for (const ProbeEvent& e : recorder.events) record(e);
    for (Node* p : probes_) {
      Node* c = p->input(0)->node();
      p->destroy();
      if (!c->hasUses()) c->destroy();
    }
    probes_.clear();
  }

  void record(const ProbeEvent& e) {
    const auto [ii, si] = targets_.at(e.id);
    Instance& inst = instances_[ii];
    if (e.begin) {
      inst.counts.clear();
      inst.ran = true;
      return;
    }
    Site& s = inst.sites[si];
    s.indices.insert(inst.counts[s.op]++);
    if (s.executions++ == 0) {
      s.lhs_rec = e.lhs;
      s.rhs_rec = e.rhs;
      return;
    }
    if (!s.inconsistency.empty()) return;
    const OperandRecord* seen[2] = {&s.lhs_rec, &s.rhs_rec};
    const OperandRecord* now[2] = {&e.lhs, &e.rhs};
    const char* names[2] = {"lhs", "rhs"};
    for (int k = 0; k < 2; ++k) {
      if (seen[k]->sizes.size() != now[k]->sizes.size()) {
        s.inconsistency = std::string("its ") + names[k] + " had rank " + std::to_string(seen[k]->sizes.size()) +
                          " in one call and rank " + std::to_string(now[k]->sizes.size()) + " in another";
      } else if (seen[k]->is_weight != now[k]->is_weight) {
        s.inconsistency = std::string("its ") + names[k] + " was a parameter (or a view of one) in one call and not " +
                          "in another";
      } else if (seen[k]->floating != now[k]->floating) {
        s.inconsistency = std::string("its ") + names[k] + " was floating-point in one call and not in another";
      }
      if (!s.inconsistency.empty()) return;
    }
  }

  void transform(Instance& inst) {
    std::map<const Graph*, std::set<std::string>> stat_names;  // per method
    for (size_t si = 0; si < inst.sites.size(); ++si) {
      Site& s = inst.sites[si];
      if (!provider_.match_rule(inst.path, s.op)) continue;
      Graph* g = s.node->owningGraph();
      std::string sig = "|" + std::to_string(si) + ":";
      if (s.executions == 0) {
        insert_guard(*g, inst, s);
        inst.signature += sig + "guard";
        inst.modified = true;
        continue;
      }
      TORCH_CHECK_VALUE(s.inconsistency.empty(), "qwix: ", site_name(inst, s), ": ", s.inconsistency,
                        " during the example forward; a TorchScript op gets one quantization plan, so its operands "
                        "need the same rank and kind in every call");
      const OperandInfo li{static_cast<int64_t>(s.lhs_rec.sizes.size()), s.lhs_rec.is_weight, s.groups};
      const OperandInfo ri{static_cast<int64_t>(s.rhs_rec.sizes.size()), s.rhs_rec.is_weight, s.groups};
      const auto plan = provider_.plan(inst.path, s.op, li, ri, s.equation);
      TORCH_INTERNAL_ASSERT(plan.has_value());
      sig += "r" + std::to_string(li.rank) + "," + std::to_string(ri.rank) + "#" +
             (s.indices.size() == 1 ? std::to_string(*s.indices.begin()) : "*");  // SRQ names use the op id
      check_plan_runs(inst, s, s.lhs_rec, plan->lhs, *plan);
      check_plan_runs(inst, s, s.rhs_rec, plan->rhs, *plan);
      note_kind_may_change(inst, s, s.lhs, s.lhs_rec, plan->lhs, "lhs");
      note_kind_may_change(inst, s, s.rhs, s.rhs_rec, plan->rhs, "rhs");
      Value* ql = s.lhs;
      Value* qr = s.rhs;
      if (plan->lhs.quantize && s.lhs_rec.floating) {
        ql = quantize_operand(*g, inst, s, s.lhs, s.lhs_rec, plan->lhs, "_lhs", stat_names[g]);
        sig += "L" + operand_signature(plan->lhs);
      }
      if (plan->rhs.quantize && s.rhs_rec.floating) {
        qr = quantize_operand(*g, inst, s, s.rhs, s.rhs_rec, plan->rhs, "_rhs", stat_names[g]);
        sig += "R" + operand_signature(plan->rhs);
      }
      if (ql == s.lhs && qr == s.rhs) continue;
      if (s.op == "einsum") {
        WithInsertPoint ip(s.node);
        Node* old = s.node->input(1)->node();
        Value* list = g->insertNode(g->createList(c10::TensorType::get(), {ql, qr}))->output();
        s.node->replaceInput(1, list);
        if (!old->hasUses()) old->destroy();
      } else {
        s.node->replaceInput(s.lhs_pos, ql);
        s.node->replaceInput(s.rhs_pos, qr);
      }
      inst.signature += sig;
      inst.modified = true;
    }
  }

  // A quantized operand that was a parameter in the example but may be an activation on another run (an
  // Optional weight argument filled from a parameter), or the reverse: TorchScript keeps the example's plan
  // (weight_qtype or act_qtype) for every run, where the Python path plans each call. Warned about (run).
  void note_kind_may_change(const Instance& inst, const Site& s, const Value* v, const OperandRecord& rec,
                            const OperandPlan& p, const char* operand) {
    if (!p.quantize || !rec.floating) return;
    const bool changes = rec.is_weight ? !parameter_on_runs(v, /*must=*/true) : parameter_on_runs(v, /*must=*/false);
    if (changes)
      kind_may_change_.push_back(site_name(inst, s) + ": its " + operand + " was " +
                                 (rec.is_weight ? "a parameter" : "an activation") + " in the example forward");
  }

  void warn_kind_may_change() const {
    if (kind_may_change_.empty()) return;
    std::string list;
    for (const auto& k : kind_may_change_) list += "\n  " + k;
    TORCH_WARN("qwix: these operands reach their op through a branch or an argument, so they may be a parameter "
               "on some runs and an activation on others; TorchScript quantizes them on every run as the example "
               "forward's kind says (weight_qtype or act_qtype), where the Python path decides per call:", list);
  }

  // The ops' own checks (a tile that does not divide, an MX block) on the example operand's shape (its first
  // call's), on a meta tensor: now they name the module, op and rule, as the Python path's do, instead of
  // failing the first forward without them.
  void check_plan_runs(const Instance& inst, const Site& s, const OperandRecord& rec, const OperandPlan& p,
                       const OpPlan& plan) const {
    if (!p.quantize || !rec.floating) return;
    const at::Tensor meta = at::empty(rec.sizes, at::TensorOptions().dtype(rec.dtype).device(at::kMeta));
    try {
      if (p.static_scale) {
        const QuantStatTensors stat = make_quant_stat(meta, p);
        qwix::quantize_operand(meta, p, &stat);
      } else {
        qwix::quantize_operand(meta, p);
      }
    } catch (const c10::ValueError& e) {
      rules_internal::throw_at_site(e, site_name(inst, s), provider_.rules()[plan.rule_index]);
    }
  }

  // Raises "qwix: module '<path>', op ...: <what>" at the insertion point. Instances whose quantized code
  // came out the same share one type (finish), so the path is read from the module at run time.
  void insert_raise(Graph& g, Instance& inst, const Site& s, const std::string& what) {
    if (!inst.module.type()->hasAttribute(kPathAttr))
      inst.module.register_attribute(kPathAttr, c10::StringType::get(), inst.path);
    std::string rest = "', op " + s.op;
    if (s.indices.size() == 1) rest += std::to_string(*s.indices.begin());
    if (!s.where.empty()) rest += " (" + s.where + ")";
    Value* msg = g.insert(c10::aten::add, {g.insertConstant(std::string("qwix: module '")),
                                           g.insertGetAttr(g.inputs()[0], kPathAttr)});
    msg = g.insert(c10::aten::add, {msg, g.insertConstant(rest + what)});
    insert_void(g, c10::prim::RaiseException, {NamedValue(msg)});
  }

  void insert_guard(Graph& g, Instance& inst, const Site& s) {
    WithInsertPoint ip(s.node);
    insert_raise(g, inst, s, " matches a quantization rule but did not run during quantize_model's example forward, "
                 "so it was not quantized; quantize the model again with example inputs (and train/eval mode) that "
                 "run it");
    std::string op = s.op;
    if (!s.where.empty()) op += " (" + s.where + ")";
    auto& entry = unexecuted_[inst.path];
    entry.first = inst.ran;
    entry.second.push_back(op);
    ++unexecuted_count_;
  }

  // The plan of an activation depends on its rank (per-token axes, SRQ statistics' shape): a
  // call with another rank than the example's raises instead of quantizing differently from
  // the Python path (which plans per call).
  void insert_rank_check(Graph& g, Instance& inst, const Site& s, Value* x, int64_t rank, const char* operand) {
    Value* bad = g.insert(c10::aten::ne, {g.insert(c10::aten::dim, {x}), c10::IValue(rank)});
    Node* if_node = g.insertNode(g.create(c10::prim::If, {bad}, 0));
    Block* raise = if_node->addBlock();
    if_node->addBlock();
    WithInsertPoint in_raise(raise);
    insert_raise(g, inst, s, std::string(": its ") + operand + " has a rank other than " + std::to_string(rank) +
                 ", the rank it had in quantize_model's example forward, for which its quantization was planned; "
                 "quantize the model with example inputs of the rank it runs");
  }

  // Returns the quantized operand; inserts the nodes before the op.
  Value* quantize_operand(Graph& g, Instance& inst, const Site& s, Value* x, const OperandRecord& rec,
                          const OperandPlan& p, const char* suffix, std::set<std::string>& stat_names) {
    WithInsertPoint ip(s.node);
    auto op = [&](const char* name, std::vector<NamedValue> args) {
      return g.insert(c10::Symbol::fromQualString(name), args);
    };
    // First, so that a call of another rank fails here, not in the aten::size of a fractional tile below.
    if (!p.is_weight) insert_rank_check(g, inst, s, x, static_cast<int64_t>(rec.sizes.size()), suffix + 1);
    // Tiles: whole elements are constants; a fraction of the axis is resolved at run time,
    // int(round(x.size(axis) * f)) (round half to even, as resolve_tiled_axes).
    std::vector<int64_t> tiled_axes, const_tiles;
    std::vector<Value*> tile_values;
    bool dynamic_tiles = false;
    for (const auto& [axis, tile] : p.tiled_axes) {
      tiled_axes.push_back(axis);
      if (tile >= 1.0) {
        const_tiles.push_back(static_cast<int64_t>(tile));
        tile_values.push_back(g.insertConstant(static_cast<int64_t>(tile)));
      } else {
        dynamic_tiles = true;
        Value* dim = op("aten::size", {x, c10::IValue(axis)});
        Value* f = op("aten::mul", {dim, c10::IValue(tile)});
        Value* r = op("aten::round", {f});
        tile_values.push_back(op("aten::Int", {r}));
      }
    }
    Value* tiles = dynamic_tiles ? g.insertNode(g.createList(c10::IntType::get(), tile_values))->output()
                                 : g.insertConstant(c10::IValue(const_tiles));
    const c10::IValue axes(tiled_axes);
    const c10::IValue channelwise(p.channelwise_axes);
    if (!p.static_scale) {
      const c10::IValue clip = p.clip_gradient ? c10::IValue(*p.clip_gradient) : c10::IValue();
      return op("qwix::fake_quant", {x, c10::IValue(p.qtype), c10::IValue(p.calibration_method), channelwise, axes,
                                     tiles, clip});
    }

    // SRQ: the QuantStat, shaped as the engine's make_quant_stat says (run on a Meta tensor:
    // shapes only, no data).
    TORCH_CHECK_VALUE(s.indices.size() == 1, "qwix: module ", quote(inst.path), ", op ", s.op, " (", s.where,
                      ") ran as ", s.indices.size(), " different op ids (",
                      s.op + std::to_string(*s.indices.begin()), ", ", s.op + std::to_string(*s.indices.rbegin()),
                      ") in the example forward (in a loop, or after a data-dependent branch); a static scale "
                      "(act_static_scale) needs one QuantStat per op, so it cannot be used for this op in TorchScript");
    const std::string name = s.op + std::to_string(*s.indices.begin()) + suffix;
    TORCH_CHECK_VALUE(stat_names.insert(name).second, "qwix: module ", quote(inst.path), ": two ", s.op,
                      " ops ran as the same op id in different calls of the example forward, so both would need the "
                      "QuantStat ", name, "; a static scale cannot be used for them in TorchScript");
    const at::Tensor meta = at::empty(rec.sizes, at::TensorOptions().dtype(rec.dtype).device(at::kMeta));
    const QuantStatTensors shapes = make_quant_stat(meta, p);
    const bool symmetric = shapes.sums.size() == 1;
    const auto stat_kind = std::make_pair(symmetric, shapes.sums[0].sizes().vec());
    if (auto added = inst.stats.find(name); added != inst.stats.end()) {
      // The same op id in another forward method of a traced module (a submodule called twice): one
      // QuantStat, as in Python.
      TORCH_CHECK_VALUE(added->second == stat_kind, "qwix: ", site_name(inst, s), ": its calls (traced as "
                        "forward methods of their own) need QuantStats of different shapes for ", name, " (",
                        join_ints(added->second.second), ", ", join_ints(stat_kind.second), "); give them "
                        "inputs of one shape or use a dynamic scale");
    } else {
      TORCH_CHECK_VALUE(!inst.module.type()->hasAttribute(name), "qwix: module ", quote(inst.path),
                        " already has an attribute ", quote(name), ", the name of the QuantStat of ",
                        site_name(inst, s));
      add_stat(inst, name, symmetric, stat_kind.second, rec.device);
      inst.stats.emplace(name, stat_kind);
    }

    Value* self = g.inputs()[0];
    Value* xd = op("aten::detach", {x});
    Value* stat = g.insertGetAttr(self, name);
    auto sums_of = [&]() {
      std::vector<Value*> sums;
      for (const auto& n : stat_sum_names(symmetric)) sums.push_back(g.insertGetAttr(stat, n));
      return g.insertNode(g.createList(c10::TensorType::get(), sums))->output();
    };
    // Update before read, in training mode (unless disabled) or when forced (calibration).
    // An empty batch (no tokens for this op) adds nothing.
    Value* cond = op("aten::__and__",
                     {op("aten::__or__", {op("aten::__and__", {g.insertGetAttr(self, "training"),
                                                               g.insertGetAttr(self, kUpdateAttr)}),
                                          g.insertGetAttr(self, kForceAttr)}),
                      op("aten::gt", {op("aten::numel", {x}), c10::IValue(int64_t{0})})});
    Node* if_node = g.insertNode(g.create(c10::prim::If, {cond}, 0));
    Block* then_block = if_node->addBlock();
    if_node->addBlock();
    {
      WithInsertPoint in_then(then_block);
      Value* c = op("qwix::calibrate", {xd, c10::IValue(p.calibration_method), channelwise, axes, tiles});
      insert_void(g, c10::Symbol::fromQualString("qwix::update_quant_stat"),
                  {g.insertGetAttr(stat, "count"), sums_of(), c, c10::IValue(p.batch_axes), c10::IValue(int64_t{1})});
    }
    Value* scales = op("qwix::srq_scale", {xd, g.insertGetAttr(stat, "count"), sums_of(), c10::IValue(p.qtype),
                                           c10::IValue(p.calibration_method), channelwise, axes, tiles});
    Node* unpack = g.insertNode(g.createListUnpack(scales, symmetric ? 1 : 2));
    Value* zero_point = symmetric ? g.insertConstant(c10::IValue()) : unpack->output(1);
    return op("qwix::fake_quant_with_scale", {x, unpack->output(0), zero_point, c10::IValue(p.qtype),
                                              c10::IValue(p.clip_gradient.value_or(false))});
  }

  void add_stat(Instance& inst, const std::string& name, bool symmetric, const std::vector<int64_t>& shape,
                c10::Device device) {
    Module& mod = inst.module;
    auto cu = mod._ivalue()->compilation_unit();
    if (!mod.type()->hasAttribute("training")) mod.register_attribute("training", c10::BoolType::get(), true);
    if (!mod.type()->hasAttribute(kUpdateAttr)) {
      mod.register_attribute(kUpdateAttr, c10::BoolType::get(), true);
      mod.register_attribute(kForceAttr, c10::BoolType::get(), false);
    }
    Module stat(cu, quant_stat_type(cu, symmetric));
    stat._ivalue()->setAttr("training", mod.attr("training").toBool());
    stat._ivalue()->setAttr("count", at::zeros({}, at::TensorOptions().dtype(at::kInt).device(device)));
    for (const auto& n : stat_sum_names(symmetric))
      stat._ivalue()->setAttr(n, at::zeros(shape, at::TensorOptions().dtype(at::kFloat).device(device)));
    mod.register_module(name, stat);
  }

  void warn_if_nothing_matched(bool ran) const {
    std::vector<std::string> paths;
    for (const auto& entry : orig_) paths.push_back(entry.second);
    if (const std::string w = provider_.nothing_matched_warning(paths, ran); !w.empty()) TORCH_WARN(w);
  }

  // Calls whose ops run outside the module's graph, out of the pass's sight: a Python function
  // (@torch.jit.ignore, which may run none) and a torch.jit.fork of a function that runs some. Their ops
  // stay floating-point, where the Python path quantizes them. "" for other nodes.
  std::string unseen_call(Node* n) const {
    if (n->kind() == c10::prim::PythonOp) return static_cast<torch::jit::PythonOp*>(n)->name();
    if (n->kind() == c10::prim::fork && n->hasAttribute(torch::jit::attr::Subgraph) &&
        Inliner(false, numbered_forwards_).has_ops(*n->g(torch::jit::attr::Subgraph)))
      return "torch.jit.fork";
    return "";
  }

  void warn_unseen_calls() const {
    if (unseen_calls_.empty()) return;
    std::string list;
    for (const auto& [path, calls] : unseen_calls_) {
      list += "\n  module " + quote(path) + ": ";
      for (size_t i = 0; i < calls.size(); ++i) list += (i ? ", " : "") + calls[i];
    }
    TORCH_WARN("qwix: these calls run outside their module's graph, where quantize_model's TorchScript pass cannot "
               "see into them, so ops they run (linear, matmul, ...) stay floating-point, where the Python path "
               "quantizes them: Python functions (@torch.jit.ignore; nothing to do if they run none) and functions "
               "run by torch.jit.fork. Make them scriptable, or call them directly:", list);
  }

  void warn_unexecuted() const {
    if (unexecuted_.empty()) return;
    std::string list;
    for (const auto& [path, entry] : unexecuted_) {
      list += "\n  module " + quote(path) + ": ";
      if (!entry.first) {
        list += "its forward did not run (" + std::to_string(entry.second.size()) + " op(s))";
        continue;
      }
      // In graph order; repeats (an inlined function's branches) counted: "linear x3 (file:12)".
      std::vector<std::pair<std::string, int>> ops;
      for (const auto& op : entry.second) {
        auto found = std::find_if(ops.begin(), ops.end(), [&](const auto& o) { return o.first == op; });
        if (found == ops.end()) ops.emplace_back(op, 1);
        else ++found->second;
      }
      for (size_t i = 0; i < ops.size(); ++i) {
        const auto& [op, n] = ops[i];
        const auto paren = op.find(" (");
        list += (i ? ", " : "") + (n == 1 ? op : op.substr(0, paren) + " x" + std::to_string(n) +
                                                     (paren == std::string::npos ? "" : op.substr(paren)));
      }
    }
    TORCH_WARN("qwix: ", unexecuted_count_, " op(s) match a quantization rule but did not run during "
               "quantize_model's example forward, so they are not quantized and raise an error if they run later:",
               list);
  }

  // Clone once more: instances of one original type with the same quantized code share a type,
  // unmodified subtrees keep their original types, the root gets a type of its own (marked).
  Module finish() {
    std::unordered_map<const c10::ivalue::Object*, std::string> keys;
    std::function<std::string(const Module&)> key_of = [&](const Module& mod) -> std::string {
      const auto* obj = mod._ivalue().get();
      if (auto it = keys.find(obj); it != keys.end()) return it->second;
      std::string key;
      auto idx = index_.find(obj);
      if (idx == index_.end()) {
        key = "=" + mod.type()->repr_str();  // a QuantStat: keeps its type
      } else {
        const Instance& inst = instances_[idx->second];
        std::string children;
        bool unchanged = !inst.modified && obj != work_._ivalue().get();
        for (const auto& c : mod.named_children()) {
          const std::string ck = key_of(c.value);
          unchanged = unchanged && ck[0] == '=';
          children += "|" + c.name + "{" + ck + "}";
        }
        std::ostringstream os;
        if (unchanged) {
          os << "=" << static_cast<const void*>(inst.orig_type.get());
        } else {
          os << static_cast<const void*>(inst.orig_type.get()) << "|" << inst.candidate << inst.signature << children;
          if (obj == work_._ivalue().get()) os << "|root";
        }
        key = os.str();
      }
      keys.emplace(obj, key);
      return key;
    };
    key_of(work_);
    auto choose = [&](const Module& src) -> jit_internal::TypeChoice {
      const auto* obj = src._ivalue().get();
      auto idx = index_.find(obj);
      if (idx == index_.end()) return {src.type(), ""};
      const std::string& key = keys.at(obj);
      if (key[0] == '=') return {instances_[idx->second].orig_type, ""};
      return {nullptr, key};
    };
    auto result = jit_internal::clone_module_tree(work_, choose, /*copy_tensors=*/false);
    Module out = result.module;
    out.register_attribute(kQuantizedAttr, c10::BoolType::get(), true);
    // Every module with quantized code in its subtree is marked (each has a type of its own): a model built
    // around one is not quantized twice, and set_quant_stats_update / calibrate accept it, as in Python.
    for (const Instance& inst : instances_)
      if (keys.at(inst.module._ivalue().get())[0] != '=')
        Module(result.objects.at(inst.module._ivalue().get()))
            .register_attribute(kQuantizedAttr, c10::BoolType::get(), true);
    return out;
  }

  QatProvider& provider_;
  bool inplace_;
  bool has_parameters_ = true;
  std::vector<std::pair<Module, std::string>> orig_;
  std::unordered_map<const c10::ivalue::Object*, size_t> seen_;
  std::unordered_map<const c10::ivalue::Object*, bool> subtree_;
  Module work_;
  std::vector<Instance> instances_;
  std::unordered_map<const c10::ivalue::Object*, size_t> index_;  // working-tree object -> instance
  const int64_t session_ = jit_internal::new_probe_session();      // its probes' ids name it
  std::vector<std::pair<size_t, int64_t>> targets_;               // probe id -> (instance, site or -1: begin)
  std::vector<Node*> probes_;
  std::map<std::string, std::pair<bool, std::vector<std::string>>> unexecuted_;  // path -> (ran, ops)
  size_t unexecuted_count_ = 0;
  std::map<std::string, std::vector<std::string>> unseen_calls_;  // path -> "name (file:line)"
  std::unordered_map<const Node*, std::string> where_;  // locations of ops from a decomposed attention
  TracedForwards numbered_forwards_;
  std::set<std::string> in_parametrization_;  // paths of parametrization modules (never quantized)
  std::vector<std::string> kind_may_change_;  // operands whose weight / activation kind may differ by run
  std::set<std::string> numbered_helpers_;  // "'path'.forwardN" taken for helpers (warned about)
};

}  // namespace

torch::jit::Module quantize_model(torch::jit::Module& m, QatProvider& provider, std::vector<c10::IValue> example_inputs,
                                  bool inplace) {
  torch::jit::Module out = Pass(provider, inplace).run(m, std::move(example_inputs));
  if (inplace) m = out;
  return out;
}

torch::jit::Module quantize_model(torch::jit::Module& m, QatProvider&& provider,
                                  std::vector<c10::IValue> example_inputs, bool inplace) {
  return quantize_model(m, provider, std::move(example_inputs), inplace);
}

bool is_quantized(const torch::jit::Module& m) { return m.type()->hasAttribute(kQuantizedAttr); }

namespace {

void set_flag(torch::jit::Module& m, const char* name, bool value) {
  TORCH_CHECK_VALUE(is_quantized(m), "qwix: this TorchScript module was not returned by qwix::jit::quantize_model");
  for (torch::jit::Module mod : m.modules())
    if (mod.type()->hasAttribute(name)) mod.setattr(name, value);
}

}  // namespace

void set_quant_stats_update(torch::jit::Module& m, bool enabled) { set_flag(m, kUpdateAttr, enabled); }

void calibrate(torch::jit::Module& m, const std::vector<std::vector<c10::IValue>>& batches) {
  TORCH_CHECK_VALUE(is_quantized(m), "qwix: this TorchScript module was not returned by qwix::jit::quantize_model");
  std::vector<std::pair<torch::jit::Module, bool>> modes;
  for (torch::jit::Module mod : m.modules())
    if (mod.type()->hasAttribute("training")) modes.emplace_back(mod, mod.attr("training").toBool());
  auto restore = [&] {
    set_flag(m, kForceAttr, false);
    for (auto& [mod, t] : modes) mod.setattr("training", t);
  };
  try {
    m.eval();
    set_flag(m, kForceAttr, true);
    at::NoGradGuard no_grad;
    for (const auto& b : batches) m.forward(b);
  } catch (...) {
    restore();
    throw;
  }
  restore();
}

}  // namespace qwix::jit
