"""QuantizationRule validation, QatProvider matching (precedence, fullmatch, op_names,
unused rules) and the C++ engine's per-operand plans as seen from Python."""
import copy
import dataclasses
import pickle

import pytest
import torch
import torch.nn as nn

import qwix_torch as qwix
from qwix_torch import QatProvider, QuantizationRule


def test_defaults_are_qwix():
    r = QuantizationRule()
    assert r.module_path == ".*"
    assert r.op_names == ()
    assert r.weight_qtype is None and r.act_qtype is None and r.tile_size is None
    assert r.act_static_scale is False
    assert r.weight_calibration_method == "absmax" and r.act_calibration_method == "absmax"
    assert r.act_batch_axes == (0,)
    assert r.clip_gradient is None


def test_frozen_keyword_only_hashable():
    r = QuantizationRule(weight_qtype="int8", op_names=["linear"], act_batch_axes=[0, 1])
    assert r.op_names == ("linear",) and r.act_batch_axes == (0, 1)
    assert QuantizationRule(op_names="linear").op_names == ("linear",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.weight_qtype = "int4"
    with pytest.raises(TypeError):
        QuantizationRule(".*")  # keyword-only
    assert hash(r) == hash(QuantizationRule(weight_qtype="int8", op_names=("linear",), act_batch_axes=(0, 1)))
    assert pickle.loads(pickle.dumps(r)) == r


@pytest.mark.parametrize(
    "kwargs, needles",
    [
        (dict(weight_qtype="int9"), ["weight_qtype", "int9", "int8"]),
        (dict(act_qtype="fp7"), ["act_qtype", "fp7"]),
        (dict(weight_qtype=8), ["weight_qtype", "8"]),
        (dict(act_qtype="int8", act_calibration_method="absmax,x"), ["act_calibration_method", "absmax,x"]),
        (dict(weight_qtype="int8", weight_calibration_method="maxabs"), ["weight_calibration_method", "maxabs"]),
        (dict(act_qtype="int8", act_calibration_method="fixed,1,2"), ["fixed,1,2"]),
        (dict(act_qtype="float8_e4m3fn", act_calibration_method="minmax"), ["minmax", "float8_e4m3fn"]),
        (dict(act_static_scale=True), ["act_static_scale", "act_qtype"]),
        (dict(weight_qtype="int8", weight_calibration_method="minmax", act_static_scale=True), ["act_static_scale"]),
        (dict(weight_qtype="int8", tile_size=0), ["tile_size", "0"]),
        (dict(weight_qtype="int8", tile_size=-16), ["tile_size", "-16"]),
        (dict(weight_qtype="int8", tile_size=1.5), ["tile_size", "1.5"]),
        (dict(weight_qtype="int8", tile_size=0.0), ["tile_size", "0.0"]),
        (dict(weight_qtype="int8", tile_size=True), ["tile_size", "True"]),
        (dict(weight_qtype="int8", tile_size="32"), ["tile_size", "'32'"]),
        (dict(module_path="enc("), ["module_path", "enc("]),
        (dict(module_path=r"(?<=a)b"), ["module_path", "(?<=a)b"]),  # valid in Python, not in std::regex
        (dict(module_path=r"\Aenc"), ["module_path", "\\A", "plain letter"]),  # an anchor in re, "A" in std::regex
        (dict(module_path=r"enc\Z"), ["module_path", "\\Z"]),
        (dict(module_path="[[:alpha:]]+"), ["module_path", "POSIX class"]),  # a class in std::regex, not in re
        (dict(module_path="fc[_[:digit:]]+"), ["module_path", "POSIX class"]),
        (dict(module_path="fc[]1]"), ["module_path", "fc[]1]", "empty class"]),  # "]" or "1" in re, empty in C++
        (dict(module_path="x.[^]a]"), ["module_path", "[^]a]", "escape it"]),
        (dict(module_path=3), ["module_path", "3"]),
        (dict(op_names=("dot_general",)), ["dot_general", "linear, conv1d"]),
        (dict(op_names=("linear", 3)), ["op_names", "3"]),
        (dict(act_qtype="int8", act_batch_axes=(0, 0)), ["act_batch_axes", "(0, 0)"]),
        (dict(act_qtype="int8", act_batch_axes=("0",)), ["act_batch_axes"]),
        (dict(act_qtype="int8", act_static_scale=1), ["act_static_scale", "1"]),
        (dict(act_qtype="int8", clip_gradient="yes"), ["clip_gradient", "yes"]),
    ],
)
def test_bad_rules_raise_value_error_naming_the_value(kwargs, needles):
    with pytest.raises(ValueError) as e:
        QuantizationRule(**kwargs)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_valid_variants():
    QuantizationRule()  # quantizes nothing: excludes the modules it matches
    QuantizationRule(act_qtype="int8")  # ours: activations only
    QuantizationRule(weight_qtype="fp8_e4m3", act_qtype="int4", act_calibration_method="minmax,0.9",
                     act_static_scale=True, act_batch_axes=(0, 1), tile_size=0.5, clip_gradient=True)
    QuantizationRule(weight_qtype="uint8", weight_calibration_method="fixed,-1,3", tile_size=128)
    QuantizationRule(module_path=r"layers\.\d+\.(attn|mlp)(?!\.skip)", op_names=("matmul", "einsum"))


def test_provider_rejects_non_rules():
    with pytest.raises(ValueError, match="rule 1 is a dict"):
        QatProvider([QuantizationRule(), {"weight_qtype": "int8"}])


def test_provider_of_one_rule_says_to_pass_a_list():
    with pytest.raises(TypeError, match=r"write QatProvider\(\[rule\]\)"):
        QatProvider(QuantizationRule(weight_qtype="int8"))


def test_op_errors_in_a_model_name_the_module_op_and_rule():
    rule = QuantizationRule(weight_qtype="int8", tile_size=4)
    with pytest.raises(ValueError, match=r"^qwix: module '0', op linear0 \(rule QuantizationRule\(.*tile_size=4.*\)\): "
                                         r"tile size 4 does not divide axis 1 of size 10$"):
        qwix.quantize_model(nn.Sequential(nn.Linear(10, 4)), QatProvider([rule]), torch.randn(2, 10))
    q = qwix.quantize_model(nn.Sequential(nn.Linear(8, 4)), QatProvider([QuantizationRule(
        act_qtype="int8", act_static_scale=True)]), torch.randn(2, 3, 8)).train()
    with pytest.raises(ValueError, match=r"module '0', op linear0 .*statistic 0 has shape \[1, 3, 1\]"):
        q(torch.randn(2, 5, 8))


def test_brackets_that_both_regex_dialects_read_alike():
    p = QatProvider([QuantizationRule(module_path=r"fc[\]1]"), QuantizationRule(module_path=r"b[^a\]][0-9]")])
    assert p.find_rule("fc1", "linear") is p.rules[0] and p.find_rule("fc]", "linear") is p.rules[0]
    assert p.find_rule("bc5", "linear") is p.rules[1] and p.find_rule("ba5", "linear") is None


def test_precedence_fullmatch_and_unused():
    a = QuantizationRule(module_path=r"encoder\..*", weight_qtype="int4")
    b = QuantizationRule(module_path=".*", weight_qtype="int8")
    c = QuantizationRule(module_path="encoder", weight_qtype="int2")
    d = QuantizationRule(module_path="fc", weight_qtype="int8")
    p = QatProvider([a, b, c, d])
    assert p.get_unused_rules() == [a, b, c, d]
    assert p.find_rule("encoder.fc1", "linear") is a
    assert p.find_rule("decoder.encoder.fc1", "linear") is b  # fullmatch, not search
    assert p.find_rule("encoder", "linear") is b  # b comes first
    assert p.find_rule("", "linear") is b  # the root
    assert p.get_unused_rules() == [c, d]
    assert p.rules == (a, b, c, d)


def test_op_names_filter_in_provider():
    a = QuantizationRule(op_names=("matmul",), act_qtype="int4")
    b = QuantizationRule(op_names=("linear", "conv2d"), weight_qtype="int8")
    p = QatProvider([a, b])
    assert p.find_rule("m", "matmul") is a
    assert p.find_rule("m", "linear") is b
    assert p.find_rule("m", "bmm") is None


def test_provider_pickle_and_deepcopy_keep_usage():
    a, b = QuantizationRule(module_path="x", weight_qtype="int8"), QuantizationRule(weight_qtype="int4")
    p = QatProvider([a, b])
    p.find_rule("y", "linear")
    for q in (pickle.loads(pickle.dumps(p)), copy.deepcopy(p)):
        assert q.rules == (a, b)
        assert q.get_unused_rules() == [a]
        q.find_rule("x", "linear")
        assert q.get_unused_rules() == []
    assert p.get_unused_rules() == [a]


def test_plans_from_python():
    p = QatProvider([QuantizationRule(weight_qtype="int4", act_qtype="int8", tile_size=16)])
    plan = p.plan("fc", "linear", 3, False, 2, True)
    assert plan.rule_index == 0
    assert plan.lhs.channelwise_axes == (0, 1) and plan.lhs.tiled_axes == ((2, 16),)
    assert plan.rhs.is_weight and plan.rhs.qtype == "int4" and plan.rhs.channelwise_axes == (0,)
    assert isinstance(plan.rhs.tiled_axes[0][1], int)
    f = QatProvider([QuantizationRule(weight_qtype="int8", tile_size=0.25)]).plan("", "matmul", 2, False, 2, True)
    assert f.rhs.tiled_axes == ((0, 0.25),) and not f.lhs.quantize
    with pytest.raises(ValueError, match=r"module 'conv'.*tile_size.*conv2d"):
        QatProvider([QuantizationRule(weight_qtype="int8", tile_size=8)]).plan("conv", "conv2d", 4, False, 4, True)


# ---- rules applied to models ------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 8) * 0.3)

    def forward(self, x):
        return self.fc(x) @ self.w


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = Block()
        self.decoder = Block()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.decoder(torch.relu(self.encoder(x)))))


def _quantized_ops(model, provider, x):
    """(module path, QuantStat-style name) of every operand the provider quantized, in call order."""
    import qwix_torch.qat as qat

    q = qwix.quantize_model(model, provider)
    seen, real = [], qat._quantize

    def spy(state, module, path, name, t, plan):
        if plan.quantize:
            seen.append((path, name))
        return real(state, module, path, name, t, plan)

    qat._quantize = spy
    try:
        q(x)
    finally:
        qat._quantize = real
    return seen


def test_model_precedence_fullmatch_op_names_and_unused():
    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 8)
    r_enc = QuantizationRule(module_path=r"encoder", op_names=("matmul",), act_qtype="int8")
    r_skip = QuantizationRule(module_path=r"decoder.*")  # quantizes nothing: excludes decoder and decoder.fc
    r_all = QuantizationRule(module_path=r".*", weight_qtype="int8")
    r_never = QuantizationRule(module_path=r"head\.", weight_qtype="int4")
    p = QatProvider([r_enc, r_skip, r_all, r_never])
    seen = _quantized_ops(net, p, x)
    # encoder's matmul (activation lhs, weight rhs: r_enc has no weight_qtype, so only the lhs);
    # encoder's linear falls to r_all (op_names filter); encoder.fc and head via r_all (weights only).
    assert seen == [("encoder.fc", "linear0_rhs"), ("encoder", "matmul0_lhs"), ("head", "linear0_rhs")]
    assert p.get_unused_rules() == [r_never]


def test_only_own_forward_is_intercepted():
    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 8)
    p = QatProvider([QuantizationRule(module_path="encoder", weight_qtype="int8", act_qtype="int8")])
    seen = _quantized_ops(net, p, x)
    assert seen == [("encoder", "matmul0_lhs"), ("encoder", "matmul0_rhs")]  # not encoder.fc's linear


def test_no_rule_is_an_identity():
    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 8)
    p = QatProvider([QuantizationRule(module_path="nothing", weight_qtype="int8")])
    with pytest.warns(UserWarning, match="no rule matched any op of the example forward"):
        q = qwix.quantize_model(net, p, x)
    assert torch.equal(q(x), net(x))
    assert p.get_unused_rules() == list(p.rules)


@pytest.mark.parametrize(
    "rule, op, shapes, weights, equation",
    [
        (QuantizationRule(weight_qtype="int4", act_qtype="int8", tile_size=8), "linear", ((2, 3, 16), (5, 16)),
         (False, True), ""),
        (QuantizationRule(act_qtype="uint8", act_calibration_method="minmax", act_static_scale=True), "matmul",
         ((4, 6, 8), (4, 8, 3)), (False, False), ""),
        (QuantizationRule(weight_qtype="float8_e4m3fn", act_qtype="int8", act_static_scale=True,
                          act_batch_axes=(0, 1)), "einsum", ((2, 3, 8), (8, 4)), (False, True), "btd,dh->bth"),
        (QuantizationRule(weight_qtype="int8", act_qtype="int4", act_calibration_method="rms,2"), "conv2d",
         ((2, 3, 5, 5), (4, 3, 3, 3)), (False, True), ""),
    ],
)
def test_cpp_application_equals_the_python_pass(rule, op, shapes, weights, equation):
    """The C++ quantize_operand (what the C++ and TorchScript passes run) and the Python pass agree."""
    import qwix_torch.qat as qat
    from qwix_torch import _C

    torch.manual_seed(0)
    provider = QatProvider([rule])
    cpp = provider._cpp.plan("m", op, len(shapes[0]), weights[0], len(shapes[1]), weights[1], equation)
    py = provider.plan("m", op, len(shapes[0]), weights[0], len(shapes[1]), weights[1], equation)
    state = qat._QatState(provider)
    state.force_update = True
    module = nn.Module()
    for which, shape, cplan, pplan in zip(("lhs", "rhs"), shapes, (cpp.lhs, cpp.rhs), (py.lhs, py.rhs)):
        x = torch.randn(shape)
        for step in range(2):  # count 0 -> 1 -> 2
            xs = x * (step + 1)
            expected = qat._quantize(state, module, "m", f"{op}0_{which}", xs, pplan)
            if cplan.static_scale:
                stat = module._modules[f"{op}0_{which}"]
                if step == 0:
                    count, sums = torch.zeros((), dtype=torch.int32), [torch.zeros_like(s) for s in stat.sums]
                actual = _C.quantize_operand(xs, cplan, count, sums, True)
                assert torch.equal(count, stat.count)
                for a, b in zip(sums, stat.sums):
                    assert torch.equal(a, b)
            else:
                actual = _C.quantize_operand(xs, cplan)
            assert torch.equal(actual, expected), (which, step)
