// The torch::nn::Module rewriting pass: swaps plain Linear / Conv2d children of
// containers for wrappers, then configures every wrapper with its path.
#include <c10/util/Exception.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>

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

// A wrapper sharing the parameters of a plain Linear / Conv2d (not already a wrapper), else nullptr.
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
  return "";
}

// Replaces wrappable children of Sequential / ModuleList containers, recursively.
void swap_in_containers(torch::nn::Module& m) {
  for (const auto& child : m.named_children()) swap_in_containers(*child.value());
  if (auto* seq = dynamic_cast<torch::nn::SequentialImpl*>(&m)) {
    for (auto& any : *seq) {
      const auto plain = any.ptr();
      if (auto w = wrap<LinearImpl, torch::nn::LinearImpl>(plain)) {
        replace_child(m, plain, w);
        any = torch::nn::AnyModule(w);
      } else if (auto c1 = wrap<Conv1dImpl, torch::nn::Conv1dImpl>(plain)) {
        replace_child(m, plain, c1);
        any = torch::nn::AnyModule(c1);
      } else if (auto c2 = wrap<Conv2dImpl, torch::nn::Conv2dImpl>(plain)) {
        replace_child(m, plain, c2);
        any = torch::nn::AnyModule(c2);
      } else if (auto c3 = wrap<Conv3dImpl, torch::nn::Conv3dImpl>(plain)) {
        replace_child(m, plain, c3);
        any = torch::nn::AnyModule(c3);
      }
    }
  } else if (auto* list = dynamic_cast<torch::nn::ModuleListImpl*>(&m)) {
    for (auto& entry : *list) {
      std::shared_ptr<torch::nn::Module> w = wrap<LinearImpl, torch::nn::LinearImpl>(entry);
      if (!w) w = wrap<Conv1dImpl, torch::nn::Conv1dImpl>(entry);
      if (!w) w = wrap<Conv2dImpl, torch::nn::Conv2dImpl>(entry);
      if (!w) w = wrap<Conv3dImpl, torch::nn::Conv3dImpl>(entry);
      if (w) {
        replace_child(m, entry, w);
        entry = w;
      }
    }
  }
}

void configure(torch::nn::Module& m, const std::string& path, const std::shared_ptr<QatProvider>& provider) {
  if (auto* q = dynamic_cast<Quantizable*>(&m)) {
    q->configure(provider, path);
  } else if (const std::string op = plain_op(m); !op.empty() && provider->match_rule(path, op)) {
    TORCH_CHECK_VALUE(false, "qwix: module '", path, "' is a plain torch::nn module (op '", op, "') that rule #",
                      *provider->match_rule(path, op),
                      " would quantize, but LibTorch calls it through its parent's typed member, which no pass can "
                      "intercept: declare it as qwix::nn::Linear / qwix::nn::Conv1d / Conv2d / Conv3d (same options "
                      "and parameters), or keep it in a torch::nn::Sequential / ModuleList");
  }
  for (const auto& child : m.named_children()) configure(*child.value(), join_path(path, child.key()), provider);
}

void set_update(torch::nn::Module& m, bool enabled) {
  if (auto* q = dynamic_cast<Quantizable*>(&m)) q->set_quant_stats_update(enabled);
  for (const auto& child : m.named_children()) set_update(*child.value(), enabled);
}

}  // namespace

void set_quant_stats_update(torch::nn::Module& model, bool enabled) { set_update(model, enabled); }

void set_stat_all_reduce(torch::nn::Module& model, StatAllReduce sum) {
  auto shared = sum ? std::make_shared<const StatAllReduce>(std::move(sum)) : nullptr;
  std::function<void(torch::nn::Module&)> visit = [&](torch::nn::Module& m) {
    if (auto* q = dynamic_cast<Quantizable*>(&m)) q->set_stat_all_reduce(shared);
    for (const auto& child : m.named_children()) visit(*child.value());
  };
  visit(model);
}

}  // namespace nn

std::shared_ptr<QatProvider> quantize_model(torch::nn::Module& model, QatProvider provider) {
  auto shared = std::make_shared<QatProvider>(std::move(provider));
  nn::swap_in_containers(model);
  nn::configure(model, "", shared);
  return shared;
}
}  // namespace qwix
