#pragma once
// qwix-torch: quantization-aware training for LibTorch. The one public C++ header.
//
//   #include <qwix/qwix.h>
//   at::Tensor y = qwix::fake_quant(x, "int8", {.channelwise_axes = {0}});
//
// The functions call the registered torch.ops.qwix.* operators through the
// dispatcher, so autograd, CPU/CUDA kernels and TorchScript all apply.
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace qwix {

// {axis: tile}. A tile >= 1 counts elements (must be an integer); a tile in
// (0, 1) is a fraction of the axis (tile = round(dim * f)), as in Qwix.
using TiledAxes = std::vector<std::pair<int64_t, double>>;

struct FakeQuantOptions {
  std::string calibration_method = "absmax";
  std::vector<int64_t> channelwise_axes = {};
  TiledAxes tiled_axes = {};
  // Mask the straight-through gradient to the calibrated range. Default: only
  // when the method can clip (absmax,s / minmax,s with s < 1, rms, fixed).
  c10::optional<bool> clip_gradient = c10::nullopt;
};

// Quantize-dequantize with a scale computed from x (DESIGN section 2).
at::Tensor fake_quant(const at::Tensor& x, const std::string& qtype, const FakeQuantOptions& options = {});

// Quantize-dequantize with a given scale (and zero point, integer qtypes).
// scale's shape gives the granularity: per dim 1, the dim, or a divisor (tiles).
at::Tensor fake_quant_with_scale(const at::Tensor& x, const at::Tensor& scale, const std::string& qtype,
                                 const c10::optional<at::Tensor>& zero_point = c10::nullopt,
                                 bool clip_gradient = false);

// [absmax] or [min, max], float32, keepdim shapes (tiled axes: one entry per tile).
std::vector<at::Tensor> calibrate(const at::Tensor& x, const std::string& calibration_method = "absmax",
                                  const std::vector<int64_t>& channelwise_axes = {}, const TiledAxes& tiled_axes = {});

// [scale] (symmetric calibration) or [scale, zero_point] (asymmetric).
std::vector<at::Tensor> compute_scale(const std::vector<at::Tensor>& calibration, const std::string& qtype);

// SRQ: the scale from statistics (sums / count), or x's own while count is 0.
std::vector<at::Tensor> srq_scale(const at::Tensor& x, const at::Tensor& count, const std::vector<at::Tensor>& sums,
                                  const std::string& qtype, const std::string& calibration_method = "absmax",
                                  const std::vector<int64_t>& channelwise_axes = {}, const TiledAxes& tiled_axes = {});

// SRQ, in place: count += count_increment; sums[i] += calibration[i].mean(batch_axes, keepdim).
void update_quant_stat(at::Tensor& count, std::vector<at::Tensor>& sums, const std::vector<at::Tensor>& calibration,
                       const std::vector<int64_t>& batch_axes = {0}, int64_t count_increment = 1);

// Splits {axis: tile} into the ops' (tiled_axes, tile_sizes), resolving fractions.
std::pair<std::vector<int64_t>, std::vector<int64_t>> resolve_tiled_axes(c10::IntArrayRef sizes,
                                                                         const TiledAxes& tiled_axes);

// ===========================================================================
// Rules and providers (DESIGN section 3), implemented in csrc/rules/.
// The one engine: the per-op decisions (which rule, which qtype, calibration,
// channelwise and tiled axes, static or dynamic, batch axes, clip_gradient) for
// every operand of linear / conv / conv_transpose / matmul / bmm / einsum are made here, and the
// Python nn.Module path, the C++ frontend path and the TorchScript path only
// intercept ops and keep module bookkeeping.
// ===========================================================================

// The op names a rule's op_names can list; op ids are <op name><n> (linear0, ...).
const std::vector<std::string>& valid_op_names();

// Qwix's QuantizationRule (same field names and defaults); clip_gradient is ours.
struct QuantizationRule {
  // std::regex (ECMAScript) full match on the dotted module path; the root is "".
  std::string module_path = ".*";
  // Empty: every op. Otherwise names from valid_op_names().
  std::vector<std::string> op_names = {};
  std::optional<std::string> weight_qtype = std::nullopt;
  std::optional<std::string> act_qtype = std::nullopt;
  // Tiles the contracting axis: >= 1 (an integer) counts elements; in (0, 1)
  // it is a fraction of the axis. Not allowed for conv (an error at plan time).
  std::optional<double> tile_size = std::nullopt;
  // SRQ: activations use a scale from running statistics (QuantStat).
  bool act_static_scale = false;
  std::string weight_calibration_method = "absmax";
  std::string act_calibration_method = "absmax";
  // SRQ: the statistics are averaged over these activation axes.
  std::vector<int64_t> act_batch_axes = {0};
  // Mask the straight-through gradient to the quantization range. nullopt:
  // dynamic scales mask when the method can clip; static scales do not.
  std::optional<bool> clip_gradient = std::nullopt;
};

// Throws c10::ValueError (Python: ValueError) naming the bad field and value:
// an invalid regex, an unknown op name or qtype, a malformed calibration method,
// an asymmetric method with a floating-point qtype, a non-positive or
// non-integer tile, act_static_scale without act_qtype, repeated batch axes.
void validate_rule(const QuantizationRule& rule);

// A readable one-line form, for messages: QuantizationRule(module_path='...', ...).
std::string rule_repr(const QuantizationRule& rule);

enum class Operand : int { Lhs = 0, Rhs = 1 };

// What to do with one operand of an intercepted op.
struct OperandPlan {
  bool quantize = false;  // false: leave the operand as it is (no qtype for its role)
  bool is_weight = false;
  std::string qtype;               // canonical name
  std::string calibration_method;  // as the rule spells it
  std::vector<int64_t> channelwise_axes;  // non-negative, sorted
  TiledAxes tiled_axes;                   // at most one {axis, tile}; resolve with resolve_tiled_axes
  bool static_scale = false;              // SRQ: scale from a QuantStat named <op id>_lhs / _rhs
  std::vector<int64_t> batch_axes;        // SRQ: non-negative, sorted
  // Pass to fake_quant (dynamic) as is; static scales get a plain bool.
  std::optional<bool> clip_gradient = std::nullopt;
};

// The decision for one operand of `op_name` (one of valid_op_names()).
//   linear  lhs [..., in]: per token (all axes but the last); rhs (W [out, in]): per output channel.
//   conv*   lhs [N, C, ...] (or unbatched): per batch item; rhs (W [out, in/g, k...]): per output channel.
//   conv_transpose*: lhs as conv; rhs (W [in, out/g, k...]): per output channel, i.e. per axis 1 and, with
//           groups > 1, also per block of in/groups along axis 0 (a tile of 1/groups of the axis).
//   matmul / bmm / einsum: every non-contracting axis is channelwise.
// tile_size tiles the (last) contracting axis; it is an error for conv.
// einsum_equation is read for einsum only (two operands, explicit or implicit output).
OperandPlan plan_operand(const QuantizationRule& rule, const std::string& op_name, Operand operand, bool is_weight,
                         int64_t rank, const std::string& einsum_equation = "", int64_t groups = 1);

struct OperandInfo {
  int64_t rank = 0;
  bool is_weight = false;
  int64_t groups = 1;  // the op's feature groups (read for a conv_transpose weight: see plan_operand)
};

struct OpPlan {
  int64_t rule_index = -1;  // into QatProvider::rules()
  OperandPlan lhs, rhs;
};

OpPlan plan_op(const QuantizationRule& rule, const std::string& op_name, const OperandInfo& lhs,
               const OperandInfo& rhs, const std::string& einsum_equation = "");

// Qwix's QatProvider: an ordered rule list; the first rule whose module_path
// fully matches and whose op_names (if any) include the op wins.
class QatProvider {
 public:
  QatProvider() = default;
  explicit QatProvider(std::vector<QuantizationRule> rules);  // validates every rule

  const std::vector<QuantizationRule>& rules() const { return rules_; }

  // Index of the first matching rule, or nullopt; does not mark it used.
  std::optional<int64_t> match_rule(const std::string& module_path, const std::string& op_name) const;
  // As match_rule, and marks the rule used.
  std::optional<int64_t> find_rule(const std::string& module_path, const std::string& op_name);
  // find_rule + plan_op: nullopt when no rule matches. Errors name the module path.
  std::optional<OpPlan> plan(const std::string& module_path, const std::string& op_name, const OperandInfo& lhs,
                             const OperandInfo& rhs, const std::string& einsum_equation = "");

  // Whether F.scaled_dot_product_attention run by this module's forward is decomposed (see
  // decomposed_attention) so that its two products are quantized: the first rule matching
  // (module_path, "matmul") has an act_qtype. Does not mark the rule used (the matmuls' plans do).
  bool decomposes_attention(const std::string& module_path) const;

  // Rules that matched no op so far (Qwix's get_unused_rules), in order.
  std::vector<QuantizationRule> get_unused_rules() const;
  std::vector<int64_t> unused_rule_indices() const;
  bool is_used(int64_t index) const;
  void mark_used(int64_t index);

  // The warning for rules that can quantize nothing ("" when there is none to give): after an example
  // forward (ran_forward), every rule unused; otherwise no rule's module_path fully matches any of
  // `module_paths` (op names aside). Almost surely a module_path / op_names typo.
  std::string nothing_matched_warning(const std::vector<std::string>& module_paths, bool ran_forward) const;
  // Whether some op of a module at one of `module_paths` may be quantized: for one of them the first rule
  // whose module_path matches has a qtype (a rule without qtypes and without op_names excludes the module).
  bool may_quantize(const std::vector<std::string>& module_paths) const;

 private:
  struct Matchers;  // the compiled module_path regexes (std::regex), immutable and shared by copies
  // Which rules matched an op: set by every thread that runs a forward (relaxed atomics); a copy
  // takes a snapshot.
  class UsageFlags {
   public:
    explicit UsageFlags(size_t n = 0) : flags_(n) {}
    UsageFlags(const UsageFlags& o) : flags_(o.size()) { copy_from(o); }
    UsageFlags& operator=(const UsageFlags& o) {
      if (this != &o) {
        flags_ = std::vector<std::atomic<bool>>(o.size());
        copy_from(o);
      }
      return *this;
    }
    UsageFlags(UsageFlags&&) noexcept = default;
    UsageFlags& operator=(UsageFlags&&) noexcept = default;
    size_t size() const { return flags_.size(); }
    bool get(size_t i) const { return flags_[i].load(std::memory_order_relaxed); }
    void set(size_t i) { flags_[i].store(true, std::memory_order_relaxed); }

   private:
    void copy_from(const UsageFlags& o) {
      for (size_t i = 0; i < o.size(); ++i) flags_[i].store(o.get(i), std::memory_order_relaxed);
    }
    std::vector<std::atomic<bool>> flags_;
  };
  std::vector<QuantizationRule> rules_;
  std::shared_ptr<const Matchers> matchers_;
  UsageFlags used_;
};

// ---- Applying a plan (for the C++ frontend and TorchScript passes; the Python
// pass calls the same ops itself so that Dynamo can trace them) ----

// A QuantStat's tensors: count (int32 scalar) and [sum_of_absmax] or [sum_of_min, sum_of_max] (fp32).
struct QuantStatTensors {
  at::Tensor count;
  std::vector<at::Tensor> sums;
};

// Zeros shaped like x's calibration for the plan averaged over plan.batch_axes (keepdim), on x's device.
QuantStatTensors make_quant_stat(const at::Tensor& x, const OperandPlan& plan);

// x's calibration for the plan: [absmax] or [min, max] (tiles resolved against x).
std::vector<at::Tensor> calibrate_operand(const at::Tensor& x, const OperandPlan& plan);

// SRQ update: count += count_increment; sums += calibration averaged over plan.batch_axes. Under
// data parallelism, all-reduce (sum) the averaged calibration first and pass the world size.
void update_operand_stat(QuantStatTensors& stat, const std::vector<at::Tensor>& calibration, const OperandPlan& plan,
                         int64_t count_increment = 1);

// Fake-quantizes one operand as planned: x itself when !plan.quantize or x is not floating point;
// a dynamic scale, or for static plans the scale from `stat` (dynamic while its count is 0).
// Statistics are not updated here (see update_operand_stat: update before reading).
at::Tensor quantize_operand(const at::Tensor& x, const OperandPlan& plan, const QuantStatTensors* stat = nullptr);

// ---- Attention (F.scaled_dot_product_attention) ----
// torch's fused attention computes q·kᵀ and weights·v inside one kernel, out of the rules' reach.
// Where QatProvider::decomposes_attention says so, the three paths run it as below instead, and its
// two products are the module's next two `matmul` ops (matmul<n>: q·kᵀ, matmul<n+1>: weights·v):
//   attn = matmul(q, kᵀ) * scale               (scale: 1/sqrt(q.size(-1)) unless given)
//   causal: -inf above the diagonal; attn_mask: bool -> -inf where false, float -> added (in place: in the
//   scores' dtype, broadcast to their shape)
//   attn = _safe_softmax(attn, -1)             (a fully masked row gives 0, as sdpa)
//   attn = dropout(attn, dropout_p, train=True) (dropout_p > 0; sdpa applies it in eval too)
//   out  = matmul(attn, v)                      (enable_gqa: k and v heads repeated first)
// Same signature and defaults as torch.nn.functional.scaled_dot_product_attention.
using MatmulFn = std::function<at::Tensor(const at::Tensor&, const at::Tensor&)>;
at::Tensor decomposed_attention(const MatmulFn& matmul, const at::Tensor& query, const at::Tensor& key,
                                const at::Tensor& value, const std::optional<at::Tensor>& attn_mask = std::nullopt,
                                double dropout_p = 0.0, bool is_causal = false,
                                std::optional<double> scale = std::nullopt, bool enable_gqa = false);
// The same function as TorchScript source, which is also Python (torch, Tensor and Optional in
// scope): the TorchScript pass inlines it, the Python path runs it. Tests tie the two forms.
const std::string& decomposed_attention_source();

}  // namespace qwix

// ===========================================================================
// LibTorch torch::nn::Module path (DESIGN section 1), implemented in csrc/nn/:
// the pass; the wrapper modules (qwix::nn::Linear, Conv2d) are in <qwix/nn.h>.
// ===========================================================================
namespace torch::nn {
class Module;
}  // namespace torch::nn
namespace qwix {
// The pass (documented in <qwix/nn.h>, which also takes shared_ptr / holders): returns
// the provider the wrappers share. Also spelled qwix::nn::quantize_model.
std::shared_ptr<QatProvider> quantize_model(torch::nn::Module& model, QatProvider provider);
}  // namespace qwix

// ===========================================================================
// TorchScript path (DESIGN section 1), implemented in csrc/jit/.
// Declarations only; call sites need the TorchScript headers (torch/script.h).
// ===========================================================================
namespace torch::jit {
struct Module;
}  // namespace torch::jit
namespace c10 {
struct IValue;
}  // namespace c10

namespace qwix::jit {

// Quantizes a TorchScript module for QAT with the same rules, plans, ops and op
// ids as the Python nn.Module path (same forward values for the same weights):
// in each module's own forward, linear / conv1d-3d / conv_transpose1d-3d / matmul (mm, addmm's product) /
// bmm (baddbmm's product) / two-operand einsum, and scaled_dot_product_attention's
// two matmuls where it is decomposed, get qwix::fake_quant, or for SRQ a QuantStat submodule <op id>_lhs/_rhs
// plus qwix::srq_scale + qwix::fake_quant_with_scale (statistics updated before
// the read in training mode). Parameter names do not change.
//
// example_inputs are run through forward once (no_grad) to learn the operands'
// ranks and the op order; an op a rule matches that this forward does not run
// raises when it runs later (and quantize_model warns).
//
// inplace = true: m is replaced by the quantized module, which holds the same
// parameter tensors (an optimizer built on them stays valid); TorchScript types
// cannot change in place, so other handles to the old module still see fp code.
// inplace = false: m is left as it is and the result holds copies of its tensors.
// Throws c10::ValueError (Python: ValueError) naming the module and op when an op
// cannot be handled. Needs the qwix ops when the result is loaded (link qwix_torch).
torch::jit::Module quantize_model(torch::jit::Module& m, QatProvider& provider,
                                  std::vector<c10::IValue> example_inputs, bool inplace = true);
torch::jit::Module quantize_model(torch::jit::Module& m, QatProvider&& provider,
                                  std::vector<c10::IValue> example_inputs, bool inplace = true);

// Whether m was returned by qwix::jit::quantize_model.
bool is_quantized(const torch::jit::Module& m);

// Enables or disables SRQ statistics updates in training mode (none in eval mode).
void set_quant_stats_update(torch::jit::Module& m, bool enabled);

// Standalone SRQ calibration: forward only (no_grad, every module in eval mode)
// over the batches while the statistics update; the modules' modes are restored.
void calibrate(torch::jit::Module& m, const std::vector<std::vector<c10::IValue>>& batches);

}  // namespace qwix::jit
