#pragma once
// qwix-torch for the LibTorch frontend (torch::nn::Module trees): QAT wrapper
// modules and the rewriting pass.
//
//   #include <qwix/nn.h>
//   struct Net : torch::nn::Module {
//     qwix::nn::Linear fc1{nullptr};             // a drop-in torch::nn::Linear
//     torch::nn::Sequential body{nullptr};       // plain Linear / ConvNd inside are swapped
//     ...
//   };
//   auto provider = qwix::nn::quantize_model(*net, qwix::QatProvider({rule}));
//
// LibTorch calls a child through its typed holder (`fc1(x)` is
// `torch::nn::LinearImpl::forward`, not virtual), so no pass can reach a plain
// torch::nn::Linear held by a member: declare such members as qwix::nn::Linear /
// qwix::nn::Conv1d/2d/3d / ConvTranspose1d/2d/3d (same constructors, options and parameter names). Plain
// modules inside torch::nn::Sequential and torch::nn::ModuleList are replaced by
// wrappers sharing their parameters. A custom module whose forward calls ops
// itself (attention: einsum / matmul) derives from qwix::nn::Quantizable and
// calls them through qat_ops(). The per-op decisions are the engine's
// (qwix.h), as in the Python and TorchScript paths, and the names match:
// parameters keep theirs, SRQ statistics are submodules `<op>0_lhs` with buffers
// `count` and `sum_of_absmax` (or `sum_of_min`, `sum_of_max`).
#include <torch/nn/module.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include "qwix/qwix.h"

namespace qwix {
namespace nn {

// SRQ statistics of one activation operand (DESIGN section 3).
class QuantStatImpl : public torch::nn::Module {
 public:
  explicit QuantStatImpl(QuantStatTensors init);
  // The registered buffers themselves (updates write through).
  QuantStatTensors tensors() const { return t_; }
  bool symmetric() const { return t_.sums.size() == 1; }
  // A model's to(dtype) keeps the statistics float32 and the count an integer (a bf16 sum would lose
  // precision, and a cast count breaks the update); device moves apply.
  void to(torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;

 private:
  QuantStatTensors t_;
};
TORCH_MODULE(QuantStat);

class QatOps;

// What the pass configures: every qwix::nn wrapper, and any custom module that
// derives from it to quantize the ops of its own forward with qat_ops():
//
//   struct AttentionImpl : torch::nn::Module, qwix::nn::Quantizable {
//     at::Tensor forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
//       auto ops = qat_ops();  // one per forward call: op ids einsum0, matmul0, ... as in Python
//       auto s = ops.einsum("bhqd,bhkd->bhqk", q, k).softmax(-1);
//       return ops.matmul(s, v);
//     }
//   };
//
// Until the pass runs, or where no rule matches, the ops are the plain ones.
class Quantizable {
 public:
  // The model's parameters (by TensorImpl, holding them): an operand that is one, or a view of
  // one, is a weight -- the Python path's nn.Parameter test, over the whole model.
  using ParameterSet = std::unordered_map<const c10::TensorImpl*, at::Tensor>;

  Quantizable() = default;
  virtual ~Quantizable() = default;
  // LibTorch's clone() (torch::nn::Cloneable) copies a module: a copy of a configured one would keep the
  // original model's parameter set, so its own weights would count as activations. Copy the float model, then
  // quantize the copy. (An unconfigured one copies.)
  Quantizable(const Quantizable& other) { check_copyable(other); }
  Quantizable& operator=(const Quantizable& other) {
    check_copyable(other);
    return *this;
  }
  // Attaches the provider, this module's dotted path and the model's parameters (the pass calls it).
  void configure(std::shared_ptr<QatProvider> provider, std::string path,
                 std::shared_ptr<const ParameterSet> parameters) {
    provider_ = std::move(provider);
    path_ = std::move(path);
    model_parameters_ = std::move(parameters);
  }
  // SRQ statistics update in training mode (default on; eval mode never updates).
  void set_quant_stats_update(bool enabled) { update_ = enabled; }
  // Data parallelism: see qwix::nn::set_stat_all_reduce.
  void set_stat_all_reduce(std::shared_ptr<const std::function<int64_t(at::Tensor&)>> sum) {
    all_reduce_ = std::move(sum);
  }
  // qwix::nn::create_quant_stats: while set, QuantStats are created but not updated.
  void set_creating_quant_stats(bool creating) { creating_ = creating; }
  // Whether the pass has configured this module, and its dotted path.
  bool is_configured() const { return provider_ != nullptr; }
  const std::string& qat_path() const { return path_; }
  const std::shared_ptr<QatProvider>& qat_provider() const { return provider_; }

 protected:
  // The quantized ops of this forward call: one QatOps per call (op ids count from 0 in it), so
  // a second one alive on the same thread is an error (pass the first to helpers); other threads
  // run their own forwards.
  QatOps qat_ops();

 private:
  friend class QatOps;
  static void check_copyable(const Quantizable& other) {
    TORCH_CHECK(!other.is_configured(), "qwix: copying (clone()) the quantized module ",
                other.qat_path().empty() ? std::string("(the model's root)") : "'" + other.qat_path() + "'",
                " would drop its quantization (the copy's weights are not the model's parameters): clone the float "
                "model, then run qwix::quantize_model on the copy");
  }
  std::shared_ptr<QatProvider> provider_;
  std::string path_;
  std::shared_ptr<const ParameterSet> model_parameters_;
  bool update_ = true;
  bool creating_ = false;
  std::shared_ptr<const std::function<int64_t(at::Tensor&)>> all_reduce_;
};

// The ops of one forward call of a Quantizable module, fake-quantizing their
// operands as the provider plans them (DESIGN section 3; the Python path's
// decisions): an operand that is a parameter of the model or a view of one is a
// weight, any other an activation; op ids count per op name from 0 in call
// order; SRQ statistics are submodules `<op id>_lhs` / `_rhs` of the module,
// updated before they are read in training mode. Movable, not copyable.
class QatOps {
 public:
  QatOps(QatOps&& other) noexcept
      : owner_(other.owner_), config_(other.config_), counts_(std::move(other.counts_)), live_(other.live_) {
    other.live_ = false;
  }
  QatOps(const QatOps&) = delete;
  QatOps& operator=(const QatOps&) = delete;
  QatOps& operator=(QatOps&&) = delete;
  ~QatOps();

  at::Tensor linear(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias = {});
  at::Tensor conv1d(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias = {},
                    at::IntArrayRef stride = 1, at::IntArrayRef padding = 0, at::IntArrayRef dilation = 1,
                    int64_t groups = 1);
  at::Tensor conv2d(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias = {},
                    at::IntArrayRef stride = 1, at::IntArrayRef padding = 0, at::IntArrayRef dilation = 1,
                    int64_t groups = 1);
  at::Tensor conv3d(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias = {},
                    at::IntArrayRef stride = 1, at::IntArrayRef padding = 0, at::IntArrayRef dilation = 1,
                    int64_t groups = 1);
  // (input, weight [in, out/groups, k...], bias, stride, padding, output_padding, groups, dilation), as at::
  at::Tensor conv_transpose1d(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias = {},
                              at::IntArrayRef stride = 1, at::IntArrayRef padding = 0,
                              at::IntArrayRef output_padding = 0, int64_t groups = 1, at::IntArrayRef dilation = 1);
  at::Tensor conv_transpose2d(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias = {},
                              at::IntArrayRef stride = 1, at::IntArrayRef padding = 0,
                              at::IntArrayRef output_padding = 0, int64_t groups = 1, at::IntArrayRef dilation = 1);
  at::Tensor conv_transpose3d(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias = {},
                              at::IntArrayRef stride = 1, at::IntArrayRef padding = 0,
                              at::IntArrayRef output_padding = 0, int64_t groups = 1, at::IntArrayRef dilation = 1);
  at::Tensor matmul(const at::Tensor& a, const at::Tensor& b);
  at::Tensor bmm(const at::Tensor& a, const at::Tensor& b);
  // input * beta + (batch1 @ batch2) * alpha: the product is quantized as a bmm (as in Python).
  at::Tensor baddbmm(const at::Tensor& input, const at::Tensor& batch1, const at::Tensor& batch2,
                     const at::Scalar& beta = 1, const at::Scalar& alpha = 1);
  // 2-D products, quantized as matmul ops (as in Python): mat1 @ mat2, and input * beta + (mat1 @ mat2) * alpha.
  at::Tensor mm(const at::Tensor& mat1, const at::Tensor& mat2);
  at::Tensor addmm(const at::Tensor& input, const at::Tensor& mat1, const at::Tensor& mat2,
                   const at::Scalar& beta = 1, const at::Scalar& alpha = 1);
  // Two operands (explicit or implicit output), as the Python path intercepts.
  at::Tensor einsum(const std::string& equation, const at::Tensor& a, const at::Tensor& b);
  // torch::scaled_dot_product_attention, or where the provider decomposes attention for this module
  // (QatProvider::decomposes_attention) qwix::decomposed_attention: q·kᵀ and weights·v become the
  // next two matmul op ids, as on the Python and TorchScript paths.
  at::Tensor scaled_dot_product_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                          const std::optional<at::Tensor>& attn_mask = std::nullopt,
                                          double dropout_p = 0.0, bool is_causal = false,
                                          std::optional<double> scale = std::nullopt, bool enable_gqa = false);

  // The two operands of op `op` (one of valid_op_names()) as planned, taking the next op id. groups: the
  // op's feature groups (a conv_transpose weight's per-output-channel scales depend on them).
  std::pair<at::Tensor, at::Tensor> operands(const std::string& op, const at::Tensor& lhs, const at::Tensor& rhs,
                                             const std::string& einsum_equation = "", int64_t groups = 1);

 private:
  friend class Quantizable;
  QatOps(torch::nn::Module& owner, Quantizable& config);
  at::Tensor operand(const std::string& name, const at::Tensor& x, const OperandPlan& plan);
  bool is_weight(const at::Tensor& t) const;

  torch::nn::Module& owner_;
  Quantizable& config_;
  std::map<std::string, int64_t> counts_;
  bool live_ = true;
};

namespace detail {
// Puts `value` in `slot` until the end of the scope (also when an exception leaves it).
class Swap {
 public:
  Swap(at::Tensor& slot, const at::Tensor& value) : slot_(slot), saved_(slot) { slot_ = value; }
  ~Swap() { slot_ = saved_; }
  Swap(const Swap&) = delete;
  Swap& operator=(const Swap&) = delete;

 private:
  at::Tensor& slot_;
  at::Tensor saved_;
};
}  // namespace detail

// Base + QAT: Base's forward with fake-quantized input and weight. Self: the wrapper class.
template <typename Base, typename Self>
class QatModule : public Base, public Quantizable {
 public:
  using Base::Base;

  // LibTorch's clone() copies the torch::nn part only, which would silently drop the quantization:
  // an unconfigured wrapper clones into a wrapper; a configured one is an error.
  std::shared_ptr<torch::nn::Module> clone(const std::optional<torch::Device>& device = std::nullopt) const override {
    TORCH_CHECK(!is_configured(), "qwix: clone() of the quantized module '", qat_path(), "' would drop its "
                "quantization (LibTorch clones the torch::nn part only): clone the float model, then run "
                "qwix::quantize_model on the copy");
    auto plain = std::dynamic_pointer_cast<Base>(Base::clone(device));
    TORCH_INTERNAL_ASSERT(plain != nullptr, "clone of a ", this->name(), " is not one");
    return std::make_shared<Self>(*plain);
  }

 protected:
  // Makes this wrapper hold `plain`'s parameter tensors themselves (optimizers built before keep working).
  void share_parameters(const Base& plain) {
    this->weight = this->parameters_["weight"] = plain.weight;
    if (plain.bias.defined()) this->bias = this->parameters_["bias"] = plain.bias;
  }
  // LibTorch's own forward (padding modes and all) on the fake-quantized input, with the
  // fake-quantized weight in the weight member for the call only. The registered parameter is
  // never replaced and gradients reach it through the fake quant. Forwards of one module object
  // from several threads (inference serving) take turns: the weight member holds this call's
  // fake-quantized weight until it returns.
  template <typename... Rest>
  at::Tensor forward_quantized(const std::string& op, int64_t groups, const at::Tensor& input, const Rest&... rest) {
    const std::lock_guard<std::mutex> lock(*forward_mutex_);
    auto [x, w] = qat_ops().operands(op, input, this->weight, "", groups);
    const detail::Swap swap(this->weight, w);
    return Base::forward(x, rest...);
  }

 private:
  // (held by pointer: the class stays copyable, as LibTorch modules are; a copy shares the lock)
  std::shared_ptr<std::mutex> forward_mutex_ = std::make_shared<std::mutex>();
};

// Drop-in torch::nn::Linear (op "linear").
class LinearImpl : public QatModule<torch::nn::LinearImpl, LinearImpl> {
 public:
  using QatModule<torch::nn::LinearImpl, LinearImpl>::QatModule;
  // A wrapper sharing `plain`'s options and parameter tensors.
  explicit LinearImpl(const torch::nn::LinearImpl& plain);
  at::Tensor forward(const at::Tensor& input);
};
TORCH_MODULE(Linear);

// Drop-in torch::nn::Conv1d / Conv2d / Conv3d (ops "conv1d" / "conv2d" / "conv3d";
// any padding mode: LibTorch's own forward runs on the fake-quantized operands).
class Conv1dImpl : public QatModule<torch::nn::Conv1dImpl, Conv1dImpl> {
 public:
  using QatModule<torch::nn::Conv1dImpl, Conv1dImpl>::QatModule;
  explicit Conv1dImpl(const torch::nn::Conv1dImpl& plain);
  at::Tensor forward(const at::Tensor& input);
};
TORCH_MODULE(Conv1d);

class Conv2dImpl : public QatModule<torch::nn::Conv2dImpl, Conv2dImpl> {
 public:
  using QatModule<torch::nn::Conv2dImpl, Conv2dImpl>::QatModule;
  explicit Conv2dImpl(const torch::nn::Conv2dImpl& plain);
  at::Tensor forward(const at::Tensor& input);
};
TORCH_MODULE(Conv2d);

class Conv3dImpl : public QatModule<torch::nn::Conv3dImpl, Conv3dImpl> {
 public:
  using QatModule<torch::nn::Conv3dImpl, Conv3dImpl>::QatModule;
  explicit Conv3dImpl(const torch::nn::Conv3dImpl& plain);
  at::Tensor forward(const at::Tensor& input);
};
TORCH_MODULE(Conv3d);

// Drop-in torch::nn::ConvTranspose1d / 2d / 3d (ops "conv_transpose1d" / "2d" / "3d"; output_size as LibTorch's).
class ConvTranspose1dImpl : public QatModule<torch::nn::ConvTranspose1dImpl, ConvTranspose1dImpl> {
 public:
  using QatModule<torch::nn::ConvTranspose1dImpl, ConvTranspose1dImpl>::QatModule;
  explicit ConvTranspose1dImpl(const torch::nn::ConvTranspose1dImpl& plain);
  at::Tensor forward(const at::Tensor& input, const std::optional<at::IntArrayRef>& output_size = std::nullopt);
};
TORCH_MODULE(ConvTranspose1d);

class ConvTranspose2dImpl : public QatModule<torch::nn::ConvTranspose2dImpl, ConvTranspose2dImpl> {
 public:
  using QatModule<torch::nn::ConvTranspose2dImpl, ConvTranspose2dImpl>::QatModule;
  explicit ConvTranspose2dImpl(const torch::nn::ConvTranspose2dImpl& plain);
  at::Tensor forward(const at::Tensor& input, const std::optional<at::IntArrayRef>& output_size = std::nullopt);
};
TORCH_MODULE(ConvTranspose2d);

class ConvTranspose3dImpl : public QatModule<torch::nn::ConvTranspose3dImpl, ConvTranspose3dImpl> {
 public:
  using QatModule<torch::nn::ConvTranspose3dImpl, ConvTranspose3dImpl>::QatModule;
  explicit ConvTranspose3dImpl(const torch::nn::ConvTranspose3dImpl& plain);
  at::Tensor forward(const at::Tensor& input, const std::optional<at::IntArrayRef>& output_size = std::nullopt);
};
TORCH_MODULE(ConvTranspose3d);

// Enables / disables SRQ statistics updates of every Quantizable in `model` (after
// qwix::quantize_model; before it, a c10::ValueError).
void set_quant_stats_update(torch::nn::Module& model, bool enabled);

// Runs `forward` once (typically `[&] { net->forward(example); }`) to create every
// SRQ QuantStat submodule, as the Python path's example inputs do, and leaves all
// else as it was: no gradients, statistics not updated, buffers (batch-norm
// statistics) and the RNG restored. Needed before loading a checkpoint that holds
// statistics (LibTorch's load reads only the submodules that exist). After
// qwix::quantize_model.
void create_quant_stats(torch::nn::Module& model, const std::function<void()>& forward);

// Data-parallel SRQ (DESIGN section 3: every replica uses the same scale at every step, and the
// statistics equal what one process would gather from all the batches). `sum` adds a float32
// tensor across the replicas in place and returns their number; each update then adds the sum
// over replicas of their batch averages (one collective per update) and counts the replicas.
// With a c10d process group:
//   qwix::nn::set_stat_all_reduce(*net, [pg](at::Tensor& t) {
//     std::vector<at::Tensor> v{t};
//     pg->allreduce(v)->wait();
//     return static_cast<int64_t>(pg->getSize());
//   });
// Every replica must run the same quantized ops in the same order (as DDP requires anyway).
// An empty function turns it off. After qwix::quantize_model (before it, a c10::ValueError).
using StatAllReduce = std::function<int64_t(at::Tensor&)>;
void set_stat_all_reduce(torch::nn::Module& model, StatAllReduce sum);

}  // namespace nn

// The pass, qwix::quantize_model(model, provider) (declared in qwix.h for a Module&):
// configures every qwix::nn module of `model` (paths from named_modules(), root ""),
// first replacing plain torch::nn::Linear / Conv1d-3d / ConvTranspose1d-3d children of
// Sequential and ModuleList containers by wrappers that share their parameters. A
// plain one elsewhere that a rule would quantize is a c10::ValueError naming its
// path. Returns the provider every wrapper uses (get_unused_rules() is meaningful
// after a forward: rules are matched when each op first runs). Also for a model
// held by shared_ptr or by a module holder (`net` as users keep it):
template <typename M>
std::shared_ptr<QatProvider> quantize_model(const std::shared_ptr<M>& model, QatProvider provider) {
  return quantize_model(static_cast<torch::nn::Module&>(*model), std::move(provider));
}
template <typename Impl>
std::shared_ptr<QatProvider> quantize_model(torch::nn::ModuleHolder<Impl>& model, QatProvider provider) {
  return quantize_model(static_cast<torch::nn::Module&>(*model), std::move(provider));
}

namespace nn {
using qwix::quantize_model;  // qwix::nn::quantize_model: the same functions
}  // namespace nn

}  // namespace qwix
