// qwix::nn::QatOps: the ops of a Quantizable module's forward with their
// operands fake-quantized as the provider plans them (the wrappers use it too).
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <vector>

#include "qwix/nn.h"
#include "rules/internal.h"

namespace qwix {
namespace nn {

namespace {
// The modules whose QatOps are alive on this thread, one entry per QatOps (its forward's nesting).
std::vector<const Quantizable*>& live_ops() {
  thread_local std::vector<const Quantizable*> live;
  return live;
}
}  // namespace

QatOps Quantizable::qat_ops() {
  auto* module = dynamic_cast<torch::nn::Module*>(this);
  TORCH_CHECK(module != nullptr, "qwix: a qwix::nn::Quantizable must also be a torch::nn::Module");
  const auto& live = live_ops();
  TORCH_CHECK(std::find(live.begin(), live.end(), this) == live.end(), "qwix: qat_ops() of '", path_,
              "' called while another one of the same module is alive: op ids count per QatOps, so make one per "
              "forward call and pass it to helper functions");
  return QatOps(*module, *this);
}

QatOps::QatOps(torch::nn::Module& owner, Quantizable& config) : owner_(owner), config_(config) {
  live_ops().push_back(&config_);
}

QatOps::~QatOps() {
  if (!live_) return;
  auto& live = live_ops();
  live.erase(std::find(live.begin(), live.end(), &config_));
}

namespace {
// Statistics are looked up, and created on first use, in a module's children: forwards on several threads
// must not read the children while another thread adds one. (The wrappers' forwards are serialized per
// module already; this is for custom Quantizable modules. First use holds it while calibrating.)
std::mutex& stat_mutex() {
  static std::mutex m;
  return m;
}
}  // namespace

bool QatOps::is_weight(const at::Tensor& t) const {
  // A parameter of the model (those quantize_model found) or of this module (one registered since counts too), or
  // a view of one: the Python path's nn.Parameter test.
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  const c10::TensorImpl* base = t.is_view() ? t._base().unsafeGetTensorImpl() : nullptr;
  for (const auto& p : owner_.parameters(/*recurse=*/false))
    if (p.unsafeGetTensorImpl() == impl || p.unsafeGetTensorImpl() == base) return true;
  if (!config_.model_parameters_) return false;
  const auto& params = *config_.model_parameters_;
  return params.count(impl) > 0 || (base && params.count(base) > 0);
}

at::Tensor QatOps::operand(const std::string& name, const at::Tensor& x, const OperandPlan& plan) {
  if (!plan.quantize || !plan.static_scale || !x.is_floating_point()) return quantize_operand(x, plan);
  std::shared_ptr<QuantStatImpl> stat;
  {
    const std::lock_guard<std::mutex> lock(stat_mutex());
    const auto children = owner_.named_children();
    if (const auto* found = children.find(name)) {
      stat = std::dynamic_pointer_cast<QuantStatImpl>(*found);
      TORCH_CHECK(stat != nullptr, "qwix: submodule '", name, "' of '", config_.path_, "' is not a QuantStat");
    } else {
      // Created as normal tensors under InferenceMode too (a first forward in inference): training updates them.
      const c10::InferenceMode not_inference(false);
      stat = owner_.register_module(name, std::make_shared<QuantStatImpl>(make_quant_stat(x.detach(), plan)));
    }
  }
  QuantStatTensors t = stat->tensors();
  const bool empty = x.numel() == 0;  // an empty batch (no tokens for this op) adds nothing
  if (config_.update_ && owner_.is_training() && !config_.creating_ && (!empty || config_.all_reduce_)) {
    // update, then read
    std::vector<at::Tensor> cal;
    if (empty) {
      for (const auto& s : t.sums) cal.push_back(at::zeros_like(s));
    } else {
      cal = calibrate_operand(x.detach(), plan);
    }
    int64_t replicas = 1;
    if (config_.all_reduce_) {
      // One collective: every sum's batch average, flattened together, and in the last slot the number of
      // replicas that had data. A replica with an empty batch joins with zeros; the others' average stands
      // in for it (as the Python path does).
      std::vector<at::Tensor> flat;
      for (auto& c : cal) {
        if (!empty && !plan.batch_axes.empty()) c = c.mean(plan.batch_axes, /*keepdim=*/true);
        flat.push_back(c.reshape(-1));
      }
      flat.push_back(at::full({1}, empty ? 0.0 : 1.0, flat[0].options()));
      at::Tensor all = at::cat(flat);
      replicas = (*config_.all_reduce_)(all);
      TORCH_CHECK(replicas >= 1, "qwix: the statistics all-reduce of '", config_.path_, "' returned ", replicas,
                  " replicas; it must return the number of replicas (>= 1)");
      const at::Tensor with_data = all.narrow(0, all.numel() - 1, 1).reshape({});
      // True division: exactly 1 when every replica had data, so the sums are what they were without this;
      // NaN when none had, which update_quant_stat leaves out entirely.
      const at::Tensor spread =
          at::where(with_data > 0, at::full({}, static_cast<double>(replicas), with_data.options()) / with_data,
                    at::full({}, std::numeric_limits<double>::quiet_NaN(), with_data.options()));
      int64_t offset = 0;
      for (auto& c : cal) {
        const at::Tensor total = all.narrow(0, offset, c.numel()).view(c.sizes());
        offset += c.numel();
        c = total * spread;
      }
    }
    update_operand_stat(t, cal, plan, replicas);
  }
  return quantize_operand(x, plan, &t);
}

std::pair<at::Tensor, at::Tensor> QatOps::operands(const std::string& op, const at::Tensor& lhs, const at::Tensor& rhs,
                                                   const std::string& einsum_equation, int64_t groups) {
  const auto& valid = valid_op_names();
  if (std::find(valid.begin(), valid.end(), op) == valid.end()) {
    std::string names;
    for (const auto& v : valid) names += (names.empty() ? "" : ", ") + v;
    TORCH_CHECK_VALUE(false, "qwix: unknown op '", op, "' in QatOps::operands; valid ops: ", names);
  }
  const int64_t n = counts_[op]++;
  if (!config_.provider_) return {lhs, rhs};
  // The provider is shared by every module of the model; planning records rule usage.
  auto plan = config_.provider_->plan(config_.path_, op, {lhs.dim(), is_weight(lhs), groups},
                                      {rhs.dim(), is_weight(rhs), groups}, einsum_equation);
  if (!plan) return {lhs, rhs};
  const std::string id = op + std::to_string(n);
  try {
    at::Tensor a = operand(id + "_lhs", lhs, plan->lhs);
    return {a, operand(id + "_rhs", rhs, plan->rhs)};
  } catch (const c10::ValueError& e) {  // the op's own message (a tile that does not divide, ...) + where
    rules_internal::throw_at_site(e, "module '" + config_.path_ + "', op " + id,
                                  config_.provider_->rules()[plan->rule_index]);
  }
}

at::Tensor QatOps::linear(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias) {
  auto [x, w] = operands("linear", input, weight);
  return at::linear(x, w, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt);
}

at::Tensor QatOps::conv1d(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  auto [x, w] = operands("conv1d", input, weight);
  return at::conv1d(x, w, bias, stride, padding, dilation, groups);
}

at::Tensor QatOps::conv2d(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  auto [x, w] = operands("conv2d", input, weight);
  return at::conv2d(x, w, bias, stride, padding, dilation, groups);
}

at::Tensor QatOps::conv3d(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  auto [x, w] = operands("conv3d", input, weight);
  return at::conv3d(x, w, bias, stride, padding, dilation, groups);
}

at::Tensor QatOps::conv_transpose1d(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                                    int64_t groups, at::IntArrayRef dilation) {
  auto [x, w] = operands("conv_transpose1d", input, weight, "", groups);
  return at::conv_transpose1d(x, w, bias, stride, padding, output_padding, groups, dilation);
}

at::Tensor QatOps::conv_transpose2d(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                                    int64_t groups, at::IntArrayRef dilation) {
  auto [x, w] = operands("conv_transpose2d", input, weight, "", groups);
  return at::conv_transpose2d(x, w, bias, stride, padding, output_padding, groups, dilation);
}

at::Tensor QatOps::conv_transpose3d(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                                    int64_t groups, at::IntArrayRef dilation) {
  auto [x, w] = operands("conv_transpose3d", input, weight, "", groups);
  return at::conv_transpose3d(x, w, bias, stride, padding, output_padding, groups, dilation);
}

at::Tensor QatOps::matmul(const at::Tensor& a, const at::Tensor& b) {
  auto [x, y] = operands("matmul", a, b);
  return at::matmul(x, y);
}

at::Tensor QatOps::bmm(const at::Tensor& a, const at::Tensor& b) {
  auto [x, y] = operands("bmm", a, b);
  return at::bmm(x, y);
}

at::Tensor QatOps::baddbmm(const at::Tensor& input, const at::Tensor& batch1, const at::Tensor& batch2,
                           const at::Scalar& beta, const at::Scalar& alpha) {
  auto [x, y] = operands("bmm", batch1, batch2);
  return at::baddbmm(input, x, y, beta, alpha);
}

at::Tensor QatOps::mm(const at::Tensor& mat1, const at::Tensor& mat2) {
  auto [x, y] = operands("matmul", mat1, mat2);
  return at::mm(x, y);
}

at::Tensor QatOps::addmm(const at::Tensor& input, const at::Tensor& mat1, const at::Tensor& mat2,
                         const at::Scalar& beta, const at::Scalar& alpha) {
  auto [x, y] = operands("matmul", mat1, mat2);
  return at::addmm(input, x, y, beta, alpha);
}

at::Tensor QatOps::einsum(const std::string& equation, const at::Tensor& a, const at::Tensor& b) {
  auto [x, y] = operands("einsum", a, b, equation);
  return at::einsum(equation, {x, y});
}

at::Tensor QatOps::scaled_dot_product_attention(const at::Tensor& query, const at::Tensor& key,
                                                const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                                                double dropout_p, bool is_causal, std::optional<double> scale,
                                                bool enable_gqa) {
  if (!config_.provider_ || !config_.provider_->decomposes_attention(config_.path_))
    return at::scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa);
  auto matmul = [this](const at::Tensor& a, const at::Tensor& b) { return this->matmul(a, b); };
  return decomposed_attention(matmul, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa);
}

}  // namespace nn
}  // namespace qwix
