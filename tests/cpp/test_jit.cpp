// The TorchScript path from C++ (qwix::jit::quantize_model): modules defined in
// TorchScript source, the result against the ops composed by hand, SRQ
// statistics, torch::jit::save / load, types shared by instances, errors.
#include <gtest/gtest.h>
#include <qwix/qwix.h>
#include <torch/script.h>

#include <sstream>

namespace {

// Net: fc1 and fc2 share one type (Lin); the root also multiplies by a view of fc1's weight.
//   h = relu(fc1(x)); y = fc2(h) @ fc1.weight.t()
torch::jit::Module make_net() {
  auto cu = std::make_shared<torch::jit::CompilationUnit>();
  torch::jit::Module fc1(c10::QualifiedName("__torch__.Lin"), cu, /*shouldMangle=*/true);
  fc1.register_attribute("training", c10::BoolType::get(), true);
  fc1.register_parameter("weight", torch::randn({16, 16}).requires_grad_(), false);
  fc1.register_parameter("bias", torch::randn({16}).requires_grad_(), false);
  fc1.define(R"(
def forward(self, x):
    return torch.linear(x, self.weight, self.bias)
)");
  torch::jit::Module fc2(cu, fc1.type());
  fc2.register_attribute("training", c10::BoolType::get(), true);
  fc2.register_parameter("weight", torch::randn({16, 16}).requires_grad_(), false);
  fc2.register_parameter("bias", torch::randn({16}).requires_grad_(), false);

  torch::jit::Module net(c10::QualifiedName("__torch__.Net"), cu, /*shouldMangle=*/true);
  net.register_attribute("training", c10::BoolType::get(), true);
  net.register_module("fc1", fc1);
  net.register_module("fc2", fc2);
  net.define(R"(
def forward(self, x):
    h = torch.relu(self.fc1.forward(x))
    return torch.matmul(self.fc2.forward(h), self.fc1.weight.t())
)");
  return net;
}

at::Tensor fq(const at::Tensor& x, const std::string& qtype, std::vector<int64_t> channelwise) {
  qwix::FakeQuantOptions o;
  o.channelwise_axes = std::move(channelwise);
  return qwix::fake_quant(x, qtype, o);
}

at::Tensor param(const torch::jit::Module& m, const std::string& path) {
  for (const auto& p : m.named_parameters())
    if (p.name == path) return p.value;
  ADD_FAILURE() << "no parameter " << path;
  return {};
}

torch::jit::Module child(const torch::jit::Module& m, const std::string& name) {
  return torch::jit::Module(m.attr(name).toObject());
}

qwix::QuantizationRule rule(const std::string& path, std::optional<std::string> w, std::optional<std::string> a,
                            bool srq = false) {
  qwix::QuantizationRule r;
  r.module_path = path;
  r.weight_qtype = std::move(w);
  r.act_qtype = std::move(a);
  r.act_static_scale = srq;
  return r;
}

TEST(JitQuantize, MatchesOpsComposedByHand) {
  torch::manual_seed(0);
  torch::jit::Module m = make_net();
  torch::jit::Module fp = m;
  const at::Tensor x = torch::randn({4, 16});
  qwix::QatProvider provider({rule(".*", "int8", "int4")});
  torch::jit::Module q = qwix::jit::quantize_model(m, provider, {x});
  EXPECT_TRUE(qwix::jit::is_quantized(q));
  EXPECT_TRUE(qwix::jit::is_quantized(m));  // inplace (default): m is the quantized module
  EXPECT_FALSE(qwix::jit::is_quantized(fp));
  EXPECT_TRUE(provider.get_unused_rules().empty());

  const at::Tensor w1 = param(q, "fc1.weight"), b1 = param(q, "fc1.bias");
  const at::Tensor w2 = param(q, "fc2.weight"), b2 = param(q, "fc2.bias");
  EXPECT_TRUE(w1.is_same(param(fp, "fc1.weight")));  // inplace: the same tensors
  const at::Tensor h = torch::relu(torch::linear(fq(x, "int4", {0}), fq(w1, "int8", {0}), b1));
  const at::Tensor h2 = torch::linear(fq(h, "int4", {0}), fq(w2, "int8", {0}), b2);
  // matmul(activation [4, 16], weight view [16, 16]): every non-contracting axis is channelwise.
  const at::Tensor expected = torch::matmul(fq(h2, "int4", {0}), fq(w1.t(), "int8", {1}));
  const at::Tensor y = q.forward({x}).toTensor();
  EXPECT_TRUE(torch::equal(y, expected));

  // Parameter names do not change; gradients reach the weights (straight-through).
  std::vector<std::string> names;
  for (const auto& p : q.named_parameters()) names.push_back(p.name);
  EXPECT_EQ(names, (std::vector<std::string>{"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}));
  y.sum().backward();
  EXPECT_TRUE(w1.grad().defined() && w2.grad().defined());
}

TEST(JitQuantize, SharedTypeGetsOneTypePerPlan) {
  torch::jit::Module m = make_net();
  const auto lin_type = child(m, "fc1").type();
  ASSERT_EQ(lin_type, child(m, "fc2").type());
  qwix::QatProvider provider({rule("fc1", "int8", std::nullopt), rule("nothing", "int8", std::nullopt)});
  torch::jit::Module q = qwix::jit::quantize_model(m, provider, {torch::randn({2, 16})}, /*inplace=*/false);
  EXPECT_NE(child(q, "fc1").type(), lin_type);
  EXPECT_EQ(child(q, "fc2").type(), lin_type);  // untouched: keeps its type
  EXPECT_FALSE(qwix::jit::is_quantized(m));      // not inplace: m is left as it is
  EXPECT_FALSE(param(q, "fc1.weight").is_same(param(m, "fc1.weight")));
  EXPECT_TRUE(torch::equal(param(q, "fc1.weight"), param(m, "fc1.weight")));
  ASSERT_EQ(provider.get_unused_rules().size(), 1u);
  EXPECT_EQ(provider.get_unused_rules()[0].module_path, "nothing");
}

TEST(JitQuantize, SrqStatisticsAndSaveLoad) {
  torch::manual_seed(0);
  torch::jit::Module m = make_net();
  const at::Tensor x = torch::randn({4, 16});
  // The DESIGN snippet: a temporary provider, m replaced in place.
  qwix::jit::quantize_model(m, qwix::QatProvider({rule("fc.", "int8", "int8", /*srq=*/true)}), {x});
  ASSERT_TRUE(qwix::jit::is_quantized(m));
  torch::jit::Module stat = child(child(m, "fc1"), "linear0_lhs");
  EXPECT_EQ(stat.attr("count").toTensor().item<int>(), 0);  // the example forward updates nothing
  m.forward({x});
  m.forward({x * 2});
  EXPECT_EQ(stat.attr("count").toTensor().item<int>(), 2);
  // linear activations are per token: the sum of the per-token absmax averaged over the batch axis, [1, 1].
  const at::Tensor sum = stat.attr("sum_of_absmax").toTensor();
  ASSERT_EQ(sum.sizes(), (c10::IntArrayRef{1, 1}));
  EXPECT_FLOAT_EQ(sum.item<float>(), 3 * x.abs().amax(1).mean().item<float>());  // per token, then averaged
  m.eval();
  m.forward({x});
  EXPECT_EQ(stat.attr("count").toTensor().item<int>(), 2);  // eval: no update

  std::stringstream buffer;
  m.save(buffer);
  torch::jit::Module loaded = torch::jit::load(buffer);
  EXPECT_TRUE(qwix::jit::is_quantized(loaded));
  loaded.eval();
  const at::Tensor x2 = torch::randn({3, 16});
  EXPECT_TRUE(torch::equal(loaded.forward({x2}).toTensor(), m.forward({x2}).toTensor()));
  EXPECT_TRUE(torch::equal(child(child(loaded, "fc2"), "linear0_lhs").attr("sum_of_absmax").toTensor(),
                           child(child(m, "fc2"), "linear0_lhs").attr("sum_of_absmax").toTensor()));

  // Standalone calibration and the update switch.
  qwix::jit::calibrate(loaded, {{x}, {x}});
  EXPECT_EQ(child(child(loaded, "fc1"), "linear0_lhs").attr("count").toTensor().item<int>(), 4);
  EXPECT_FALSE(loaded.is_training());
  loaded.train();
  qwix::jit::set_quant_stats_update(loaded, false);
  loaded.forward({x});
  EXPECT_EQ(child(child(loaded, "fc1"), "linear0_lhs").attr("count").toTensor().item<int>(), 4);
}

TEST(JitQuantize, Errors) {
  torch::jit::Module m = make_net();
  qwix::jit::quantize_model(m, qwix::QatProvider({rule(".*", "int8", "int8")}), {torch::randn({2, 16})});
  EXPECT_THROW(qwix::jit::quantize_model(m, qwix::QatProvider({rule(".*", "int8", "int8")}), {torch::randn({2, 16})}),
               c10::ValueError);

  // A static scale for an op that runs in a loop (op ids linear0, linear1): one QuantStat cannot serve both.
  torch::jit::Module loop(c10::QualifiedName("__torch__.Loop"));
  loop.register_attribute("training", c10::BoolType::get(), true);
  loop.register_parameter("weight", torch::randn({16, 16}).requires_grad_(), false);
  loop.define(R"(
def forward(self, x):
    for i in range(2):
        x = torch.linear(x, self.weight)
    return x
)");
  try {
    qwix::jit::quantize_model(loop, qwix::QatProvider({rule(".*", "int8", "int8", /*srq=*/true)}),
                              {torch::randn({2, 16})});
    ADD_FAILURE() << "expected a ValueError";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("op linear"), std::string::npos) << e.what();
  }
  // Dynamic scales in a loop are fine.
  qwix::jit::quantize_model(loop, qwix::QatProvider({rule(".*", "int8", "int8")}), {torch::randn({2, 16})});
  EXPECT_TRUE(qwix::jit::is_quantized(loop));
}

}  // namespace
