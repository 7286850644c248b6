// Cloning a torch::jit::Module tree while choosing, per object, which type its
// clone gets. torch::jit::Module::clone keeps shared ClassTypes shared; the
// TorchScript pass needs the opposite as well (instances of one type that get
// different quantization need different types, and so do their parents, whose
// code names the children's types), so this is a variant of Module::clone_impl
// whose type sharing follows a caller-given key.
#include <ATen/core/function_schema.h>
#include <c10/util/Exception.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/ir/ir.h>

#include <tuple>
#include <vector>

#include "jit/internal.h"

namespace qwix::jit_internal {
namespace {

using torch::jit::Block;
using torch::jit::Graph;
using torch::jit::Module;
using torch::jit::Node;
using torch::jit::Value;

class Cloner {
 public:
  Cloner(const TypeChooser& choose, bool copy_tensors) : choose_(choose), copy_tensors_(copy_tensors) {}

  Module clone(const Module& src) {
    if (auto it = result_.objects.find(src._ivalue().get()); it != result_.objects.end()) return Module(it->second);
    const c10::ClassTypePtr src_type = src.type();
    const TypeChoice choice = choose_(src);
    auto cu = src._ivalue()->compilation_unit();

    c10::ClassTypePtr type = choice.reuse;
    bool fresh = false;
    if (!type) {
      if (auto it = key_types_.find(choice.key); it != key_types_.end()) type = it->second;
    }
    Module r;
    if (type) {
      TORCH_INTERNAL_ASSERT(type->numAttributes() >= src_type->numAttributes());
      r = Module(cu, type);
    } else {
      r = Module(*src_type->name(), cu, /*shouldMangle=*/true);
      type = r.type();
      key_types_.emplace(choice.key, type);
      fresh = true;
    }
    if (type != src_type) replaced_.insert(src_type.get());
    result_.objects.emplace(src._ivalue().get(), r._ivalue());

    const size_t n = src_type->numAttributes();
    for (size_t i = 0; i < n; ++i) {
      const std::string& name = src_type->getAttributeName(i);
      const c10::TypePtr& attr_type = src_type->getAttribute(i);
      const c10::IValue value = src._ivalue()->getSlot(i);
      c10::TypePtr new_attr_type = attr_type;
      c10::IValue new_value;
      if (attr_type->is_module() && value.isObject()) {
        Module child = clone(Module(value.toObject()));
        // An interface-typed attribute keeps its interface type (it can hold any conforming module).
        if (attr_type->cast<c10::ClassType>()) new_attr_type = child.type();
        new_value = child._ivalue();
      } else {
        new_value = copy_value(value);
      }
      if (fresh) {
        type->addAttribute(name, new_attr_type, src_type->is_parameter(i), src_type->is_buffer(i));
      } else {
        TORCH_INTERNAL_ASSERT(type->getAttributeName(i) == name, "qwix: cloned type ", type->repr_str(),
                              " has attribute '", type->getAttributeName(i), "' where ", src_type->repr_str(),
                              " has '", name, "'");
      }
      r._ivalue()->setSlot(i, std::move(new_value));
    }

    if (fresh) {
      for (size_t i = 0; i < src_type->numConstants(); ++i)
        type->addConstant(src_type->getConstantName(i), src_type->getConstant(i));
      std::unordered_map<const torch::jit::Function*, torch::jit::Function*> cloned;
      for (torch::jit::Function* fn : src_type->methods()) {
        auto* c = clone_function(*fn, src_type, type);
        type->addMethod(c);
        cloned[fn] = c;
      }
      auto lookup = [&](torch::jit::Function* fn) -> torch::jit::Function* {
        if (fn == nullptr) return nullptr;
        if (auto it = cloned.find(fn); it != cloned.end()) return it->second;
        auto* c = clone_function(*fn, src_type, type);
        cloned[fn] = c;
        return c;
      };
      for (torch::jit::Function* hook : src_type->getForwardPreHooks()) type->addForwardPreHook(lookup(hook));
      for (torch::jit::Function* hook : src_type->getForwardHooks()) type->addForwardHook(lookup(hook));
      for (const auto& p : src_type->properties()) type->addProperty(p.name, lookup(p.getter), lookup(p.setter));
    }
    return r;
  }

  CloneResult take(Module root) {
    // A module passed as a method argument (torch.jit.trace passes a submodule shared by several parents
    // this way) keeps its old type in the signature, so its calls would run the old, unquantized code.
    // Checked once every type that will be replaced is known.
    for (const auto& [graph, src_type, method] : cloned_graphs_)
      for (size_t i = 1; i < graph->inputs().size(); ++i) check_value(graph->inputs()[i], *src_type, method);
    result_.module = std::move(root);
    return std::move(result_);
  }

 private:
  c10::IValue copy_value(const c10::IValue& v) {
    if (!copy_tensors_) return v;
    if (v.isTensor()) {
      const at::Tensor& t = v.toTensor();
      if (!t.defined()) return v;
      if (auto it = tensors_.find(t.unsafeGetTensorImpl()); it != tensors_.end()) return it->second;
      at::Tensor c;
      {
        at::NoGradGuard no_grad;
        c = t.detach().clone(at::MemoryFormat::Preserve);
      }
      c.requires_grad_(t.requires_grad());
      tensors_.emplace(t.unsafeGetTensorImpl(), c);
      return c;
    }
    if (v.isObject() || v.isList() || v.isTuple() || v.isGenericDict()) return v.deepcopy(memo_);
    return v;
  }

  torch::jit::Function* clone_function(const torch::jit::Function& fn, const c10::ClassTypePtr& src_type,
                                       const c10::ClassTypePtr& type) {
    auto graph = torch::jit::toGraphFunction(fn).graph()->copy();
    TORCH_CHECK(!graph->inputs().empty(), "qwix: method '", fn.name(), "' of ", src_type->repr_str(),
                " has no self argument");
    graph->inputs()[0]->setType(type);
    remap_block(graph->block(), *src_type, fn.name());
    auto schema = fn.getSchema().cloneWithRemappedTypes(
        [&](c10::TypePtr t) -> c10::TypePtr { return t == src_type ? c10::TypePtr(type) : t; });
    cloned_graphs_.emplace_back(graph, src_type, fn.name());
    auto* copied = type->compilation_unit()->create_function(c10::QualifiedName(*type->name(), fn.name()), graph);
    copied->setSchema(std::move(schema));
    return copied;
  }

  // GetAttr of a module-typed value gets the attribute type of the (new) object type. Any other
  // value of a module type that some clone replaced (an If output, a tuple element, ...) is an error:
  // which object it holds is not known statically.
  void remap_block(Block* block, const c10::ClassType& src_type, const std::string& method) {
    for (Node* node : block->nodes()) {
      if (node->kind() == c10::prim::GetAttr) {
        if (auto cls = node->input()->type()->cast<c10::ClassType>(); cls && cls->is_module()) {
          const std::string& field = node->s(c10::attr::name);
          if (cls->hasAttribute(field)) node->output()->setType(cls->getAttribute(field));
        }
      }
      for (Block* b : node->blocks()) remap_block(b, src_type, method);
      if (node->kind() != c10::prim::GetAttr)
        for (Value* v : node->outputs()) check_value(v, src_type, method);
    }
  }

  void check_value(Value* v, const c10::ClassType& src_type, const std::string& method) {
    auto cls = v->type()->cast<c10::ClassType>();
    const bool argument = v->node()->kind() == c10::prim::Param;
    TORCH_CHECK_VALUE(!cls || !replaced_.count(cls.get()), "qwix: method '", method, "' of ", src_type.repr_str(),
                      " uses a module of type ", cls ? cls->repr_str() : "", " as a value other than through an "
                      "attribute of self (", argument ? "an argument of the method" : v->node()->kind().toQualString(),
                      "); the TorchScript pass cannot give such a module its own quantized type",
                      argument ? " (torch.jit.trace passes a submodule that several modules share this way: quantize "
                                 "the nn.Module, or torch.jit.script it)" : "");
  }

  const TypeChooser& choose_;
  bool copy_tensors_;
  std::unordered_map<std::string, c10::ClassTypePtr> key_types_;
  std::unordered_set<const c10::ClassType*> replaced_;
  std::vector<std::tuple<std::shared_ptr<Graph>, c10::ClassTypePtr, std::string>> cloned_graphs_;
  std::unordered_map<const c10::TensorImpl*, at::Tensor> tensors_;
  c10::IValue::HashIdentityIValueMap memo_;
  CloneResult result_;
};

}  // namespace

CloneResult clone_module_tree(const torch::jit::Module& root, const TypeChooser& choose, bool copy_tensors) {
  Cloner c(choose, copy_tensors);
  Module r = c.clone(root);
  return c.take(std::move(r));
}

}  // namespace qwix::jit_internal
