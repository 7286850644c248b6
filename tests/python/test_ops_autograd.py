"""Straight-through gradients, masks, double backward and saved-tensor memory of the qwix ops."""
import math

import pytest
import torch

import qwix_torch as qwix
import reference as ref
from _helpers import assert_same, make_input, stable_seed

METHODS = ["absmax", "absmax,0.8", "absmax,1.5", "minmax", "minmax,0.9", "rms,3", "rms,0.5", "fixed,2", "fixed,-1,3"]

CASES = [
    ((7, 13), (), None),
    ((7, 13), (0,), None),
    ((3, 5, 16), (0, 1), None),
    ((3, 5, 16), (2,), {0: 1}),
    ((4, 12), (), {-1: 4}),
    ((2, 3, 4, 5), (1,), None),
    ((1,), (), None),
    ((0, 3), (), None),
]


def case_id(c):
    shape, axes, tiles = c
    return f"{'x'.join(map(str, shape))}-ch{list(axes)}-t{tiles or {}}"


def expected_grad(g, mask):
    return torch.where(mask, g, torch.zeros_like(g))


def fq(x, qtype, method, axes=(), tiles=None, clip_gradient=None):
    return qwix.fake_quant(x, qtype, calibration_method=method, channelwise_axes=axes, tiled_axes=tiles,
                           clip_gradient=clip_gradient)


PAIRS = [(q, m) for q in ["int8", "uint4", "float8_e4m3fn", "nf4"] for m in METHODS
         if ref.get_qtype(q).is_integer or ref.parse_method(m).symmetric]


@pytest.mark.parametrize("clip_gradient", [None, True, False])
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("qtype,method", PAIRS)
def test_fake_quant_gradient(qtype, method, case, clip_gradient):
    shape, axes, tiles = case
    seed = stable_seed(qtype, method, case)
    x = make_input(shape, seed).requires_grad_()
    g = make_input(shape, seed + 1)
    y = fq(x, qtype, method, axes, tiles, clip_gradient)
    y.backward(g)
    mask = ref.ref_grad_mask(x, qtype, method, axes, tiles, clip_gradient)
    assert_same(x.grad, expected_grad(g, mask), f"{qtype} {method} {case} clip_gradient={clip_gradient}")


def test_gradient_hand_cases():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], requires_grad=True)
    fq(x, "int8", "absmax,0.5").sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 0]
    x.grad = None
    fq(x, "int8", "absmax").sum().backward()
    assert x.grad.tolist() == [1, 1, 1, 1, 1]
    x.grad = None
    fq(x, "int8", "fixed,-1,1.5").sum().backward()  # range [-1, 1.5]
    assert x.grad.tolist() == [0, 1, 1, 1, 0]
    x.grad = None
    fq(x, "int8", "absmax,0.5", clip_gradient=False).sum().backward()
    assert x.grad.tolist() == [1, 1, 1, 1, 1]
    x.grad = None
    fq(x, "uint8", "minmax,0.5").sum().backward()  # range [min(-1, 0), max(1, 0)]
    assert x.grad.tolist() == [0, 1, 1, 1, 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("method", ["absmax", "absmax,0.8", "minmax,0.9", "rms,3"])
def test_fake_quant_gradient_dtypes(dtype, method):
    x = make_input((6, 20), stable_seed(method, str(dtype))).to(dtype).requires_grad_()
    g = make_input((6, 20), 99).to(dtype)
    fq(x, "int8", method, (0,)).backward(g)
    assert x.grad.dtype == dtype
    assert_same(x.grad, expected_grad(g, ref.ref_grad_mask(x, "int8", method, (0,))))


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
@pytest.mark.parametrize("grad_layout", ["contiguous", "transposed", "expanded"])
def test_gradient_noncontiguous(layout, grad_layout):
    base = make_input((2, 6, 8, 4), stable_seed(layout))
    if layout == "transposed":
        x = base.transpose(1, 3)
    elif layout == "sliced":
        x = base[:, ::2]
    else:
        x = base.to(memory_format=torch.channels_last)
    x = x.detach().requires_grad_()
    shape = tuple(x.shape)
    if grad_layout == "contiguous":
        g = make_input(shape, 5)
    elif grad_layout == "transposed":
        g = make_input(shape[::-1], 5).permute(*reversed(range(len(shape))))
    else:
        g = make_input(shape[-1:], 5).expand(shape)
    for method, axes in [("absmax,0.8", (0,)), ("minmax,0.9", (1, 3)), ("rms,3", ())]:
        x.grad = None
        fq(x, "int8", method, axes).backward(g)
        assert_same(x.grad, expected_grad(g, ref.ref_grad_mask(x, "int8", method, axes)), f"{layout} {method}")


# ------------------------------------------------------------------------------------------------
# fake_quant_with_scale
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip_gradient", [False, True])
@pytest.mark.parametrize("qtype,with_zp", [(q, z) for q in ["int8", "uint8", "int4", "float8_e5m2", "float4_e2m1fn", "nf4"]
                                           for z in (False, True) if not z or ref.get_qtype(q).is_integer])
def test_with_scale_gradient(qtype, with_zp, clip_gradient):
    q = ref.get_qtype(qtype)
    x = (make_input((5, 12), stable_seed(qtype)) * 3).requires_grad_()
    scale = torch.tensor([[0.01], [0.02], [0.05], [0.5], [1.0]]) * (8.0 / q.bound)
    zp = torch.tensor([[0.0], [2.0], [-1.0], [q.qmin], [q.qmax]]).clamp(q.qmin, q.qmax) if with_zp else None
    g = make_input((5, 12), 3)
    y = qwix.fake_quant_with_scale(x, scale, qtype, zero_point=zp, clip_gradient=clip_gradient)
    y.backward(g)
    mask = ref.ref_with_scale_mask(x, scale, qtype, zp, clip_gradient)
    if clip_gradient:
        assert not mask.all()  # the test data exercises the mask
    assert_same(x.grad, expected_grad(g, mask))


def test_scale_and_zero_point_get_no_gradient():
    x = make_input((4, 8), 1).requires_grad_()
    scale = torch.full((4, 1), 0.05, requires_grad=True)
    zp = torch.full((4, 1), 3.0, requires_grad=True)
    y = qwix.fake_quant_with_scale(x, scale, "int8", zero_point=zp, clip_gradient=True)
    y.sum().backward()
    for t in (scale, zp):
        assert t.grad is None or not t.grad.any()
    assert x.grad is not None
    # only the scale requires grad
    x2 = make_input((4, 8), 1)
    scale2 = torch.full((4, 1), 0.05, requires_grad=True)
    y2 = qwix.fake_quant_with_scale(x2, scale2, "int8")
    if y2.requires_grad:
        y2.sum().backward()
        assert scale2.grad is None or not scale2.grad.any()


def test_dynamic_scale_is_not_differentiated():
    """The dynamic scale is treated as a constant: d/dx of sum(fake_quant(x)) is the STE mask,
    not including any path through the calibration."""
    x = make_input((3, 7), 2).double().requires_grad_()
    y = fq(x, "int4", "absmax")
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(gx, torch.ones_like(gx))


def test_no_grad_and_detached_inputs():
    x = make_input((3, 7), 3)
    y = fq(x, "int8", "absmax,0.8")
    assert not y.requires_grad and y.grad_fn is None
    with torch.no_grad():
        y = fq(x.requires_grad_(), "int8", "absmax,0.8")
    assert not y.requires_grad


# ------------------------------------------------------------------------------------------------
# The internal ops: fake_quant_forward / fake_quant_with_scale_forward / fake_quant_backward
# ------------------------------------------------------------------------------------------------


def _layouts(shape):
    base = make_input(shape, 7)
    yield "contiguous", base
    yield "transposed", base.transpose(0, -1)
    if len(shape) == 4:
        yield "channels_last", base.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(5, 13), (3, 1, 7), (2, 6, 5, 4), (1,), (9,)])
@pytest.mark.parametrize("method,axes", [("absmax,0.8", (0,)), ("minmax,0.9", ()), ("rms,3", (-1,)), ("fixed,-1,3", ())])
def test_forward_op_mask_bits(shape, method, axes):
    for name, x in _layouts(shape):
        y, mask = torch.ops.qwix.fake_quant_forward(
            x, qtype="int8", calibration_method=method, channelwise_axes=list(axes), tiled_axes=[], tile_sizes=[],
            with_mask=True)
        assert_same(y, ref.ref_fake_quant(x, "int8", method, axes), name)
        assert mask.dtype == torch.uint8 and mask.numel() == math.ceil(x.numel() / 8), name
        bits = ref.unpack_mask(mask, x.numel())
        want = ref.mask_in_memory_order(ref.ref_range_mask(x, method, axes), x)
        assert torch.equal(bits, want), f"{name}: mask bits {bits.int().tolist()} != {want.int().tolist()}"
        # padding bits of the last byte are whatever; the backward op must use only the first numel bits
        y2, mask2 = torch.ops.qwix.fake_quant_forward(
            x, qtype="int8", calibration_method=method, channelwise_axes=list(axes), tiled_axes=[], tile_sizes=[],
            with_mask=False)
        assert_same(y2, y, f"{name} without mask")
        assert mask2.dtype == torch.uint8


@pytest.mark.parametrize("qtype,zp", [("int8", None), ("int8", 4.0), ("uint4", 2.0), ("float8_e4m3fn", None), ("nf4", None)])
def test_with_scale_forward_op_mask_bits(qtype, zp):
    x = make_input((6, 11), 8) * 3
    scale = torch.linspace(0.001, 0.5, 6).reshape(6, 1) * (8 / ref.get_qtype(qtype).bound)
    zpt = None if zp is None else torch.full((6, 1), zp)
    for name, xx in [("contiguous", x), ("transposed", x.t().contiguous().t())]:
        y, mask = torch.ops.qwix.fake_quant_with_scale_forward(xx, scale, zpt, qtype, with_mask=True)
        assert_same(y, ref.ref_fake_quant_with_scale(xx, scale, qtype, zpt), name)
        assert mask.dtype == torch.uint8 and mask.numel() == math.ceil(xx.numel() / 8)
        want = ref.mask_in_memory_order(ref.ref_with_scale_mask(xx, scale, qtype, zpt, True), xx)
        assert torch.equal(ref.unpack_mask(mask, xx.numel()), want), name


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 100, 1001])
def test_backward_op(n):
    g = torch.Generator().manual_seed(n)
    bits = torch.rand(n, generator=g) > 0.4
    mask = ref.pack_mask(bits)
    grad = torch.randn(n, generator=g)
    out = torch.ops.qwix.fake_quant_backward(grad, mask)
    assert_same(out, expected_grad(grad, bits))
    # padding bits set: must not matter
    mask_pad = mask.clone()
    mask_pad[-1] |= torch.tensor(0xFF << (n % 8) & 0xFF if n % 8 else 0, dtype=torch.uint8)
    assert_same(torch.ops.qwix.fake_quant_backward(grad, mask_pad), out)
    # 2-D grad, memory order = row-major
    if n % 7 == 0:
        g2 = grad.reshape(7, -1)
        assert_same(torch.ops.qwix.fake_quant_backward(g2, mask), expected_grad(g2, bits.reshape(7, -1)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_backward_op_dtypes(dtype):
    bits = torch.rand(37) > 0.5
    grad = torch.randn(37).to(dtype)
    assert_same(torch.ops.qwix.fake_quant_backward(grad, ref.pack_mask(bits)), expected_grad(grad, bits))


def test_backward_op_gradcheck():
    bits = torch.rand(3, 7) > 0.5
    mask = ref.pack_mask(bits)
    grad = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    fn = lambda t: torch.ops.qwix.fake_quant_backward(t, mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (grad,))
    assert torch.autograd.gradgradcheck(fn, (grad,))
    # its jacobian is diag(mask)
    (jac,) = torch.autograd.functional.jacobian(fn, (grad,))
    assert torch.equal(jac.reshape(21, 21), torch.diag(bits.reshape(-1).double()))


def _away_from_boundaries(shape, seed):
    """float64 data whose elements are not within 1e-3 of a mask boundary or of each other's
    magnitude (finite differences then never flip a mask bit)."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    vals = (torch.randperm(4 * n, generator=g)[:n].double() + 1) / (4 * n) * 2 - 1
    return (vals + 0.001).reshape(shape)


@pytest.mark.parametrize("method", ["absmax", "absmax,0.5", "minmax,0.7", "rms,1", "fixed,0.6", "fixed,-0.3,0.5"])
@pytest.mark.parametrize("axes", [(), (0,)])
def test_gradgradcheck_fake_quant(method, axes):
    x = _away_from_boundaries((3, 5), stable_seed(method)).requires_grad_()
    gy = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    fn = lambda t: fq(t, "int8", method, axes)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x,), (gy,), eps=1e-6, atol=1e-5)
    # the first derivative is the straight-through mask
    (gx,) = torch.autograd.grad(fn(x), x, gy)
    assert_same(gx, expected_grad(gy.detach(), ref.ref_grad_mask(x, "int8", method, axes)))


@pytest.mark.parametrize("clip_gradient", [False, True])
def test_gradgradcheck_fake_quant_with_scale(clip_gradient):
    x = _away_from_boundaries((4, 5), 3).mul(3).requires_grad_()
    scale = torch.tensor([[0.01], [0.02], [0.005], [0.1]], dtype=torch.float64)
    gy = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    fn = lambda t: qwix.fake_quant_with_scale(t, scale, "int8", clip_gradient=clip_gradient)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x,), (gy,), eps=1e-6, atol=1e-5)


def test_double_backward_values():
    x = make_input((4, 6), 4).requires_grad_()
    gy = torch.randn(4, 6, requires_grad=True)
    (gx,) = torch.autograd.grad(fq(x, "int8", "absmax,0.6"), x, gy, create_graph=True)
    v = torch.randn(4, 6)
    (ggy,) = torch.autograd.grad(gx, gy, v)
    assert_same(ggy, expected_grad(v, ref.ref_grad_mask(x, "int8", "absmax,0.6")))


# ------------------------------------------------------------------------------------------------
# Memory saved for backward
# ------------------------------------------------------------------------------------------------


class SavedBytes:
    def __init__(self):
        self.bytes = 0
        self.tensors = []

    def pack(self, t):
        self.bytes += t.numel() * t.element_size()
        self.tensors.append((tuple(t.shape), t.dtype))
        return t

    @staticmethod
    def unpack(t):
        return t


@pytest.mark.parametrize("shape", [(64, 100), (7, 13), (3, 5, 9)])
@pytest.mark.parametrize("kind,masked", [
    ("absmax", False), ("minmax", False), ("absmax,0.8", True), ("rms,3", True), ("fixed,2", True),
    ("absmax|clip", True), ("minmax,0.9|noclip", False), ("scale", False), ("scale|clip", True),
])
def test_saved_tensor_bytes(shape, kind, masked):
    x = make_input(shape, 6).requires_grad_()
    rec = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(rec.pack, rec.unpack):
        method, _, opt = kind.partition("|")
        clip = {"clip": True, "noclip": False}.get(opt)
        if method == "scale":
            y = qwix.fake_quant_with_scale(x, torch.tensor(0.01), "int8", clip_gradient=bool(clip))
        else:
            y = fq(x, "int8", method, (0,), clip_gradient=clip)
    if masked:
        assert rec.bytes <= math.ceil(x.numel() / 8), f"saved {rec.tensors}"
    else:
        assert rec.bytes == 0, f"identity backward must save nothing, saved {rec.tensors}"
    g = torch.randn(shape)
    y.backward(g)
    if method == "scale":
        mask = ref.ref_with_scale_mask(x, torch.tensor(0.01), "int8", None, bool(clip))
    else:
        mask = ref.ref_grad_mask(x, "int8", method, (0,), clip_gradient=clip)
    assert_same(x.grad, expected_grad(g, mask))
