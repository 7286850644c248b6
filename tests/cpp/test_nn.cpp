// GoogleTest: the torch::nn::Module pass (qwix/nn.h) against the same fake quant
// applied by hand with the ops, SRQ statistics, containers and errors.
#include <gtest/gtest.h>
#include <qwix/nn.h>
#include <qwix/qwix.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <condition_variable>
#include <sstream>
#include <mutex>
#include <map>
#include <thread>

namespace {

namespace F = torch::nn::functional;

struct Net : torch::nn::Module {
  qwix::nn::Linear fc1{nullptr};
  torch::nn::Sequential body{nullptr};
  Net() {
    fc1 = register_module("fc1", qwix::nn::Linear(16, 32));
    body = register_module("body", torch::nn::Sequential(torch::nn::Linear(32, 8), torch::nn::ReLU(),
                                                         torch::nn::Linear(8, 4)));
  }
  torch::Tensor forward(const torch::Tensor& x) { return body->forward(torch::relu(fc1(x))); }
};

at::Tensor fq_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return F::linear(qwix::fake_quant(x, "int8", {.channelwise_axes = {0}}),
                   qwix::fake_quant(w, "int4", {.channelwise_axes = {0}}), b);
}

qwix::QuantizationRule w4a8() {
  qwix::QuantizationRule r;
  r.weight_qtype = "int4";
  r.act_qtype = "int8";
  return r;
}

TEST(NnPass, WrappersAndContainersMatchTheOpsByHand) {
  torch::manual_seed(0);
  auto net = std::make_shared<Net>();
  const auto x = torch::randn({5, 16});
  const auto w1 = net->fc1->weight;
  const auto plain_first = net->body->ptr(0);
  const auto plain_weight = std::dynamic_pointer_cast<torch::nn::LinearImpl>(plain_first)->weight;
  // Unconfigured, a qwix::nn::Linear is a torch::nn::Linear.
  EXPECT_TRUE(torch::equal(net->fc1(x), F::linear(x, w1, net->fc1->bias)));

  auto provider = qwix::nn::quantize_model(*net, qwix::QatProvider({w4a8()}));
  auto* l0 = dynamic_cast<qwix::nn::LinearImpl*>(net->body->ptr(0).get());
  auto* l2 = dynamic_cast<qwix::nn::LinearImpl*>(net->body->ptr(2).get());
  ASSERT_TRUE(l0 != nullptr && l2 != nullptr);  // swapped inside the Sequential
  EXPECT_TRUE(l0->weight.is_same(plain_weight));  // sharing the very parameter tensors
  EXPECT_TRUE(net->named_modules()["body.0"].get() == l0);

  const auto h = torch::relu(fq_linear(x, w1, net->fc1->bias));
  const auto want = fq_linear(torch::relu(fq_linear(h, l0->weight, l0->bias)), l2->weight, l2->bias);
  EXPECT_TRUE(torch::equal(net->forward(x), want));
  EXPECT_TRUE(provider->get_unused_rules().empty());

  // Parameter names never change: the fp model's keys are all there.
  std::vector<std::string> names;
  for (const auto& p : net->named_parameters()) names.push_back(p.key());
  EXPECT_EQ(names, (std::vector<std::string>{"fc1.weight", "fc1.bias", "body.0.weight", "body.0.bias",
                                             "body.2.weight", "body.2.bias"}));

  // It trains: the straight-through gradient reaches every parameter.
  torch::optim::SGD opt(net->parameters(), 0.05);
  const auto y = torch::randn({5, 4});
  float first = 0, last = 0;
  for (int step = 0; step < 30; ++step) {
    opt.zero_grad();
    auto loss = torch::mse_loss(net->forward(x), y);
    loss.backward();
    opt.step();
    (step == 0 ? first : last) = loss.item<float>();
  }
  EXPECT_LT(last, first);
}

TEST(NnPass, StaticScalesKeepStatisticsLikePython) {
  torch::manual_seed(1);
  auto net = std::make_shared<Net>();
  qwix::QuantizationRule r;
  r.module_path = "fc1";
  r.act_qtype = "int8";
  r.act_static_scale = true;
  qwix::nn::quantize_model(*net, qwix::QatProvider({r}));
  const auto x = torch::randn({6, 16});
  net->train();
  net->forward(x);
  auto stat = std::dynamic_pointer_cast<qwix::nn::QuantStatImpl>(net->fc1->named_children()["linear0_lhs"]);
  ASSERT_TRUE(stat != nullptr && stat->symmetric());
  EXPECT_EQ(stat->tensors().count.item<int>(), 1);
  // sum = the batch's per-token absmax averaged over the batch axis ([1, 1]); the scale read after the update.
  const auto absmax = x.abs().amax(1, true);
  EXPECT_TRUE(torch::equal(stat->tensors().sums[0], absmax.mean(0, true)));
  const auto y = net->fc1(x);  // second update: count 2
  const auto avg = (stat->tensors().sums[0] / 2.0);
  const auto scale = avg / 127.5;
  const auto xq = qwix::fake_quant_with_scale(x, scale, "int8");
  EXPECT_TRUE(torch::equal(y, F::linear(xq, net->fc1->weight, net->fc1->bias)));
  net->eval();
  net->forward(x);
  EXPECT_EQ(stat->tensors().count.item<int>(), 2);  // eval reads only
  net->train();
  qwix::nn::set_quant_stats_update(*net, false);
  net->forward(x);
  EXPECT_EQ(stat->tensors().count.item<int>(), 2);
  qwix::nn::set_quant_stats_update(*net, true);
  net->forward(x);
  EXPECT_EQ(stat->tensors().count.item<int>(), 3);
  const auto buffers = net->named_buffers();
  EXPECT_TRUE(buffers.contains("fc1.linear0_lhs.count") && buffers.contains("fc1.linear0_lhs.sum_of_absmax"));
}

TEST(NnPass, DesignSpellingWithSharedPtrAndHolders) {
  torch::manual_seed(3);
  auto net = std::make_shared<Net>();
  auto seq = torch::nn::Sequential(torch::nn::Linear(16, 4));
  const auto x = torch::randn({3, 16});
  const auto before = net->forward(x);
  auto p1 = qwix::quantize_model(net, qwix::QatProvider({w4a8()}));  // shared_ptr<Net>
  auto p2 = qwix::quantize_model(seq, qwix::QatProvider({w4a8()}));  // ModuleHolder
  EXPECT_FALSE(torch::equal(net->forward(x), before));              // now quantized
  ASSERT_TRUE(dynamic_cast<qwix::nn::LinearImpl*>(seq->ptr(0).get()) != nullptr);
  EXPECT_TRUE(p1 && p2 && p1 != p2);
}

TEST(NnPass, Conv2dWrapperKeepsPaddingModes) {
  torch::manual_seed(2);
  auto opts = torch::nn::Conv2dOptions(3, 4, 3).padding(1).padding_mode(torch::kReflect);
  auto seq = torch::nn::Sequential(torch::nn::Conv2d(opts));
  qwix::QuantizationRule r = w4a8();
  qwix::nn::quantize_model(*seq, qwix::QatProvider({r}));
  auto* conv = dynamic_cast<qwix::nn::Conv2dImpl*>(seq->ptr(0).get());
  ASSERT_TRUE(conv != nullptr);
  const auto x = torch::randn({2, 3, 8, 8});
  torch::nn::Conv2d ref(opts);
  {
    torch::NoGradGuard g;
    ref->weight.copy_(qwix::fake_quant(conv->weight, "int4", {.channelwise_axes = {0}}));
    ref->bias.copy_(conv->bias);
  }
  EXPECT_TRUE(torch::equal(seq->forward(x), ref(qwix::fake_quant(x, "int8", {.channelwise_axes = {0}}))));
}

// ConvTranspose1d/2d/3d in a Sequential (through AnyModule, output_size defaulted) and a ModuleList:
// LibTorch's forward on fake-quantized operands, the weight [in, out/groups, k...] per axis 1.
TEST(NnPass, ConvTransposeWrappers) {
  torch::manual_seed(9);
  auto o2 = torch::nn::ConvTranspose2dOptions(4, 6, 3).stride(2).padding(1).output_padding(1).groups(2);
  auto o1 = torch::nn::ConvTranspose1dOptions(2, 3, 3).stride(2);
  auto o3 = torch::nn::ConvTranspose3dOptions(2, 2, 2).stride(2).bias(false);
  auto seq = torch::nn::Sequential(torch::nn::ConvTranspose2d(o2));
  torch::nn::ModuleList list{torch::nn::ConvTranspose1d{o1}, torch::nn::ConvTranspose3d{o3}};
  const auto plain_w2 = seq->ptr<torch::nn::ConvTranspose2dImpl>(0)->weight;
  qwix::nn::quantize_model(*seq, qwix::QatProvider({w4a8()}));
  qwix::nn::quantize_model(list, qwix::QatProvider({w4a8()}));
  auto t2 = std::dynamic_pointer_cast<qwix::nn::ConvTranspose2dImpl>(seq->ptr(0));
  auto t1 = list->ptr<qwix::nn::ConvTranspose1dImpl>(0);
  auto t3 = list->ptr<qwix::nn::ConvTranspose3dImpl>(1);
  ASSERT_TRUE(t2 && t1 && t3);
  EXPECT_TRUE(t2->weight.is_same(plain_w2));  // the same parameter tensor (optimizers stay valid)
  auto fq_x = [](const at::Tensor& x) { return qwix::fake_quant(x, "int8", {.channelwise_axes = {0}}); };
  auto fq_w = [](const at::Tensor& w) { return qwix::fake_quant(w, "int4", {.channelwise_axes = {1}}); };
  // groups 2: output channel g * 3 + j is axis 1's j in the block of axis 0 that holds group g's inputs
  auto fq_w2 = qwix::fake_quant(t2->weight, "int4", {.channelwise_axes = {1}, .tiled_axes = {{0, 2}}});
  const auto x2 = torch::randn({2, 4, 5, 5});
  EXPECT_TRUE(torch::equal(seq->forward(x2), at::conv_transpose2d(fq_x(x2), fq_w2, t2->bias, 2, 1, 1, 2)));
  const auto x1 = torch::randn({2, 2, 7});
  EXPECT_TRUE(torch::equal(t1->forward(x1), at::conv_transpose1d(fq_x(x1), fq_w(t1->weight), t1->bias, 2)));
  const auto x3 = torch::randn({2, 2, 3, 3, 3});
  EXPECT_TRUE(torch::equal(t3->forward(x3), at::conv_transpose3d(fq_x(x3), fq_w(t3->weight), {}, 2)));
  // output_size reaches LibTorch's forward (it picks the output padding).
  EXPECT_EQ(t1->forward(x1, std::vector<int64_t>{16}).size(2), 16);
  // Quantized, not the float op.
  EXPECT_FALSE(torch::equal(t2->forward(x2), at::conv_transpose2d(x2, t2->weight, t2->bias, 2, 1, 1, 2)));
}

// Conv1d (circular padding) and Conv3d (LibTorch's forward on swapped-in fake-quantized weights),
// in a ModuleList, against torch's own conv of the fake-quantized operands.
TEST(NnPass, Conv1dAndConv3dWrappers) {
  torch::manual_seed(4);
  auto o1 = torch::nn::Conv1dOptions(2, 3, 3).padding(1).padding_mode(torch::kCircular);
  auto o3 = torch::nn::Conv3dOptions(2, 3, 2).stride(2);
  torch::nn::ModuleList list{torch::nn::Conv1d{o1}, torch::nn::Conv3d{o3}};
  const auto plain_w1 = list->ptr<torch::nn::Conv1dImpl>(0)->weight;
  qwix::nn::quantize_model(list, qwix::QatProvider({w4a8()}));
  auto c1 = list->ptr<qwix::nn::Conv1dImpl>(0);
  auto c3 = list->ptr<qwix::nn::Conv3dImpl>(1);
  ASSERT_TRUE(c1 && c3);
  EXPECT_TRUE(c1->weight.is_same(plain_w1));
  const auto x1 = torch::randn({2, 2, 9}), x3 = torch::randn({2, 2, 4, 4, 4});
  const auto fq_w = [](const at::Tensor& w) { return qwix::fake_quant(w, "int4", {.channelwise_axes = {0}}); };
  const auto fq_x = [](const at::Tensor& x) { return qwix::fake_quant(x, "int8", {.channelwise_axes = {0}}); };
  torch::nn::Conv1d r1(o1);
  torch::nn::Conv3d r3(o3);
  {
    torch::NoGradGuard g;
    r1->weight.copy_(fq_w(c1->weight));
    r1->bias.copy_(c1->bias);
    r3->weight.copy_(fq_w(c3->weight));
    r3->bias.copy_(c3->bias);
  }
  auto y1 = c1->forward(x1);
  EXPECT_TRUE(torch::equal(y1, r1(fq_x(x1))));
  EXPECT_TRUE(torch::equal(c3->forward(x3), r3(fq_x(x3))));
  EXPECT_TRUE(c1->weight.is_same(plain_w1));  // the parameter is back after the call
  y1.sum().backward();
  EXPECT_TRUE(c1->weight.grad().defined() && c1->weight.grad().abs().sum().item<float>() > 0);
}

struct Typed : torch::nn::Module {
  torch::nn::Linear fc{nullptr};
  Typed() { fc = register_module("fc", torch::nn::Linear(4, 4)); }
};

TEST(NnPass, AnOpErrorNamesTheModuleOpAndRule) {
  auto net = std::make_shared<Net>();
  qwix::QuantizationRule r = w4a8();
  r.tile_size = 3;  // divides neither 16 nor 32
  qwix::nn::quantize_model(*net, qwix::QatProvider({r}));
  try {
    net->forward(torch::randn({2, 16}));
    FAIL() << "expected c10::ValueError";
  } catch (const c10::ValueError& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT_EQ(msg.rfind("qwix: module 'fc1', op linear0 (rule " + qwix::rule_repr(r) +
                            "): tile size 3 does not divide axis 1 of size 16", 0),
              0u)
        << msg;
  }
}

TEST(NnPass, PlainTypedMembersAreAnErrorOnlyWhenARuleMatches) {
  Typed m;
  try {
    qwix::nn::quantize_model(m, qwix::QatProvider({w4a8()}));
    FAIL() << "expected a ValueError";
  } catch (const c10::ValueError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("module 'fc'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("qwix::nn::Linear"), std::string::npos) << msg;
  }
  qwix::QuantizationRule other = w4a8();
  other.module_path = "elsewhere";
  auto provider = qwix::nn::quantize_model(m, qwix::QatProvider({other}));  // nothing to do: fine
  EXPECT_EQ(provider->get_unused_rules().size(), 1u);
}

// DESIGN section 1: "a model quantized on any path gives the same forward values
// for the same weights". The same network on the torch::nn path and on the
// TorchScript path (tests/python/test_jit.py ties TorchScript to the Python path):
// outputs and SRQ statistics bit for bit, over training steps and in eval.
struct PathNet : torch::nn::Module {
  qwix::nn::Conv2d conv{nullptr};
  qwix::nn::Linear head{nullptr};
  PathNet() {
    conv = register_module("conv", qwix::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3).padding(1)));
    head = register_module("head", qwix::nn::Linear(4 * 6 * 6, 5));
  }
  torch::Tensor forward(const torch::Tensor& x) { return head(torch::relu(conv(x)).flatten(1)); }
};

torch::jit::Module script_of(PathNet& net) {
  auto cu = std::make_shared<torch::jit::CompilationUnit>();
  auto leaf = [&](const char* type, const at::Tensor& w, const at::Tensor& b, const char* src) {
    torch::jit::Module m(c10::QualifiedName(type), cu, /*shouldMangle=*/true);
    m.register_attribute("training", c10::BoolType::get(), true);
    m.register_parameter("weight", w.detach().clone().requires_grad_(), false);
    m.register_parameter("bias", b.detach().clone().requires_grad_(), false);
    m.define(src);
    return m;
  };
  torch::jit::Module root(c10::QualifiedName("__torch__.PathNet"), cu, /*shouldMangle=*/true);
  root.register_attribute("training", c10::BoolType::get(), true);
  root.register_module("conv", leaf("__torch__.Conv", net.conv->weight, net.conv->bias, R"(
def forward(self, x):
    return torch.conv2d(x, self.weight, self.bias, [1, 1], [1, 1], [1, 1], 1)
)"));
  root.register_module("head", leaf("__torch__.Head", net.head->weight, net.head->bias, R"(
def forward(self, x):
    return torch.linear(x, self.weight, self.bias)
)"));
  root.define(R"(
def forward(self, x):
    return self.head.forward(torch.relu(self.conv.forward(x)).flatten(1))
)");
  return root;
}

TEST(NnPass, SameValuesAsTheTorchScriptPass) {
  torch::manual_seed(3);
  auto net = std::make_shared<PathNet>();
  torch::jit::Module ts = script_of(*net);
  const at::Tensor example = torch::randn({2, 1, 6, 6});
  auto rules = [] {
    qwix::QuantizationRule conv;  // SRQ, asymmetric activations
    conv.module_path = "conv";
    conv.weight_qtype = "int8";
    conv.act_qtype = "uint8";
    conv.act_calibration_method = "minmax";
    conv.act_static_scale = true;
    qwix::QuantizationRule head;  // dynamic, tiled contracting axis
    head.module_path = "head";
    head.weight_qtype = "int4";
    head.act_qtype = "float8_e4m3fn";
    head.tile_size = 48;
    return std::vector<qwix::QuantizationRule>{conv, head};
  }();
  auto provider = qwix::quantize_model(*net, qwix::QatProvider(rules));
  qwix::QatProvider jit_provider(rules);
  qwix::jit::quantize_model(ts, jit_provider, {example});
  EXPECT_TRUE(jit_provider.get_unused_rules().empty());  // after the example forward
  for (int step = 0; step < 3; ++step) {  // training mode: statistics updated before each read
    const at::Tensor x = torch::randn({3, 1, 6, 6}) * (step + 1);
    const at::Tensor a = net->forward(x), b = ts.forward({x}).toTensor();
    ASSERT_TRUE(torch::equal(a, b)) << "step " << step << ": max diff " << (a - b).abs().max().item<float>();
  }
  EXPECT_TRUE(provider->get_unused_rules().empty());  // the nn path plans at the first forward
  std::map<std::string, at::Tensor> jit_buffers;
  for (const auto& b : ts.named_buffers()) jit_buffers[b.name] = b.value;
  int compared = 0;
  for (const auto& b : net->named_buffers()) {
    ASSERT_TRUE(jit_buffers.count(b.key())) << b.key() << " missing on the TorchScript path";
    EXPECT_TRUE(torch::equal(b.value(), jit_buffers[b.key()])) << b.key();
    ++compared;
  }
  EXPECT_EQ(compared, 3);  // conv.conv2d0_lhs.{count, sum_of_min, sum_of_max}
  EXPECT_EQ(net->conv->named_buffers()["conv2d0_lhs.count"].item<int>(), 3);
  net->eval();
  ts.eval();
  const at::Tensor x = torch::randn({2, 1, 6, 6});
  EXPECT_TRUE(torch::equal(net->forward(x), ts.forward({x}).toTensor()));
}

}  // namespace

namespace {

// A custom attention whose forward calls its ops itself, through qat_ops().
struct AttentionImpl : torch::nn::Module, qwix::nn::Quantizable {
  at::Tensor wqkv, wo;
  AttentionImpl() {
    wqkv = register_parameter("wqkv", torch::randn({48, 16}) * 0.2);
    wo = register_parameter("wo", torch::randn({16, 16}) * 0.2);
  }
  qwix::nn::QatOps qat_ops_for_test() { return qat_ops(); }
  at::Tensor forward(const at::Tensor& x) {
    auto ops = qat_ops();
    const int64_t b = x.size(0), t = x.size(1);
    auto qkv = ops.linear(x, wqkv).reshape({b, t, 3, 2, 8}).permute({2, 0, 3, 1, 4});
    auto s = ops.einsum("bhqd,bhkd->bhqk", qkv[0], qkv[1]) / std::sqrt(8.0);
    auto y = ops.matmul(s.softmax(-1), qkv[2]).transpose(1, 2).reshape({b, t, 16});
    return ops.matmul(y, wo.t());  // a view of a parameter: a weight
  }
};
TORCH_MODULE(Attention);

torch::jit::Module script_attention(const AttentionImpl& a) {
  auto cu = std::make_shared<torch::jit::CompilationUnit>();
  torch::jit::Module m(c10::QualifiedName("__torch__.Attention"), cu, /*shouldMangle=*/true);
  m.register_attribute("training", c10::BoolType::get(), true);
  m.register_parameter("wqkv", a.wqkv.detach().clone().requires_grad_(), false);
  m.register_parameter("wo", a.wo.detach().clone().requires_grad_(), false);
  m.define(R"(
def forward(self, x):
    b = x.size(0)
    t = x.size(1)
    qkv = torch.linear(x, self.wqkv).reshape([b, t, 3, 2, 8]).permute([2, 0, 3, 1, 4])
    s = torch.einsum("bhqd,bhkd->bhqk", [qkv[0], qkv[1]]) / 2.8284271247461903
    y = torch.matmul(s.softmax(-1), qkv[2]).transpose(1, 2).reshape([b, t, 16])
    return torch.matmul(y, self.wo.t())
)");
  return m;
}

TEST(NnPass, CustomForwardOpsMatchTheTorchScriptPass) {
  torch::manual_seed(4);
  Attention att;
  const at::Tensor x0 = torch::randn({2, 5, 16});
  // Unconfigured, the ops are the plain ones.
  EXPECT_TRUE(torch::allclose(att->forward(x0), script_attention(*att).forward({x0}).toTensor()));
  torch::jit::Module ts = script_attention(*att);
  qwix::QuantizationRule srq;  // activation x activation products with SRQ; weights int4, activations int8
  srq.weight_qtype = "int4";
  srq.act_qtype = "int8";
  srq.act_static_scale = true;
  auto provider = qwix::quantize_model(att, qwix::QatProvider({srq}));
  qwix::QatProvider jit_provider({srq});
  qwix::jit::quantize_model(ts, jit_provider, {x0});
  for (int step = 0; step < 3; ++step) {
    const at::Tensor x = torch::randn({2, 5, 16});
    const at::Tensor a = att->forward(x), b = ts.forward({x}).toTensor();
    ASSERT_TRUE(torch::equal(a, b)) << "step " << step << ": max diff " << (a - b).abs().max().item<float>();
  }
  std::vector<std::string> names;
  for (const auto& c : att->named_children()) names.push_back(c.key());
  EXPECT_EQ(names, (std::vector<std::string>{"linear0_lhs", "einsum0_lhs", "einsum0_rhs", "matmul0_lhs",
                                             "matmul0_rhs", "matmul1_lhs"}));  // matmul1's rhs is the weight
  std::map<std::string, at::Tensor> jit_buffers;
  for (const auto& b : ts.named_buffers()) jit_buffers[b.name] = b.value;
  for (const auto& b : att->named_buffers()) {
    ASSERT_TRUE(jit_buffers.count(b.key())) << b.key();
    EXPECT_TRUE(torch::equal(b.value(), jit_buffers[b.key()])) << b.key();
  }
  EXPECT_EQ(att->named_buffers()["matmul0_rhs.count"].item<int>(), 3);
  EXPECT_TRUE(provider->get_unused_rules().empty());
  {
    auto ops = att->qat_ops_for_test();
    EXPECT_THROW(ops.operands("conv4d", x0, x0), c10::ValueError);  // names the op and the valid ones
    // One QatOps per forward call: a second one while the first is alive would reuse op ids.
    EXPECT_THROW(att->forward(x0), c10::Error);
  }
  att->forward(x0);  // fine again once it is gone
  struct NotAModule : qwix::nn::Quantizable {
    void run() { qat_ops(); }
  } not_a_module;
  EXPECT_THROW(not_a_module.run(), c10::Error);
  // The straight-through gradient reaches the parameters used through views.
  att->forward(x0).sum().backward();
  EXPECT_TRUE(att->wo.grad().defined() && att->wo.grad().abs().sum().item<float>() > 0);
}

// Attention through QatOps::scaled_dot_product_attention: decomposed into matmul0 / matmul1 where a rule
// quantizes the module's matmul activations, as the TorchScript pass does with aten::scaled_dot_product_attention.
struct SdpaAttentionImpl : torch::nn::Module, qwix::nn::Quantizable {
  at::Tensor wqkv, wo;
  SdpaAttentionImpl() {
    wqkv = register_parameter("wqkv", torch::randn({48, 16}) * 0.2);
    wo = register_parameter("wo", torch::randn({16, 16}) * 0.2);
  }
  at::Tensor forward(const at::Tensor& x, const at::Tensor& mask) {
    auto ops = qat_ops();
    const int64_t b = x.size(0), t = x.size(1);
    auto qkv = ops.linear(x, wqkv).reshape({b, t, 3, 2, 8}).permute({2, 0, 3, 1, 4});
    auto y = ops.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], mask);
    return ops.linear(y.transpose(1, 2).reshape({b, t, 16}), wo);
  }
};
TORCH_MODULE(SdpaAttention);

torch::jit::Module script_sdpa_attention(const SdpaAttentionImpl& a) {
  auto cu = std::make_shared<torch::jit::CompilationUnit>();
  torch::jit::Module m(c10::QualifiedName("__torch__.SdpaAttention"), cu, /*shouldMangle=*/true);
  m.register_attribute("training", c10::BoolType::get(), true);
  m.register_parameter("wqkv", a.wqkv.detach().clone().requires_grad_(), false);
  m.register_parameter("wo", a.wo.detach().clone().requires_grad_(), false);
  m.define(R"(
def forward(self, x, mask):
    b = x.size(0)
    t = x.size(1)
    qkv = torch.linear(x, self.wqkv).reshape([b, t, 3, 2, 8]).permute([2, 0, 3, 1, 4])
    y = torch.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], mask)
    return torch.linear(y.transpose(1, 2).reshape([b, t, 16]), self.wo)
)");
  return m;
}

TEST(NnPass, ScaledDotProductAttentionMatchesTheTorchScriptPass) {
  const at::Tensor mask = torch::rand({5, 5}) > 0.3;
  for (const bool quantize_products : {true, false}) {
    torch::manual_seed(6);
    SdpaAttention att;
    torch::jit::Module ts = script_sdpa_attention(*att);
    const at::Tensor x0 = torch::randn({2, 5, 16});
    qwix::QuantizationRule rule;
    rule.weight_qtype = "int8";
    if (quantize_products) {  // SRQ int8 activations: the products are quantized
      rule.act_qtype = "int8";
      rule.act_static_scale = true;
    }
    qwix::quantize_model(att, qwix::QatProvider({rule}));
    qwix::QatProvider jit_provider({rule});
    qwix::jit::quantize_model(ts, jit_provider, {x0, mask});
    for (int step = 0; step < 3; ++step) {
      const at::Tensor x = torch::randn({2, 5, 16});
      const at::Tensor a = att->forward(x, mask), b = ts.forward({x, mask}).toTensor();
      ASSERT_TRUE(torch::equal(a, b)) << "step " << step << ": max diff " << (a - b).abs().max().item<float>();
    }
    std::vector<std::string> names;
    for (const auto& c : att->named_children()) names.push_back(c.key());
    if (quantize_products) {
      EXPECT_EQ(names, (std::vector<std::string>{"linear0_lhs", "matmul0_lhs", "matmul0_rhs", "matmul1_lhs",
                                                 "matmul1_rhs", "linear1_lhs"}));
      EXPECT_EQ(att->named_buffers()["matmul1_rhs.count"].item<int>(), 3);
    } else {  // weights only: the fused op, untouched
      EXPECT_TRUE(names.empty());
      const at::Tensor x = torch::randn({2, 5, 16});
      auto w = qwix::fake_quant(att->wqkv, "int8", {.channelwise_axes = {0}});
      auto qkv = at::linear(x, w).reshape({2, 5, 3, 2, 8}).permute({2, 0, 3, 1, 4});
      auto y = at::scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], mask).transpose(1, 2).reshape({2, 5, 16});
      auto expected = at::linear(y, qwix::fake_quant(att->wo, "int8", {.channelwise_axes = {0}}));
      EXPECT_TRUE(torch::equal(att->forward(x, mask), expected));
    }
  }
  // Bad arguments name themselves.
  const at::Tensor q = torch::randn({1, 2, 4, 8});
  EXPECT_THROW(qwix::decomposed_attention(at::matmul, q, q, q, mask.narrow(0, 0, 4).narrow(1, 0, 4), 0.0, true),
               c10::ValueError);
  EXPECT_THROW(qwix::decomposed_attention(at::matmul, q, q, q, std::nullopt, 2.0), c10::ValueError);
}

// 2-D products through QatOps::mm / addmm are matmul ops (GPT-2's Conv1D), as aten::mm / aten::addmm in TorchScript.
struct MmNetImpl : torch::nn::Module, qwix::nn::Quantizable {
  at::Tensor w1, b1, w2;
  MmNetImpl() {
    w1 = register_parameter("w1", torch::randn({16, 32}) * 0.2);  // [in, out]
    b1 = register_parameter("b1", torch::randn({32}) * 0.1);
    w2 = register_parameter("w2", torch::randn({4, 32}) * 0.2);
  }
  at::Tensor forward(const at::Tensor& x) {
    auto ops = qat_ops();
    auto h = ops.addmm(b1, x, w1, /*beta=*/0.5, /*alpha=*/2.0).relu();
    return ops.mm(h, w2.t());
  }
};
TORCH_MODULE(MmNet);

TEST(NnPass, MmAndAddmmMatchTheTorchScriptPass) {
  torch::manual_seed(8);
  MmNet net;
  auto cu = std::make_shared<torch::jit::CompilationUnit>();
  torch::jit::Module ts(c10::QualifiedName("__torch__.MmNet"), cu, /*shouldMangle=*/true);
  ts.register_attribute("training", c10::BoolType::get(), true);
  for (const auto& p : net->named_parameters()) ts.register_parameter(p.key(), p.value().detach().clone(), false);
  ts.define(R"(
def forward(self, x):
    h = torch.addmm(self.b1, x, self.w1, beta=0.5, alpha=2.0).relu()
    return torch.mm(h, self.w2.t())
)");
  const at::Tensor x0 = torch::randn({6, 16});
  qwix::QuantizationRule srq;
  srq.weight_qtype = "int4";
  srq.act_qtype = "int8";
  srq.act_static_scale = true;
  qwix::quantize_model(net, qwix::QatProvider({srq}));
  qwix::QatProvider jit_provider({srq});
  qwix::jit::quantize_model(ts, jit_provider, {x0});
  for (int step = 0; step < 3; ++step) {
    const at::Tensor x = torch::randn({6, 16});
    const at::Tensor a = net->forward(x), b = ts.forward({x}).toTensor();
    ASSERT_TRUE(torch::equal(a, b)) << "step " << step;
  }
  std::vector<std::string> names;
  for (const auto& c : net->named_children()) names.push_back(c.key());
  EXPECT_EQ(names, (std::vector<std::string>{"matmul0_lhs", "matmul1_lhs"}));
  // The weight [in, out] is quantized per output column (matmul's rhs: its non-contracting axis).
  const at::Tensor x = torch::randn({6, 16});
  net->eval();
  auto xq = qwix::srq_scale(x, net->named_buffers()["matmul0_lhs.count"],
                            {net->named_buffers()["matmul0_lhs.sum_of_absmax"]}, "int8", "absmax", {0});
  auto expected_h = at::addmm(net->b1, qwix::fake_quant_with_scale(x, xq[0], "int8"),
                              qwix::fake_quant(net->w1, "int4", {.channelwise_axes = {1}}), 0.5, 2.0);
  auto ops_h = at::addmm(net->b1, x, net->w1, 0.5, 2.0);  // unquantized, to show the difference matters
  EXPECT_FALSE(torch::allclose(expected_h, ops_h, 0, 1e-4));
  EXPECT_TRUE(torch::equal(net->forward(x), [&] {
    auto h = expected_h.relu();
    auto hs = qwix::srq_scale(h, net->named_buffers()["matmul1_lhs.count"],
                              {net->named_buffers()["matmul1_lhs.sum_of_absmax"]}, "int8", "absmax", {0});
    return at::mm(qwix::fake_quant_with_scale(h, hs[0], "int8"),
                  qwix::fake_quant(net->w2.t(), "int4", {.channelwise_axes = {1}}));
  }()));
}

// LibTorch's clone() copies the torch::nn part only: an unquantized model clones into wrappers
// (and can be quantized afterwards); a quantized one refuses instead of dropping its quantization.
struct CloneNet : torch::nn::Cloneable<CloneNet> {
  qwix::nn::Linear fc{nullptr};
  CloneNet() { reset(); }
  void reset() override { fc = register_module("fc", qwix::nn::Linear(8, 4)); }
  at::Tensor forward(const at::Tensor& x) { return fc(x); }
};

TEST(NnPass, CloneKeepsWrappersOrRefuses) {
  torch::manual_seed(5);
  auto net = std::make_shared<CloneNet>();
  auto copy = std::dynamic_pointer_cast<CloneNet>(net->clone());
  ASSERT_TRUE(copy != nullptr);
  ASSERT_TRUE(dynamic_cast<qwix::nn::LinearImpl*>(copy->fc.get()) != nullptr);
  EXPECT_FALSE(copy->fc->weight.is_same(net->fc->weight));
  EXPECT_TRUE(torch::equal(copy->fc->weight, net->fc->weight));
  auto alone = std::dynamic_pointer_cast<qwix::nn::LinearImpl>(net->fc->clone());
  ASSERT_TRUE(alone != nullptr);  // a wrapper, not a plain torch::nn::LinearImpl
  qwix::quantize_model(net, qwix::QatProvider({w4a8()}));
  qwix::quantize_model(copy, qwix::QatProvider({w4a8()}));
  const auto x = torch::randn({3, 8});
  EXPECT_TRUE(torch::equal(copy->forward(x), net->forward(x)));
  EXPECT_TRUE(torch::equal(net->forward(x), fq_linear(x, net->fc->weight, net->fc->bias)));
  try {
    net->clone();
    ADD_FAILURE() << "clone() of a quantized model must fail";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("'fc' would drop its quantization"), std::string::npos) << e.what();
  }
}

}  // namespace

namespace {

// Sums a tensor across `n` threads (a stand-in for a process group's all-reduce).
struct ThreadWorld {
  explicit ThreadWorld(int n) : n(n) {}
  int64_t all_reduce(at::Tensor& t) {
    std::unique_lock<std::mutex> lock(mu);
    const int64_t my_round = round;
    acc = acc.defined() ? acc + t : t.clone();  // two addends: the same sum in any order
    if (++arrived == n) {
      result = acc;
      acc = at::Tensor();
      arrived = 0;
      ++round;
      cv.notify_all();
    } else {
      cv.wait(lock, [&] { return round != my_round; });
    }
    t.copy_(result);
    return n;
  }
  int n, arrived = 0;
  int64_t round = 0;
  at::Tensor acc, result;
  std::mutex mu;
  std::condition_variable cv;
};

TEST(NnPass, DataParallelStatisticsAreTheSameOnEveryReplica) {
  torch::manual_seed(6);
  qwix::QuantizationRule r = w4a8();
  r.act_static_scale = true;
  auto make = [&](const Net& like) {
    auto net = std::make_shared<Net>();
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < net->parameters().size(); ++i) net->parameters()[i].copy_(like.parameters()[i]);
    qwix::quantize_model(net, qwix::QatProvider({r}));
    return net;
  };
  Net seed_net;
  auto replica0 = make(seed_net), replica1 = make(seed_net), single = make(seed_net);
  std::vector<at::Tensor> batches0, batches1;
  for (int step = 0; step < 3; ++step) {
    batches0.push_back(torch::randn({4, 16}) * (step + 1));
    batches1.push_back(torch::randn({4, 16}) * 0.5);
  }
  ThreadWorld world(2);
  for (auto* net : {&replica0, &replica1}) {
    qwix::nn::set_stat_all_reduce(**net, [&world](at::Tensor& t) { return world.all_reduce(t); });
  }
  std::vector<at::Tensor> out0, out1;
  std::thread t1([&] {
    for (const auto& x : batches1) out1.push_back(replica1->forward(x));
  });
  for (const auto& x : batches0) out0.push_back(replica0->forward(x));
  t1.join();
  for (int step = 0; step < 3; ++step) {  // one process that sees both batches of every step
    single->forward(batches0[step]);
    single->forward(batches1[step]);
  }
  auto b0 = replica0->named_buffers(), b1 = replica1->named_buffers(), bs = single->named_buffers();
  ASSERT_EQ(b0.size(), 6u);  // fc1, body.0, body.2: count + sum_of_absmax each
  for (const auto& b : b0) {
    EXPECT_TRUE(torch::equal(b.value(), b1[b.key()])) << b.key() << ": replicas differ";
    if (b.key().rfind("fc1.", 0) == 0) {
      // The first layer sees the raw batches: its statistics are what one process gathers from
      // all of them (deeper layers see activations quantized with the shared scale of each step).
      EXPECT_TRUE(torch::allclose(b.value().to(torch::kDouble), bs[b.key()].to(torch::kDouble), 1e-6, 0))
          << b.key() << ": " << b.value() << " vs one process " << bs[b.key()];
    }
  }
  EXPECT_EQ(b0["body.2.linear0_lhs.count"].item<int>(), 6);
  EXPECT_EQ(b0["fc1.linear0_lhs.count"].item<int>(), 6);  // 3 steps x 2 replicas
  // The same scale on both replicas: the same input gives the same output.
  replica0->eval();
  replica1->eval();
  const auto x = torch::randn({2, 16});
  EXPECT_TRUE(torch::equal(replica0->forward(x), replica1->forward(x)));
  // A reducer that reports no replicas is an error naming the module.
  qwix::nn::set_stat_all_reduce(*replica0, [](at::Tensor&) { return int64_t{0}; });
  replica0->train();
  EXPECT_THROW(replica0->forward(x), c10::Error);
  qwix::nn::set_stat_all_reduce(*replica0, nullptr);  // off again
  replica0->forward(x);
  EXPECT_EQ(replica0->named_buffers()["fc1.linear0_lhs.count"].item<int>(), 7);
}

// A parameter of another module (a tied embedding) passed into a custom forward is a weight, as an
// nn.Parameter is in Python; settings before quantize_model are errors.
struct TiedHeadImpl : torch::nn::Module, qwix::nn::Quantizable {
  at::Tensor forward(const at::Tensor& x, const at::Tensor& embedding) {
    auto ops = qat_ops();
    return ops.matmul(x, embedding.t());  // a view of the sibling's parameter
  }
};
TORCH_MODULE(TiedHead);
struct TiedLm : torch::nn::Module {
  torch::nn::Embedding emb{nullptr};
  TiedHead head{nullptr};
  TiedLm() {
    emb = register_module("emb", torch::nn::Embedding(12, 8));
    head = register_module("head", TiedHead());
  }
  at::Tensor forward(const at::Tensor& tokens) { return head->forward(emb(tokens), emb->weight); }
};

TEST(NnPass, TiedParametersAreWeightsAndSettingsNeedTheModel) {
  torch::manual_seed(7);
  auto lm = std::make_shared<TiedLm>();
  EXPECT_THROW(qwix::nn::set_quant_stats_update(*lm, false), c10::ValueError);  // before quantize_model
  EXPECT_THROW(qwix::nn::set_stat_all_reduce(*lm, nullptr), c10::ValueError);
  qwix::quantize_model(lm, qwix::QatProvider({w4a8()}));
  const auto tokens = torch::randint(0, 12, {3, 5});
  const auto h = lm->emb(tokens);
  qwix::FakeQuantOptions act, w;
  act.channelwise_axes = {0, 1};
  w.channelwise_axes = {1};  // matmul: every non-contracting axis of the rhs [8, 12] -> axis 1
  const auto want = at::matmul(qwix::fake_quant(h, "int8", act), qwix::fake_quant(lm->emb->weight.t(), "int4", w));
  EXPECT_TRUE(torch::equal(lm->forward(tokens), want));
  qwix::nn::set_quant_stats_update(*lm, false);  // fine now
}

// Checkpoints with SRQ statistics: the QuantStats appear at the first forward, so a fresh model
// creates them with an example forward (changing nothing else) before loading.
struct BnNet : torch::nn::Module {
  qwix::nn::Linear fc{nullptr};
  torch::nn::BatchNorm1d bn{nullptr};
  torch::nn::Dropout drop{nullptr};
  BnNet() {
    fc = register_module("fc", qwix::nn::Linear(16, 8));
    bn = register_module("bn", torch::nn::BatchNorm1d(8));
    drop = register_module("drop", torch::nn::Dropout(0.5));
  }
  at::Tensor forward(const at::Tensor& x) { return drop(bn(fc(x))); }
};

TEST(NnPass, AnEmptyBatchAddsNothingAndJoinsTheAllReduce) {
  torch::manual_seed(7);
  qwix::QuantizationRule r = w4a8();
  r.act_static_scale = true;
  auto single = std::make_shared<Net>();
  qwix::quantize_model(single, qwix::QatProvider({r}));
  single->forward(torch::randn({4, 16}));
  auto before = single->named_buffers();
  std::map<std::string, at::Tensor> saved;
  for (const auto& b : before) saved[b.key()] = b.value().clone();
  EXPECT_EQ(single->forward(torch::randn({0, 16})).size(0), 0);  // averaging it gave NaN sums for good
  for (const auto& b : single->named_buffers()) EXPECT_TRUE(torch::equal(b.value(), saved[b.key()])) << b.key();

  // Two replicas, one with an empty batch: it still joins the collective (no hang), and the other's average
  // stands in for it; when both are empty, nothing changes.
  auto replica0 = std::make_shared<Net>(), replica1 = std::make_shared<Net>();
  for (auto* net : {&replica0, &replica1}) qwix::quantize_model(*net, qwix::QatProvider({r}));
  ThreadWorld world(2);
  for (auto* net : {&replica0, &replica1})
    qwix::nn::set_stat_all_reduce(**net, [&world](at::Tensor& t) { return world.all_reduce(t); });
  const auto x = torch::randn({4, 16});
  std::thread t0([&] { replica1->forward(torch::randn({0, 16})); });  // both empty at count 0: nothing changes
  replica0->forward(torch::randn({0, 16}));
  t0.join();
  std::thread t1([&] { replica1->forward(torch::randn({0, 16})); });
  replica0->forward(x);
  t1.join();
  const auto count = [](Net& n) { return n.named_buffers()["fc1.linear0_lhs.count"].item<int>(); };
  const auto sum = [](Net& n) { return n.named_buffers()["fc1.linear0_lhs.sum_of_absmax"].clone(); };
  EXPECT_EQ(count(*replica0), 2);
  EXPECT_TRUE(torch::equal(sum(*replica0), sum(*replica1)));
  const auto own = qwix::calibrate(x, "absmax", {0})[0].mean({0}, /*keepdim=*/true);
  EXPECT_TRUE(torch::allclose(sum(*replica0), own * 2, 1e-6, 0)) << sum(*replica0) << " vs " << own * 2;
  const auto sum_before = sum(*replica0);
  std::thread t2([&] { replica1->forward(torch::randn({0, 16})); });
  replica0->forward(torch::randn({0, 16}));
  t2.join();
  EXPECT_EQ(count(*replica0), 2);  // both empty again: left out entirely
  EXPECT_TRUE(torch::equal(sum(*replica0), sum_before));
}

TEST(NnPass, CreateQuantStatsThenLoadACheckpoint) {
  torch::manual_seed(8);
  qwix::QuantizationRule r = w4a8();
  r.act_static_scale = true;
  auto trained = std::make_shared<BnNet>();
  qwix::quantize_model(trained, qwix::QatProvider({r}));
  for (int step = 0; step < 3; ++step) trained->forward(torch::randn({6, 16}));
  std::stringstream buffer;
  torch::save(trained, buffer);

  auto fresh = std::make_shared<BnNet>();
  qwix::quantize_model(fresh, qwix::QatProvider({r}));
  EXPECT_EQ(fresh->fc->named_children().size(), 0u);  // no statistics before a forward
  const auto bn_mean = fresh->bn->running_mean.clone();
  torch::manual_seed(9);
  qwix::nn::create_quant_stats(*fresh, [&] { fresh->forward(torch::randn({6, 16}) * 5); });
  const auto after = torch::rand({4});
  torch::manual_seed(9);
  EXPECT_TRUE(torch::equal(after, torch::rand({4})));  // the RNG as it was (input and dropout drew numbers)
  EXPECT_TRUE(torch::equal(fresh->bn->running_mean, bn_mean));  // buffers as they were
  auto stat = fresh->fc->named_buffers();
  EXPECT_EQ(stat["linear0_lhs.count"].item<int>(), 0);  // created, not updated
  EXPECT_EQ(stat["linear0_lhs.sum_of_absmax"].item<float>(), 0.0f);
  torch::load(fresh, buffer);
  for (const auto& b : trained->named_buffers()) {
    EXPECT_TRUE(torch::equal(b.value(), fresh->named_buffers()[b.key()])) << b.key();
  }
  EXPECT_EQ(fresh->fc->named_buffers()["linear0_lhs.count"].item<int>(), 3);
}

TEST(NnPass, ThreadsShareOneModelForInference) {
  // Inference serving: several threads run forwards of one quantized model (a plain torch::nn::Linear
  // allows it). The wrappers' forwards take turns on the weight member; each thread's qat_ops() is its own.
  torch::manual_seed(10);
  auto net = std::make_shared<Net>();
  qwix::QuantizationRule r = w4a8();
  r.act_static_scale = true;
  r.module_path = "fc1";
  qwix::nn::quantize_model(*net, qwix::QatProvider({r, w4a8()}));
  net->eval();  // statistics created on the first forward, by whichever thread gets there first
  const auto x = torch::randn({5, 16});
  std::vector<at::Tensor> outs(4);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < outs.size(); ++t) {
    threads.emplace_back([&, t] {
      torch::NoGradGuard no_grad;
      for (int i = 0; i < 200; ++i) outs[t] = net->forward(x);
    });
  }
  for (auto& th : threads) th.join();
  const auto expected = net->forward(x);
  for (const auto& y : outs) EXPECT_TRUE(torch::equal(y, expected));
  EXPECT_TRUE(net->fc1->weight.is_same(net->fc1->named_parameters()["weight"]));
  EXPECT_EQ(net->fc1->named_children().size(), 1u);  // one statistic, not one per thread
}

TEST(NnPass, StatisticsMadeUnderInferenceModeTrain) {
  // A first forward (or create_quant_stats) under InferenceMode made the statistics inference tensors,
  // which no training step could update afterwards.
  auto net = std::make_shared<Net>();
  qwix::QuantizationRule r = w4a8();
  r.act_static_scale = true;
  qwix::nn::quantize_model(*net, qwix::QatProvider({r}));
  net->eval();
  {
    c10::InferenceMode inference;
    net->forward(torch::randn({2, 16}));
  }
  net->train();
  net->forward(torch::randn({2, 16})).sum().backward();
  EXPECT_EQ(net->fc1->named_buffers()["linear0_lhs.count"].item<int>(), 1);
}

TEST(NnPass, ToDtypeKeepsTheStatistics) {
  torch::manual_seed(11);
  auto net = std::make_shared<Net>();
  qwix::QuantizationRule r = w4a8();
  r.act_static_scale = true;
  qwix::nn::quantize_model(*net, qwix::QatProvider({r}));
  net->train();
  net->forward(torch::randn({6, 16}));
  net->to(torch::kDouble);
  EXPECT_EQ(net->fc1->weight.scalar_type(), torch::kDouble);
  const auto buffers = net->named_buffers();
  EXPECT_EQ(buffers["fc1.linear0_lhs.count"].scalar_type(), torch::kInt);
  EXPECT_EQ(buffers["fc1.linear0_lhs.sum_of_absmax"].scalar_type(), torch::kFloat);
  net->forward(torch::randn({6, 16}, torch::kDouble));  // was: "count must be an int32 or int64 scalar tensor"
  EXPECT_EQ(net->named_buffers()["fc1.linear0_lhs.count"].item<int>(), 2);
  net->to(torch::kCPU, torch::kBFloat16);
  EXPECT_EQ(net->named_buffers()["body.0.linear0_lhs.count"].scalar_type(), torch::kInt);
  EXPECT_EQ(net->named_buffers()["body.0.linear0_lhs.sum_of_absmax"].scalar_type(), torch::kFloat);
  EXPECT_EQ(net->fc1->weight.scalar_type(), torch::kBFloat16);
}

TEST(NnPass, QuantizingTwiceIsAnError) {
  auto net = std::make_shared<Net>();
  qwix::nn::quantize_model(*net, qwix::QatProvider({w4a8()}));
  try {
    qwix::nn::quantize_model(*net, qwix::QatProvider({w4a8()}));
    FAIL() << "expected c10::ValueError";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("its submodule 'fc1' is already quantized"), std::string::npos) << e.what();
  }
  try {
    qwix::nn::quantize_model(*net->fc1, qwix::QatProvider({w4a8()}));
    FAIL() << "expected c10::ValueError";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("this model is already quantized"), std::string::npos) << e.what();
  }
}

// The TORCH_WARN messages of a scope.
struct CollectWarnings : c10::WarningHandler {
  std::vector<std::string> messages;
  c10::WarningUtils::WarningHandlerGuard guard{static_cast<c10::WarningHandler*>(this)};
  void process(const c10::Warning& w) override { messages.push_back(w.msg()); }
};

TEST(NnPass, RulesThatMatchNothingWarn) {
  qwix::QuantizationRule typo = w4a8();
  typo.module_path = "encoder\\..*";  // Net has fc1, body, body.0 ...
  {
    CollectWarnings w;
    auto net = std::make_shared<Net>();
    qwix::nn::quantize_model(*net, qwix::QatProvider({typo}));
    ASSERT_EQ(w.messages.size(), 1u);
    EXPECT_NE(w.messages[0].find("no rule's module_path matches any module of this model, so nothing is quantized; "
                                 "module_path is a full match on module paths such as '', 'fc1', 'body', 'body.0'"),
              std::string::npos)
        << w.messages[0];
  }
  qwix::QuantizationRule only_conv = w4a8();
  only_conv.module_path = "fc1";
  only_conv.op_names = {"conv2d"};  // the path matches, no conv2d runs: only the example forward tells
  CollectWarnings w;
  auto net = std::make_shared<Net>();
  auto provider = qwix::nn::quantize_model(*net, qwix::QatProvider({only_conv}));
  EXPECT_TRUE(w.messages.empty());
  qwix::nn::create_quant_stats(*net, [&] { net->forward(torch::randn({2, 16})); });
  ASSERT_EQ(w.messages.size(), 1u);
  EXPECT_NE(w.messages[0].find("no rule matched any op of the example forward"), std::string::npos) << w.messages[0];

  auto matched = std::make_shared<Net>();  // a rule that quantizes: no warning from either
  qwix::nn::quantize_model(*matched, qwix::QatProvider({w4a8()}));
  qwix::nn::create_quant_stats(*matched, [&] { matched->forward(torch::randn({2, 16})); });
  EXPECT_EQ(w.messages.size(), 1u);
}

TEST(NnPass, CopiesOfAProviderKeepTheirOwnUsage) {
  qwix::QuantizationRule a = w4a8(), b = w4a8();
  a.module_path = "a";
  b.module_path = "b";
  qwix::QatProvider p({a, b});
  p.mark_used(1);
  qwix::QatProvider copy = p;  // a snapshot
  copy.mark_used(0);
  EXPECT_EQ(p.unused_rule_indices(), std::vector<int64_t>{0});
  EXPECT_TRUE(copy.unused_rule_indices().empty());
  p = copy;
  EXPECT_TRUE(p.is_used(0) && p.is_used(1));
  qwix::QatProvider moved = std::move(copy);
  EXPECT_TRUE(moved.is_used(0) && moved.is_used(1));
}

struct TwoOpsImpl : torch::nn::Module, qwix::nn::Quantizable {
  at::Tensor w;
  bool twice = false;      // a second qat_ops() in the same forward: an error
  bool on_thread = false;  // another thread's forward while this one's QatOps is alive: its own
  at::Tensor from_thread;
  TwoOpsImpl() { w = register_parameter("w", torch::randn({8, 8})); }
  at::Tensor forward(const at::Tensor& x) {
    auto ops = qat_ops();
    if (twice) auto again = qat_ops();
    if (on_thread) {
      on_thread = false;
      std::thread([&] { from_thread = forward(x); }).join();
    }
    return ops.linear(x, w);
  }
};

TEST(NnPass, OneQatOpsPerForwardCallOnEachThread) {
  auto m = std::make_shared<TwoOpsImpl>();
  qwix::nn::quantize_model(*m, qwix::QatProvider({w4a8()}));
  const auto x = torch::randn({3, 8});
  const auto expected = m->forward(x);
  m->twice = true;
  try {
    m->forward(x);
    FAIL() << "expected c10::Error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("called while another one of the same module is alive"), std::string::npos);
  }
  m->twice = false;
  EXPECT_TRUE(torch::equal(m->forward(x), expected));  // the first one went with the exception
  m->on_thread = true;
  EXPECT_TRUE(torch::equal(m->forward(x), expected));
  EXPECT_TRUE(torch::equal(m->from_thread, expected));
}

}  // namespace

namespace {

// The same plain Linear twice in a Sequential / ModuleList: one wrapper for both entries (the second entry ran
// a wrapper that was never configured, in float).
TEST(NnPass, AModuleInTwoEntriesIsOneWrapper) {
  torch::manual_seed(0);
  torch::nn::Linear l(8, 8);
  auto seq = torch::nn::Sequential(l, torch::nn::ReLU(), l);
  torch::nn::ModuleList list(l, l);
  qwix::nn::quantize_model(*seq, qwix::QatProvider({w4a8()}));
  qwix::nn::quantize_model(*list, qwix::QatProvider({w4a8()}));
  for (auto* m : std::vector<torch::nn::Module*>{seq.get(), list.get()}) {
    const auto children = m->children();
    ASSERT_GE(children.size(), 2u);
    auto* w = dynamic_cast<qwix::nn::LinearImpl*>(children.front().get());
    ASSERT_TRUE(w != nullptr && w->is_configured());
    EXPECT_EQ(children.back().get(), children.front().get());
    EXPECT_TRUE(w->weight.is_same(l->weight));
  }
  EXPECT_EQ(seq->ptr(0).get(), seq->ptr(2).get());
  EXPECT_EQ(list[0].get(), list[1].get());
  const auto x = torch::randn({3, 8});
  const auto want = fq_linear(torch::relu(fq_linear(x, l->weight, l->bias)), l->weight, l->bias);
  EXPECT_TRUE(torch::equal(seq->forward(x), want));
}

// Wrappers keep the plain module's train/eval mode (in eval, SRQ statistics never update), and making them leaves
// the CPU generator as it was (LibTorch's constructors initialize throw-away parameters).
TEST(NnPass, SwappingKeepsTheModeAndTheGenerator) {
  torch::manual_seed(1);
  auto seq = torch::nn::Sequential(torch::nn::Linear(8, 8), torch::nn::Conv1d(2, 2, 3));
  seq->eval();
  qwix::QuantizationRule srq = w4a8();
  srq.act_static_scale = true;
  torch::manual_seed(2);
  const auto expected = torch::rand({3});
  torch::manual_seed(2);
  qwix::nn::quantize_model(*seq, qwix::QatProvider({srq}));
  EXPECT_TRUE(torch::equal(torch::rand({3}), expected));
  auto* w = dynamic_cast<qwix::nn::LinearImpl*>(seq->ptr(0).get());
  ASSERT_TRUE(w != nullptr);
  EXPECT_FALSE(w->is_training());
  for (int i = 0; i < 3; ++i) w->forward(torch::randn({4, 8}));
  EXPECT_EQ(w->named_buffers()["linear0_lhs.count"].item<int64_t>(), 0);
}

// A module registered under two parents takes the first path, as named_modules() gives it (it took the last, so
// a rule for the first path matched nothing).
TEST(NnPass, AModuleWithTwoPathsTakesTheFirst) {
  struct Holder : torch::nn::Module {
    explicit Holder(const qwix::nn::Linear& fc) { register_module("fc", fc); }
  };
  struct Root : torch::nn::Module {
    Root() {
      qwix::nn::Linear fc(8, 8);
      register_module("enc", std::make_shared<Holder>(fc));
      register_module("dec", std::make_shared<Holder>(fc));
      shared = fc;
    }
    qwix::nn::Linear shared{nullptr};
  } root;
  qwix::QuantizationRule enc = w4a8();
  enc.module_path = "enc\\..*";
  qwix::nn::quantize_model(root, qwix::QatProvider({enc}));
  EXPECT_EQ(root.shared->qat_path(), "enc.fc");
  const auto x = torch::randn({2, 8});
  EXPECT_TRUE(torch::equal(root.shared(x), fq_linear(x, root.shared->weight, root.shared->bias)));
}

// A custom Quantizable (torch::nn::Cloneable) copied by clone() kept the original model's parameter set: its own
// weights counted as activations. A configured one refuses; an unconfigured one copies.
struct ProjImpl : torch::nn::Cloneable<ProjImpl>, qwix::nn::Quantizable {
  at::Tensor w;
  ProjImpl() { reset(); }
  void reset() override { w = register_parameter("w", torch::randn({8, 8})); }
  at::Tensor forward(const at::Tensor& x) { return qat_ops().matmul(x, w); }
};
TORCH_MODULE(Proj);

TEST(NnPass, CloneOfAConfiguredCustomModuleRefuses) {
  Proj p;
  auto copy = std::dynamic_pointer_cast<ProjImpl>(p->clone());
  ASSERT_TRUE(copy != nullptr && !copy->is_configured());
  qwix::nn::quantize_model(*p, qwix::QatProvider({w4a8()}));
  try {
    p->clone();
    ADD_FAILURE() << "clone() of a configured Quantizable must fail";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("(the model's root) would drop its quantization"), std::string::npos)
        << e.what();
  }
}

// A parameter a module registers after quantize_model is a weight too (the pass snapshots the model's).
TEST(NnPass, AParameterRegisteredLaterIsAWeight) {
  torch::manual_seed(0);
  Proj p;
  qwix::QuantizationRule weights_only;
  weights_only.weight_qtype = "int8";
  qwix::nn::quantize_model(*p, qwix::QatProvider({weights_only}));
  p->w = p->register_parameter("adapter", torch::randn({8, 8}));
  const auto x = torch::randn({2, 8});
  const auto want = torch::matmul(x, qwix::fake_quant(p->w, "int8", {.channelwise_axes = {1}}));
  EXPECT_TRUE(torch::equal(p->forward(x), want));
}

// LibTorch's MultiheadAttention / Transformer layers call their Linear children through typed members (or read
// out_proj's weight): a catch-all rule warns that they stay float (it raised an error whose fix was impossible).
TEST(NnPass, LinearsInsideLibTorchsTransformerBlocksWarn) {
  torch::nn::TransformerEncoderLayer layer(torch::nn::TransformerEncoderLayerOptions(8, 2).dim_feedforward(16));
  CollectWarnings w;
  qwix::nn::quantize_model(*layer, qwix::QatProvider({w4a8()}));
  ASSERT_EQ(w.messages.size(), 1u);
  EXPECT_NE(w.messages[0].find("they stay floating point: 'self_attn.out_proj' (linear), 'linear1' (linear), "
                               "'linear2' (linear)"),
            std::string::npos)
      << w.messages[0];
  const auto x = torch::randn({3, 2, 8});
  EXPECT_EQ(layer->forward(x).sizes(), x.sizes());
  // A rule without qtypes for them, first, keeps them float without a warning.
  qwix::QuantizationRule keep;
  keep.module_path = "self_attn.*|linear.";
  torch::nn::TransformerEncoderLayer other(torch::nn::TransformerEncoderLayerOptions(8, 2).dim_feedforward(16));
  qwix::nn::quantize_model(*other, qwix::QatProvider({keep, w4a8()}));
  EXPECT_EQ(w.messages.size(), 1u);
}

}  // namespace
