// GoogleTest: the C++ API and the registered ops, against hand-computed cases.
#include <gtest/gtest.h>
#include <qwix/qwix.h>
#include <torch/torch.h>

namespace {

TEST(FakeQuant, QwixHandCasesInt8) {
  const auto x = torch::tensor({1.2f, 3.5f, -127.5f, 129.0f, -1300.0f});
  const auto y = qwix::fake_quant_with_scale(x, torch::ones({}), "int8");
  EXPECT_TRUE(torch::equal(y, torch::tensor({1.0f, 4.0f, -128.0f, 127.0f, -128.0f})));
}

TEST(FakeQuant, QwixHandCasesInt4AndUint8) {
  EXPECT_TRUE(torch::equal(qwix::fake_quant_with_scale(torch::tensor({1.2f, 3.5f, 8.0f, -1300.0f}), torch::ones({}), "int4"),
                           torch::tensor({1.0f, 4.0f, 7.0f, -8.0f})));
  EXPECT_TRUE(torch::equal(qwix::fake_quant_with_scale(torch::tensor({-1.2f, 3.5f, 129.0f, 1300.0f}), torch::ones({}), "uint8"),
                           torch::tensor({0.0f, 4.0f, 129.0f, 255.0f})));
}

TEST(FakeQuant, PerRowDynamicMatchesFormula) {
  torch::manual_seed(0);
  const auto x = torch::randn({16, 64});
  const auto y = qwix::fake_quant(x, "int8", {.channelwise_axes = {0}});
  const auto s = x.abs().amax(-1, true) / 127.5;
  const auto ref = (x / s).round().clamp(-128, 127) * s;
  EXPECT_TRUE(torch::equal(y, ref));
}

TEST(FakeQuant, StraightThroughGradient) {
  auto x = torch::tensor({-2.0f, -1.0f, 0.0f, 1.0f, 2.0f}, torch::requires_grad());
  qwix::fake_quant(x, "int8", {.calibration_method = "absmax,0.5"}).sum().backward();
  EXPECT_TRUE(torch::equal(x.grad(), torch::tensor({0.0f, 1.0f, 1.0f, 1.0f, 0.0f})));
  auto x2 = torch::randn({4, 8}, torch::requires_grad());
  qwix::fake_quant(x2, "int4").sum().backward();
  EXPECT_TRUE(torch::equal(x2.grad(), torch::ones({4, 8})));
}

TEST(FakeQuant, TiledFractionAndErrors) {
  const auto x = torch::randn({4, 32});
  const auto a = qwix::fake_quant(x, "int8", {.tiled_axes = {{1, 0.25}}});
  const auto b = qwix::fake_quant(x, "int8", {.tiled_axes = {{1, 8.0}}});
  EXPECT_TRUE(torch::equal(a, b));
  EXPECT_THROW(qwix::fake_quant(x, "int9"), c10::ValueError);
  EXPECT_THROW(qwix::fake_quant(x, "int8", {.tiled_axes = {{1, 5.0}}}), c10::ValueError);
  EXPECT_THROW(qwix::fake_quant(x, "int8", {.channelwise_axes = {2}}), c10::IndexError);
  EXPECT_THROW(qwix::fake_quant(x, "float8_e4m3fn", {.calibration_method = "minmax"}), c10::ValueError);
}

// A message of `fn()`'s c10::ValueError (empty if it throws none).
template <typename F>
std::string value_error(F fn) {
  try {
    fn();
  } catch (const c10::ValueError& e) {
    return e.what_without_backtrace();
  }
  return "";
}

TEST(FakeQuant, HugeTilesAreAnErrorNotAnOverflow) {
  // static_cast<int64_t> of 1e30 or inf is undefined (it came out as INT64_MIN in the op's message).
  const auto x = torch::randn({4, 16});
  for (double tile : {1e30, static_cast<double>(INFINITY), 0x1p63}) {
    const std::string msg = value_error([&] { qwix::fake_quant(x, "int8", {.tiled_axes = {{1, tile}}}); });
    EXPECT_NE(msg.find("must be a positive integer (elements, at most 2^62)"), std::string::npos) << msg;
  }
  qwix::QuantizationRule r;
  r.weight_qtype = "int8";
  r.tile_size = 1e30;
  const std::string msg = value_error([&] { qwix::QatProvider({r}); });
  EXPECT_NE(msg.find("tile_size 1e+30 must be an integer number of elements (>= 1, at most 2^62)"), std::string::npos)
      << msg;
}

TEST(Api, UndefinedTensorsAreNamed) {
  const at::Tensor u, x = torch::randn({4, 8});
  EXPECT_NE(value_error([&] { qwix::fake_quant(u, "int8"); }).find("qwix::fake_quant: x is an undefined tensor"),
            std::string::npos);
  EXPECT_NE(value_error([&] { qwix::fake_quant_with_scale(x, torch::ones({}), "int8", u); })
                .find("qwix::fake_quant_with_scale: zero_point is an undefined tensor"),
            std::string::npos);
  EXPECT_NE(value_error([&] { qwix::calibrate(u); }).find("qwix::calibrate: x is an undefined tensor"),
            std::string::npos);
  EXPECT_NE(value_error([&] { qwix::compute_scale({u}, "int8"); })
                .find("qwix::compute_scale: a calibration tensor is an undefined tensor"),
            std::string::npos);
  at::Tensor count = torch::zeros({}, torch::kInt);
  std::vector<at::Tensor> sums{u};
  EXPECT_NE(value_error([&] { qwix::update_quant_stat(count, sums, {torch::ones({4, 1})}); })
                .find("qwix::update_quant_stat: a statistic is an undefined tensor"),
            std::string::npos);
}

TEST(ComputeScale, AnEmptyCalibrationIsAnError) {
  try {
    qwix::compute_scale({}, "int8");
    FAIL() << "expected c10::ValueError";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("compute_scale needs a calibration"), std::string::npos) << e.what();
  }
}

// Block formats from C++: MX = blocks of 32 with power-of-two scales; nvfp4 = e4m3 block scales
// (blocks of 16) times absmax / 2688, composed from the ops.
TEST(FakeQuant, BlockFormatsFromCpp) {
  torch::manual_seed(0);
  const auto x = torch::randn({4, 64});
  const auto blocks = x.reshape({4, 2, 32});
  const auto s = blocks.abs().amax(-1, true) / 448.0;
  const auto p2 = torch::exp2(torch::ceil(torch::log2(s.to(torch::kDouble)))).to(torch::kFloat);  // log2 in fp64: exact ceil
  const auto ref8 = ((blocks / p2).clamp(-448, 448).to(torch::kFloat8_e4m3fn).to(torch::kFloat) * p2).reshape({4, 64});
  EXPECT_TRUE(torch::equal(qwix::fake_quant(x, "mxfp8"), ref8));
  // The given axes do not matter for MX.
  EXPECT_TRUE(torch::equal(qwix::fake_quant(x, "mxfp8", {.channelwise_axes = {0}}), ref8));
  const auto ts = x.abs().max() / 2688.0;
  const auto bs = qwix::fake_quant_with_scale(x.reshape({4, 4, 16}).abs().amax(-1) / 6.0, ts.reshape({1, 1}),
                                              "float8_e4m3fn");
  EXPECT_TRUE(torch::equal(qwix::fake_quant(x, "nvfp4"), qwix::fake_quant_with_scale(x, bs, "float4_e2m1fn")));
  EXPECT_THROW(qwix::fake_quant(torch::randn({4, 24}), "nvfp4"), c10::ValueError);
  EXPECT_THROW(qwix::fake_quant(torch::randn({4, 48}), "mxfp4"), c10::ValueError);
  EXPECT_THROW(qwix::fake_quant(x, "nvfp4", {.calibration_method = "absmax,0.5"}), c10::ValueError);
}

TEST(QuantStat, UpdateThenStaticScale) {
  auto count = torch::zeros({}, torch::kInt32);
  std::vector<at::Tensor> sums = {torch::zeros({1, 1})};
  const auto x = torch::randn({8, 16});
  const auto cal = qwix::calibrate(x, "absmax", {0});
  qwix::update_quant_stat(count, sums, cal, {0}, 1);
  EXPECT_EQ(count.item<int>(), 1);
  EXPECT_TRUE(torch::allclose(sums[0], x.abs().amax(-1, true).mean(0, true)));
  const auto scale = qwix::srq_scale(x, count, sums, "int8", "absmax", {0})[0];
  EXPECT_EQ(scale.sizes(), (std::vector<int64_t>{8, 1}));
  EXPECT_TRUE(torch::equal(scale[3], sums[0][0] / 127.5f));
}

}  // namespace
