// The torch::nn::Module rewriting pass: swaps plain Linear / Conv / ConvTranspose children of
// containers for wrappers, then configures every wrapper with its path.
#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <c10/util/Exception.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>

#include <algorithm>
#include <functional>
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

// A wrapper sharing the parameters of a plain Linear / Conv / ConvTranspose (not already a wrapper), else nullptr.
template <typename Wrapper, typename Plain>
std::shared_ptr<Wrapper> wrap(const std::shared_ptr<torch::nn::Module>& m) {
  if (dynamic_cast<Quantizable*>(m.get())) return nullptr;
  auto* plain = dynamic_cast<Plain*>(m.get());
  return plain ? std::make_shared<Wrapper>(*plain) : nullptr;
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

// Replaces wrappable children of Sequential / ModuleList containers, recursively.
void swap_in_containers(torch::nn::Module& m) {
  for (const auto& child : m.named_children()) swap_in_containers(*child.value());
  if (auto* seq = dynamic_cast<torch::nn::SequentialImpl*>(&m)) {
    for (auto& any : *seq) {
      const auto plain = any.ptr();
      with_any_wrapper(plain, [&](const auto& w) {
        replace_child(m, plain, w);
        any = torch::nn::AnyModule(w);  // typed: AnyModule keeps the wrapper's forward signature
      });
    }
  } else if (auto* list = dynamic_cast<torch::nn::ModuleListImpl*>(&m)) {
    for (auto& entry : *list) {
      const auto plain = entry;
      with_any_wrapper(plain, [&](const auto& w) {
        replace_child(m, plain, w);
        entry = w;
      });
    }
  }
}

void configure(torch::nn::Module& m, const std::string& path, const std::shared_ptr<QatProvider>& provider,
               const std::shared_ptr<const Quantizable::ParameterSet>& parameters) {
  if (auto* q = dynamic_cast<Quantizable*>(&m)) {
    q->configure(provider, path, parameters);
  } else if (const std::string op = plain_op(m); !op.empty() && provider->match_rule(path, op)) {
    TORCH_CHECK_VALUE(false, "qwix: module '", path, "' is a plain torch::nn module (op '", op, "') that rule #",
                      *provider->match_rule(path, op),
                      " would quantize, but LibTorch calls it through its parent's typed member, which no pass can "
                      "intercept: declare it as qwix::nn::Linear / Conv1d-3d / ConvTranspose1d-3d (same options "
                      "and parameters), or keep it in a torch::nn::Sequential / ModuleList");
  }
  for (const auto& child : m.named_children()) {
    configure(*child.value(), join_path(path, child.key()), provider, parameters);
  }
}

// The dotted paths of named_modules(), the root "" first: what rules' module_path regexes match.
// (A walk over children: named_modules() with the root needs a model held by shared_ptr.)
void add_module_paths(torch::nn::Module& m, const std::string& path, std::vector<std::string>& paths) {
  paths.push_back(path);
  for (const auto& child : m.named_children()) add_module_paths(*child.value(), join_path(path, child.key()), paths);
}

std::vector<std::string> module_paths(torch::nn::Module& model) {
  std::vector<std::string> paths;
  add_module_paths(model, "", paths);
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
  nn::swap_in_containers(model);
  auto parameters = std::make_shared<nn::Quantizable::ParameterSet>();
  for (const auto& p : model.parameters()) parameters->emplace(p.unsafeGetTensorImpl(), p);
  nn::configure(model, "", shared, parameters);
  if (const std::string w = shared->nothing_matched_warning(nn::module_paths(model), false); !w.empty())
    TORCH_WARN(w);
  return shared;
}
}  // namespace qwix
