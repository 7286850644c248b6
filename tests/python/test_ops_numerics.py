"""Bit-exact numerics of the qwix ops against the independent reference (DESIGN section 2)."""
import math

import numpy as np
import pytest
import torch

import qwix_torch as qwix
import reference as ref
from _helpers import assert_same, make_input, nextafter, stable_seed

METHODS = ["absmax", "absmax,0.8", "minmax", "minmax,0.9", "rms,3", "fixed,2", "fixed,-1,3"]

# (shape, channelwise_axes, tiled_axes)
CASES = [
    ((7, 13), (), None),
    ((7, 13), (0,), None),
    ((7, 13), (-1,), None),
    ((3, 5, 64), (0, 2), None),
    ((3, 5, 64), (0, 1), None),  # all but last (per token)
    ((3, 5, 64), (), {-1: 4}),
    ((6, 8), (0,), {1: 0.5}),
    ((4, 6), (1,), {0: 2}),
    ((2, 3, 4, 5), (1,), None),
    ((2, 3, 4, 8), (0, 1), {-1: 4}),
    ((33,), (), {0: 11}),
    ((1,), (), None),
    ((), (), None),
    ((0, 5), (), None),
    ((0, 5), (-1,), None),
    ((1, 1, 9), (0, 1), None),
    ((4, 12, 6), (2,), {1: 3}),  # tiles in the middle, a kept axis inside
    ((8, 12), (), {0: 4, 1: 3}),  # 2-D blocks
    ((5, 7, 3), (0, 2), {1: 7}),
]


def case_id(c):
    shape, axes, tiles = c
    return f"{'x'.join(map(str, shape)) or 'scalar'}-ch{list(axes)}-t{tiles or {}}"


def is_valid(qtype, method):
    return ref.get_qtype(qtype).is_integer or ref.parse_method(method).symmetric


def run_fake_quant(x, qtype, method, axes, tiles):
    return qwix.fake_quant(x, qtype, calibration_method=method, channelwise_axes=axes, tiled_axes=tiles)


# ------------------------------------------------------------------------------------------------
# fake_quant vs reference
# ------------------------------------------------------------------------------------------------


# asymmetric methods with float qtypes are errors (test_ops_errors)
VALID_PAIRS = [(q, m) for q in ref.ALL_QTYPES for m in METHODS if is_valid(q, m)]


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("qtype,method", VALID_PAIRS)
def test_fake_quant_float32(qtype, method, case):
    shape, axes, tiles = case
    x = make_input(shape, stable_seed(qtype, method, case))
    y = run_fake_quant(x, qtype, method, axes, tiles)
    assert_same(y, ref.ref_fake_quant(x, qtype, method, axes, tiles), f"{qtype} {method} {case}")


@pytest.mark.parametrize("alias,name", sorted(ref.ALIASES.items()))
def test_qtype_aliases(alias, name):
    x = make_input((5, 16), 1)
    y = run_fake_quant(x, alias, "absmax", (0,), None)
    assert_same(y, run_fake_quant(x, name, "absmax", (0,), None))
    assert_same(y, ref.ref_fake_quant(x, name, "absmax", (0,)))


@pytest.mark.parametrize("method,same_as", [("AbsMax,0.8", "absmax,0.8"), ("MINMAX", "minmax"), ("rms", "rms,1"), ("Fixed,2", "fixed,2")])
def test_method_case_insensitive_and_defaults(method, same_as):
    x = make_input((6, 10), 2)
    y = run_fake_quant(x, "int8", method, (0,), None)
    assert_same(y, run_fake_quant(x, "int8", same_as, (0,), None))
    assert_same(y, ref.ref_fake_quant(x, "int8", same_as, (0,)))


NONCONTIG_PARAMS = [
    ("int8", "absmax", (0,), None),
    ("int4", "minmax,0.9", (-1,), None),
    ("uint8", "minmax", (), None),
    ("float8_e4m3fn", "rms,3", (1,), None),
    ("nf4", "absmax,0.8", (), {0: 4}),
    ("int8", "absmax", (), {1: 0.5}),
    ("float4_e2m1fn", "absmax", (0,), {1: 2}),
    ("int3", "fixed,-1,3", (0,), None),
]


@pytest.mark.parametrize("qtype,method,axes,tiles", NONCONTIG_PARAMS)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "sliced_rows"])
def test_fake_quant_noncontiguous(qtype, method, axes, tiles, layout):
    base = make_input((12, 16), stable_seed(qtype, method, layout))
    if layout == "transposed":
        x = base.t()  # (16, 12), dense but not contiguous
    elif layout == "sliced":
        x = base[:, ::2]  # (12, 8), not dense
    else:
        x = base[::3]  # (4, 16)
    if tiles and 0 in tiles and x.shape[0] % tiles[0]:
        tiles = {0: 2}
    assert not x.is_contiguous() or layout == "sliced_rows"
    y = run_fake_quant(x, qtype, method, axes, tiles)
    assert_same(y, ref.ref_fake_quant(x, qtype, method, axes, tiles), f"{layout}")
    assert_same(y, run_fake_quant(x.contiguous(), qtype, method, axes, tiles), f"{layout} vs contiguous")


@pytest.mark.parametrize("qtype,method,axes,tiles", [
    ("int8", "absmax", (1,), None),
    ("int8", "absmax", (0,), None),
    ("int4", "minmax", (0, 1), None),
    ("float8_e5m2", "absmax,0.8", (), {1: 1}),
    ("int8", "rms,3", (3,), {1: 3}),
    ("uint4", "minmax,0.9", (), None),
])
def test_fake_quant_channels_last(qtype, method, axes, tiles):
    x = make_input((2, 6, 5, 4), stable_seed(qtype, method, axes)).to(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    y = run_fake_quant(x, qtype, method, axes, tiles)
    assert_same(y, ref.ref_fake_quant(x, qtype, method, axes, tiles))
    assert_same(y, run_fake_quant(x.contiguous(), qtype, method, axes, tiles))


DTYPE_PARAMS = [
    ("int8", "absmax", (7, 13), (0,), None),
    ("int4", "minmax,0.9", (3, 5, 64), (), {-1: 4}),
    ("uint8", "minmax", (7, 13), (-1,), None),
    ("float8_e4m3fn", "absmax,0.8", (3, 5, 64), (0, 1), None),
    ("float8_e5m2", "rms,3", (7, 13), (), None),
    ("float4_e2m1fn", "absmax", (6, 8), (0,), {1: 0.5}),
    ("nf4", "absmax", (6, 8), (0,), None),
    ("int16", "fixed,-1,3", (7, 13), (), None),
    ("int2", "fixed,2", (7, 13), (0,), None),
    ("int8", "rms,3", (2, 3, 4, 5), (1,), None),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qtype,method,shape,axes,tiles", DTYPE_PARAMS)
def test_fake_quant_half_dtypes(dtype, qtype, method, shape, axes, tiles):
    """Computed in fp32 (the input upcast exactly), returned in the input dtype."""
    x = make_input(shape, stable_seed(qtype, method, str(dtype)), dtype)
    y = run_fake_quant(x, qtype, method, axes, tiles)
    want = ref.ref_fake_quant(x.float(), qtype, method, axes, tiles).to(dtype)
    assert_same(y, want)
    assert_same(y, ref.ref_fake_quant(x, qtype, method, axes, tiles))


@pytest.mark.parametrize("qtype,method,shape,axes,tiles", DTYPE_PARAMS)
def test_fake_quant_float64(qtype, method, shape, axes, tiles):
    """float64 in, float64 out, computed in float32. Values that are not float32 values are
    rounded to float32 first (for absmax/minmax/fixed that is the same as rounding the group's
    statistics); rms uses fp32-representable data, where both readings agree."""
    g = torch.Generator().manual_seed(stable_seed(qtype, method, "f64"))
    if method.startswith("rms"):
        x = make_input(shape, 5).double()
    else:
        x = make_input(shape, 5).double() + torch.randn(shape, generator=g, dtype=torch.float64) * 1e-9
    y = run_fake_quant(x, qtype, method, axes, tiles)
    assert y.dtype == torch.float64
    assert_same(y, ref.ref_fake_quant(x.float(), qtype, method, axes, tiles).double())


def test_fractional_tiles_round_like_python():
    """A float tile is round(dim * f) elements (Python's round: half to even, as Qwix)."""
    x = make_input((3, 10), 12)
    assert_same(run_fake_quant(x, "int8", "absmax", (0,), {1: 0.25}), run_fake_quant(x, "int8", "absmax", (0,), {1: 2}))
    assert_same(run_fake_quant(x, "int8", "absmax", (), {1: 0.5}), ref.ref_fake_quant(x, "int8", "absmax", (), {1: 5}))
    # 1.0 is refused, as by rules: the C++ API, whose tiles are one number type, reads it as one element.
    with pytest.raises(ValueError, match=r"fractional tile 1.0 for axis 1 must be in \(0, 1\)"):
        run_fake_quant(x, "int8", "absmax", (0,), {1: 1.0})


def test_output_is_new_tensor_with_input_shape():
    x = make_input((4, 8), 3)
    x0 = x.clone()
    y = run_fake_quant(x, "int8", "absmax", (0,), None)
    assert y.shape == x.shape and y.dtype == x.dtype and y.data_ptr() != x.data_ptr()
    assert torch.equal(x, x0)  # input untouched


# ------------------------------------------------------------------------------------------------
# Ties, grids and hand cases
# ------------------------------------------------------------------------------------------------


def test_ties_round_half_to_even_dynamic():
    # absmax 127.5 -> int8 scale exactly 1
    x = torch.tensor([127.5, -3.5, 2.5, 0.5, -0.5, 1.5, -126.5, 100.25])
    y = run_fake_quant(x, "int8", "absmax", (), None)
    assert torch.equal(y, torch.tensor([127.0, -4.0, 2.0, 0.0, -0.0, 2.0, -126.0, 100.0]))
    assert_same(y, ref.ref_fake_quant(x, "int8"))


@pytest.mark.parametrize("qtype", ["int8", "int4", "float8_e4m3fn", "float4_e2m1fn", "nf4", "mxfp8"])
def test_a_zero_result_is_positive_zero(qtype):
    # Documented (README "Numerics"): as torch.fake_quantize_per_tensor_affine; the reference keeps -0.0.
    x = torch.tensor([[-1e-30, -0.0, 0.0, 1e-30] + [-1000.0] * 28])
    for y in (run_fake_quant(x, qtype, "absmax", (), None),
              qwix.fake_quant_with_scale(x, torch.full((), 100.0), qtype) if qtype != "mxfp8" else None):
        if y is not None:
            assert y[0, :4].view(torch.int32).tolist() == [0] * 4, (qtype, y[0, :4])


def test_hand_cases_scale_one():
    one = torch.ones(())
    cases = [
        ("int8", [1.2, 3.5, -127.5, 129, -1300], [1, 4, -128, 127, -128]),
        ("int4", [1.2, 3.5, 8, -1300], [1, 4, 7, -8]),
        ("uint8", [-1.2, 3.5, 129, 1300], [0, 4, 129, 255]),
    ]
    for qtype, xs, want in cases:
        y = qwix.fake_quant_with_scale(torch.tensor(xs), one, qtype)
        assert torch.equal(y, torch.tensor(want, dtype=torch.float32)), (qtype, y)


def test_minmax_uint8_round_trip():
    x = torch.arange(256, dtype=torch.float32) / 255
    y = run_fake_quant(x, "uint8", "minmax", (), None)
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)
    assert_same(y, ref.ref_fake_quant(x, "uint8", "minmax"))


def test_absmax_half_gradient_hand_case():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], requires_grad=True)
    qwix.fake_quant(x, "int8", calibration_method="absmax,0.5").sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def _format_grid(dtype):
    v = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    return torch.unique(v[torch.isfinite(v)])


GRIDS = {
    "float8_e4m3fn": lambda: _format_grid(torch.float8_e4m3fn),
    "float8_e5m2": lambda: _format_grid(torch.float8_e5m2),
    "float4_e2m1fn": lambda: torch.unique(torch.tensor(ref.E2M1_MAGNITUDES + [-m for m in ref.E2M1_MAGNITUDES])),
    "nf4": lambda: torch.tensor(ref.NF4_LEVELS),
}


@pytest.mark.parametrize("qtype", list(GRIDS))
def test_float_grids_scale_one(qtype):
    """Every grid value, the exact midpoints between neighbours (ties) and the fp32 values right
    next to them, beyond the range (saturation), and tiny values (subnormals)."""
    grid = GRIDS[qtype]()
    mids = ((grid[1:].double() + grid[:-1].double()) / 2).float()
    fmax = grid.max().item()
    tiny = torch.tensor([1e-30, -1e-30, 2.0**-10, 2.0**-17, -(2.0**-16), 2.0**-9 * 3, 1e-8])
    x = torch.cat([grid, mids, nextafter(mids, math.inf), nextafter(mids, -math.inf), tiny,
                   torch.tensor([fmax * 1.01, -fmax * 1.01, fmax * 1e3, -fmax * 1e3])])
    y = qwix.fake_quant_with_scale(x, torch.ones(()), qtype)
    assert_same(y, ref.ref_fake_quant_with_scale(x, torch.ones(()), qtype), qtype)
    assert torch.equal(y[: grid.numel()], grid)


def test_nf4_ties_go_to_lower_and_nearest_is_exact():
    """Around each exact midpoint of neighbouring NF4 levels: the fp32 value at or just below the
    true midpoint goes to the lower level, the one just above to the upper level."""
    levels = torch.tensor(ref.NF4_LEVELS)
    xs, want = [], []
    for i in range(15):
        lo, hi = levels[i].double().item(), levels[i + 1].double().item()
        mid = (lo + hi) / 2
        m32 = torch.tensor([mid], dtype=torch.float64).float()
        for c in [nextafter(m32, -math.inf), m32, nextafter(m32, math.inf)]:
            xs.append(c.item())
            want.append(lo if c.double().item() <= mid else hi)
    x = torch.tensor(xs)
    y = qwix.fake_quant_with_scale(x, torch.ones(()), "nf4")
    expected = torch.tensor(want, dtype=torch.float32)
    assert_same(ref.ref_fake_quant_with_scale(x, torch.ones(()), "nf4"), expected, "reference")
    assert_same(y, expected, "nf4 near midpoints (x = " + repr(xs) + ")")


def test_int16_and_int2_grids():
    x = torch.tensor([32767.4, 32767.6, -32768.5, -40000.0, 0.5, 1.5, -2.5])
    y = qwix.fake_quant_with_scale(x, torch.ones(()), "int16")
    assert torch.equal(y, torch.tensor([32767.0, 32767, -32768, -32768, 0, 2, -2]))
    x = torch.tensor([-3.0, -1.5, -0.5, 0.5, 1.2, 5.0])
    y = qwix.fake_quant_with_scale(x, torch.ones(()), "int2")
    assert torch.equal(y, torch.tensor([-2.0, -2, -0.0, 0, 1, 1]))


def test_zero_and_tiny_groups_get_scale_one():
    x = torch.zeros(3, 4)
    x[1] = 1e-25  # absmax / 127.5 < sqrt(FLT_MIN) -> scale 1 -> rounds to 0
    x[2, 0] = 3.0
    y = run_fake_quant(x, "int8", "absmax", (0,), None)
    assert_same(y, ref.ref_fake_quant(x, "int8", "absmax", (0,)))
    assert torch.equal(y[:2], torch.zeros(2, 4))
    sc, _ = qwix.compute_scale({"absmax": torch.tensor([[0.0], [1e-25], [3.0]])}, "int8")
    assert torch.equal(sc, torch.tensor([[1.0], [1.0], [np.float32(3.0) / np.float32(127.5)]]))


# ------------------------------------------------------------------------------------------------
# Non-finite input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("qtype,method", [
    ("int8", "absmax"), ("int8", "minmax"), ("uint8", "minmax,0.9"), ("int4", "rms,3"),
    ("float8_e4m3fn", "absmax"), ("float4_e2m1fn", "absmax,0.8"), ("nf4", "absmax"), ("int8", "absmax,0.8"),
])
def test_nonfinite_row_is_nan_others_unaffected(qtype, method, bad):
    x = make_input((5, 33), stable_seed(qtype, method, "nf"))
    x[2, 7] = bad
    y = run_fake_quant(x, qtype, method, (0,), None)
    assert torch.isnan(y[2]).all(), f"row with {bad} must be all NaN, got {y[2]}"
    assert not torch.isnan(y[[0, 1, 3, 4]]).any()
    assert_same(y, ref.ref_fake_quant(x, qtype, method, (0,)))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("method", ["absmax", "absmax,0.8", "minmax", "minmax,0.9", "rms", "rms,3"])
@pytest.mark.parametrize("shape,axes,tiles", [
    ((6, 40), (0,), None),  # rows (the fused path)
    ((40, 16), (1,), None),  # columns (groups along the innermost axis)
    ((6, 40), (), {1: 8}),  # tiles
    ((6, 40), (), None),  # per-tensor
], ids=["rows", "columns", "tiles", "tensor"])
def test_nonfinite_group_calibrates_to_nan_and_masks_its_gradient(bad, method, shape, axes, tiles):
    # Every method gives NaN for a group holding NaN or +-Inf (rms gave Inf for Inf) and the reference agrees
    # (it gave the true absmax, Inf, and a finite min); other groups are exact. The clipped gradient of such a
    # group is 0, its range being NaN.
    x = make_input(shape, stable_seed(method, "nonfinite-cal"))
    x[3, 5] = bad
    got = qwix.compute_calibration(x, method, channelwise_axes=axes, tiled_axes=tiles)
    want = ref.ref_calibrate(x, method, axes, tiles)
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.isnan(want[k]).sum() == 1, want[k]
        assert_same(got[k], want[k], k)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(qwix.fake_quant(xg, "int8", calibration_method=method, channelwise_axes=axes,
                                               tiled_axes=tiles, clip_gradient=True).sum(), [xg])
    mask = ref.ref_grad_mask(x, "int8", method, axes, tiles, True)
    assert not mask[3, 5] and (mask.any() if axes or tiles else not mask.any())  # only its group is cut off
    assert torch.equal(g, mask.to(g.dtype))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_tile_and_tensor(bad):
    x = make_input((4, 16), 9)
    x[1, 5] = bad
    y = run_fake_quant(x, "int8", "absmax", (0,), {1: 4})
    want = ref.ref_fake_quant(x, "int8", "absmax", (0,), {1: 4})
    assert torch.isnan(want[1, 4:8]).all() and torch.isnan(want).sum() == 4
    assert_same(y, want)
    y = run_fake_quant(x, "int4", "minmax", (), None)
    assert torch.isnan(y).all()


@pytest.mark.parametrize("qtype,method", [("int8", "fixed,2"), ("int4", "fixed,-1,3"), ("float8_e4m3fn", "fixed,2")])
def test_nonfinite_fixed_is_elementwise(qtype, method):
    x = make_input((3, 8), 11)
    x[0, 1], x[1, 2], x[2, 3] = math.nan, math.inf, -math.inf
    y = run_fake_quant(x, qtype, method, (), None)
    assert torch.isnan(y).sum() == 1 and torch.isnan(y[0, 1])
    assert_same(y, ref.ref_fake_quant(x, qtype, method))


def test_nonfinite_with_scale_is_elementwise():
    x = torch.tensor([math.nan, math.inf, -math.inf, 1.0])
    y = qwix.fake_quant_with_scale(x, torch.tensor(0.5), "int8")
    assert torch.isnan(y[0]) and torch.equal(y[1:], torch.tensor([63.5, -64.0, 1.0]))
    y = qwix.fake_quant_with_scale(x, torch.tensor(2.0), "uint8", zero_point=torch.tensor(3.0))
    assert_same(y, ref.ref_fake_quant_with_scale(x, torch.tensor(2.0), "uint8", torch.tensor(3.0)))


# ------------------------------------------------------------------------------------------------
# calibrate / compute_scale
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [c for c in CASES if 0 not in c[0]], ids=case_id)
@pytest.mark.parametrize("method", METHODS)
def test_compute_calibration(method, case):
    shape, axes, tiles = case
    x = make_input(shape, stable_seed(method, case, "cal"))
    got = qwix.compute_calibration(x, method, channelwise_axes=axes, tiled_axes=tiles)
    want = ref.ref_calibrate(x, method, axes, tiles)
    assert set(got) == set(want)
    for k in want:
        assert_same(got[k], want[k], k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("method", ["absmax", "minmax,0.9", "rms,3"])
def test_compute_calibration_dtypes(dtype, method):
    x = make_input((6, 20), 4).to(dtype)  # fp32-representable values for float64
    got = qwix.compute_calibration(x, method, channelwise_axes=(0,))
    want = ref.ref_calibrate(x, method, (0,))
    for k in want:
        assert got[k].dtype == torch.float32
        assert_same(got[k], want[k], k)


@pytest.mark.parametrize("qtype,method", [(q, m) for q in ref.ALL_QTYPES + sorted(ref.ALIASES)
                                           for m in ["absmax", "minmax", "absmax,0.8"] if is_valid(q, m)])
def test_compute_scale(qtype, method):
    x = make_input((9, 17), stable_seed(qtype, method, "scale"))
    x[3] = 0.0  # zero group
    x[4] = x[4].abs() + 0.1  # all-positive group (asymmetric: lo = 0)
    x[5] = -x[5].abs() - 0.1  # all-negative group (hi = 0)
    cal = ref.ref_calibrate(x, method, (0,))
    sc, zp = qwix.compute_scale(cal, qtype)
    want_sc, want_zp = ref.ref_compute_scale(cal, qtype)
    assert_same(sc, want_sc, "scale")
    if want_zp is None:
        assert zp is None
    else:
        assert_same(zp, want_zp, "zero_point")


def test_compute_scale_special_calibrations():
    cal = {"min": torch.tensor([-1.0, 0.0, 2.0, -3.0, -1e-30, 0.0]), "max": torch.tensor([3.0, 0.0, 5.0, -1.0, 1e-30, 1e-21])}
    for qtype in ["int8", "uint8", "int4", "uint4", "int16", "int2"]:
        sc, zp = qwix.compute_scale(cal, qtype)
        want_sc, want_zp = ref.ref_compute_scale(cal, qtype)
        assert_same(sc, want_sc, qtype)
        assert_same(zp, want_zp, qtype)


# ------------------------------------------------------------------------------------------------
# fake_quant_with_scale
# ------------------------------------------------------------------------------------------------

# (x shape, scale shape)
SCALE_SHAPES = [
    ((7, 12), ()),
    ((7, 12), (1,)),
    ((7, 12), (7, 1)),
    ((7, 12), (12,)),
    ((7, 12), (1, 12)),
    ((7, 12), (7, 3)),  # tiles of 4 along the last axis
    ((7, 12), (7, 12)),  # per element
    ((3, 5, 8), (5, 1)),  # right-aligned
    ((3, 5, 8), (3, 1, 2)),
    ((2, 6, 4, 4), (1, 6, 1, 1)),
]


@pytest.mark.parametrize("shapes", SCALE_SHAPES, ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("qtype", ref.ALL_QTYPES)
def test_fake_quant_with_scale(qtype, shapes):
    xs, ss = shapes
    g = torch.Generator().manual_seed(stable_seed(qtype, shapes))
    x = make_input(xs, stable_seed(qtype, shapes, "x"))
    q = ref.get_qtype(qtype)
    scale = (torch.rand(ss, generator=g) + 0.05) * (3.0 / q.bound)
    y = qwix.fake_quant_with_scale(x, scale, qtype)
    assert_same(y, ref.ref_fake_quant_with_scale(x, scale, qtype), "no zero point")
    if q.is_integer:
        zp = torch.randint(int(q.qmin), int(q.qmax) + 1, ss, generator=g).float()
        y = qwix.fake_quant_with_scale(x, scale, qtype, zero_point=zp)
        assert_same(y, ref.ref_fake_quant_with_scale(x, scale, qtype, zp), "zero point")


def test_fake_quant_with_scale_guard():
    x = make_input((6, 5), 21)
    scale = torch.tensor([[0.1], [0.0], [-0.5], [1e-20], [2.0**-63], [1e-19]])
    y = qwix.fake_quant_with_scale(x, scale, "int8")
    assert_same(y, ref.ref_fake_quant_with_scale(x, scale, "int8"))
    assert_same(y[1:4], torch.round(x[1:4]).clamp(-128, 127))  # scale 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float64])
def test_fake_quant_with_scale_dtypes(dtype, scale_dtype):
    x = make_input((5, 8), 22).to(dtype)
    scale = torch.tensor([[0.01], [0.02], [0.03], [0.04], [0.05]], dtype=scale_dtype)
    zp = torch.tensor([[0.0], [1.0], [-3.0], [10.0], [-128.0]])
    y = qwix.fake_quant_with_scale(x, scale, "int8", zero_point=zp)
    assert y.dtype == dtype
    assert_same(y, ref.ref_fake_quant_with_scale(x.float(), scale.float(), "int8", zp).to(dtype))


def test_fake_quant_with_scale_noncontiguous():
    base = make_input((10, 8), 23)
    scale = torch.rand(8, 1) * 0.05 + 0.01
    for x in [base.t(), base.t()[:, ::2]]:
        y = qwix.fake_quant_with_scale(x, scale[: x.shape[0]], "int4")
        assert_same(y, ref.ref_fake_quant_with_scale(x, scale[: x.shape[0]], "int4"))


def test_fake_quant_with_scale_matches_dynamic():
    """fake_quant == fake_quant_with_scale(compute_scale(calibrate(x)))."""
    for qtype, method, axes, tiles in [("int8", "absmax", (0,), None), ("uint8", "minmax", (), {1: 4}),
                                       ("float8_e4m3fn", "rms,3", (1,), None), ("int4", "minmax,0.9", (0, 1), None)]:
        x = make_input((4, 8, 16), 24)
        sc, zp = qwix.compute_scale(qwix.compute_calibration(x, method, channelwise_axes=axes, tiled_axes=tiles), qtype)
        y = qwix.fake_quant_with_scale(x, sc, qtype, zero_point=zp)
        assert_same(y, run_fake_quant(x, qtype, method, axes, tiles), f"{qtype} {method}")


@pytest.mark.parametrize("qtype", ["int8", "uint8"])
@pytest.mark.parametrize("zp_value", [0, 5, -17])
def test_with_scale_vs_torch_per_tensor(qtype, zp_value):
    q = ref.get_qtype(qtype)
    qmin, qmax = int(q.qmin), int(q.qmax)
    zp_value = min(max(zp_value, qmin), qmax)
    x = make_input((16, 33), stable_seed(qtype, zp_value)) * 2
    for scale in [2.0**-5, 2.0**-7, 0.5]:  # powers of two: torch's reciprocal multiply is exact too
        want = torch.fake_quantize_per_tensor_affine(x, scale, zp_value, qmin, qmax)
        y = qwix.fake_quant_with_scale(x, torch.tensor(scale), qtype, zero_point=torch.tensor(float(zp_value)))
        assert_same(y, want, f"scale {scale}")
    # other scales: torch multiplies by 1/scale, which may differ by one step at exact half points
    scale = 0.0123
    want = torch.fake_quantize_per_tensor_affine(x, scale, zp_value, qmin, qmax)
    y = qwix.fake_quant_with_scale(x, torch.tensor(scale), qtype, zero_point=torch.tensor(float(zp_value)))
    diff = (y - want).abs()
    assert (diff > 0).float().mean() < 0.01 and diff.max() <= scale * 1.001
    assert_same(y, ref.ref_fake_quant_with_scale(x, torch.tensor(scale), qtype, torch.tensor(float(zp_value))))


@pytest.mark.parametrize("qtype", ["int8", "uint8"])
@pytest.mark.parametrize("axis", [0, 1])
def test_with_scale_vs_torch_per_channel(qtype, axis):
    q = ref.get_qtype(qtype)
    qmin, qmax = int(q.qmin), int(q.qmax)
    x = make_input((6, 10), stable_seed(qtype, axis)) * 3
    n = x.shape[axis]
    g = torch.Generator().manual_seed(axis)
    scale = torch.pow(2.0, -torch.randint(2, 8, (n,), generator=g).float())
    zp = torch.randint(qmin, qmax + 1, (n,), generator=g).to(torch.int32)
    want = torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax)
    shape = (n, 1) if axis == 0 else (n,)
    y = qwix.fake_quant_with_scale(x, scale.reshape(shape), qtype, zero_point=zp.float().reshape(shape))
    assert_same(y, want)
    y_int_zp = qwix.fake_quant_with_scale(x, scale.reshape(shape), qtype, zero_point=zp.reshape(shape))
    assert_same(y_int_zp, want, "int32 zero point")


# ------------------------------------------------------------------------------------------------
# SRQ: srq_scale and update_quant_stat_
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype,method,shape,axes,tiles", [
    ("int8", "absmax", (4, 16), (0,), None),
    ("int8", "absmax,0.8", (2, 5, 16), (0, 1), None),
    ("uint8", "minmax", (4, 16), (0,), None),
    ("int4", "minmax,0.9", (3, 4, 8), (0, 1), {2: 4}),
    ("float8_e4m3fn", "rms,3", (3, 8), (), None),
    ("int8", "absmax", (3, 12), (), {1: 4}),
])
def test_srq_scale(qtype, method, shape, axes, tiles):
    x = make_input(shape, stable_seed(qtype, method, "srq"))
    cal = ref.ref_calibrate(x, method, axes, tiles)
    names = ["absmax"] if "absmax" in cal else ["min", "max"]
    stat_shape = [1] + list(cal[names[0]].shape[1:])  # averaged over batch axis 0
    # count == 0: x's own (dynamic) scale
    count = torch.zeros((), dtype=torch.int32)
    sums = [torch.zeros(stat_shape) for _ in names]
    sc, zp = qwix.srq_scale(x, count, sums, qtype, method, channelwise_axes=axes, tiled_axes=tiles)
    want_sc, want_zp = ref.ref_srq_scale(x, 0, sums, qtype, method, axes, tiles)
    assert_same(sc, want_sc.contiguous(), "count 0 scale")
    if want_zp is None:
        assert zp is None
    else:
        assert_same(zp, want_zp.contiguous(), "count 0 zero point")
    # count > 0: compute_scale(sums / count), expanded to x's calibration shape
    g = torch.Generator().manual_seed(7)
    sums = [torch.rand(stat_shape, generator=g) * 6 + 0.5]
    if len(names) == 2:
        sums = [-torch.rand(stat_shape, generator=g) * 6, torch.rand(stat_shape, generator=g) * 6 + 0.5]
    count = torch.tensor(3, dtype=torch.int32)
    sc, zp = qwix.srq_scale(x, count, sums, qtype, method, channelwise_axes=axes, tiled_axes=tiles)
    want_sc, want_zp = ref.ref_srq_scale(x, 3, sums, qtype, method, axes, tiles)
    assert sc.shape == cal[names[0]].shape
    assert_same(sc.contiguous(), want_sc.contiguous(), "count 3 scale")
    if want_zp is None:
        assert zp is None
    else:
        assert_same(zp.contiguous(), want_zp.contiguous(), "count 3 zero point")
    assert count.item() == 3  # not modified


@pytest.mark.parametrize("batch_axes,increment", [((0,), 1), ((0, 1), 1), ((0,), 3), ((1,), 2)])
def test_update_quant_stat(batch_axes, increment):
    # Dyadic values and power-of-two batch sizes: every mean is exact whatever the summation order.
    g = torch.Generator().manual_seed(8)
    absmax = torch.randint(0, 64, (4, 8, 1), generator=g).float() / 8
    stat_shape = [1 if a in batch_axes else d for a, d in enumerate(absmax.shape)]
    count = torch.tensor(2, dtype=torch.int32)
    s = torch.randint(0, 64, stat_shape, generator=g).float() / 4
    sums = [s.clone()]
    qwix.update_quant_stat_(count, sums, {"absmax": absmax}, batch_axes=batch_axes, count_increment=increment)
    assert count.dtype == torch.int32 and count.item() == 2 + increment
    assert_same(sums[0], s + absmax.mean(batch_axes, keepdim=True))
    # min/max
    mn, mx = -absmax, absmax * 2
    s_min, s_max = torch.zeros(stat_shape), torch.ones(stat_shape)
    qwix.update_quant_stat_(count, [s_min, s_max], {"min": mn, "max": mx}, batch_axes=batch_axes)
    assert count.item() == 3 + increment
    assert_same(s_min, mn.mean(batch_axes, keepdim=True))
    assert_same(s_max, 1 + mx.mean(batch_axes, keepdim=True))


def test_update_quant_stat_random_values():
    cal = make_input((64, 10, 1), 9).abs()
    s = torch.rand(1, 10, 1)
    sums = [s.clone()]
    count = torch.zeros((), dtype=torch.int32)
    qwix.update_quant_stat_(count, sums, {"absmax": cal})
    torch.testing.assert_close(sums[0], s + cal.mean(0, keepdim=True), rtol=2e-6, atol=0)
    assert count.item() == 1


def test_srq_end_to_end():
    """update then read: the SRQ scale after one update equals the batch's own dynamic scale
    averaged over the batch axis."""
    x = make_input((4, 8, 16), 10)
    count = torch.zeros((), dtype=torch.int32)
    sums = [torch.zeros(1, 8, 1)]
    cal = qwix.compute_calibration(x, "absmax", channelwise_axes=(0, 1))
    qwix.update_quant_stat_(count, sums, cal)
    sc, zp = qwix.srq_scale(x, count, sums, "int8", "absmax", channelwise_axes=(0, 1))
    want = ref.guard_scale(ref.div32(ref.div32(cal["absmax"].mean(0, keepdim=True), 1.0), 127.5)).expand(4, 8, 1)
    assert zp is None and sc.shape == (4, 8, 1)
    torch.testing.assert_close(sc, want, rtol=2e-6, atol=0)


# ------------------------------------------------------------------------------------------------
# Threads
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype,method,axes,tiles", [
    ("int8", "absmax", (), None),
    ("int8", "absmax", (0,), None),
    ("int4", "minmax", (-1,), None),
    ("uint8", "minmax,0.9", (), None),
    ("float8_e4m3fn", "rms,3", (), None),
    ("int8", "rms,3", (0,), None),
    ("nf4", "absmax", (), {1: 100}),
])
def test_thread_count_does_not_change_results(qtype, method, axes, tiles):
    x = make_input((512, 1000), stable_seed(qtype, method, "threads"))
    x[17, 3] = math.nan
    outs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        xr = x.clone().requires_grad_()
        y = run_fake_quant(xr, qtype, method, axes, tiles)
        y.backward(torch.ones_like(y))
        cal = qwix.compute_calibration(x, method, channelwise_axes=axes, tiled_axes=tiles)
        outs.append((y.detach(), xr.grad, cal))
    assert_same(outs[0][0], outs[1][0], "values")
    assert_same(outs[0][1], outs[1][1], "gradients")
    for k in outs[0][2]:
        assert_same(outs[0][2][k], outs[1][2][k], k)
    if qtype in ("int8", "int4", "uint8"):
        assert_same(outs[0][0], ref.ref_fake_quant(x, qtype, method, axes, tiles))


@pytest.mark.parametrize("method, qtype", [("absmax", "int8"), ("minmax", "uint8"), ("rms,2", "int4")])
def test_many_groups_along_a_kept_innermost_axis(method, qtype):
    # 2^15 groups of 8 elements each, the kept axis innermost: the CPU statistics use chunks of at least one
    # element per group (their scratch holds one state per group and chunk), several chunks over the rows.
    x = make_input((8, 2**15), seed=3)
    x[5, 7] = float("nan")
    for axes in ((1,), (-1,)):
        assert_same(qwix.fake_quant(x, qtype, calibration_method=method, channelwise_axes=axes),
                    ref.ref_fake_quant(x, qtype, method, (1,)), f"{method} {axes}")
