"""The TorchScript path (qwix_torch.jit_quantize_model, csrc/jit): the same forward values as the
Python nn.Module path for the same weights and rules, training, state_dict keys, torch.jit.save /
load, type sharing between module instances, get_unused_rules, and clear errors."""
import collections
import io
import warnings
from typing import List, Optional, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _helpers import assert_same
from test_qat_attention import SdpaAttention, _masks
from test_qat_models import CNN, MLP, Decoder, MmBlock, TorchAttention, TransformerBlock, _w8a8_linear

import qwix_torch as qwix
from qwix_torch import QatProvider, QuantizationRule
from qwix_torch.jit import jit_calibrate, jit_is_quantized, jit_set_quant_stats_update

# ---- models ----------------------------------------------------------------------------------------


# The nn.Module test models, so both paths quantize the very same classes.
Block = TransformerBlock


class Views(nn.Module):
    """Weights used through views (a weight is a parameter or a view of one) and one copy (not a weight)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16))
        self.v = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        h = x @ self.w.t()  # weight (a view)
        h = torch.einsum("bi,oi->bo", h, self.v)  # weight
        return torch.matmul(h, self.v.t().contiguous())  # a copy: an activation, as in the Python path


class Twin(nn.Module):
    """Two instances of one TorchScript type (same class, same constants)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Loop(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16) * 0.1)

    def forward(self, x):
        for _ in range(2):
            x = F.linear(x, self.w)
        return x


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.w = nn.Parameter(torch.randn(16, 16))

    def forward(self, x, use_aux: bool = False):
        x = self.fc(x)
        if use_aux:
            x = F.linear(x, self.w)
        return x


class Spare(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = MLP()
        self.spare = nn.Linear(4, 4)  # scripted (with its forward) but never called

    def forward(self, x):
        return self.body(x)


W8A8 = [QuantizationRule(weight_qtype="int8", act_qtype="int8")]
BLOCK_RULES = [
    QuantizationRule(module_path="attn", act_qtype="int8", act_static_scale=True),
    QuantizationRule(module_path=r".*(qkv|proj|fc1|fc2)", weight_qtype="int4", act_qtype="int8", tile_size=8),
]


def both(model, rules, *example, **kw):
    """The Python path and the TorchScript path on the same weights, each with its own provider."""
    pe, pj = QatProvider(rules), QatProvider(rules)
    eager = qwix.quantize_model(model, pe, *example)
    ts = qwix.jit_quantize_model(torch.jit.script(model), pj, *example, **kw)
    return eager, ts, pe, pj


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert_same(sb[k], sa[k], k)


# ---- forward equals the Python path --------------------------------------------------------------------


def test_mlp_matches_python_path():
    m = MLP()
    eager, ts, pe, pj = both(m, W8A8, torch.randn(8, 16))
    assert jit_is_quantized(ts) and not jit_is_quantized(torch.jit.script(m))
    for _ in range(3):
        x = torch.randn(8, 16)
        assert_same(ts(x), eager(x), "mlp")
    assert pj.get_unused_rules() == [] == pe.get_unused_rules()
    assert "qwix::fake_quant" in str(ts.fc1.graph)


def test_cnn_dynamic_and_srq_minmax_match_python_path():
    rules = [QuantizationRule(weight_qtype="int8", act_qtype="int4", act_static_scale=True,
                              act_calibration_method="minmax")]
    for r in (W8A8, rules):
        eager, ts, _, _ = both(CNN(), r, torch.randn(2, 1, 8, 8))
        for _ in range(3):  # training mode: SRQ statistics update before each read
            x = torch.randn(3, 1, 8, 8)
            assert_same(ts(x), eager(x), "cnn")
        assert_same_state(eager, ts)
    assert list(ts.conv1.conv2d0_lhs.state_dict()) == ["count", "sum_of_min", "sum_of_max"]
    assert int(ts.conv1.conv2d0_lhs.count) == 3


def test_transformer_block_matches_python_path():
    # attn: SRQ on the einsum and the matmul (activation x activation); the linears: int4 weights, tiles of 8.
    eager, ts, pe, pj = both(Block(), BLOCK_RULES, torch.randn(2, 5, 16))
    for _ in range(2):
        x = torch.randn(2, 5, 16)
        assert_same(ts(x), eager(x), "block")
    assert_same_state(eager, ts)
    assert {n for n, _ in ts.attn.named_children()} == {"qkv", "proj", "einsum0_lhs", "einsum0_rhs", "matmul0_lhs",
                                                         "matmul0_rhs"}
    assert list(ts.attn.matmul0_rhs.sum_of_absmax.shape) == [1, 2, 1, 8]


def test_torch_multihead_attention_matches_python_path():
    # F.multi_head_attention_forward is inlined by the pass and run op by op by the Python path: the same ops
    # (in-projection, the two products of need_weights=True, out-projection), the same names, the same values.
    # With a mask, q·k is torch.baddbmm (its product quantized as bmm0). TorchScript quantizes the branch its
    # example ran (the other one raises), so each branch gets its own example.
    rules = [QuantizationRule(module_path="attn", weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
    causal = torch.triu(torch.full((5, 5), float("-inf")), 1)
    for mask in (None, causal):
        torch.manual_seed(0)
        eager, ts, pe, pj = both(TorchAttention(), rules, torch.randn(2, 5, 16), True, mask)
        for _ in range(2):
            x = torch.randn(2, 5, 16)
            assert_same(ts(x, True, mask), eager(x, True, mask), f"need_weights, mask {mask is not None}")
        assert_same_state(eager, ts)
        assert pe.get_unused_rules() == [] and pj.get_unused_rules() == []
        assert {n for n, _ in ts.attn.named_children()} == {"out_proj", "linear0_lhs", "bmm0_lhs", "bmm0_rhs",
                                                            "bmm1_lhs", "bmm1_rhs", "linear1_lhs"}


def test_scaled_dot_product_attention_matches_python_path():
    # aten::scaled_dot_product_attention is replaced by the engine's decomposition where the Python path runs
    # it decomposed: its products are matmul0 (q·kᵀ) and matmul1 (weights·v) in both, with the same values.
    rules = [QuantizationRule(weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
    for variant in ("none", "causal", "bool", "float", "gqa"):
        torch.manual_seed(0)
        mask, causal = _masks(5).get(variant), variant == "causal"
        model = SdpaAttention(kv_heads=1 if variant == "gqa" else 2)
        eager, ts, pe, pj = both(model, rules, torch.randn(2, 5, 16), mask, causal)
        for _ in range(2):
            x = torch.randn(2, 5, 16)
            assert_same(ts(x, mask, causal), eager(x, mask, causal), variant)
        assert_same_state(eager, ts)
        assert {n for n, _ in ts.named_children()} == {"q", "kv", "o", "matmul0_lhs", "matmul0_rhs", "matmul1_lhs",
                                                       "matmul1_rhs"}
        assert "aten::scaled_dot_product_attention" not in str(ts.graph)
    buf = io.BytesIO()  # the inlined decomposition saves and loads like any TorchScript code
    torch.jit.save(ts, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x = torch.randn(2, 5, 16)
    assert_same(loaded(x, mask, causal), ts(x, mask, causal), "saved and loaded")


def _attend(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class HelperAttention(nn.Module):
    def forward(self, q, k, v):
        return _attend(q, k, v) * 2.0


def test_scaled_dot_product_attention_in_a_helper_function_and_when_not_decomposed():
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    # A free function holding only the attention is inlined too (it holds two matmuls once decomposed).
    eager, ts, _, _ = both(HelperAttention(), [QuantizationRule(act_qtype="int8")], q, k, v)
    assert_same(ts(q, k, v), eager(q, k, v), "helper")
    assert (ts(q, k, v) - HelperAttention()(q, k, v)).abs().max() > 1e-3
    # No rule quantizes the products: the fused op stays, as on the Python path.
    for rules in ([QuantizationRule(weight_qtype="int8")], [QuantizationRule(act_qtype="int8", op_names=("einsum",))]):
        eager, ts, _, _ = both(HelperAttention(), rules, q, k, v)
        assert_same(ts(q, k, v), eager(q, k, v), "fused")
        assert_same(ts(q, k, v), HelperAttention()(q, k, v), "fused, unquantized")


def test_torch_multihead_attention_without_weights_matches_python_path():
    # need_weights=False: F.multi_head_attention_forward calls scaled_dot_product_attention (4-D q, k, v).
    rules = [QuantizationRule(module_path="attn", weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
    torch.manual_seed(0)
    eager, ts, pe, pj = both(TorchAttention(), rules, torch.randn(2, 5, 16), False)
    for _ in range(2):
        x = torch.randn(2, 5, 16)
        assert_same(ts(x, False), eager(x, False), "need_weights=False")
    assert_same_state(eager, ts)
    assert {n for n, _ in ts.attn.named_children()} == {"out_proj", "linear0_lhs", "matmul0_lhs", "matmul0_rhs",
                                                        "matmul1_lhs", "matmul1_rhs", "linear1_lhs"}


def test_mm_and_addmm_match_python_path():
    # aten::mm and aten::addmm (GPT-2's Conv1D) are matmul ops, as on the Python path.
    rules = [QuantizationRule(weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
    torch.manual_seed(0)
    eager, ts, pe, pj = both(MmBlock(), rules, torch.randn(2, 3, 16))
    for _ in range(2):
        x = torch.randn(2, 3, 16)
        assert_same(ts(x), eager(x), "mm block")
    assert_same_state(eager, ts)
    assert pe.get_unused_rules() == [] == pj.get_unused_rules()
    assert {n for n, _ in ts.c_fc.named_children()} == {"matmul0_lhs"}


def test_transposed_convolutions_match_python_path():
    rules = [QuantizationRule(weight_qtype="int4", act_qtype="int8", act_static_scale=True,
                              act_calibration_method="minmax")]
    torch.manual_seed(0)
    xs = (torch.randn(2, 2, 5), torch.randn(2, 4, 5, 5), torch.randn(2, 1, 3, 3, 3))
    eager, ts, pe, pj = both(Decoder(), rules, *xs)
    for _ in range(2):
        xs = (torch.randn(2, 2, 5), torch.randn(2, 4, 5, 5), torch.randn(2, 1, 3, 3, 3))
        for got, want in zip(ts(*xs), eager(*xs)):
            assert_same(got, want, "decoder")
    assert_same_state(eager, ts)
    assert pe.get_unused_rules() == [] == pj.get_unused_rules()


def test_fractional_tile_is_resolved_at_run_time():
    # tile_size=0.5: the linear's `in` axis and the attention's T axis (the matmul contracts over keys).
    rules = [QuantizationRule(weight_qtype="int8", act_qtype="int8", tile_size=0.5)]
    eager, ts, _, _ = both(Block(), rules, torch.randn(2, 6, 16))
    for t in (6, 10, 4):
        x = torch.randn(2, t, 16)
        assert_same(ts(x), eager(x), f"T={t}")


def test_weights_are_parameters_or_views_of_them():
    rules = [QuantizationRule(weight_qtype="int4", act_qtype="int8")]
    m = Views()
    eager, ts, _, _ = both(m, rules, torch.randn(4, 16))
    x = torch.randn(4, 16)
    assert_same(ts(x), eager(x), "views")
    # Weight-only rule: the copy self.v.t().contiguous() is an activation, so the last matmul stays as is.
    eager, ts, _, _ = both(m, [QuantizationRule(weight_qtype="int4")], torch.randn(4, 16))
    assert_same(ts(x), eager(x), "weight only")
    assert str(ts.graph).count("qwix::fake_quant(") == 2


def test_conv_helper_method_and_functions_are_inlined():
    eager, ts, _, _ = both(CNN(), W8A8, torch.randn(2, 1, 8, 8))
    g = str(ts.conv1.forward.graph)
    assert "_conv_forward" not in g and "aten::conv2d" in g and "qwix::fake_quant" in g
    x = torch.randn(2, 1, 8, 8)
    assert_same(ts.conv1(x), eager.conv1(x), "conv1")


def test_traced_module():
    m = MLP()
    x = torch.randn(8, 16)
    pe, pj = QatProvider(W8A8), QatProvider(W8A8)
    eager = qwix.quantize_model(m, pe, x)
    ts = qwix.jit_quantize_model(torch.jit.trace(m, x), pj, x)
    assert_same(ts(x), eager(x), "traced")


def test_traced_convolutions_match_python_path():
    # torch.jit.trace records every convolution as aten::_convolution: conv or conv_transpose 1d-3d by its
    # `transposed` flag and stride length, groups included (they were silently left in floating point).
    torch.manual_seed(0)
    srq = [QuantizationRule(weight_qtype="int8", act_qtype="int4", act_static_scale=True,
                            act_calibration_method="minmax")]
    same = nn.Sequential(nn.Conv2d(1, 4, 3, padding="same"), nn.ReLU(), nn.Conv2d(4, 4, 3, padding="valid"),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 3))  # string padding: aten::_convolution_mode
    for model, args in [(CNN(), (torch.randn(2, 1, 8, 8),)), (same, (torch.randn(2, 1, 8, 8),)),
                        (Decoder(), (torch.randn(2, 2, 5), torch.randn(2, 4, 5, 5), torch.randn(2, 1, 2, 3, 3)))]:
        for rules in (W8A8, srq):
            pe, pj = QatProvider(rules), QatProvider(rules)
            eager = qwix.quantize_model(model, pe, *args)
            ts = qwix.jit_quantize_model(torch.jit.trace(model, args), pj, *args)
            for step in range(2):
                got, want = ts(*args), eager(*args)
                for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                    assert_same(a, b, f"traced {type(model).__name__} step {step}")
            assert_same_state(eager, ts)
            assert pj.get_unused_rules() == []
    with torch.no_grad():
        ts.eval()
        fp = model(*args)
        assert all(not torch.equal(a, b) for a, b in zip(ts(*args), fp))
    assert [n for n, _ in ts.up2.named_children()] == ["conv_transpose2d0_lhs"]


class CalledThrice(nn.Module):
    """A layer called three times and a block (with a child of its own) called twice: a trace records the
    repeat calls as the submodule's methods forward1, forward2, ..."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.blk = nn.Sequential(nn.Linear(16, 16), nn.ReLU())

    def forward(self, x):
        h = self.fc(torch.relu(self.fc(torch.relu(self.fc(x)))))
        return self.blk(self.blk(h))


class SelfHelper(nn.Module):
    """A method named like a traced one, called on self: its ops are this module's, as in Python."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        return self.forward1(x)

    def forward1(self, x):
        return F.linear(x, self.w)


@pytest.mark.parametrize("rules", [
    [QuantizationRule(module_path="fc", weight_qtype="int4", act_qtype="int8")],
    [QuantizationRule(weight_qtype="int4", act_qtype="int8", act_static_scale=True)],
], ids=["fc only, dynamic", "srq"])
def test_traced_submodule_called_several_times_is_that_module_on_every_call(rules):
    # Each traced call of fc (forward, forward1, forward2) is fc's linear0, as in Python: the repeat calls were
    # inlined into the root (quantized with the root's rule and a root QuantStat) or, where only fc matched, left
    # in floating point.
    torch.manual_seed(0)
    m, x = CalledThrice(), torch.randn(4, 16)
    traced = torch.jit.trace(m, x)
    assert "forward2" in traced.code
    pe, pj = QatProvider(rules), QatProvider(rules)
    eager = qwix.quantize_model(m, pe, x)
    ts = qwix.jit_quantize_model(traced, pj, x)
    for step in range(2):
        x = torch.randn(4, 16)
        assert_same(ts(x), eager(x), f"step {step}")
    assert_same_state(eager, ts)
    if rules[0].act_static_scale:
        assert int(ts.fc.linear0_lhs.count) == 6 and int(getattr(ts.blk, "0").linear0_lhs.count) == 4
        assert not hasattr(ts, "linear0_lhs")
    x.requires_grad_(True)
    (ge,), (gt,) = torch.autograd.grad(eager(x).sum(), [x]), torch.autograd.grad(ts(x).sum(), [x])
    assert_same(gt, ge, "input gradient")
    for step in range(2):  # (saved and loaded: the forwardN methods keep their quantization)
        buf = io.BytesIO()
        torch.jit.save(ts, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
        x = torch.randn(4, 16)
        assert_same(loaded(x), eager(x), f"loaded, step {step}")
        ts = loaded


class TwoLengths(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(x), self.fc(x[:, :3])


def test_traced_calls_needing_quantstats_of_two_shapes_are_an_error():
    # Per-token statistics of [2, 5, 16] and [2, 3, 16] inputs ([1, 5, 1], [1, 3, 1]) cannot share fc's
    # linear0_lhs; the Python path fails too, at the example forward's second update.
    m, x = TwoLengths(), torch.randn(2, 5, 16)
    rules = [QuantizationRule(weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
    with pytest.raises(ValueError, match=r"module 'fc', op linear0 .*QuantStats of different shapes for linear0_lhs "
                                         r"\(\[1, 5, 1\], \[1, 3, 1\]\)"):
        qwix.jit_quantize_model(torch.jit.trace(m, x), QatProvider(rules), x)
    with pytest.raises(ValueError, match=r"module 'fc', op linear0 .*statistic of shape \[1, 5, 1\] does not broadcast"):
        qwix.quantize_model(m, QatProvider(rules), x)
    eager, ts = (qwix.quantize_model(m, QatProvider(W8A8), x),
                 qwix.jit_quantize_model(torch.jit.trace(m, x), QatProvider(W8A8), x))
    for a, b in zip(ts(x), eager(x)):
        assert_same(a, b, "dynamic scales")


def test_a_forward1_method_called_on_self_belongs_to_the_module():
    torch.manual_seed(0)
    m, x = SelfHelper(), torch.randn(4, 16)
    eager, ts, _, pj = both(m, W8A8, x)
    assert_same(ts(x), eager(x), "self.forward1")
    assert "qwix::fake_quant" in str(ts.forward.graph)


class ChildWithForward1(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16) * 0.2)

    def forward(self, x):
        return x

    @torch.jit.export
    def forward1(self, x):
        return F.linear(x, self.w)


class ChildWithTheSameOps(ChildWithForward1):
    def forward(self, x):
        return F.linear(x, self.w)

    @torch.jit.export
    def forward1(self, x):
        return F.linear(x, self.w) * 2


class ChildWithAHelper(ChildWithForward1):
    def __init__(self):
        super().__init__()
        self.sub = nn.Linear(16, 16)

    def forward(self, x):
        return self.sub(x)

    def helper(self, x):
        return F.linear(x, self.w)

    @torch.jit.export
    def forward1(self, x):
        return self.helper(x)


class CallsChildForward1(nn.Module):
    def __init__(self, child):
        super().__init__()
        self.child = child

    def forward(self, x):
        return self.child.forward1(x)


@pytest.mark.parametrize("path", ["", "child"])
@pytest.mark.parametrize("child", [ChildWithForward1, ChildWithTheSameOps, ChildWithAHelper])
def test_a_scripted_childs_forward1_is_a_helper_of_the_caller(path, child):
    # Not a traced call of the child (its code differs from the child's forward, whatever ops each runs): its
    # linear is the root's, as in Python (it was taken for a call of the child: left in floating point under a
    # root rule, quantized under a rule for the child). A warning lists such methods.
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    rules = [QuantizationRule(module_path=path, weight_qtype="int8", act_qtype="int8")]
    with pytest.warns(UserWarning, match=r"named like a traced repeat call.*'child'.forward1"):
        eager, ts, pe, pj = both(CallsChildForward1(child()), rules, x)
    assert_same(ts(x), eager(x), "child.forward1")
    assert pj.get_unused_rules() == pe.get_unused_rules()


class TwoPaths(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16) * 0.2)

    def forward(self, x):
        if x.shape[0] == 4:
            return F.linear(x, self.w)
        return x @ self.w.t()


class CallsTwoPaths(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = TwoPaths()

    def forward(self, x):
        return self.c(x), self.c(x[:2])


def test_a_traced_repeat_call_that_took_another_branch_is_warned_about():
    # Its code differs from the module's forward, so it cannot be told from a helper method: a warning says so.
    x = torch.randn(4, 16)
    with pytest.warns(UserWarning, match=r"named like a traced repeat call.*took another branch.*'c'.forward1"):
        qwix.jit_quantize_model(torch.jit.trace(CallsTwoPaths(), x, check_trace=False),
                                QatProvider([QuantizationRule(module_path="c", weight_qtype="int8")]), x)


class Shares(nn.Module):
    """One Linear shared by two parents: a trace passes it to the first parent as an argument."""

    class Parent(nn.Module):
        def __init__(self, fc):
            super().__init__()
            self.fc = fc

        def forward(self, x):
            return self.fc(x)

    def __init__(self):
        super().__init__()
        fc = nn.Linear(16, 16)
        self.a, self.b = Shares.Parent(fc), Shares.Parent(fc)

    def forward(self, x):
        return self.b(self.a(x))


def test_a_traced_module_passed_as_an_argument_is_an_error():
    # Its argument kept the old type: the call ran the old, floating-point forward, silently.
    m, x = Shares(), torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"uses a module of type .*Linear.* as a value other than through an attribute "
                                         r"of self \(an argument of the method\).*quantize the nn.Module"):
        qwix.jit_quantize_model(torch.jit.trace(m, x), QatProvider(W8A8), x)
    eager, ts, _, _ = both(m, W8A8, x)  # scripted, the shared module is two attributes (docs: Shared submodules)
    assert_same(ts(x), eager(x), "scripted")


class Mix(nn.Module):
    """A parametrization whose forward runs a matmul (W -> W @ M)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("m", torch.randn(16, 16) * 0.3)

    def forward(self, w):
        return w @ self.m


def test_a_traced_parametrization_is_not_quantized():
    # A trace records the parametrization as a submodule; its matmul computes the weight and is never quantized
    # (qat.md), as on the Python path (it was quantized as module '0.parametrizations.weight.0').
    torch.manual_seed(0)
    m, x = nn.Sequential(nn.Linear(16, 16)), torch.randn(4, 16)
    torch.nn.utils.parametrize.register_parametrization(m[0], "weight", Mix())
    pe, pj = QatProvider(W8A8), QatProvider(W8A8)
    eager = qwix.quantize_model(m, pe, x)
    ts = qwix.jit_quantize_model(torch.jit.trace(m, x), pj, x)
    mix = getattr(getattr(ts, "0").parametrizations.weight, "0")
    assert "qwix" not in str(mix.graph) and "qwix::fake_quant" in str(getattr(ts, "0").graph)
    assert_same(ts(x), eager(x), "parametrized")


class OptionalWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16))

    def forward(self, x, w: Optional[torch.Tensor] = None):
        if w is None:
            w = self.w
        return F.linear(x, w)


class TrainOnlyCopy(OptionalWeight):
    def forward(self, x):
        w = self.w
        if self.training:
            w = w * 1.0
        return F.linear(x, w)


class TupleHelper(OptionalWeight):
    def params(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.w, self.w[:, 0]

    def forward(self, x):
        w, b = self.params()
        return F.linear(x, w, b)


class Detached(OptionalWeight):
    def forward(self, x):
        return F.linear(x, self.w.detach())


def test_an_operand_whose_kind_may_change_between_runs_is_warned_about():
    # TorchScript plans each op once, from the example: a weight argument that is the parameter in the example
    # and an activation later (or the reverse) keeps the example's plan, where the Python path plans per call.
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    rules = [QuantizationRule(weight_qtype="int4", act_qtype="int8")]
    for example in ((x,), (x, w)):
        with pytest.warns(UserWarning, match=r"may be a parameter on some runs and an activation on others.*\n  "
                                             r"module '', op linear0 .*its rhs was (a parameter|an activation)"):
            qwix.jit_quantize_model(torch.jit.script(OptionalWeight()), QatProvider(rules), *example)
    with pytest.warns(UserWarning, match=r"its rhs was an activation"):  # train/eval changes the kind: warned
        qwix.jit_quantize_model(torch.jit.script(TrainOnlyCopy()), QatProvider(rules), x)
    # Weights read from attributes (through views, branches that raise, helpers returning tuples) and detached
    # copies (activations, as in Python) are not warned about.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="qwix: these operands")
        both(Views(), W8A8, torch.randn(4, 16))
        both(nn.MultiheadAttention(16, 2, batch_first=True), W8A8, *[torch.randn(2, 5, 16)] * 3)
        for model in (TupleHelper(), Detached()):
            eager, ts, _, _ = both(model, W8A8, x)
            assert_same(ts(x), eager(x), type(model).__name__)


def test_a_trace_of_a_fused_fast_path_says_how_to_trace_instead():
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
    with pytest.raises(ValueError, match=r"outside a branch.*trace in training mode or with gradients enabled"):
        qwix.jit_quantize_model(traced, QatProvider(W8A8), x)


@pytest.mark.parametrize("quantize_in", ["train", "eval"])
def test_fused_transformer_fast_paths_are_not_taken(quantize_in):
    # In eval mode without gradients nn.MultiheadAttention / TransformerEncoderLayer / TransformerEncoder take
    # fused kernels that read the weights directly. The Python path never does under its mode; the pass removes
    # the branch, so TorchScript inference is quantized (it was bit-identical to the float model).
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).train(quantize_in == "train")
    x, pad = torch.randn(2, 5, 16), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    rules = [QuantizationRule(weight_qtype="int8", act_qtype="int8")]
    script = torch.jit.script(model)
    pe, pj = QatProvider(rules), QatProvider(rules)
    eager = qwix.quantize_model(model, pe, x)
    ts = qwix.jit_quantize_model(script, pj, x)
    assert "_transformer_encoder_layer_fwd" in str(dict(script.named_modules())["layers.0"].graph)
    eager.eval(), ts.eval(), script.eval()
    with torch.no_grad():
        for mask in (None, pad):
            y = ts(x, src_key_padding_mask=mask)
            assert_same(y, eager(x, src_key_padding_mask=mask), f"mask {mask is not None}")
            assert not torch.equal(y, script(x, src_key_padding_mask=mask))
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    eager_mha, ts_mha, _, _ = both(mha, rules, x, x, x)
    eager_mha.eval(), ts_mha.eval()
    with torch.no_grad():
        for a, b in zip(ts_mha(x, x, x), eager_mha(x, x, x)):
            assert_same(a, b, "nn.MultiheadAttention")


# ---- types shared by instances -----------------------------------------------------------------------


def test_instances_of_one_type_with_different_rules():
    m = Twin()
    script = torch.jit.script(m)
    assert script.a._c._type() == script.b._c._type()
    rules = [QuantizationRule(module_path="a", weight_qtype="int4", act_qtype="int8")]
    eager, ts, _, _ = both(m, rules, torch.randn(4, 16))
    x = torch.randn(4, 16)
    assert_same(ts(x), eager(x), "twin")
    assert ts.a._c._type() != ts.b._c._type()
    assert ts.b._c._type() == script.b._c._type()  # untouched: keeps its type
    assert "qwix" not in str(ts.b.graph) and "qwix" in str(ts.a.graph)
    assert "qwix" not in str(script.a.graph)  # the input module is unchanged

    rules = [QuantizationRule(module_path="a", weight_qtype="int4", act_qtype="int8"),
             QuantizationRule(module_path="b", weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
    eager, ts, _, _ = both(m, rules, torch.randn(4, 16))
    for _ in range(2):
        x = torch.randn(4, 16)
        assert_same(ts(x), eager(x), "twin 2")
    assert hasattr(ts.b, "linear0_lhs") and not hasattr(ts.a, "linear0_lhs")


class MatMul(nn.Module):
    def forward(self, a, b):
        return torch.matmul(a, b)


class WeightAndActivationMatMuls(nn.Module):
    """Two instances of one class, one multiplying by a weight, one by an activation."""

    def __init__(self):
        super().__init__()
        self.m1, self.m2 = MatMul(), MatMul()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x, y):
        return self.m1(x, self.w), self.m2(x, y)


def test_instances_share_a_type_only_with_the_same_weight_and_activation_operands():
    # With weight_qtype == act_qtype the plans of m1 (b: a weight) and m2 (b: an activation) were equal, so both
    # got m1's code, where b has no rank check: m2 quantized a rank-3 b with its rank-2 plan, silently.
    torch.manual_seed(0)
    x, y = torch.randn(4, 8), torch.randn(8, 8)
    eager, ts, _, _ = both(WeightAndActivationMatMuls(), W8A8, x, y)
    assert ts.m1._c._type().qualified_name() != ts.m2._c._type().qualified_name()
    for a, b in zip(ts(x, y), eager(x, y)):
        assert_same(a, b, "matmuls")
    with pytest.raises(torch.jit.Error, match=r"module 'm2', op matmul0 .*its rhs has a rank other than 2"):
        ts(x, torch.randn(2, 8, 8))


def test_a_call_of_another_rank_with_a_fractional_tile_raises_the_rank_error():
    # The tile (a fraction of the axis) read the axis's size before the rank check: ATen's "Dimension out of range".
    ts = qwix.jit_quantize_model(torch.jit.script(MatMul()), QatProvider([QuantizationRule(act_qtype="int8",
                                                                                           tile_size=0.5)]),
                                 torch.randn(2, 8, 8), torch.randn(2, 8, 4))
    with pytest.raises(torch.jit.Error, match=r"module '', op matmul0 .*its lhs has a rank other than 3"):
        ts(torch.randn(8, 8), torch.randn(8, 4))


def test_instances_with_the_same_plan_share_one_type():
    m = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
    eager, ts, _, _ = both(m, W8A8, torch.randn(4, 16))
    types = {ts._c.getattr(str(i))._type().qualified_name() for i in range(4)}
    assert len(types) == 1
    x = torch.randn(4, 16)
    assert_same(ts(x), eager(x), "sequential")
    # Their shared code names each instance in its errors (the path is read from the module at run time).
    for i in (0, 2):
        with pytest.raises(torch.jit.Error, match=rf"qwix: module '{i}', op linear0 .*lhs has a rank other than 2"):
            getattr(ts, str(i))(torch.randn(2, 4, 16))


# ---- training, state_dict, save / load -------------------------------------------------------------


def test_training_lowers_the_loss_and_matches_python_path():
    torch.manual_seed(0)
    m = Block()
    eager, ts, _, _ = both(m, BLOCK_RULES, torch.randn(8, 5, 16))
    assert [n for n, _ in ts.named_parameters()] == [n for n, _ in m.named_parameters()]
    data = [(torch.randn(8, 5, 16), torch.randn(8, 5, 16)) for _ in range(4)]
    losses = {}
    for name, model in (("eager", eager), ("ts", ts)):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses[name] = []
        for step in range(12):
            x, y = data[step % len(data)]
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["ts"][-1] < 0.8 * losses["ts"][0]
    # The first step's forward is bit-exact; afterwards the autograd of the two paths may round differently.
    assert losses["ts"][0] == losses["eager"][0]
    assert losses["ts"] == pytest.approx(losses["eager"], rel=1e-3)
    assert int(ts.attn.einsum0_lhs.count) == 12 == int(eager.attn.einsum0_lhs.count)


def test_optimized_graphs_keep_update_before_read():
    # The executor optimizes a graph after its first runs (profiling); the SRQ nodes (update, then
    # read) must keep their order and the forward its values, with and without gradients.
    eager, ts, _, _ = both(Block(), BLOCK_RULES, torch.randn(2, 5, 16))
    for step in range(6):
        x = torch.randn(2, 5, 16, requires_grad=step % 2 == 0)
        a, b = eager(x), ts(x)
        assert_same(b, a, f"step {step}")
        if x.requires_grad:
            ga, = torch.autograd.grad(a.sum(), x)
            gb, = torch.autograd.grad(b.sum(), x)
            torch.testing.assert_close(gb, ga)
    assert_same_state(eager, ts)


def test_state_dict_keys_and_loading():
    m = Block()
    eager, ts, _, _ = both(m, BLOCK_RULES, torch.randn(2, 5, 16))
    assert set(m.state_dict()) <= set(ts.state_dict())
    assert list(ts.state_dict()) == list(eager.state_dict())
    eager(torch.randn(2, 5, 16))  # statistics differ now: loading copies them
    ts.load_state_dict(eager.state_dict())
    eager.eval(), ts.eval()
    x = torch.randn(2, 5, 16)
    assert_same(ts(x), eager(x), "after load_state_dict")


def test_save_and_load_round_trip():
    eager, ts, _, _ = both(Block(), BLOCK_RULES, torch.randn(2, 5, 16))
    ts(torch.randn(2, 5, 16)), eager(torch.randn(2, 5, 16))
    buf = io.BytesIO()
    torch.jit.save(ts, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    assert jit_is_quantized(loaded)
    assert_same_state(ts, loaded)
    ts.eval(), loaded.eval()
    x = torch.randn(2, 5, 16)
    assert_same(loaded(x), ts(x), "loaded")
    loaded.train()  # still trains and updates its statistics
    loaded(x).sum().backward()
    assert int(loaded.attn.einsum0_lhs.count) == int(ts.attn.einsum0_lhs.count) + 1
    assert loaded.fc1.weight.grad is not None


def test_example_forward_leaves_buffers_and_rng_as_they_were():
    m = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 4))
    script = torch.jit.script(m)
    before = {k: v.clone() for k, v in script.state_dict().items()}
    x = torch.randn(8, 16)
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    ts = qwix.jit_quantize_model(script, QatProvider(W8A8), x, inplace=True)  # dropout draws, BN updates
    assert torch.equal(torch.rand(3), expected)
    for k, v in before.items():
        assert_same(ts.state_dict()[k], v, k)


def test_inplace_shares_tensors_and_default_copies():
    m = torch.jit.script(MLP())
    q = qwix.jit_quantize_model(m, QatProvider(W8A8), torch.randn(2, 16))
    assert q.fc1.weight.data_ptr() != m.fc1.weight.data_ptr()
    assert q.fc1.weight.requires_grad
    q2 = qwix.jit_quantize_model(m, QatProvider(W8A8), torch.randn(2, 16), inplace=True)
    assert q2.fc1.weight.data_ptr() == m.fc1.weight.data_ptr()
    assert "qwix" not in str(m.fc1.graph)


# ---- SRQ controls ------------------------------------------------------------------------------------


def test_statistics_update_only_in_training_mode_and_when_enabled():
    rules = [QuantizationRule(weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
    _, ts, _, _ = both(MLP(), rules, torch.randn(4, 16))
    stat = ts.fc1.linear0_lhs
    assert int(stat.count) == 0  # the example forward updates nothing
    ts(torch.randn(4, 16))
    assert int(stat.count) == 1
    ts.eval()
    ts(torch.randn(4, 16))
    assert int(stat.count) == 1
    ts.train()
    jit_set_quant_stats_update(ts, False)
    ts(torch.randn(4, 16))
    assert int(stat.count) == 1
    jit_set_quant_stats_update(ts, True)
    ts(torch.randn(4, 16))
    assert int(stat.count) == 2


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(MLP(d_out=16), MLP(d_out=16))
        self.head = nn.Linear(16, 16)

    def forward(self, x):
        return self.head(self.blocks(x))


def test_set_quant_stats_update_and_calibrate_take_a_container_submodule():
    # As on the Python path: a submodule whose subtree was quantized, not only one whose own code was
    # (`blocks` runs no op of its own; it was refused as "not returned by quantize_model").
    torch.manual_seed(0)
    rules = [QuantizationRule(weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
    x = torch.randn(4, 16)
    eager, ts, _, _ = both(Blocks(), rules, x)
    def counts(m):
        first, second = getattr(m.blocks, "0"), getattr(m.blocks, "1")  # (a ScriptModule has no [i])
        return [int(first.fc1.linear0_lhs.count), int(second.fc2.linear0_lhs.count), int(m.head.linear0_lhs.count)]

    for model in (eager, ts):
        assert qwix.is_quantized(model.blocks)
        model.train()
        qwix.set_quant_stats_update(model.blocks, False)
        model(x)
        assert counts(model) == [0, 0, 1]
        qwix.calibrate(model.blocks, [x, x], progress=False)
        assert counts(model) == [2, 2, 1]
        qwix.set_quant_stats_update(model.blocks, True)
        model(x)
        assert counts(model) == [3, 3, 2]
    assert_same_state(eager, ts)


def test_calibrate_matches_python_path():
    rules = [QuantizationRule(weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
    eager, ts, _, _ = both(MLP(), rules, torch.randn(4, 16))
    batches = [torch.randn(4, 16) for _ in range(3)]
    qwix.calibrate(eager, batches, progress=False)
    jit_calibrate(ts, batches, progress=False)
    assert ts.training and ts.fc1.training
    assert_same_state(eager, ts)
    eager.eval(), ts.eval()
    x = torch.randn(4, 16)
    assert_same(ts(x), eager(x), "calibrated")


# ---- rules and errors --------------------------------------------------------------------------------


def test_get_unused_rules():
    rules = [QuantizationRule(module_path="fc2", weight_qtype="int8"),
             QuantizationRule(module_path="nothing", weight_qtype="int8"),
             QuantizationRule(op_names=("conv2d",), weight_qtype="int8")]
    p = QatProvider(rules)
    qwix.jit_quantize_model(torch.jit.script(MLP()), p, torch.randn(2, 16))
    assert p.get_unused_rules() == rules[1:]


@pytest.mark.parametrize("script", [False, True])
def test_a_rule_set_that_matches_nothing_warns(script):
    rules = [QuantizationRule(module_path="encoder\\..*", weight_qtype="int8")]  # MLP has fc1, fc2
    model = torch.jit.script(MLP()) if script else MLP()
    with pytest.warns(UserWarning, match=r"no rule matched any op of the example forward.*'', 'fc1', 'fc2'"):
        qwix.quantize_model(model, QatProvider(rules), torch.randn(2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qwix.quantize_model(MLP(), QatProvider(rules + [QuantizationRule(module_path="fc1", weight_qtype="int8")]),
                            torch.randn(2, 16))
    only_conv = [QuantizationRule(module_path="fc1", op_names=["conv2d"], weight_qtype="int8")]
    with pytest.warns(UserWarning, match=r"no rule matched any op of the example forward"):  # no conv2d ran
        qwix.quantize_model(torch.jit.script(MLP()) if script else MLP(), QatProvider(only_conv), torch.randn(2, 16))
    if script:
        return  # TorchScript needs example inputs
    # Eager mode without example inputs: the module paths alone show that no rule can match.
    with pytest.warns(UserWarning, match=r"no rule's module_path matches any module of this model.*'', 'fc1', 'fc2'"):
        qwix.quantize_model(MLP(), QatProvider(rules))
    with warnings.catch_warnings():  # a path that matches: only a forward could tell whether its ops run
        warnings.simplefilter("error")
        qwix.quantize_model(MLP(), QatProvider(only_conv))


@pytest.mark.parametrize("rule, needle", [
    (QuantizationRule(weight_qtype="int8", act_qtype="int8", tile_size=3), "tile size 3 does not divide axis 1 of size 8"),
    (QuantizationRule(weight_qtype="mxfp4"), "qtype 'mxfp4' quantizes blocks of 32 elements along the last axis"),
    (QuantizationRule(act_qtype="nvfp4"), "qtype 'nvfp4' quantizes blocks of 16 elements along the last axis"),
    (QuantizationRule(act_qtype="int8", act_static_scale=True, tile_size=3), "tile size 3 does not divide"),
])
def test_a_plan_the_example_operands_cannot_run_is_an_error_at_quantize_time(rule, needle):
    # Eager mode raised at quantize time, naming module, op and rule; TorchScript returned a module whose first
    # forward raised the op's bare message.
    m, x = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(2, 8)
    for model in (m, torch.jit.script(m)):  # TorchScript adds where the op is: "op linear0 (<file>:<line>)"
        with pytest.raises(ValueError, match=r"module '0', op linear0 (\(.*\) )?\(rule QuantizationRule\(") as e:
            qwix.quantize_model(model, QatProvider([rule]), x)
        assert needle in str(e.value) and repr(rule._to_cpp()) in str(e.value)


class _WithScriptedChild(nn.Module):
    def __init__(self, child):
        super().__init__()
        self.child, self.fc = child, nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.child(x))


def test_an_eager_model_with_a_torchscript_submodule():
    # quantize_model's Python pass cannot hook a ScriptModule (torch raised "register_forward_pre_hook is not
    # supported on ScriptModules"): it quantizes the rest and says that the scripted child stays float.
    torch.manual_seed(0)
    x, rules = torch.randn(2, 8), [QuantizationRule(weight_qtype="int8", act_qtype="int8")]
    m = _WithScriptedChild(torch.jit.script(nn.Linear(8, 8)))

    with pytest.warns(UserWarning, match="submodule 'child' is a TorchScript module: its ops run in TorchScript"):
        q = qwix.quantize_model(m, QatProvider(rules), x)
    assert_same(q(x), _w8a8_linear(m.child(x), m.fc), "fc quantized, the scripted child float")
    child = qwix.quantize_model(m.child, QatProvider(rules), x)  # the TorchScript pass
    with warnings.catch_warnings():  # rules that quantize only Python modules, or a child quantized already
        warnings.simplefilter("error", UserWarning)
        for only_fc in ([QuantizationRule(module_path="fc", weight_qtype="int8", act_qtype="int8")],
                        [QuantizationRule(module_path="child")] + rules):  # a rule without qtypes excludes it
            qwix.quantize_model(m, QatProvider(only_fc), x)
        both = qwix.quantize_model(_WithScriptedChild(child), QatProvider(rules), x)
    both.fc.load_state_dict(m.fc.state_dict())
    assert_same(both(x), _w8a8_linear(_w8a8_linear(x, m.child), m.fc), "both quantized")


def test_scripting_a_model_quantized_in_python_says_what_to_do():
    # It failed inside TorchScript's hook compiler: "'functools.partial' object has no attribute '__name__'".
    q = qwix.quantize_model(MLP(), QatProvider([QuantizationRule(weight_qtype="int8")]), torch.randn(2, 16))
    for target in (q, q.fc1):
        with pytest.raises(TypeError, match=r"torch.jit.script of a model quantized by quantize_model's Python pass "
                                            r"is not supported .* quantize_model\(torch.jit.script\(model\)"):
            torch.jit.script(target)


class _IgnoredHelper(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.w = nn.Linear(8, 8), nn.Parameter(torch.randn(8, 8))

    @torch.jit.ignore
    def helper(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w)

    def forward(self, x):
        return self.helper(self.fc(x))


def test_python_functions_called_from_torchscript_warn():
    # Their ops run in Python, unseen by the TorchScript pass (the Python path quantizes them): the two paths
    # differ, which was silent.
    torch.manual_seed(0)
    m, x = _IgnoredHelper(), torch.randn(2, 8)
    rules = [QuantizationRule(weight_qtype="int8", act_qtype="int8")]
    with pytest.warns(UserWarning, match=r"these calls run outside their module's graph.*\n  module '': helper \("
                                         r".*test_jit.py:\d+\)"):
        ts = qwix.quantize_model(torch.jit.script(m), QatProvider(rules), x)
    assert_same(ts(x), F.linear(_w8a8_linear(x, m.fc), m.w), "the helper's linear stays float")
    with warnings.catch_warnings():  # no rule for the module that calls it: nothing to say
        warnings.simplefilter("error", UserWarning)
        qwix.quantize_model(torch.jit.script(m), QatProvider([QuantizationRule(module_path="fc", weight_qtype="int8")]),
                            x)


def _doubled(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def _projected(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


class _Forked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.w = nn.Linear(8, 8), nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        y = torch.jit.wait(torch.jit.fork(_doubled, x))
        return self.fc(torch.jit.wait(torch.jit.fork(_projected, y, self.w)))


def test_forward_after_torch_jit_wait_is_quantized_and_forks_with_ops_warn():
    # The interpreter may resume a forward after wait() on another thread, whose probes went unrecorded (the
    # recorder was thread-local): fc counted as not run and raised at every forward. The forked function's
    # own linear runs in a graph of its own, which the pass does not quantize: that warns.
    torch.manual_seed(0)
    m, x = _Forked(), torch.randn(2, 8)
    rules = [QuantizationRule(weight_qtype="int8", act_qtype="int8")]
    with pytest.warns(UserWarning, match=r"these calls run outside their module's graph.*\n  module '': "
                                         r"torch.jit.fork \(.*test_jit.py:\d+\)( \(Triggered|$)"):
        ts = qwix.quantize_model(torch.jit.script(m), QatProvider(rules), x)
    expected = _w8a8_linear(F.linear(2 * x, m.w), m.fc)
    for _ in range(3):  # (each forward may resume on another thread)
        assert_same(ts(x), expected, "fc quantized after the waits")


def _forked_in_a_helper(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.jit.wait(torch.jit.fork(_projected, x, w))


class _ForkedInAHelper(_Forked):
    def forward(self, x):
        return self.fc(_forked_in_a_helper(x, self.w))


def test_a_fork_inside_a_called_function_warns_too():
    m, x = _ForkedInAHelper(), torch.randn(2, 8)
    with pytest.warns(UserWarning, match=r"these calls run outside their module's graph.*\n  module '': "
                                         r"torch.jit.fork \("):
        qwix.quantize_model(torch.jit.script(m), QatProvider([QuantizationRule(weight_qtype="int8")]), x)


def test_quantize_under_inference_mode_then_train():
    # Under inference mode the copies and SRQ statistics were inference tensors: training could not update them.
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    with torch.inference_mode():
        ts = qwix.quantize_model(torch.jit.script(MLP()), QatProvider([QuantizationRule(
            weight_qtype="int8", act_qtype="int8", act_static_scale=True)]), x)
    ts.train()
    ts(x).sum().backward()
    assert int(ts.fc1.linear0_lhs.count) == 1 and ts.fc1.weight.grad is not None
    with torch.inference_mode():  # the Python path's copy too
        q = qwix.quantize_model(MLP(), QatProvider([QuantizationRule(weight_qtype="int8")]), x)
    assert not any(p.is_inference() for p in q.parameters())
    with torch.no_grad():
        q.fc1.weight.add_(1.0)  # (an inference tensor refuses in-place updates outside inference mode)


def test_unexecuted_op_warns_and_raises_when_it_runs():
    m = Branchy()
    rules = [QuantizationRule(weight_qtype="int8", act_qtype="int8")]
    with pytest.warns(UserWarning, match=r"did not run.*\n  module '': linear \(.*test_jit.py:\d+\)"):
        ts = qwix.jit_quantize_model(torch.jit.script(m), QatProvider(rules), torch.randn(2, 16))
    x = torch.randn(2, 16)
    eager = qwix.quantize_model(m, QatProvider(rules), x)
    assert_same(ts(x), eager(x), "executed path")
    with pytest.raises(torch.jit.Error, match="did not run during quantize_model's example forward"):
        ts(x, True)
    script = torch.jit.script(m)
    with warnings.catch_warnings():  # an example that runs it: no warning, same values
        warnings.simplefilter("error")
        ts = qwix.jit_quantize_model(script, QatProvider(rules), x, True)
    assert_same(ts(x, True), eager(x, True), "aux path")


class TwoWays(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x, attend: bool = False):
        if attend:
            return F.scaled_dot_product_attention(x, x, x)
        return F.linear(x, self.w) + F.linear(x, self.w)


def test_unexecuted_ops_are_counted_and_attention_named_in_the_warning():
    rules = [QuantizationRule(weight_qtype="int8", act_qtype="int8")]
    x = torch.randn(2, 3, 8)
    with pytest.warns(UserWarning, match=r"2 op\(s\).*\n  module '': matmul x2 \(.*test_jit.py:\d+, in "
                                         r"scaled_dot_product_attention\)"):
        qwix.jit_quantize_model(torch.jit.script(TwoWays()), QatProvider(rules), x)
    with pytest.warns(UserWarning, match=r"module '': linear x2 \(.*test_jit.py:\d+\)"):
        qwix.jit_quantize_model(torch.jit.script(TwoWays()), QatProvider(rules), x, True)


def test_submodule_that_never_runs_warns_and_raises_when_called():
    m = Spare()
    with pytest.warns(UserWarning, match=r"module 'spare': its forward did not run \(1 op\(s\)\)"):
        ts = qwix.jit_quantize_model(torch.jit.script(m), QatProvider(W8A8), torch.randn(2, 16))
    ts(torch.randn(2, 16))
    with pytest.raises(torch.jit.Error, match="module 'spare', op linear"):
        ts.spare(torch.randn(2, 4))


def test_a_call_with_another_rank_raises():
    ts = qwix.jit_quantize_model(torch.jit.script(MLP()), QatProvider(W8A8), torch.randn(2, 16))
    with pytest.raises(torch.jit.Error, match="module 'fc1', op linear0.*rank other than 2"):
        ts(torch.randn(2, 3, 16))


def test_srq_in_a_loop_is_an_error_dynamic_is_fine():
    m = Loop()
    rules = [QuantizationRule(weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
    with pytest.raises(ValueError, match=r"module '', op linear .*2 different op ids \(linear0, linear1\)"):
        qwix.jit_quantize_model(torch.jit.script(m), QatProvider(rules), torch.randn(2, 16))
    eager, ts, _, _ = both(m, W8A8, torch.randn(2, 16))
    x = torch.randn(2, 16)
    assert_same(ts(x), eager(x), "loop")


class EinsumForms(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16))
        self.eq = "bi,oi->bo"  # an attribute, not a constant

    def forward(self, x):
        y = torch.einsum("bi,oi->bo", [x, self.w])  # the list form: intercepted
        z = torch.einsum("bo,bo,bo->b", y, y, y)  # three operands: not intercepted (as in Python)
        return z + torch.einsum(self.eq, x, self.w).sum(1)


def test_einsum_forms():
    rules = [QuantizationRule(op_names=("einsum",), module_path="", weight_qtype="int8", act_qtype="int8")]
    with pytest.raises(ValueError, match=r"module '', op einsum .*equation is not a constant"):
        qwix.jit_quantize_model(torch.jit.script(EinsumForms()), QatProvider(rules), torch.randn(2, 16))
    m = EinsumForms()
    m.eq = "bi,oi->bo"
    script = torch.jit.script(m)
    rules = [QuantizationRule(op_names=("linear",), weight_qtype="int8")]  # einsum matched by no rule: fine
    qwix.jit_quantize_model(script, QatProvider(rules), torch.randn(2, 16))


def test_errors():
    with pytest.raises(TypeError, match="ScriptModule"):
        qwix.jit_quantize_model(MLP(), QatProvider(W8A8), torch.randn(2, 16))
    ts = qwix.jit_quantize_model(torch.jit.script(MLP()), QatProvider(W8A8), torch.randn(2, 16))
    with pytest.raises(ValueError, match="already quantized"):
        qwix.jit_quantize_model(ts, QatProvider(W8A8), torch.randn(2, 16))
    with pytest.raises(ValueError, match=r"module 'conv1'.*tile_size"):
        qwix.jit_quantize_model(torch.jit.script(CNN()), QatProvider([QuantizationRule(weight_qtype="int8",
                                                                                     tile_size=4)]),
                                torch.randn(2, 1, 8, 8))
    with pytest.raises(RuntimeError, match="qwix: quantize_model runs the example inputs"):
        qwix.jit_quantize_model(torch.jit.script(MLP()), QatProvider(W8A8), torch.randn(2, 5))
    with pytest.raises(ValueError, match="set_quant_stats_update"):
        jit_set_quant_stats_update(torch.jit.script(MLP()), False)
    with pytest.raises(ValueError, match=r"needs example inputs.*missing value for argument 'x'.*none were given"):
        qwix.jit_quantize_model(torch.jit.script(MLP()), QatProvider(W8A8))


class KeywordInputs(nn.Module):
    """An HF-style forward: the mask is a keyword argument, and its branch holds an op."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.gate = nn.Linear(16, 16)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        h = self.fc(input_ids)
        if attention_mask is not None:
            h = h * torch.sigmoid(F.linear(attention_mask, self.gate.weight)) + self.gate(attention_mask)
        return h


@pytest.mark.parametrize("script", [False, True])
def test_example_kwargs(script):
    torch.manual_seed(0)
    m, x, mask = KeywordInputs(), torch.randn(2, 16), torch.randn(2, 16)
    rules = [QuantizationRule(weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
    model = torch.jit.script(m) if script else m
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the masked branch ran: no op left unplanned
        q = qwix.quantize_model(model, QatProvider(rules), x, example_kwargs={"attention_mask": mask})
    assert {n for n, _ in q.named_children()} >= {"fc", "linear0_lhs"}  # the branch's SRQ statistics exist
    q.eval()
    ref = qwix.quantize_model(m, QatProvider(rules), x, example_kwargs={"attention_mask": mask}).eval()
    assert_same(q(x, attention_mask=mask), ref(x, attention_mask=mask), "keyword inputs")
    with pytest.raises(TypeError, match="example_kwargs must be a mapping of keyword inputs, got list"):
        qwix.quantize_model(model, QatProvider(rules), x, example_kwargs=[mask], inplace=True)
    if not script:  # the bad argument was refused before anything changed; any mapping works (BatchEncoding)
        q = qwix.quantize_model(m, QatProvider(rules), x, example_kwargs=collections.UserDict(attention_mask=mask),
                                inplace=True)
        assert int(q.linear0_lhs.count) == 0


class Wrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.inner(x))


def test_a_model_holding_a_quantized_module_is_not_quantized_twice():
    x = torch.randn(2, 16)
    inner = qwix.jit_quantize_model(torch.jit.script(MLP()), QatProvider(W8A8), x)
    assert jit_is_quantized(inner.fc1)  # every module whose code was quantized is marked
    with pytest.raises(ValueError, match="submodule 'inner' of this TorchScript module is already quantized"):
        qwix.jit_quantize_model(torch.jit.script(Wrapper(inner)), QatProvider(W8A8), x)


class MutatedOperands(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8))
        self.v = nn.Parameter(torch.randn(16, 8))

    def forward(self, x):
        ops = [x, self.w]
        ops[1] = self.v
        return torch.einsum("bi,io->bo", ops)


def test_frozen_modules_and_changed_einsum_lists_are_errors():
    x = torch.randn(2, 16)
    # The list's ListConstruct still names self.w: quantizing its inputs would compute with the wrong weight.
    with pytest.raises(ValueError, match="not a literal list of two tensors"):
        qwix.jit_quantize_model(torch.jit.script(MutatedOperands()), QatProvider(W8A8), x)
    # Freezing folds the parameters into constants: a weights-only rule would silently quantize nothing.
    for preserved in ([], ["training"]):
        frozen = torch.jit.freeze(torch.jit.script(MLP()).eval(), preserved_attrs=preserved)
        with pytest.raises(ValueError, match=r"constant tensor and the module has no parameters, as after "
                                             r"torch.jit.freeze.*quantize the module before freezing"):
            qwix.jit_quantize_model(frozen, QatProvider([QuantizationRule(weight_qtype="int8")]), x)


class AliasedOperands(nn.Module):
    """The operand list is put in another container and written through it before the einsum."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8))
        self.v = nn.Parameter(torch.randn(16, 8))

    def forward(self, x):
        ops = [x, self.w]
        holder: List[List[torch.Tensor]] = []
        holder.append(ops)
        holder[0][1] = self.v
        return torch.einsum("bi,io->bo", ops)


def test_einsum_list_written_through_an_alias_is_an_error():
    with pytest.raises(ValueError, match="not a literal list of two tensors"):
        qwix.jit_quantize_model(torch.jit.script(AliasedOperands()), QatProvider(W8A8), torch.randn(2, 16))


class ReusedOperands(nn.Module):
    """An operand list read twice and by len(): not changed, so quantized like a literal list."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8))

    def forward(self, x):
        ops = [x, self.w]
        assert len(ops) == 2
        return torch.einsum("bi,io->bo", ops) + torch.einsum("bi,io->bo", ops)


class ConstantOperand(nn.Module):
    """A plain tensor attribute: a constant in a trace, an activation on both paths (not a frozen weight)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.pe = torch.randn(4, 4)

    def forward(self, x):
        return self.fc(x) @ self.pe


def test_lists_read_but_not_changed_and_traced_constants_are_quantized():
    x = torch.randn(2, 16)
    eager, ts, _, _ = both(ReusedOperands(), W8A8, x)
    assert_same(ts(x), eager(x), "einsum list read twice")
    m, x = ConstantOperand(), torch.randn(2, 4)
    for rules in (W8A8, [QuantizationRule(weight_qtype="int8")]):
        eager = qwix.quantize_model(m, QatProvider(rules), x)
        traced = qwix.jit_quantize_model(torch.jit.trace(m, x), QatProvider(rules), x)
        assert_same(traced(x), eager(x), f"traced constant operand {rules[0].act_qtype}")


def test_quantize_model_dispatches_script_modules_to_the_jit_pass():
    torch.manual_seed(0)
    rules = [QuantizationRule(module_path=".*", weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
    x = torch.randn(4, 16)
    eager = MLP()
    script = qwix.quantize_model(torch.jit.script(eager), QatProvider(rules), x)
    assert isinstance(script, torch.jit.ScriptModule) and qwix.is_quantized(script)
    ref = qwix.quantize_model(eager, QatProvider(rules), x)
    qwix.calibrate(script, [x, 2 * x], progress=False)
    qwix.calibrate(ref, [x, 2 * x], progress=False)
    script.eval(), ref.eval()
    assert_same(script(x), ref(x))
    qwix.set_quant_stats_update(script, False)
    script.train()
    script(x)
    assert int(dict(script.named_buffers())["fc1.linear0_lhs.count"]) == 2
