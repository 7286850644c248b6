"""torch.func transforms (grad, vjp, jvp, hessian, vmap) through the fake-quant ops and QAT models.

The straight-through rule holds at every transform level, in reverse and forward mode: the gradient
(or tangent) of x passes, masked to the calibrated range where the calibration can clip; the scale
and zero point get none. vmap runs the ops per sample (qwix_torch/_vmap.py: per-sample scales).
"""
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import qwix_torch as qwix
import reference as ref
from _helpers import assert_same, make_input, stable_seed
from qwix_torch import QatProvider, QuantizationRule

# PyTorch's vmap fallback warns "There is a performance drop": no qwix op may take it.
pytestmark = pytest.mark.filterwarnings("error:There is a performance drop")

# (qtype, calibration method, channelwise axes, tiled axes, clip_gradient)
CASES = [
    ("int8", "absmax", (0,), None, None),
    ("int8", "absmax,0.7", (), None, None),
    ("int4", "minmax,0.9", (1,), None, None),
    ("float8_e4m3fn", "rms,2", (0,), None, None),
    ("int8", "absmax", (), {-1: 4}, True),
    ("nf4", "absmax,0.8", (0,), None, False),
]


def _id(c):
    return f"{c[0]}-{c[1]}-ch{list(c[2])}-t{c[3] or {}}-clip{c[4]}"


def _fq(case):
    qtype, method, axes, tiles, clip = case
    return lambda x: qwix.fake_quant(x, qtype, calibration_method=method, channelwise_axes=axes, tiled_axes=tiles,
                                     clip_gradient=clip)


def _masked(t, x, case):
    qtype, method, axes, tiles, clip = case
    return torch.where(ref.ref_grad_mask(x, qtype, method, axes, tiles, clip), t, torch.zeros_like(t))


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_grad_and_vjp_are_straight_through(case):
    fq = _fq(case)
    x, g = make_input((6, 8), stable_seed(case)), make_input((6, 8), 1)
    assert_same(grad(lambda t: (fq(t) * g).sum())(x), _masked(g, x, case), "grad")
    y, pullback = vjp(fq, x)
    assert_same(y, fq(x), "vjp output")
    assert_same(pullback(g)[0], _masked(g, x, case), "vjp")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_jvp_is_straight_through(case):
    fq = _fq(case)
    x, t = make_input((6, 8), stable_seed(case)), make_input((6, 8), 2)
    y, y_t = jvp(fq, (x,), (t,))
    assert_same(y, fq(x), "jvp output")
    assert_same(y_t, _masked(t, x, case), "tangent")
    # forward and reverse mode agree: the Jacobian is the diagonal of the mask
    x = make_input((3, 4), stable_seed(case, "small"))
    expected = torch.diag(_masked(torch.ones(3, 4), x, case).reshape(-1)).reshape(3, 4, 3, 4)
    assert_same(jacfwd(fq)(x), expected, "jacfwd")
    assert_same(jacrev(fq)(x), expected, "jacrev")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_hessian_goes_through_the_backward(case):
    """Second order (jacfwd over jacrev, jacrev over jacrev): d/dx of 2 fq(x) mask is 2 mask mask."""
    fq = _fq(case)
    x = make_input((3, 4), stable_seed(case, "h"))
    expected = torch.diag(2 * _masked(torch.ones(3, 4), x, case).reshape(-1)).reshape(3, 4, 3, 4)
    f = lambda t: fq(t).square().sum()  # noqa: E731
    assert_same(hessian(f)(x), expected, "hessian")
    assert_same(jacrev(jacrev(f))(x), expected, "jacrev(jacrev)")


def test_outer_level_masks_an_input_the_inner_level_does_not_differentiate():
    """jvp over grad w.r.t. w: at the inner level x needs no gradient, the outer one still gets the mask."""
    case = ("int8", "absmax,0.6", (), None, None)
    fq = _fq(case)
    x, t, w = make_input((4, 5), 3), make_input((4, 5), 4), make_input((4, 5), 5)
    _, tangent = jvp(lambda a: grad(lambda b: (fq(a) * b).sum())(w), (x,), (t,))
    assert_same(tangent, _masked(t, x, case))


@pytest.mark.parametrize("with_zp,clip", [(False, False), (False, True), (True, True)])
def test_with_scale_scale_and_zero_point_get_nothing(with_zp, clip):
    x = make_input((4, 6), 6) * 3
    scale = torch.tensor([[0.01], [0.02], [0.05], [0.5]])
    zp = torch.tensor([[0.0], [2.0], [-3.0], [1.0]]) if with_zp else None

    def f(x, scale, zp):
        return qwix.fake_quant_with_scale(x, scale, "int8", zero_point=zp, clip_gradient=clip)

    g = make_input((4, 6), 7)
    mask = ref.ref_with_scale_mask(x, scale, "int8", zp, clip)
    if clip:
        assert not mask.all()
    argnums = (0, 1, 2) if with_zp else (0, 1)
    grads = grad(lambda *a: (f(*a) * g).sum(), argnums=argnums)(x, scale, zp)
    assert_same(grads[0], torch.where(mask, g, torch.zeros_like(g)), "d/dx")
    for other in grads[1:]:
        assert_same(other, torch.zeros_like(other), "scale / zero point")
    _, y_t = jvp(lambda s: f(x, s, zp), (scale,), (torch.ones_like(scale),))
    assert_same(y_t, torch.zeros_like(x), "tangent of the scale")
    _, y_t = jvp(lambda a: f(a, scale, zp), (x,), (g,))
    assert_same(y_t, torch.where(mask, g, torch.zeros_like(g)), "tangent of x")


def test_vmap_quantizes_per_sample():
    case = ("int8", "absmax,0.8", (), None, None)
    fq = _fq(case)
    xs = make_input((5, 4, 6), 8)
    assert_same(vmap(fq)(xs), torch.stack([fq(x) for x in xs]), "dynamic")
    scales = torch.rand(5, 4, 1) * 0.05 + 0.01
    ws = vmap(lambda x, s: qwix.fake_quant_with_scale(x, s, "int4"))(xs, scales)
    assert_same(ws, torch.stack([qwix.fake_quant_with_scale(x, s, "int4") for x, s in zip(xs, scales)]), "scale")
    # per-sample gradients
    g = make_input((4, 6), 9)
    per_sample = vmap(grad(lambda x: (fq(x) * g).sum()))(xs)
    assert_same(per_sample, torch.stack([_masked(g, x, case) for x in xs]), "per-sample grad")


def test_backward_op_under_transforms():
    """fake_quant_backward (the op the straight-through backward runs) is linear in the gradient."""
    x = make_input((3, 8), 10)
    _, mask = torch.ops.qwix.fake_quant_forward(x, "int8", "absmax,0.5", [], [], [], True)
    bits = ref.ref_grad_mask(x, "int8", "absmax,0.5", (), None)
    g, t = make_input((3, 8), 11), make_input((3, 8), 12)
    back = lambda a: torch.ops.qwix.fake_quant_backward(a, mask)  # noqa: E731
    _, tangent = jvp(back, (g,), (t,))
    assert_same(tangent, torch.where(bits, t, torch.zeros_like(t)), "jvp")
    assert_same(grad(lambda a: (back(a) * t).sum())(g), torch.where(bits, t, torch.zeros_like(t)), "grad")


# ------------------------------------------------------------------------------------------------
# QAT models under torch.func.functional_call
# ------------------------------------------------------------------------------------------------


class _TransposedWeight(nn.Module):
    """Reads its weight through a view (x @ w.t())."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        return x @ self.w.t()


def _integer_mlp(seed: int) -> nn.Module:
    """Integer weights in [-7, 7] and 7.5 in each row: int4's per-channel scale is 7.5 / 7.5 = 1 and the
    quantized weights are integers (7.5 clamps to 7), so with integer inputs the first layer's sums are exact
    in any order and a batched (vmap) and a per-sample forward agree bit for bit."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randint(-7, 8, p.shape, generator=g).float())
            if p.dim() == 2:
                p[:, 0] = 7.5
    return m


@pytest.mark.parametrize("rules", [
    [QuantizationRule(weight_qtype="int4")],
    [QuantizationRule(weight_qtype="int4", act_qtype="int8", act_calibration_method="absmax,0.9")],
], ids=["weights-only", "w4a8-clipped"])
@pytest.mark.parametrize("model", ["mlp", "transposed-view"])
def test_functional_call_treats_the_given_tensors_as_weights(model, rules):
    """functional_call puts plain tensors in the parameters' slots: they are the weights (a weights-only
    rule quantizes them, an activation qtype does not apply to them), as in the model's own forward."""
    torch.manual_seed(0)
    fp = _integer_mlp(1) if model == "mlp" else _TransposedWeight()
    width = 6 if model == "mlp" else 8
    q = qwix.quantize_model(fp, QatProvider(rules), torch.randn(2, width))
    x = torch.randn(5, width)
    params = {k: v.detach().clone() for k, v in q.named_parameters()}
    assert_same(functional_call(q, params, (x,)), q(x), "forward")
    assert not torch.equal(q(x), fp(x))  # the rules do change the numerics
    grads = grad(lambda p: functional_call(q, p, (x,)).square().sum())(params)
    q.zero_grad()
    q(x).square().sum().backward()
    for name, p in q.named_parameters():
        assert_same(grads[name], p.grad, name)


def _assert_same_as_eager_backward(q, per_sample, xs):
    """Per-sample gradients equal one eager backward of q(x[None]).sum() per sample, bit for bit."""
    for i, x in enumerate(xs):
        q.zero_grad()
        q(x[None]).sum().backward()
        for name, p in q.named_parameters():
            assert_same(per_sample[name][i], p.grad, f"sample {i} {name}")


def test_per_sample_gradients_of_a_qat_model():
    """vmap(grad(loss)) over a batch (DP-SGD style) equals one eager backward per sample."""
    # the second layer's input is quantized (and its gradient masked); the first layer's stays integer
    rules = [QuantizationRule(module_path="2", weight_qtype="int4", act_qtype="int8",
                              act_calibration_method="absmax,0.8"),
             QuantizationRule(weight_qtype="int4")]
    q = qwix.quantize_model(_integer_mlp(2), QatProvider(rules), torch.zeros(2, 6))
    xs = torch.randint(-4, 5, (6, 6)).float()
    params = {k: v.detach().clone() for k, v in q.named_parameters()}

    def loss(p, x):
        return functional_call(q, p, (x[None],)).sum()

    _assert_same_as_eager_backward(q, vmap(grad(loss), in_dims=(None, 0))(params, xs), xs)


def test_parameter_slots_are_forgotten_after_the_forward():
    """The ids of the tensors functional_call put in the slots are dropped when the forward ends (a later
    tensor reusing such an id must not count as a weight)."""
    q = qwix.quantize_model(_integer_mlp(3), QatProvider([QuantizationRule(weight_qtype="int4")]), torch.zeros(1, 6))
    params = {k: v.detach().clone() for k, v in q.named_parameters()}
    functional_call(q, params, (torch.ones(2, 6),))
    state = q._qwix_state
    run = state.local.run
    assert run.swapped == frozenset() and not run.stack and not state.traced.stack


# ------------------------------------------------------------------------------------------------
# vmap of the calibration and SRQ ops (rules in python/qwix_torch/_vmap.py)
# ------------------------------------------------------------------------------------------------


def test_vmap_of_calibration_and_srq_ops_is_per_sample():
    ops = torch.ops.qwix
    xs = make_input((4, 3, 8), 13)
    for method, axes in [("absmax", [0]), ("minmax", []), ("rms,2", [1])]:
        batched = vmap(lambda x: ops.calibrate(x, method, axes, [], []))(xs)
        looped = [ops.calibrate(x, method, axes, [], []) for x in xs]
        for i, t in enumerate(batched):
            assert_same(t, torch.stack([c[i] for c in looped]), f"calibrate {method}")
        scales = vmap(lambda *c: ops.compute_scale(list(c), "uint8" if method == "minmax" else "int8"))(*batched)
        for i, t in enumerate(scales):
            expected = torch.stack([ops.compute_scale(c, "uint8" if method == "minmax" else "int8")[i] for c in looped])
            assert_same(t, expected, f"compute_scale {method}")
    # srq_scale with shared statistics: dynamic per sample while count is 0, the statistics' scale after
    sums = [torch.full((1, 1), 2.0)]
    for count in (0, 3):
        c = torch.tensor(count, dtype=torch.int32)
        batched = vmap(lambda x: ops.srq_scale(x, c, sums, "int8", "absmax", [], [], []))(xs)[0]
        assert_same(batched, torch.stack([ops.srq_scale(x, c, sums, "int8", "absmax", [], [], [])[0] for x in xs]),
                    f"srq_scale count={count}")


def test_vmap_of_update_quant_stat_updates_once_per_sample():
    ops = torch.ops.qwix
    cal = make_input((5, 2, 4), 14).abs()  # 5 samples of a [2, 4] calibration, batch axis 0
    count, sums = torch.tensor(1, dtype=torch.int32), torch.ones(1, 4)

    def update(n, s, c):
        ops.update_quant_stat(n, [s], [c], [0], 1)
        return c

    vmap(update, in_dims=(None, None, 0))(count, sums, cal)
    expected = torch.ones(1, 4)
    for c in cal:
        expected += c.mean(0, keepdim=True)
    assert int(count) == 6
    assert_same(sums, expected)
    # per-sample statistics (model ensembling): each slice gets its own update
    counts, sums = torch.zeros(5, dtype=torch.int32), torch.zeros(5, 1, 4)
    vmap(update)(counts, sums, cal)
    assert counts.tolist() == [1] * 5
    assert_same(sums, cal.mean(1, keepdim=True))


def test_per_sample_gradients_with_static_scales():
    """An SRQ model under vmap(grad(...)): in eval the shared statistics give every sample the same scale, and
    the per-sample gradients equal one eager backward per sample; in training each sample updates the
    statistics once."""
    rules = [QuantizationRule(module_path="2", weight_qtype="int4", act_qtype="int8", act_static_scale=True,
                              act_calibration_method="absmax,0.8"),
             QuantizationRule(weight_qtype="int4")]
    q = qwix.quantize_model(_integer_mlp(4), QatProvider(rules), torch.zeros(2, 6))
    xs = torch.randint(-4, 5, (6, 6)).float()
    params = {k: v.detach().clone() for k, v in q.named_parameters()}
    buffers = dict(q.named_buffers())

    def loss(p, x):
        return functional_call(q, (p, buffers), (x[None],)).sum()

    q.train()
    vmap(grad(loss), in_dims=(None, 0))(params, xs)
    stat = q[2].linear0_lhs
    assert int(stat.count) == 6
    with torch.no_grad():
        hidden = torch.relu(q[0](xs))  # (the first layer's int4 weights are integers: exact)
    expected = torch.zeros(1, 1)
    for h in hidden:
        expected += h.abs().amax() * 0.8
    assert_same(stat.sum_of_absmax, expected)
    q.eval()
    _assert_same_as_eager_backward(q, vmap(grad(loss), in_dims=(None, 0))(params, xs), xs)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_functional_call_weights_under_compile(backend):
    """Compiled, the tensors in the parameters' slots are found at trace time (Dynamo compares them)."""
    torch._dynamo.reset()
    q = qwix.quantize_model(_integer_mlp(5), QatProvider([QuantizationRule(weight_qtype="int4")]), torch.zeros(1, 6))
    x = torch.randn(4, 6)
    params = {k: v.detach().clone() for k, v in q.named_parameters()}

    def f(p, x):
        return functional_call(q, p, (x,))

    assert_same(torch.compile(f, fullgraph=True, backend=backend)(params, x), q(x), "forward")
    grads = torch.compile(grad(lambda p, x: f(p, x).square().sum()), backend=backend)(params, x)
    q.zero_grad()
    q(x).square().sum().backward()
    for name, p in q.named_parameters():
        assert_same(grads[name], p.grad, name)
    torch._dynamo.reset()


def test_vmap_update_quant_stat_refuses_mixed_and_empty_batches():
    ops = torch.ops.qwix

    def update(n, s, c):
        ops.update_quant_stat(n, [s], [c], [0], 1)
        return c

    cal = torch.ones(3, 2, 4)
    with pytest.raises(ValueError, match=r"count and sums batched differently \(in_dims \[0, None\]\)"):
        vmap(update, in_dims=(0, None, 0))(torch.zeros(3, dtype=torch.int32), torch.zeros(1, 4), cal)
    with pytest.raises(ValueError, match=r"vmap of qwix::calibrate over a batch of size 0"):
        vmap(lambda x: ops.calibrate(x, "absmax", [], [], []))(torch.ones(0, 4))


# ------------------------------------------------------------------------------------------------
# The mask's bit order under vmap: each sample's bits follow that sample's input layout
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["fake_quant", "with_scale"])
def test_vmap_grad_masks_transposed_samples(op):
    """Per-sample inputs that are transposed views: the vmap rule's output is a row-major batch, while each
    sample's mask bits follow its (transposed) input."""
    xs, gs = make_input((5, 6, 4), 15), make_input((5, 4, 6), 16)
    scale = torch.tensor(0.01)  # range +-1.27: clips some
    if op == "fake_quant":
        f = lambda a: qwix.fake_quant(a, "int8", calibration_method="absmax,0.5")  # noqa: E731
        mask = lambda a: ref.ref_grad_mask(a, "int8", "absmax,0.5", (), None)  # noqa: E731
    else:
        f = lambda a: qwix.fake_quant_with_scale(a, scale, "int8", clip_gradient=True)  # noqa: E731
        mask = lambda a: ref.ref_with_scale_mask(a, scale, "int8", None, True)  # noqa: E731
    per_sample = vmap(grad(lambda a, g: (f(a.t()) * g).sum()))(xs, gs)
    expected = torch.stack([torch.where(mask(x.t()), g, torch.zeros_like(g)).t() for x, g in zip(xs, gs)])
    assert not mask(xs[0].t()).all()
    assert_same(per_sample, expected)
    # the tangent too
    _, tangents = vmap(lambda a, t: jvp(lambda b: f(b.t()), (a,), (t,)))(xs, xs)
    assert_same(tangents, torch.stack([torch.where(mask(x.t()), x.t(), torch.zeros_like(x.t())) for x in xs]))


def test_vmap_grad_with_layouts_that_need_a_copy():
    """The incoming gradient or the input in another layout than the mask's order (a batched copy)."""
    case = ("int8", "absmax,0.6", (), None, None)
    fq = _fq(case)
    xs, gs = make_input((3, 4, 6), 17), make_input((3, 6, 4), 18)
    # the upstream gradient arrives transposed
    per_sample = vmap(grad(lambda a, g: (fq(a).t() * g).sum()))(xs, gs)
    assert_same(per_sample, torch.stack([_masked(g.t(), x, case) for x, g in zip(xs, gs)]), "transposed grad")
    # the cotangent batched along its last axis
    cot = make_input((4, 6, 3), 19)
    out = vmap(lambda a, b: vjp(fq, a)[1](b)[0], in_dims=(0, 2))(xs, cot)
    assert_same(out, torch.stack([_masked(cot[..., i], x, case) for i, x in enumerate(xs)]), "vjp in_dims=2")
    # second order on a sliced (non-dense) input
    x = make_input((4, 6), 20)[:, :3]
    expected = torch.diag(2 * _masked(torch.ones(4, 3), x, case).reshape(-1)).reshape(4, 3, 4, 3)
    assert_same(hessian(lambda a: fq(a).square().sum())(x), expected, "hessian of a slice")


def test_per_sample_gradients_through_a_transposed_activation():
    """An attention-like product h @ h^T with a clipping activation rule: per-sample gradients by vmap(grad)
    equal one eager backward per sample."""

    class Gram(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 6)

        def forward(self, x):
            h = self.proj(x)
            return h @ h.transpose(-1, -2)

    rules = [QuantizationRule(weight_qtype="int4", act_qtype="int8", act_calibration_method="absmax,0.5")]
    model = Gram()
    with torch.no_grad():
        model.proj.weight.copy_(_integer_mlp(6)[0].weight[:6])
        model.proj.bias.copy_(torch.arange(6.0) - 3)
    q = qwix.quantize_model(model, QatProvider(rules), torch.zeros(2, 3, 6))
    xs = torch.randint(-3, 4, (4, 3, 6)).float()
    params = {k: v.detach().clone() for k, v in q.named_parameters()}
    per_sample = vmap(grad(lambda p, x: functional_call(q, p, (x,)).sum()), in_dims=(None, 0))(params, xs)
    for i, x in enumerate(xs):
        q.zero_grad()
        q(x).sum().backward()
        for name, p in q.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-5, atol=1e-4, msg=f"sample {i} {name}")


# ------------------------------------------------------------------------------------------------
# The fake-quant ops' vmap rules: the whole batch in one call, equal to the per-sample loop
# ------------------------------------------------------------------------------------------------

VMAP_CASES = [
    ("int8", "absmax", (), None),
    ("int4", "absmax,0.7", (-1,), None),
    ("uint8", "minmax", (0,), None),
    ("float8_e4m3fn", "rms,2", (), {-1: 4}),
    ("nf4", "absmax", (1,), {0: 2}),
    ("int8", "fixed,-1,2", (), None),
    ("mxfp8", "absmax", (), None),
    ("nvfp4", "absmax", (), None),  # (the loop: one tensor scale per sample)
]


@pytest.mark.parametrize("bdim", [0, 2])
@pytest.mark.parametrize("qtype,method,axes,tiles", VMAP_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}" for c in VMAP_CASES])
def test_vmap_rule_equals_the_loop(qtype, method, axes, tiles, bdim, monkeypatch):
    from qwix_torch import _vmap

    if qtype != "nvfp4":  # the whole-batch call, not the rule's own loop
        monkeypatch.setattr(_vmap, "_loop", lambda *a, **k: pytest.fail("the rule ran its loop"))
    xs = make_input((3, 4, 5, 32), stable_seed(qtype, method))
    xs = xs.movedim(0, bdim)  # the batch at axis `bdim`
    case = (qtype, method, axes, tiles, None)
    fq = _fq(case)
    samples = [xs.select(bdim, i) for i in range(3)]
    assert_same(vmap(fq, in_dims=bdim)(xs), torch.stack([fq(x) for x in samples]), "values")
    g = make_input(samples[0].shape, 21)
    sample_grad = grad(lambda a: (fq(a) * g).sum())  # (checked against the reference above)
    per_sample = vmap(sample_grad, in_dims=bdim)(xs)
    assert_same(per_sample, torch.stack([sample_grad(x) for x in samples]), "per-sample grad")


@pytest.mark.parametrize("shape", [(4, 6), (3, 5)], ids=["whole-bytes", "partial-byte"])
def test_vmap_masks_are_per_sample_row_major(shape):
    xs = make_input((4,) + shape, 22).transpose(1, 2)  # samples are transposed views
    forward = torch.ops.qwix.fake_quant_forward
    ys, masks = vmap(lambda a: forward(a, "int8", "absmax,0.6", [], [], [], True))(xs)
    for x, y, mask in zip(xs, ys, masks):
        y1, m1 = forward(x.contiguous(), "int8", "absmax,0.6", [], [], [], True)
        assert_same(y, y1)
        assert torch.equal(mask, m1)
    g = make_input(xs.shape, 23)
    back = vmap(torch.ops.qwix.fake_quant_backward)(g, masks)
    expected = [torch.where(ref.ref_grad_mask(x, "int8", "absmax,0.6", (), None), gi, 0.0) for x, gi in zip(xs, g)]
    assert_same(back, torch.stack(expected))


def test_vmap_backward_with_one_mask_for_every_sample():
    """A weight's mask (made outside vmap) applied to per-sample gradients, in the weight's own layout."""
    case = ("int4", "absmax,0.8", (0,), None, None)
    fq = _fq(case)
    w = make_input((6, 8), 24).t()  # a transposed weight: its mask bits follow its memory order
    xs = make_input((5, 8), 25)
    per_sample = vmap(grad(lambda w, x: (x @ fq(w)).square().sum()), in_dims=(None, 0))(w, xs)
    for i, x in enumerate(xs):
        wi = w.clone().requires_grad_()
        (x @ fq(wi)).square().sum().backward()
        torch.testing.assert_close(per_sample[i], wi.grad, rtol=1e-6, atol=1e-6)
    assert not ref.ref_grad_mask(w, "int4", "absmax,0.8", (0,), None).all()


@pytest.mark.parametrize("batched", ["x", "scale", "x+scale", "x+scale+zp"])
def test_vmap_with_scale_rule(batched):
    xs = make_input((3, 4, 6), 26) * 3
    scales = torch.tensor([0.02, 0.01, 0.05]).reshape(3, 1, 1).expand(3, 4, 1).clone()
    zps = torch.tensor([0.0, 3.0, -2.0]).reshape(3, 1, 1).expand(3, 4, 1).clone()
    x_dim = 0 if "x" in batched else None
    s_dim = 0 if "scale" in batched else None
    z_dim = 0 if "zp" in batched else None
    x_in = xs if x_dim == 0 else xs[0]
    s_in = scales if s_dim == 0 else scales[0]
    z_in = zps if z_dim == 0 else (zps[0] if "zp" in batched else None)

    def f(x, s, z):
        return qwix.fake_quant_with_scale(x, s, "int8", zero_point=z, clip_gradient=True)

    out = vmap(f, in_dims=(x_dim, s_dim, z_dim))(x_in, s_in, z_in)
    loop = [f(x_in[i] if x_dim == 0 else x_in, s_in[i] if s_dim == 0 else s_in,
              z_in if z_dim is None else z_in[i]) for i in range(3)]
    assert_same(out, torch.stack(loop))


def test_vmap_rules_report_the_ops_errors():
    xs = make_input((3, 4, 6), 27)
    with pytest.raises(IndexError, match=r"channelwise axis 2 is out of range for a tensor of rank 2"):
        vmap(lambda a: qwix.fake_quant(a, "int8", channelwise_axes=(2,)))(xs)
    with pytest.raises(ValueError, match=r"vmap of qwix::fake_quant over a batch of size 0"):
        vmap(lambda a: torch.ops.qwix.fake_quant(a, "int8"))(torch.ones(0, 4))


def test_per_sample_gradients_take_no_fallback():
    """No op of a QAT model falls back to PyTorch's per-sample loop (its 'performance drop' warning)."""
    import warnings

    rules = [QuantizationRule(weight_qtype="int4", act_qtype="int8", act_calibration_method="absmax,0.8")]
    q = qwix.quantize_model(_integer_mlp(7), QatProvider(rules), torch.zeros(2, 6))
    params = {k: v.detach().clone() for k, v in q.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vmap(grad(lambda p, x: functional_call(q, p, (x[None],)).sum()), in_dims=(None, 0))(params, torch.randn(4, 6))
    assert not [w for w in caught if "qwix::" in str(w.message)], [str(w.message) for w in caught]


def test_bench_func_quick_runs(tmp_path):
    import json
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    import bench_func

    out = tmp_path / "b.json"
    assert bench_func.main(["--batch", "4", "--width", "16", "--rounds", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]["4"]
    assert set(res["median_ms"]) == {"fp32 vmap", "qwix vmap", "qwix vmap loop", "qwix eager"}
    from qwix_torch import _vmap
    assert _vmap._FORCE_LOOP is False


def test_vmap_shared_gradient_meets_per_sample_masks():
    """A cotangent shared by every sample (vjp), reaching per-sample masks of transposed samples."""
    case = ("int8", "absmax,0.5", (), None, None)
    fq = _fq(case)
    for shape in [(4, 8, 6), (4, 5, 3)]:  # whole bytes, and n % 8 != 0
        xs = make_input(shape, 28).transpose(1, 2)
        c = make_input(xs.shape[1:], 29)
        out = vmap(lambda x: vjp(fq, x)[1](c)[0])(xs)
        assert_same(out, torch.stack([_masked(c, x, case) for x in xs]), f"{shape}")
    # per-sample scales, one transposed x and one cotangent for all
    x, c = make_input((8, 6), 30).t(), make_input((6, 8), 31)
    scales = torch.tensor([0.005, 0.01, 0.02, 0.03])
    out = vmap(lambda s: vjp(lambda t: qwix.fake_quant_with_scale(t, s, "int8", clip_gradient=True), x)[1](c)[0])(scales)
    expected = [torch.where(ref.ref_with_scale_mask(x, s, "int8", None, True), c, torch.zeros_like(c)) for s in scales]
    assert_same(out, torch.stack(expected))


def test_vmap_with_scale_mixed_parameters_and_errors():
    xs = make_input((4, 6, 8), 32)
    scales = torch.rand(4, 6, 1) * 0.05 + 0.01
    zp = torch.randint(0, 255, (6, 1)).float()  # shared, while the scale is per sample

    def f(x, s):
        return qwix.fake_quant_with_scale(x, s, "uint8", zero_point=zp)

    assert_same(vmap(f)(xs, scales), torch.stack([f(x, s) for x, s in zip(xs, scales)]))
    with pytest.raises(ValueError, match=r"scale of shape \[4, 1, 1\] has more dims than the input of shape \[6, 8\]"):
        vmap(lambda x: qwix.fake_quant_with_scale(x, torch.full((4, 1, 1), 0.1), "int8"))(xs)
    with pytest.raises(ValueError, match=r"qtype 'mxfp8' quantizes blocks of 32 elements along the last axis"):
        vmap(lambda s: qwix.fake_quant(s, "mxfp8"))(make_input((32,), 33))
