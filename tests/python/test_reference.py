"""Self-checks of tests/python/reference.py against DESIGN section 2 (no qwix_torch needed)."""
import math

import numpy as np
import pytest
import torch

import reference as ref


def exact_round_to_format(v: torch.Tensor, mbits: int, emin: int) -> torch.Tensor:
    """Round-to-nearest-even of finite values to a binary format with `mbits` mantissa bits and
    smallest normal exponent `emin` (subnormals included, no overflow handling), in float64."""
    v = v.to(torch.float64)
    _, e = torch.frexp(v)
    exp = torch.clamp(e.to(torch.float64) - 1, min=emin)
    spacing = torch.pow(2.0, exp - mbits)
    return torch.round(v / spacing) * spacing


def grid_midpoints(values: torch.Tensor) -> torch.Tensor:
    v = torch.unique(values.to(torch.float64))
    return (v[1:] + v[:-1]) / 2


def test_qtype_table():
    q = ref.get_qtype("int8")
    assert (q.qmin, q.qmax, q.bound) == (-128, 127, 127.5)
    q = ref.get_qtype("int4")
    assert (q.qmin, q.qmax, q.bound) == (-8, 7, 7.5)
    q = ref.get_qtype("int2")
    assert (q.qmin, q.qmax, q.bound) == (-2, 1, 1.5)
    q = ref.get_qtype("int16")
    assert (q.qmin, q.qmax, q.bound) == (-32768, 32767, 32767.5)
    q = ref.get_qtype("uint8")
    assert (q.qmin, q.qmax, q.bound) == (0, 255, 255.5)
    q = ref.get_qtype("uint4")
    assert (q.qmin, q.qmax, q.bound) == (0, 15, 15.5)
    assert ref.get_qtype("fp8_e4m3").bound == 448
    assert ref.get_qtype("fp8_e5m2").bound == 57344
    assert ref.get_qtype("fp4_e2m1").bound == 6
    assert ref.get_qtype("nf4").bound == 1
    assert torch.finfo(torch.float8_e4m3fn).max == 448
    assert torch.finfo(torch.float8_e5m2).max == 57344
    with pytest.raises(ValueError):
        ref.get_qtype("int9")


def test_parse_method():
    assert ref.parse_method("absmax") == ref.Method("absmax", 1.0)
    m = ref.parse_method("ABSMAX,0.8")
    assert m.kind == "absmax" and m.s == np.float32(0.8) and m.can_clip and m.symmetric
    assert not ref.parse_method("absmax,1.5").can_clip
    assert not ref.parse_method("minmax").can_clip and not ref.parse_method("minmax").symmetric
    assert ref.parse_method("rms,3").can_clip and ref.parse_method("rms,3").s == 3.0
    f = ref.parse_method("fixed,2")
    assert f.symmetric and f.can_clip and (f.lo, f.hi) == (-2, 2)
    f = ref.parse_method("fixed,-1,3")
    assert not f.symmetric and (f.lo, f.hi) == (-1, 3)
    assert ref.parse_method("fixed,-2,2").symmetric
    for bad in ["absmax,", "absmax,x", "foo", "fixed", "fixed,1,2", "fixed,-1,-0.5", "absmax,1,2", "minmax,nan"]:
        with pytest.raises(ValueError):
            ref.parse_method(bad)


def test_fp32_helpers_are_correctly_rounded():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, generator=g) * torch.exp(torch.randn(20000, generator=g) * 10)
    b = torch.randn(20000, generator=g) * torch.exp(torch.randn(20000, generator=g) * 10)
    an, bn = a.numpy(), b.numpy()
    with np.errstate(all="ignore"):
        assert np.array_equal(ref.div32(a, b).numpy(), an / bn)
        assert np.array_equal(ref.mul32(a, b).numpy(), an * bn)
        assert np.array_equal(ref.add32(a, b).numpy(), an + bn)
        assert np.array_equal(ref.sub32(a, b).numpy(), an - bn)
        assert np.array_equal(ref.div32(a, 127.5).numpy(), an / np.float32(127.5))


def test_torch_primitives_used_by_reference():
    # round half to even, clamp keeps NaN
    assert torch.equal(torch.round(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -127.5])),
                       torch.tensor([0.0, 2.0, 2.0, -0.0, -2.0, -128.0]))
    assert torch.isnan(torch.clamp(torch.tensor([float("nan")]), -1.0, 1.0)).all()
    assert torch.isnan(torch.minimum(torch.tensor([float("nan")]), torch.zeros(1))).all()


def test_guard_scale():
    s = torch.tensor([0.0, -1.0, 2.0**-64, 2.0**-63, 1e-3, float("nan"), float("inf")])
    out = ref.guard_scale(s)
    assert torch.equal(out[:5], torch.tensor([1.0, 1.0, 1.0, 2.0**-63, 1e-3]))
    assert math.isnan(out[5]) and out[6] == math.inf


@pytest.mark.parametrize("dtype,mbits,emin,fmax", [(torch.float8_e4m3fn, 3, -6, 448.0), (torch.float8_e5m2, 2, -14, 57344.0)])
def test_torch_fp8_cast_is_rne(dtype, mbits, emin, fmax):
    all_vals = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    finite = all_vals[torch.isfinite(all_vals)]
    assert finite.abs().max() == fmax
    mids = grid_midpoints(finite).float()
    g = torch.Generator().manual_seed(1)
    rnd = (torch.rand(50000, generator=g) * 2 - 1) * fmax * torch.exp(-torch.rand(50000, generator=g) * 20)
    for v in [finite, mids, torch.nextafter(mids, torch.tensor(math.inf)), torch.nextafter(mids, torch.tensor(-math.inf)), rnd]:
        v = v.clamp(-fmax, fmax)
        got = v.to(dtype).float().double()
        want = exact_round_to_format(v, mbits, emin)
        assert torch.equal(got, want)


def test_e2m1():
    vals = torch.tensor(ref.E2M1_MAGNITUDES)
    vals = torch.cat([vals, -vals])
    assert torch.equal(ref.round_e2m1(vals), vals)
    v = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -5.0, 0.26, 0.24, 4.9, 5.1, 6.0])
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -1.0, -4.0, 0.5, 0.0, 4.0, 6.0, 6.0])
    assert torch.equal(ref.round_e2m1(v), want)
    g = torch.Generator().manual_seed(2)
    r = (torch.rand(50000, generator=g) * 12 - 6) * torch.exp(-torch.rand(50000, generator=g) * 5)
    mids = grid_midpoints(vals).float()
    for v in [r, mids, torch.nextafter(mids, torch.tensor(math.inf)), torch.nextafter(mids, torch.tensor(-math.inf))]:
        assert torch.equal(ref.round_e2m1(v).double(), exact_round_to_format(v, 1, 0))
    assert torch.isnan(ref.round_e2m1(torch.tensor([float("nan")]))).all()


def test_nf4():
    levels = torch.tensor(ref.NF4_LEVELS)
    assert torch.equal(ref.round_nf4(levels), levels)
    lv64 = levels.double()
    for i in range(15):
        lo, hi = lv64[i].item(), lv64[i + 1].item()
        mid = (lo + hi) / 2  # exact in float64
        below = torch.tensor([mid], dtype=torch.float64).float()
        # fp32 values just around the true midpoint
        cands = [torch.nextafter(below, torch.tensor([-1.0])), below, torch.nextafter(below, torch.tensor([1.0]))]
        for c in cands:
            cv = c.double().item()
            want = lo if cv <= mid else hi  # ties to the lower
            assert ref.round_nf4(c).item() == np.float32(want), (i, cv, mid)
    g = torch.Generator().manual_seed(3)
    r = torch.rand(10000, generator=g) * 2 - 1
    d = (r.double().unsqueeze(-1) - lv64).abs()
    assert torch.equal(ref.round_nf4(r), levels[d.argmin(-1)])


def test_hand_cases_scale_one():
    one = torch.ones(())
    assert torch.equal(ref.ref_fake_quant_with_scale(torch.tensor([1.2, 3.5, -127.5, 129, -1300]), one, "int8"),
                       torch.tensor([1.0, 4, -128, 127, -128]))
    assert torch.equal(ref.ref_fake_quant_with_scale(torch.tensor([1.2, 3.5, 8, -1300]), one, "int4"),
                       torch.tensor([1.0, 4, 7, -8]))
    assert torch.equal(ref.ref_fake_quant_with_scale(torch.tensor([-1.2, 3.5, 129, 1300]), one, "uint8"),
                       torch.tensor([0.0, 4, 129, 255]))


def test_layout_and_calibration_shapes():
    lay = ref.layout((3, 5, 64), (0,), {-1: 4})
    assert lay.expanded == [3, 5, 16, 4] and lay.reduce_dims == [1, 3] and lay.calib_shape == [3, 1, 16]
    x = torch.randn(6, 8)
    c = ref.ref_calibrate(x, "absmax", (0,), {1: 0.5})
    assert c["absmax"].shape == (6, 2)
    assert torch.equal(c["absmax"], x.abs().reshape(6, 2, 4).amax(-1))
    c = ref.ref_calibrate(x, "minmax,0.9")
    assert c["min"].shape == (1, 1) and c["min"].item() == np.float32(x.min().item()) * np.float32(0.9)
    c = ref.ref_calibrate(x, "fixed,-1,3", (0,))
    assert c["min"].shape == (1, 1) and c["min"].item() == -1 and c["max"].item() == 3
    c = ref.ref_calibrate(x, "rms,3", (-1,))
    want = (x.double().square().mean(0, keepdim=True).sqrt().float()) * 3
    assert torch.equal(c["absmax"], want)


def test_symmetric_scale_and_values():
    x = torch.tensor([[-2.0, 1.0, 0.5], [0.0, 0.0, 0.0]])
    y = ref.ref_fake_quant(x, "int8", "absmax", (0,))
    s = np.float32(2.0) / np.float32(127.5)
    q = np.clip(np.round(np.array([-2.0, 1.0, 0.5], np.float32) / s), -128, 127)
    assert np.array_equal(y[0].numpy(), (q * s).astype(np.float32))
    assert torch.equal(y[1], torch.zeros(3))  # absmax 0 -> scale 1


def test_asymmetric():
    x = torch.arange(256, dtype=torch.float32) / 255
    y = ref.ref_fake_quant(x, "uint8", "minmax")
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)
    x = torch.tensor([1.0, 2.0, 3.0])  # all positive: lo = 0
    sc, zp = ref.ref_compute_scale(ref.ref_calibrate(x, "minmax"), "int8")
    assert zp.item() == -128 and sc.item() == np.float32(3.0) / np.float32(255.0)


def test_nonfinite_groups():
    x = torch.randn(4, 6)
    x[1, 2] = float("nan")
    x[3, 0] = float("inf")
    y = ref.ref_fake_quant(x, "int8", "absmax", (0,))
    assert torch.isnan(y[1]).all() and torch.isnan(y[3]).all()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()
    y = ref.ref_fake_quant(x, "int8", "fixed,2")
    assert torch.isnan(y).sum() == 1 and y[3, 0] == 127 * (np.float32(2) / np.float32(127.5))


def test_masks():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    assert ref.ref_grad_mask(x, "int8", "absmax,0.5").tolist() == [False, True, True, True, False]
    assert ref.ref_grad_mask(x, "int8", "absmax").all()
    assert ref.ref_grad_mask(x, "int8", "absmax,0.5", clip_gradient=False).all()
    assert ref.ref_grad_mask(x, "int8", "minmax,0.5").tolist() == [False, True, True, True, False]
    assert ref.ref_grad_mask(x, "int8", "fixed,-1,3").tolist() == [False, True, True, True, True]
    m = ref.ref_with_scale_mask(x, torch.tensor(1 / 64), "int8", clip_gradient=True)  # grid [-2, 127/64]
    assert m.tolist() == [True, True, True, True, False]
    m = ref.ref_with_scale_mask(x, torch.tensor(1 / 64), "int8", torch.tensor(-1.0), clip_gradient=True)
    assert m.tolist() == [False, True, True, True, True]  # grid [-127/64, 2]
    bits = torch.rand(37) > 0.5
    packed = ref.pack_mask(bits)
    assert packed.numel() == 5 and torch.equal(ref.unpack_mask(packed, 37), bits)
    assert ref.pack_mask(torch.tensor([True, False, False, False, False, False, False, False, False, True])).tolist() == [1, 2]
    t = torch.randn(3, 4).t()
    assert torch.equal(ref.memory_order(t), torch.arange(12).reshape(3, 4).t())
