// The torch::nn::Module rewriting pass: swaps plain Linear / Conv / ConvTranspose children of
// containers for wrappers, then configures every wrapper with its path.
#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <c10/util/Exception.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/transformer.h>
#include <torch/nn/modules/transformercoder.h>
#include <torch/nn/modules/transformerlayer.h>

#include <algorithm>
#include <functional>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "qwix/nn.h"

namespace qwix {
namespace nn {
namespace {

std::string join_path(const std::string& parent, const std::string& name) {
  return parent.empty() ? name : parent + "." + name;
}

// Replaces `plain` by `wrapper` among `parent`'s registered children.
void replace_child(torch::nn::Module& parent, const std::shared_ptr<torch::nn::Module>& plain,
                   const std::shared_ptr<torch::nn::Module>& wrapper) {
  for (const auto& child : parent.named_children()) {
    if (child.value() == plain) parent.replace_module(child.key(), wrapper);
  }
}

// A wrapper sharing the parameters of a plain Linear / Conv / ConvTranspose (not already a wrapper), in its
// train / eval mode, else nullptr. LibTorch's constructor initializes parameters of its own, which the wrapper
// drops for the plain module's, from the CPU generator: it is put back, so that a seeded QAT run draws the
// numbers the float run draws (dropout, shuffling).
template <typename Wrapper, typename Plain>
std::shared_ptr<Wrapper> wrap(const std::shared_ptr<torch::nn::Module>& m) {
  if (dynamic_cast<Quantizable*>(m.get())) return nullptr;
  auto* plain = dynamic_cast<Plain*>(m.get());
  if (!plain) return nullptr;
  at::Generator cpu = at::detail::getDefaultCPUGenerator();
  at::Tensor rng;
  {
    std::lock_guard<std::mutex> lock(cpu.mutex());
    rng = cpu.get_state();
  }
  auto w = std::make_shared<Wrapper>(*plain);
  {
    std::lock_guard<std::mutex> lock(cpu.mutex());
    cpu.set_state(rng);
  }
  w->train(plain->is_training());
  return w;
}

// The op a plain (not wrapped) module would run, for the error message; "" if none.
std::string plain_op(const torch::nn::Module& m) {
  if (dynamic_cast<const Quantizable*>(&m)) return "";
  if (dynamic_cast<const torch::nn::LinearImpl*>(&m)) return "linear";
  if (dynamic_cast<const torch::nn::Conv1dImpl*>(&m)) return "conv1d";
  if (dynamic_cast<const torch::nn::Conv2dImpl*>(&m)) return "conv2d";
  if (dynamic_cast<const torch::nn::Conv3dImpl*>(&m)) return "conv3d";
  if (dynamic_cast<const torch::nn::ConvTranspose1dImpl*>(&m)) return "conv_transpose1d";
  if (dynamic_cast<const torch::nn::ConvTranspose2dImpl*>(&m)) return "conv_transpose2d";
  if (dynamic_cast<const torch::nn::ConvTranspose3dImpl*>(&m)) return "conv_transpose3d";
  return "";
}

template <typename Wrapper, typename Plain>
struct WrapperOf {};

// Calls fn(typed wrapper) for the first pair whose Plain `m` is (and is not already wrapped); false if none.
template <typename Fn, typename Wrapper, typename Plain, typename... Rest>
bool with_wrapper(const std::shared_ptr<torch::nn::Module>& m, const Fn& fn, WrapperOf<Wrapper, Plain>, Rest... rest) {
  if (auto w = wrap<Wrapper, Plain>(m)) {
    fn(w);
    return true;
  }
  if constexpr (sizeof...(Rest) > 0) {
    return with_wrapper(m, fn, rest...);
  } else {
    return false;
  }
}

template <typename Fn>
bool with_any_wrapper(const std::shared_ptr<torch::nn::Module>& m, const Fn& fn) {
  return with_wrapper(m, fn, WrapperOf<LinearImpl, torch::nn::LinearImpl>{},
                      WrapperOf<Conv1dImpl, torch::nn::Conv1dImpl>{}, WrapperOf<Conv2dImpl, torch::nn::Conv2dImpl>{},
                      WrapperOf<Conv3dImpl, torch::nn::Conv3dImpl>{},
                      WrapperOf<ConvTranspose1dImpl, torch::nn::ConvTranspose1dImpl>{},
                      WrapperOf<ConvTranspose2dImpl, torch::nn::ConvTranspose2dImpl>{},
                      WrapperOf<ConvTranspose3dImpl, torch::nn::ConvTranspose3dImpl>{});
}

// One wrapper per plain module: a module in two entries (Sequential(l, l)) or two containers stays one module.
struct Swapped {
  std::shared_ptr<torch::nn::Module> plain;  // (held: its address is the key for the whole pass)
  std::shared_ptr<torch::nn::Module> wrapper;
  torch::nn::AnyModule any;  // typed: AnyModule keeps the wrapper's forward signature
};
using Swaps = std::unordered_map<const torch::nn::Module*, Swapped>;

const Swapped* swapped(const std::shared_ptr<torch::nn::Module>& plain, Swaps& swaps) {
  if (auto it = swaps.find(plain.get()); it != swaps.end()) return &it->second;
  const Swapped* out = nullptr;
  with_any_wrapper(plain, [&](const auto& w) {
    out = &(swaps[plain.get()] = Swapped{plain, w, torch::nn::AnyModule(w)});
  });
  return out;
}

// Replaces wrappable children of Sequential / ModuleList containers, recursively.
void swap_in_containers(torch::nn::Module& m, Swaps& swaps) {
  for (const auto& child : m.named_children()) swap_in_containers(*child.value(), swaps);
  if (auto* seq = dynamic_cast<torch::nn::SequentialImpl*>(&m)) {
    for (auto& any : *seq) {
      const auto plain = any.ptr();
      if (const Swapped* s = swapped(plain, swaps)) {
        replace_child(m, plain, s->wrapper);
        any = s->any;
      }
    }
  } else if (auto* list = dynamic_cast<torch::nn::ModuleListImpl*>(&m)) {
    for (auto& entry : *list) {
      const auto plain = entry;
      if (const Swapped* s = swapped(plain, swaps)) {
        replace_child(m, plain, s->wrapper);
        entry = s->wrapper;
      }
    }
  }
}

// LibTorch's own blocks that run their Linear children through typed members or read their weights
// (MultiheadAttention's out_proj): no pass can reach those ops, and the user cannot redeclare the members.
bool is_torch_block(const torch::nn::Module* m) {
  return dynamic_cast<const torch::nn::MultiheadAttentionImpl*>(m) ||
         dynamic_cast<const torch::nn::TransformerEncoderLayerImpl*>(m) ||
         dynamic_cast<const torch::nn::TransformerDecoderLayerImpl*>(m) ||
         dynamic_cast<const torch::nn::TransformerEncoderImpl*>(m) ||
         dynamic_cast<const torch::nn::TransformerDecoderImpl*>(m) || dynamic_cast<const torch::nn::TransformerImpl*>(m);
}

// Whether the first rule matching (path, op) has a qtype (one without excludes the op).
bool quantizes(const QatProvider& provider, const std::string& path, const std::string& op) {
  const auto i = provider.match_rule(path, op);
  if (!i) return false;
  const QuantizationRule& r = provider.rules()[static_cast<size_t>(*i)];
  return r.weight_qtype.has_value() || r.act_qtype.has_value();
}

struct ConfigureWalk {
  std::shared_ptr<QatProvider> provider;
  std::shared_ptr<const Quantizable::ParameterSet> parameters;
  std::unordered_set<const torch::nn::Module*> seen;  // a module reached by two paths takes the first
  std::vector<std::string> in_torch_blocks;            // "path (op)" of plain modules inside LibTorch's blocks
};

// Pre-order, each module once: the paths of PyTorch's named_modules() (and of the Python pass).
void configure(torch::nn::Module& m, const std::string& path, const torch::nn::Module* parent, ConfigureWalk& walk) {
  if (!walk.seen.insert(&m).second) return;
  if (auto* q = dynamic_cast<Quantizable*>(&m)) {
    q->configure(walk.provider, path, walk.parameters);
  } else if (const std::string op = plain_op(m); !op.empty() && quantizes(*walk.provider, path, op)) {
    if (parent && is_torch_block(parent)) {
      walk.in_torch_blocks.push_back("'" + path + "' (" + op + ")");
    } else {
      TORCH_CHECK_VALUE(false, "qwix: module '", path, "' is a plain torch::nn module (op '", op, "') that rule #",
                        *walk.provider->match_rule(path, op),
                        " would quantize, but LibTorch calls it through its parent's typed member, which no pass "
                        "can intercept: declare it as qwix::nn::Linear / Conv1d-3d / ConvTranspose1d-3d (same "
                        "options and parameters), or keep it in a torch::nn::Sequential / ModuleList");
    }
  }
  for (const auto& child : m.named_children()) configure(*child.value(), join_path(path, child.key()), &m, walk);
}

// The dotted paths of named_modules(), the root "" first: what rules' module_path regexes match.
// (A walk over children: named_modules() with the root needs a model held by shared_ptr.)
void add_module_paths(torch::nn::Module& m, const std::string& path, std::vector<std::string>& paths,
                      std::unordered_set<const torch::nn::Module*>& seen) {
  if (!seen.insert(&m).second) return;
  paths.push_back(path);
  for (const auto& child : m.named_children())
    add_module_paths(*child.value(), join_path(path, child.key()), paths, seen);
}

std::vector<std::string> module_paths(torch::nn::Module& model) {
  std::vector<std::string> paths;
  std::unordered_set<const torch::nn::Module*> seen;
  add_module_paths(model, "", paths, seen);
  return paths;
}

// As on the Python and TorchScript paths: a second pass would silently replace the first one's provider (and its
// statistics' methods).
void check_not_quantized(torch::nn::Module& m, const std::string& path) {
  const auto* q = dynamic_cast<const Quantizable*>(&m);
  TORCH_CHECK_VALUE(q == nullptr || !q->is_configured(), "qwix: ",
                    path.empty() ? std::string("this model is") : "its submodule '" + path + "' is",
                    " already quantized (qwix::quantize_model configured it); quantizing again would replace its "
                    "provider: quantize the floating-point model instead");
  for (const auto& child : m.named_children()) check_not_quantized(*child.value(), join_path(path, child.key()));
}

// Calls fn on every configured Quantizable of `model`; a model with none is an error naming `what`.
void for_each_configured(torch::nn::Module& model, const char* what, const std::function<void(Quantizable&)>& fn) {
  int64_t n = 0;
  std::function<void(torch::nn::Module&)> visit = [&](torch::nn::Module& m) {
    if (auto* q = dynamic_cast<Quantizable*>(&m); q && q->is_configured()) {
      fn(*q);
      ++n;
    }
    for (const auto& child : m.named_children()) visit(*child.value());
  };
  visit(model);
  TORCH_CHECK_VALUE(n > 0, "qwix: ", what, " needs a model that qwix::quantize_model has configured (this one has "
                    "no configured qwix::nn module); call it after quantize_model");
}

}  // namespace

void set_quant_stats_update(torch::nn::Module& model, bool enabled) {
  for_each_configured(model, "set_quant_stats_update", [&](Quantizable& q) { q.set_quant_stats_update(enabled); });
}

void set_stat_all_reduce(torch::nn::Module& model, StatAllReduce sum) {
  auto shared = sum ? std::make_shared<const StatAllReduce>(std::move(sum)) : nullptr;
  for_each_configured(model, "set_stat_all_reduce", [&](Quantizable& q) { q.set_stat_all_reduce(shared); });
}

void create_quant_stats(torch::nn::Module& model, const std::function<void()>& forward) {
  std::vector<std::pair<at::Tensor, at::Tensor>> buffers;  // (buffer, saved copy)
  for (const auto& b : model.buffers()) buffers.emplace_back(b, b.clone());
  std::vector<std::pair<at::Generator, c10::intrusive_ptr<c10::TensorImpl>>> rngs;
  std::vector<c10::Device> devices{c10::Device(c10::kCPU)};
  for (const auto& p : model.parameters()) {
    const c10::Device d = p.device().is_cuda() ? p.device() : c10::Device(c10::kCPU);
    if (std::find(devices.begin(), devices.end(), d) == devices.end()) devices.push_back(d);
  }
  for (const auto& d : devices) {
    at::Generator g = at::globalContext().defaultGenerator(d);
    rngs.emplace_back(g, g.get_state().getIntrusivePtr());
  }
  for_each_configured(model, "create_quant_stats", [](Quantizable& q) { q.set_creating_quant_stats(true); });
  auto restore = [&] {
    for_each_configured(model, "create_quant_stats", [](Quantizable& q) { q.set_creating_quant_stats(false); });
    at::NoGradGuard no_grad;
    for (auto& [b, saved] : buffers) b.copy_(saved);
    for (auto& [g, state] : rngs) g.set_state(at::Tensor(state));
  };
  try {
    at::NoGradGuard no_grad;
    forward();
  } catch (...) {
    restore();
    throw;
  }
  restore();
  std::shared_ptr<QatProvider> provider;
  for_each_configured(model, "create_quant_stats", [&](Quantizable& q) { provider = q.qat_provider(); });
  if (const std::string w = provider->nothing_matched_warning(module_paths(model), true); !w.empty()) TORCH_WARN(w);
}

}  // namespace nn

std::shared_ptr<QatProvider> quantize_model(torch::nn::Module& model, QatProvider provider) {
  nn::check_not_quantized(model, "");
  auto shared = std::make_shared<QatProvider>(std::move(provider));
  nn::Swaps swaps;
  nn::swap_in_containers(model, swaps);
  auto parameters = std::make_shared<nn::Quantizable::ParameterSet>();
  for (const auto& p : model.parameters()) parameters->emplace(p.unsafeGetTensorImpl(), p);
  nn::ConfigureWalk walk{shared, parameters, {}, {}};
  nn::configure(model, "", nullptr, walk);
  if (!walk.in_torch_blocks.empty()) {
    std::string list;
    for (const auto& s : walk.in_torch_blocks) list += (list.empty() ? "" : ", ") + s;
    TORCH_WARN("qwix: rules match modules inside LibTorch's MultiheadAttention / Transformer blocks, which call "
               "them through typed members or read their weights directly, out of the nn pass's reach; they stay "
               "floating point: ", list, ". To quantize them, script the model and use qwix::jit::quantize_model, "
               "or build the block from qwix::nn modules; an earlier rule without qtypes for them silences this");
  }
  if (const std::string w = shared->nothing_matched_warning(nn::module_paths(model), false); !w.empty())
    TORCH_WARN(w);
  return shared;
}
}  // namespace qwix
