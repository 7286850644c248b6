"""Block formats. MX (mxfp8, mxfp4): blocks of 32 along the last axis with power-of-two scales
2^ceil(log2(absmax / B)), as Qwix computes them; elements e4m3 / e2m1. nvfp4: e2m1 elements in
blocks of 16 with e4m3 block scales times an fp32 tensor scale. Checked against the plain-PyTorch
reference, hand-computed values, the ops' contracts and the QAT paths."""
import math

import pytest
import torch

import qwix_torch as qwix
from _helpers import assert_same, make_input
from reference import get_qtype, ref_compute_scale, ref_fake_quant, ref_grad_mask, ref_nvfp4

MX = ["mxfp8", "mxfp4"]
SHAPES = [(4, 64), (2, 3, 96), (128,), (1, 32)]
METHODS = ["absmax", "absmax,0.8", "rms,2", "fixed,3"]


@pytest.mark.parametrize("qtype", MX)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mx_matches_reference(qtype, shape, method, dtype):
    x = make_input(shape, dtype=dtype)
    y = qwix.fake_quant(x, qtype, calibration_method=method)
    assert y.dtype == dtype
    if method.startswith("rms"):  # float64 sums: agree with the reference up to the last bit of the scale
        torch.testing.assert_close(y, ref_fake_quant(x, qtype, method), rtol=0, atol=float(x.abs().max()) * 0.3)
    else:
        assert_same(y, ref_fake_quant(x, qtype, method), f"{qtype} {shape} {method} {dtype}")


def test_mx_hand_computed_block():
    """One block with absmax 1: mxfp8 scale = 2^ceil(log2(1/448)) = 2^-8, so 1.0 -> 256 (exact
    in e4m3), 0.3 -> 76.8 -> 80 (e4m3 spacing 8 in [64, 128)) -> 0.3125; mxfp4 scale =
    2^ceil(log2(1/6)) = 2^-2: 0.3 -> 1.2 -> 1.0 (e2m1 grid 1, 1.5) -> 0.25, 1.0 -> 4 -> 1.0."""
    x = torch.zeros(32)
    x[0], x[1], x[2] = 1.0, 0.3, -0.7
    y8 = qwix.fake_quant(x, "mxfp8")
    assert y8[0] == 1.0 and y8[1] == 0.3125 and y8[2] == -0.6875  # -179.2 -> -176 (spacing 16) * 2^-8
    y4 = qwix.fake_quant(x, "mxfp4")
    assert y4[0] == 1.0 and y4[1] == 0.25 and y4[2] == -0.75  # -2.8 -> -3 * 2^-2
    assert torch.count_nonzero(y8[3:]) == 0 and torch.count_nonzero(y4[3:]) == 0


@pytest.mark.parametrize("qtype", MX)
def test_mx_scales_are_powers_of_two(qtype):
    absmax = torch.tensor([1e-3, 1.0, 448.0, 449.0, 6.0, 3.0e30, 0.0, float("nan")])
    s = qwix.compute_scale({"absmax": absmax}, qtype)[0]
    ref, _ = ref_compute_scale({"absmax": absmax}, qtype)
    assert_same(s, ref)
    b = get_qtype(qtype).bound
    for a, v in zip(absmax.tolist()[:6], s.tolist()[:6]):
        assert math.log2(v) == round(math.log2(v)), v  # a power of two
        assert a / b <= v < 2 * a / b, (a, v)  # the smallest one >= absmax / B: nothing clips
    assert s[6] == 1.0 and math.isnan(s[7])  # zero absmax: scale 1; NaN stays NaN


@pytest.mark.parametrize("qtype", MX)
def test_mx_fixes_its_blocks(qtype):
    """As in Qwix, an MX qtype quantizes 1x32 blocks of the last axis whatever axes are given."""
    x = make_input((6, 64))
    y = qwix.fake_quant(x, qtype)
    assert_same(qwix.fake_quant(x, qtype, channelwise_axes=(0,)), y)
    assert_same(qwix.fake_quant(x, qtype, tiled_axes={1: 16}), y)
    # Each block has its own scale: scaling one block changes no other.
    x2 = x.clone()
    x2[2, 32:] *= 100
    y2 = qwix.fake_quant(x2, qtype)
    changed = (y2 != y).any(dim=-1)
    assert changed.tolist() == [False, False, True, False, False, False]
    assert_same(y2[2, :32], y[2, :32])


@pytest.mark.parametrize("qtype", MX)
def test_mx_errors(qtype):
    with pytest.raises(ValueError, match=r"multiple of 32.*\[4, 33\]"):
        qwix.fake_quant(torch.randn(4, 33), qtype)
    with pytest.raises(ValueError, match="multiple of 32"):
        qwix.fake_quant(torch.tensor(1.0), qtype)
    with pytest.raises(ValueError, match="asymmetric"):
        qwix.fake_quant(torch.randn(4, 32), qtype, calibration_method="minmax")


@pytest.mark.parametrize("qtype", MX)
def test_mx_gradient_and_opcheck(qtype):
    x = make_input((4, 64)).requires_grad_()
    g = make_input((4, 64), seed=3)
    qwix.fake_quant(x, qtype, calibration_method="absmax,0.5").backward(g)
    mask = ref_grad_mask(x, qtype, "absmax,0.5")
    assert_same(x.grad, torch.where(mask, g, torch.zeros_like(g)))
    assert 0 < int(mask.sum()) < mask.numel()
    torch.library.opcheck(torch.ops.qwix.fake_quant, (x.detach(), qtype, "absmax", [0], [], [], None))
    xr = x.detach().clone().requires_grad_()
    torch.library.opcheck(torch.ops.qwix.fake_quant, (xr, qtype, "absmax,0.5", [], [], [], None))


def test_mx_under_compile():
    def f(t):
        return qwix.fake_quant(t, "mxfp8") * 2 + qwix.fake_quant(t, "mxfp4")

    x = make_input((8, 64))
    assert_same(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 96)
        self.fc2 = torch.nn.Linear(96, 32)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_mx_qat_rules_match_manual_fake_quant():
    """weight mxfp4 / activations mxfp8 in QAT: each linear sees exactly the MX fake-quantized
    operands (tile_size in the rule does not apply: MX fixes its blocks)."""
    torch.manual_seed(0)
    fp = _Mlp()
    rules = [qwix.QuantizationRule(weight_qtype="mxfp4", act_qtype="mxfp8", tile_size=16)]
    x = make_input((5, 64))
    qm = qwix.quantize_model(fp, qwix.QatProvider(rules), x)
    h = torch.relu(torch.nn.functional.linear(ref_fake_quant(x, "mxfp8"), ref_fake_quant(fp.fc1.weight, "mxfp4"),
                                              fp.fc1.bias))
    want = torch.nn.functional.linear(ref_fake_quant(h, "mxfp8"), ref_fake_quant(fp.fc2.weight, "mxfp4"), fp.fc2.bias)
    got = qm(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # linear's own summation order may differ
    got.sum().backward()
    assert qm.fc1.weight.grad is not None and torch.isfinite(qm.fc1.weight.grad).all()
    # The TorchScript pass makes the same decisions and gives the same forward.
    ts = qwix.quantize_model(torch.jit.script(_Mlp().eval()), qwix.QatProvider(rules), x)
    ts.load_state_dict(fp.state_dict(), strict=False)
    assert_same(ts(x), qm(x))


def test_mx_static_scales_are_powers_of_two():
    """SRQ with an MX activation qtype: statistics per block, scales from them powers of two."""
    fp = _Mlp()
    rules = [qwix.QuantizationRule(module_path="fc1", act_qtype="mxfp8", act_static_scale=True)]
    x = make_input((5, 64))
    qm = qwix.quantize_model(fp, qwix.QatProvider(rules), x)
    stat = qm.fc1.linear0_lhs
    assert list(stat.sum_of_absmax.shape) == [1, 2]  # batch axis averaged, 64 / 32 blocks
    qm(x)
    count, sums = stat.count, [stat.sum_of_absmax]
    s = qwix.srq_scale(x, count, sums, "mxfp8", channelwise_axes=(0,), tiled_axes={1: 32})[0]
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    s_other_axes = qwix.srq_scale(x, count, sums, "mxfp8")[0]
    assert_same(s_other_axes, s)  # MX ignores the given axes here too


E2M1 = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}


@pytest.mark.parametrize("shape", [(4, 64), (2, 3, 32), (16,), (1, 8192)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nvfp4_matches_reference(shape, dtype):
    x = make_input(shape, dtype=dtype)
    y = qwix.fake_quant(x, "nvfp4")
    assert y.dtype == dtype
    assert_same(y, ref_nvfp4(x), f"{shape} {dtype}")


def test_nvfp4_two_level_scales_by_hand():
    """Every output is an e2m1 value times its block's scale, and that scale is an e4m3 value times
    the tensor scale absmax / 2688."""
    x = make_input((3, 64))
    y = qwix.fake_quant(x, "nvfp4")
    ts = float(torch.tensor(float(x.abs().max())) / 2688.0)
    blocks_x, blocks_y = x.reshape(3, 4, 16), y.reshape(3, 4, 16)
    for bx, by in zip(blocks_x.reshape(-1, 16), blocks_y.reshape(-1, 16)):
        e4m3 = torch.tensor(float(bx.abs().max()) / 6.0 / ts).to(torch.float8_e4m3fn).float()
        bs = float(e4m3) * ts
        q = (by / bs).tolist()
        assert all(min(abs(abs(v) - g) for g in E2M1) < 1e-4 for v in q), q
    # The block holding the tensor's absmax gets e4m3 448 exactly: its largest value maps to +-6.
    assert torch.isclose(y.abs().max(), x.abs().max(), rtol=1e-5)


def test_nvfp4_block_whose_scale_rounds_to_zero_is_zero():
    # Block 1's e4m3 scale, absmax / 6 / (1e6 / 2688) ~ 5e-7, is under half of e4m3's smallest step (2^-9):
    # nvfp4 stores 0 and decodes zeros. The given-scale guard used to turn that 0 into 1 (steps of 0.5).
    x = torch.zeros(2, 32)
    x[0, 0] = 1e6
    x[1] = torch.linspace(-2, 2, 32)
    y = qwix.fake_quant(x, "nvfp4")
    assert_same(y, ref_nvfp4(x))
    assert not y[1].any() and torch.isclose(y[0, 0], x[0, 0])
    # A larger block in the same tensor keeps a nonzero scale: finer steps, not coarser, as it grows.
    x[1] *= 1e3
    y = qwix.fake_quant(x, "nvfp4")
    assert y[1].any() and (y[1] - x[1]).abs().max() <= x[1].abs().max() / 6
    assert_same(y, ref_nvfp4(x))


def test_nvfp4_errors_and_gradient():
    x = make_input((4, 32))
    for method in ["minmax", "absmax,0.9", "rms,2"]:
        with pytest.raises(ValueError, match="nvfp4"):
            qwix.fake_quant(x, "nvfp4", calibration_method=method)
    with pytest.raises(ValueError, match="multiple of 16"):
        qwix.fake_quant(torch.randn(4, 24), "nvfp4")
    with pytest.raises(ValueError, match="given scale"):
        qwix.fake_quant_with_scale(x, torch.tensor(0.1), "nvfp4")
    with pytest.raises(ValueError, match="compute_scale"):
        qwix.compute_scale({"absmax": torch.ones(1)}, "nvfp4")
    # refused when the rule is made, not at the first forward
    with pytest.raises(ValueError, match="act_static_scale=True is not supported with act_qtype 'nvfp4'"):
        qwix.QuantizationRule(act_qtype="nvfp4", act_static_scale=True)
    for method in ("minmax", "rms", "absmax,0.9"):
        with pytest.raises(ValueError, match=rf"'{method}' is not supported with weight_qtype 'nvfp4'.*use 'absmax'"):
            qwix.QuantizationRule(weight_qtype="nvfp4", weight_calibration_method=method)
        with pytest.raises(ValueError, match=rf"calibration method '{method}' is not supported with it \(use 'absmax'\)"):
            qwix.fake_quant(x, "nvfp4", calibration_method=method)  # (minmax: not the asymmetric-method hint)
    xg = x.clone().requires_grad_()
    g = make_input((4, 32), seed=5)
    qwix.fake_quant(xg, "nvfp4").backward(g)
    assert_same(xg.grad, g)  # absmax never clips: identity
    torch.library.opcheck(torch.ops.qwix.fake_quant, (x, "nvfp4", "absmax", [], [], [], None))
    torch.library.opcheck(torch.ops.qwix.fake_quant, (x.clone().requires_grad_(), "nvfp4", "absmax", [], [], [], True))
    f = torch.compile(lambda t: qwix.fake_quant(t, "nvfp4") + 1, fullgraph=True, backend="aot_eager")
    assert_same(f(x), ref_nvfp4(x) + 1)


def test_nvfp4_qat_weights():
    torch.manual_seed(0)
    fp = _Mlp()
    x = make_input((5, 64))
    qm = qwix.quantize_model(fp, qwix.QatProvider([qwix.QuantizationRule(weight_qtype="nvfp4")]), x)
    h = torch.relu(torch.nn.functional.linear(x, ref_nvfp4(fp.fc1.weight), fp.fc1.bias))
    want = torch.nn.functional.linear(h, ref_nvfp4(fp.fc2.weight), fp.fc2.bias)
    torch.testing.assert_close(qm(x), want, rtol=1e-5, atol=1e-6)


def test_nvfp4_clip_gradient_masks_to_each_blocks_grid():
    # docs/ops.md: the mask is 6 x the rounded e4m3 block scale, not the calibrated range.
    x = torch.zeros(1, 48)
    x[0, 0] = 1.0  # tensor absmax 1: tensor scale 1/2688
    x[0, 16] = 17.0 / 448.0  # its block's absmax * 448 = 17, an e4m3 tie: the block scale rounds down to 16
    x[0, 17] = 16.0 / 448.0  # on that block's grid edge: kept
    x[0, 32] = 1e-9  # a block whose e4m3 scale rounds to 0: decodes to zeros, passes every gradient
    x.requires_grad_()
    y = qwix.fake_quant(x, "nvfp4", clip_gradient=True)
    (g,) = torch.autograd.grad(y, x, torch.ones_like(x))
    assert float(y[0, 16]) == float(y[0, 17]) == float(torch.tensor(16.0) / 448.0)  # 17/448 saturated
    assert float(y[0, 32]) == 0.0
    expected = torch.ones_like(x)
    expected[0, 16] = 0.0
    assert torch.equal(g, expected)
    (g_plain,) = torch.autograd.grad(qwix.fake_quant(x, "nvfp4"), x, torch.ones_like(x))
    assert torch.equal(g_plain, torch.ones_like(x))  # plain absmax: the identity
