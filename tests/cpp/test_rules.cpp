// GoogleTest: QuantizationRule validation, QatProvider matching and the per-operand
// plans of csrc/rules (the one engine behind the Python, C++ and TorchScript paths).
#include <gtest/gtest.h>
#include <qwix/qwix.h>

#include <c10/util/Exception.h>
#include <torch/torch.h>

#include <string>

#include "rules/internal.h"

namespace {

using qwix::Operand;
using qwix::QuantizationRule;
using Axes = std::vector<int64_t>;

QuantizationRule rule(const std::string& path = ".*") {
  QuantizationRule r;
  r.module_path = path;
  r.weight_qtype = "int8";
  r.act_qtype = "int8";
  return r;
}

// Expects a c10::ValueError whose message contains every needle.
template <typename F>
void expect_value_error(F&& f, std::initializer_list<std::string> needles) {
  try {
    f();
    FAIL() << "no error";
  } catch (const c10::ValueError& e) {
    const std::string m = e.what_without_backtrace();
    for (const auto& n : needles) EXPECT_NE(m.find(n), std::string::npos) << "'" << n << "' not in: " << m;
  }
}

TEST(Rules, DefaultsAreQwix) {
  QuantizationRule r;
  EXPECT_EQ(r.module_path, ".*");
  EXPECT_TRUE(r.op_names.empty());
  EXPECT_FALSE(r.weight_qtype);
  EXPECT_FALSE(r.act_qtype);
  EXPECT_FALSE(r.tile_size);
  EXPECT_FALSE(r.act_static_scale);
  EXPECT_EQ(r.weight_calibration_method, "absmax");
  EXPECT_EQ(r.act_calibration_method, "absmax");
  EXPECT_EQ(r.act_batch_axes, Axes{0});
  EXPECT_FALSE(r.clip_gradient);
  qwix::validate_rule(r);  // a rule that quantizes nothing is valid (it excludes modules)
}

TEST(Rules, ValidationErrorsNameTheValue) {
  auto r = rule();
  r.weight_qtype = "int9";
  expect_value_error([&] { qwix::validate_rule(r); }, {"weight_qtype", "int9", "int8"});
  r = rule();
  r.act_calibration_method = "absmax,x";
  expect_value_error([&] { qwix::validate_rule(r); }, {"act_calibration_method", "absmax,x"});
  r = rule();
  r.act_qtype = "float8_e4m3fn";
  r.act_calibration_method = "minmax";
  expect_value_error([&] { qwix::validate_rule(r); }, {"minmax", "float8_e4m3fn"});
  r = rule();
  r.module_path = "enc(";
  expect_value_error([&] { qwix::validate_rule(r); }, {"module_path", "enc("});
  r = rule();
  r.op_names = {"dot_general"};
  expect_value_error([&] { qwix::validate_rule(r); }, {"dot_general", "linear"});
  for (double t : {0.0, -4.0, 2.5}) {
    r = rule();
    r.tile_size = t;
    expect_value_error([&] { qwix::validate_rule(r); }, {"tile_size"});
  }
  r = rule();
  r.act_qtype.reset();
  r.act_static_scale = true;
  expect_value_error([&] { qwix::validate_rule(r); }, {"act_static_scale", "act_qtype"});
  r = rule();
  r.act_batch_axes = {0, 0};
  expect_value_error([&] { qwix::validate_rule(r); }, {"act_batch_axes", "(0, 0)"});
  expect_value_error([&] { qwix::QatProvider({rule(), r}); }, {"rule 1", "act_batch_axes"});
}

TEST(Rules, Repr) {
  auto r = rule("enc\\..*");
  r.tile_size = 32;
  r.op_names = {"linear"};
  EXPECT_EQ(qwix::rule_repr(r),
            "QuantizationRule(module_path='enc\\..*', op_names=('linear',), weight_qtype='int8', act_qtype='int8', "
            "tile_size=32)");
}

TEST(Provider, FirstMatchWinsFullMatchAndUnused) {
  auto a = rule("encoder\\..*");
  a.weight_qtype = "int4";
  auto b = rule(".*");
  auto c = rule("encoder");  // shadowed by nothing, matches only the module "encoder" itself
  auto d = rule("never");
  qwix::QatProvider p({a, b, c, d});
  EXPECT_EQ(p.match_rule("encoder.fc1", "linear"), 0);
  EXPECT_EQ(p.match_rule("decoder.encoder.fc1", "linear"), 1);  // full match, not search
  EXPECT_EQ(p.match_rule("encoder", "linear"), 1);
  EXPECT_EQ(p.unused_rule_indices(), (Axes{0, 1, 2, 3}));  // match_rule does not mark
  ASSERT_TRUE(p.find_rule("encoder.fc1", "linear"));
  ASSERT_TRUE(p.find_rule("", "matmul"));  // the root's path is ""
  EXPECT_EQ(p.unused_rule_indices(), (Axes{2, 3}));
  EXPECT_EQ(p.get_unused_rules().size(), 2u);
  EXPECT_EQ(p.get_unused_rules()[1].module_path, "never");
}

TEST(Provider, OpNamesFilter) {
  auto a = rule();
  a.op_names = {"matmul", "einsum"};
  a.act_qtype = "int4";
  auto b = rule();
  b.op_names = {"linear"};
  qwix::QatProvider p({a, b});
  EXPECT_EQ(p.match_rule("x", "matmul"), 0);
  EXPECT_EQ(p.match_rule("x", "linear"), 1);
  EXPECT_FALSE(p.match_rule("x", "conv2d"));
  auto plan = p.plan("x", "einsum", {2, false}, {2, false}, "ij,jk->ik");
  ASSERT_TRUE(plan);
  EXPECT_EQ(plan->rule_index, 0);
  EXPECT_EQ(plan->lhs.qtype, "int4");
  EXPECT_FALSE(p.plan("x", "conv2d", {4, false}, {4, true}));
  expect_value_error([&] { p.plan("x", "dot", {2, false}, {2, false}); }, {"dot"});
}

TEST(Plan, LinearWeightPerChannelActivationPerToken) {
  auto r = rule();
  r.weight_qtype = "int4";
  auto p = qwix::plan_op(r, "linear", {3, false}, {2, true});
  EXPECT_TRUE(p.lhs.quantize);
  EXPECT_FALSE(p.lhs.is_weight);
  EXPECT_EQ(p.lhs.qtype, "int8");
  EXPECT_EQ(p.lhs.channelwise_axes, (Axes{0, 1}));
  EXPECT_TRUE(p.lhs.tiled_axes.empty());
  EXPECT_FALSE(p.lhs.static_scale);
  EXPECT_FALSE(p.lhs.clip_gradient);
  EXPECT_TRUE(p.rhs.is_weight);
  EXPECT_EQ(p.rhs.qtype, "int4");
  EXPECT_EQ(p.rhs.channelwise_axes, Axes{0});
}

TEST(Plan, TileSizeTilesTheContractingAxis) {
  auto r = rule();
  r.tile_size = 32;
  auto p = qwix::plan_op(r, "linear", {2, false}, {2, true});
  ASSERT_EQ(p.lhs.tiled_axes.size(), 1u);
  EXPECT_EQ(p.lhs.tiled_axes[0], (std::pair<int64_t, double>{1, 32.0}));
  EXPECT_EQ(p.rhs.tiled_axes[0], (std::pair<int64_t, double>{1, 32.0}));
  auto m = qwix::plan_op(r, "matmul", {4, false}, {4, false});
  EXPECT_EQ(m.lhs.channelwise_axes, (Axes{0, 1, 2}));
  EXPECT_EQ(m.lhs.tiled_axes[0].first, 3);
  EXPECT_EQ(m.rhs.channelwise_axes, (Axes{0, 1, 3}));
  EXPECT_EQ(m.rhs.tiled_axes[0].first, 2);
  r.tile_size = 0.25;
  auto f = qwix::plan_op(r, "bmm", {3, false}, {3, true});
  EXPECT_EQ(f.rhs.tiled_axes[0], (std::pair<int64_t, double>{1, 0.25}));
  expect_value_error([&] { qwix::plan_op(r, "conv2d", {4, false}, {4, true}); }, {"tile_size", "conv2d"});
}

TEST(Plan, MatmulRanks) {
  auto r = rule();
  auto v = qwix::plan_op(r, "matmul", {1, false}, {2, true});
  EXPECT_TRUE(v.lhs.channelwise_axes.empty());
  EXPECT_EQ(v.rhs.channelwise_axes, Axes{1});  // x @ W: per output column
  auto b = qwix::plan_op(r, "matmul", {3, false}, {1, false});
  EXPECT_EQ(b.lhs.channelwise_axes, (Axes{0, 1}));
  EXPECT_TRUE(b.rhs.channelwise_axes.empty());
  expect_value_error([&] { qwix::plan_op(r, "bmm", {2, false}, {3, false}); }, {"bmm", "rank 3"});
}

TEST(Plan, Conv) {
  auto r = rule();
  auto p = qwix::plan_op(r, "conv2d", {4, false}, {4, true});
  EXPECT_EQ(p.lhs.channelwise_axes, Axes{0});  // per batch item
  EXPECT_EQ(p.rhs.channelwise_axes, Axes{0});  // per output channel
  auto u = qwix::plan_op(r, "conv1d", {2, false}, {3, true});  // unbatched input
  EXPECT_TRUE(u.lhs.channelwise_axes.empty());
  expect_value_error([&] { qwix::plan_op(r, "conv3d", {3, false}, {5, true}); }, {"conv3d", "rank"});
}

TEST(Plan, ConvTranspose) {
  auto r = rule();
  auto p = qwix::plan_op(r, "conv_transpose2d", {4, false}, {4, true});
  EXPECT_EQ(p.lhs.channelwise_axes, Axes{0});  // per batch item
  EXPECT_EQ(p.rhs.channelwise_axes, Axes{1});  // W [in, out/groups, k...]: per output channel
  auto u = qwix::plan_op(r, "conv_transpose1d", {2, false}, {3, true});  // unbatched input
  EXPECT_TRUE(u.lhs.channelwise_axes.empty());
  EXPECT_EQ(qwix::plan_op(r, "conv_transpose3d", {5, false}, {5, true}).rhs.channelwise_axes, Axes{1});
  EXPECT_TRUE(p.rhs.tiled_axes.empty());  // groups 1: axis 1 is the output channel
  auto g = qwix::plan_op(r, "conv_transpose2d", {4, false, 4}, {4, true, 4});  // groups 4: blocks of axis 0 too
  EXPECT_EQ(g.rhs.channelwise_axes, Axes{1});
  ASSERT_EQ(g.rhs.tiled_axes.size(), 1u);
  EXPECT_EQ(g.rhs.tiled_axes[0].first, 0);
  EXPECT_DOUBLE_EQ(g.rhs.tiled_axes[0].second, 0.25);
  EXPECT_TRUE(g.lhs.tiled_axes.empty());
  EXPECT_TRUE(qwix::plan_op(r, "conv2d", {4, false, 4}, {4, true, 4}).rhs.tiled_axes.empty());  // conv: axis 0
  expect_value_error([&] { qwix::plan_op(r, "conv_transpose2d", {4, false, 0}, {4, true, 0}); }, {"groups", "0"});
  expect_value_error([&] { qwix::plan_op(r, "conv_transpose3d", {3, false}, {5, true}); },
                     {"conv_transpose3d", "rank 5", "got 3"});
  expect_value_error([&] { qwix::plan_op(r, "conv_transpose2d", {4, false}, {3, true}); },
                     {"conv_transpose2d weight", "rank 4"});
  r.tile_size = 2;
  expect_value_error([&] { qwix::plan_op(r, "conv_transpose2d", {4, false}, {4, true}); },
                     {"tile_size", "conv_transpose2d"});
}

TEST(Plan, Einsum) {
  auto r = rule();
  r.tile_size = 16;
  auto p = qwix::plan_op(r, "einsum", {4, false}, {4, false}, "bhqd,bhkd->bhqk");
  EXPECT_EQ(p.lhs.channelwise_axes, (Axes{0, 1, 2}));
  EXPECT_EQ(p.lhs.tiled_axes[0].first, 3);
  EXPECT_EQ(p.rhs.channelwise_axes, (Axes{0, 1, 2}));
  EXPECT_EQ(p.rhs.tiled_axes[0].first, 3);
  auto w = qwix::plan_op(r, "einsum", {3, false}, {2, true}, "btd, dh -> bth");
  EXPECT_EQ(w.rhs.channelwise_axes, Axes{1});
  EXPECT_EQ(w.rhs.tiled_axes[0].first, 0);
  auto e = qwix::plan_op(r, "einsum", {4, false}, {2, true}, "...d,dh->...h");
  EXPECT_EQ(e.lhs.channelwise_axes, (Axes{0, 1, 2}));
  EXPECT_EQ(e.lhs.tiled_axes[0].first, 3);
  auto i = qwix::plan_op(r, "einsum", {2, false}, {2, false}, "ij,jk");  // implicit output "ik"
  EXPECT_EQ(i.lhs.channelwise_axes, Axes{0});
  EXPECT_EQ(i.rhs.channelwise_axes, Axes{1});
  // Two contracting labels: both operands tile the last one in the lhs' order (d).
  auto two = qwix::plan_op(r, "einsum", {3, false}, {3, true}, "bcd,dco->bo");
  EXPECT_EQ(two.lhs.tiled_axes[0].first, 2);
  EXPECT_EQ(two.rhs.tiled_axes[0].first, 0);
  auto internal = qwix::rules_internal::einsum_operand_axes("abc,cd->ad", 0, 3);
  EXPECT_EQ(internal.kept, Axes{0});
  EXPECT_EQ(internal.contracting, Axes{2});  // b is summed alone: neither kept nor contracting
  expect_value_error([&] { qwix::plan_op(r, "einsum", {2, false}, {2, false}, "ij->i"); }, {"two operands"});
  expect_value_error([&] { qwix::plan_op(r, "einsum", {3, false}, {2, false}, "ij,jk->ik"); }, {"rank 3"});
  expect_value_error([&] { qwix::plan_op(r, "einsum", {2, false}, {2, false}, "i1,jk->ik"); }, {"'1'"});
}

TEST(Plan, StaticScalesAndClipGradient) {
  auto r = rule();
  r.act_static_scale = true;
  r.act_batch_axes = {0, -2};
  auto p = qwix::plan_op(r, "linear", {3, false}, {2, true});
  EXPECT_TRUE(p.lhs.static_scale);
  EXPECT_EQ(p.lhs.batch_axes, (Axes{0, 1}));
  EXPECT_EQ(p.lhs.clip_gradient, false);  // static: identity backward unless the rule says so
  EXPECT_FALSE(p.rhs.static_scale);        // weights are always dynamic
  EXPECT_FALSE(p.rhs.clip_gradient);       // dynamic: the method decides
  r.clip_gradient = true;
  auto c = qwix::plan_op(r, "linear", {3, false}, {2, true});
  EXPECT_EQ(c.lhs.clip_gradient, true);
  EXPECT_EQ(c.rhs.clip_gradient, true);
  r.act_batch_axes = {0, 2};
  expect_value_error([&] { qwix::plan_op(r, "linear", {2, false}, {2, true}); }, {"act_batch_axes", "rank-2"});
}

TEST(Plan, NoQtypeNoQuantization) {
  QuantizationRule r;
  r.act_qtype = "int8";  // ours: activations are quantized even without weight_qtype
  auto p = qwix::plan_op(r, "linear", {2, false}, {2, true});
  EXPECT_TRUE(p.lhs.quantize);
  EXPECT_FALSE(p.rhs.quantize);
  auto aa = qwix::plan_op(r, "matmul", {3, false}, {3, false});  // activation x activation
  EXPECT_TRUE(aa.lhs.quantize && aa.rhs.quantize);
  r.act_qtype = "fp8_e4m3";
  EXPECT_EQ(qwix::plan_op(r, "linear", {2, false}, {2, true}).lhs.qtype, "float8_e4m3fn");  // canonical name
}

TEST(Apply, DynamicPlanEqualsTheOpCall) {
  torch::manual_seed(0);
  auto r = rule();
  r.weight_qtype = "int4";
  r.tile_size = 8;
  const auto x = torch::randn({2, 3, 16});
  const auto w = torch::randn({5, 16});
  const auto p = qwix::plan_op(r, "linear", {3, false}, {2, true});
  EXPECT_TRUE(torch::equal(qwix::quantize_operand(x, p.lhs),
                           qwix::fake_quant(x, "int8", {.channelwise_axes = {0, 1}, .tiled_axes = {{2, 8.0}}})));
  EXPECT_TRUE(torch::equal(qwix::quantize_operand(w, p.rhs),
                           qwix::fake_quant(w, "int4", {.channelwise_axes = {0}, .tiled_axes = {{1, 8.0}}})));
  QuantizationRule none;
  const auto n = qwix::plan_op(none, "linear", {3, false}, {2, true});
  EXPECT_TRUE(qwix::quantize_operand(x, n.lhs).is_same(x));
}

TEST(Apply, StaticPlanUpdateBeforeRead) {
  torch::manual_seed(0);
  auto r = rule();
  r.act_static_scale = true;
  const auto p = qwix::plan_op(r, "linear", {3, false}, {2, true}).lhs;
  const auto x = torch::randn({4, 3, 8});
  auto stat = qwix::make_quant_stat(x, p);
  EXPECT_EQ(stat.count.scalar_type(), torch::kInt);
  EXPECT_EQ(stat.count.dim(), 0);
  ASSERT_EQ(stat.sums.size(), 1u);
  EXPECT_EQ(stat.sums[0].sizes().vec(), (Axes{1, 3, 1}));
  // count 0: the dynamic scale
  EXPECT_TRUE(torch::equal(qwix::quantize_operand(x, p, &stat),
                           qwix::fake_quant(x, "int8", {.channelwise_axes = {0, 1}})));
  qwix::update_operand_stat(stat, qwix::calibrate_operand(x, p), p);
  EXPECT_EQ(stat.count.item<int>(), 1);
  const auto avg = x.abs().amax(-1, true).mean(0, true);
  EXPECT_TRUE(torch::allclose(stat.sums[0], avg));
  const auto scale = qwix::compute_scale({stat.sums[0] / 1.0}, "int8")[0];
  EXPECT_TRUE(torch::equal(qwix::quantize_operand(x, p, &stat), qwix::fake_quant_with_scale(x, scale, "int8")));
  expect_value_error([&] { qwix::quantize_operand(x, p); }, {"QuantStat"});
}

}  // namespace
