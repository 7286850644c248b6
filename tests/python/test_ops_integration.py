"""The ops as PyTorch operators: opcheck, TorchScript and torch.compile."""
import copy
import shutil
from typing import List

import pytest
import torch
import torch._dynamo

import qwix_torch as qwix
import reference as ref
from _helpers import assert_same, make_input

ops = torch.ops.qwix

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script.*` is deprecated:DeprecationWarning")


def _x(shape=(4, 8), seed=0, grad=False, dtype=torch.float32):
    return make_input(shape, seed, dtype).requires_grad_(grad)


def _samples(grad: bool):
    """(op name, args) for every op of docs/ops.md; `grad`: float inputs require grad."""
    x, x3 = _x(grad=grad), _x((2, 3, 8), 1, grad=grad)
    xb = _x((3, 8), 2, grad=grad, dtype=torch.bfloat16)
    mask = ops.fake_quant_forward(x.detach(), "int8", "absmax,0.8", [0], [], [], True)[1]
    scale = torch.full((4, 1), 0.02).requires_grad_(grad)
    zp = torch.tensor([[0.0], [3.0], [7.0], [100.0]])  # grid values of both int8 and uint8
    count0, count3 = torch.zeros((), dtype=torch.int32), torch.tensor(3, dtype=torch.int32)
    cal_a = [x.detach().abs().amax(1, keepdim=True).requires_grad_(grad)]
    cal_mm = [x.detach().amin(1, keepdim=True).requires_grad_(grad), x.detach().amax(1, keepdim=True).requires_grad_(grad)]
    s = [
        ("fake_quant", (x, "int8", "absmax", [0], [], [], None)),
        ("fake_quant", (x, "int8", "absmax,0.8", [0], [], [], None)),
        ("fake_quant", (x, "uint4", "minmax", [], [1], [4], True)),
        ("fake_quant", (x3, "float8_e4m3fn", "rms,3", [0, 1], [], [], None)),
        ("fake_quant", (x3, "nf4", "fixed,2", [], [], [], False)),
        ("fake_quant", (xb, "int4", "minmax,0.9", [0], [], [], None)),
        ("fake_quant_forward", (x, "int8", "absmax,0.8", [0], [], [], True)),
        ("fake_quant_forward", (x3, "int8", "minmax", [2], [], [], False)),
        ("fake_quant_with_scale", (x, scale, None, "int8", False)),
        ("fake_quant_with_scale", (x, scale, zp, "uint8", True)),
        ("fake_quant_with_scale", (x3, torch.tensor([0.1, 0.2, 0.3]).reshape(3, 1), None, "float4_e2m1fn", True)),
        ("fake_quant_with_scale_forward", (x, scale, zp, "int8", True)),
        ("fake_quant_with_scale_forward", (x, scale, None, "int4", False)),
        ("fake_quant_backward", (_x((4, 8), 3, grad=grad), mask)),
        ("calibrate", (x, "absmax", [0], [], [])),
        ("calibrate", (x3, "minmax,0.9", [], [2], [4])),
        ("calibrate", (x3, "rms,3", [1], [], [])),
        ("calibrate", (x, "fixed,-1,3", [], [], [])),
        ("compute_scale", (cal_a, "int8")),
        ("compute_scale", (cal_mm, "uint8")),
        ("srq_scale", (x, count0, [torch.zeros(1, 1)], "int8", "absmax", [0], [], [])),
        ("srq_scale", (x, count3, [torch.full((1, 1), 3.0)], "int8", "absmax", [0], [], [])),
        ("srq_scale", (x, count3, [torch.full((1, 1), -1.0), torch.full((1, 1), 2.0)], "uint8", "minmax", [0], [], [])),
        ("update_quant_stat", (count3.clone(), [torch.zeros(1, 1)], cal_a, [0], 1)),
        ("update_quant_stat", (count0.clone(), [torch.zeros(1, 1), torch.ones(1, 1)], cal_mm, [0], 2)),
    ]
    return s


def _ids(samples):
    seen = {}
    out = []
    for name, _ in samples:
        seen[name] = seen.get(name, -1) + 1
        out.append(f"{name}-{seen[name]}")
    return out


NO_GRAD_SAMPLES = _samples(False)
GRAD_SAMPLES = [s for s in _samples(True) if any(isinstance(a, torch.Tensor) and a.requires_grad for a in s[1])
                or any(isinstance(a, list) and any(isinstance(t, torch.Tensor) and t.requires_grad for t in a) for a in s[1])]


def test_every_documented_op_is_covered():
    documented = {"fake_quant", "fake_quant_forward", "fake_quant_with_scale", "fake_quant_with_scale_forward",
                  "fake_quant_backward", "calibrate", "compute_scale", "srq_scale", "update_quant_stat"}
    assert {n for n, _ in NO_GRAD_SAMPLES} == documented
    assert {n for n, _ in GRAD_SAMPLES} == documented
    for name in documented:
        assert hasattr(ops, name), name


@pytest.mark.parametrize("name,args", NO_GRAD_SAMPLES, ids=_ids(NO_GRAD_SAMPLES))
def test_opcheck(name, args):
    torch.library.opcheck(getattr(ops, name).default, copy.deepcopy(args))


@pytest.mark.parametrize("name,args", GRAD_SAMPLES, ids=_ids(GRAD_SAMPLES))
def test_opcheck_requires_grad(name, args):
    torch.library.opcheck(getattr(ops, name).default, args)


def test_non_differentiable_outputs_do_not_require_grad():
    x = _x(grad=True)
    for out in [ops.calibrate(x, "minmax", [0], [], []), ops.compute_scale([x.abs().amax(1, keepdim=True)], "int8"),
                ops.srq_scale(x, torch.zeros((), dtype=torch.int32), [torch.zeros(1, 1)], "int8", "absmax", [0], [], [])]:
        for t in out:
            assert not t.requires_grad


@pytest.mark.parametrize("with_mask", [False, True])
def test_forward_ops_output_is_straight_through(with_mask):
    """The *_forward ops' y is differentiable (functorch levels see these ops): straight-through,
    masked when with_mask; the mask output is not differentiable."""
    x = _x(grad=True)
    scale = x.detach().abs().amax(1, keepdim=True) / 127 * 0.7
    for y, mask in [ops.fake_quant_forward(x, "int8", "absmax,0.7", [0], [], [], with_mask),
                    ops.fake_quant_with_scale_forward(x, scale, None, "int8", with_mask)]:
        assert y.requires_grad and not mask.requires_grad
        (gx,) = torch.autograd.grad(y.sum(), x)
        in_range = x.detach().abs() <= scale * 127
        assert not in_range.all()
        assert torch.equal(gx, in_range.float() if with_mask else torch.ones_like(x))


def test_update_quant_stat_returns_none_and_mutates():
    count, s = torch.zeros((), dtype=torch.int32), torch.zeros(1, 1)
    assert ops.update_quant_stat(count, [s], [torch.full((4, 1), 2.0)], [0], 1) is None
    assert count.item() == 1 and s.item() == 2.0


# ------------------------------------------------------------------------------------------------
# TorchScript
# ------------------------------------------------------------------------------------------------


def _script_fake_quant(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.qwix.fake_quant(x, "int8", "absmax,0.8", [0], [1], [4], None)


def _script_fake_quant_defaults(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.qwix.fake_quant(x, "int4")


def _script_with_scale(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    return torch.ops.qwix.fake_quant_with_scale(x, scale, zp, "uint8", True)


def _script_srq(x: torch.Tensor, count: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    cal = torch.ops.qwix.calibrate(x, "absmax", [0], [], [])
    torch.ops.qwix.update_quant_stat(count, [s], cal, [0], 1)
    sc: List[torch.Tensor] = torch.ops.qwix.srq_scale(x, count, [s], "int8", "absmax", [0], [], [])
    return torch.ops.qwix.fake_quant_with_scale(x, sc[0], None, "int8", False)


def test_jit_script_fake_quant():
    fn = torch.jit.script(_script_fake_quant)
    x = _x((4, 8), 5, grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = fn(x), _script_fake_quant(x2)
    assert_same(y, y2)
    assert_same(y, ref.ref_fake_quant(x, "int8", "absmax,0.8", (0,), {1: 4}))
    g = torch.randn(4, 8)
    y.backward(g)
    y2.backward(g)
    assert_same(x.grad, x2.grad)
    fn2 = torch.jit.script(_script_fake_quant_defaults)
    assert_same(fn2(x.detach()), ref.ref_fake_quant(x, "int4"))


def test_jit_script_fake_quant_with_scale():
    fn = torch.jit.script(_script_with_scale)
    x = _x((4, 8), 6) * 3
    scale, zp = torch.full((4, 1), 0.03), torch.tensor([[0.0], [10.0], [100.0], [255.0]])
    assert_same(fn(x, scale, zp), _script_with_scale(x, scale, zp))
    assert_same(fn(x, scale, zp), ref.ref_fake_quant_with_scale(x, scale, "uint8", zp))


def test_jit_script_srq_mutation():
    fn = torch.jit.script(_script_srq)
    c1, s1 = torch.zeros((), dtype=torch.int32), torch.zeros(1, 1)
    c2, s2 = c1.clone(), s1.clone()
    for i in range(3):
        x = _x((4, 8), 10 + i)
        assert_same(fn(x, c1, s1), _script_srq(x, c2, s2))
        assert c1.item() == c2.item() == i + 1
        assert_same(s1, s2)


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------


def _qat_step(x, w):
    y = torch.ops.qwix.fake_quant(x, "int8", "absmax,0.8", [0], [], [], None)
    yw = torch.ops.qwix.fake_quant(w, "int4", "minmax", [], [1], [4], True)
    return y * yw


def _check_compiled_step(backend, dynamic=False):
    torch._dynamo.reset()
    cf = torch.compile(_qat_step, backend=backend, fullgraph=True, dynamic=dynamic)
    shapes = [(4, 8), (6, 8)] if dynamic else [(4, 8)]
    for shape in shapes:
        x, w = _x(shape, 20, grad=True), _x(shape, 21, grad=True)
        xe, we = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        g = torch.randn(shape)
        y = cf(x, w)
        y.backward(g)
        ye = _qat_step(xe, we)
        ye.backward(g)
        assert_same(y, ye, f"{backend} forward")
        assert_same(x.grad, xe.grad, f"{backend} grad x")
        assert_same(w.grad, we.grad, f"{backend} grad w")


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fake_quant(backend):
    _check_compiled_step(backend)


def test_compile_fake_quant_dynamic_shapes():
    _check_compiled_step("aot_eager", dynamic=True)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_compile_fake_quant_inductor():
    _check_compiled_step("inductor")


def _srq_step_ops(x, count, s):
    cal = torch.ops.qwix.calibrate(x, "absmax", [0], [], [])
    torch.ops.qwix.update_quant_stat(count, [s], cal, [0], 1)
    sc = torch.ops.qwix.srq_scale(x, count, [s], "int8", "absmax", [0], [], [])
    return torch.ops.qwix.fake_quant_with_scale(x, sc[0], None, "int8", False)


def _srq_step_wrappers(x, count, s_min, s_max):
    cal = qwix.compute_calibration(x, "minmax", channelwise_axes=(0, 1))
    qwix.update_quant_stat_(count, [s_min, s_max], cal)
    sc, zp = qwix.srq_scale(x, count, [s_min, s_max], "uint8", "minmax", channelwise_axes=(0, 1))
    return qwix.fake_quant_with_scale(x, sc, "uint8", zero_point=zp)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("which", ["ops", "wrappers"])
def test_compile_srq_mutation_visible(backend, which):
    torch._dynamo.reset()
    if which == "ops":
        fn, shape, state = _srq_step_ops, (4, 8), [torch.zeros((), dtype=torch.int32), torch.zeros(1, 1)]
    else:
        fn, shape, state = _srq_step_wrappers, (2, 3, 8), [torch.zeros((), dtype=torch.int32), torch.zeros(1, 3, 1),
                                                          torch.zeros(1, 3, 1)]
    cf = torch.compile(fn, backend=backend, fullgraph=True)
    eager_state = [t.clone() for t in state]
    for i in range(3):
        x = _x(shape, 30 + i)
        y = cf(x, *state)
        ye = fn(x, *eager_state)
        assert_same(y, ye, f"step {i}")
        assert state[0].item() == i + 1, "count update inside the compiled graph is not visible"
        for a, b in zip(state[1:], eager_state[1:]):
            assert_same(a, b, f"sums after step {i}")


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_compile_srq_mutation_inductor():
    torch._dynamo.reset()
    cf = torch.compile(_srq_step_ops, backend="inductor", fullgraph=True)
    state = [torch.zeros((), dtype=torch.int32), torch.zeros(1, 1)]
    eager_state = [t.clone() for t in state]
    for i in range(2):
        x = _x((4, 8), 40 + i)
        assert_same(cf(x, *state), _srq_step_ops(x, *eager_state))
        assert state[0].item() == i + 1
        assert_same(state[1], eager_state[1])


def test_the_cuda_sync_free_sequence_runs_on_the_cpu():
    """test_ops_cuda runs this sequence under torch's sync debug mode on a GPU; here it stays valid."""
    from test_ops_cuda import ops_and_a_qat_training_step

    ops_and_a_qat_training_step("cpu")
