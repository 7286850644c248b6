"""Bad inputs raise clear errors that name the bad value."""
import re

import pytest
import torch

import qwix_torch as qwix
import reference as ref

ops = torch.ops.qwix


def x24():
    return torch.randn(4, 6)


# ------------------------------------------------------------------------------------------------
# qtypes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["int9", "int1", "int32", "float16", "bfloat16", "INT8x", ""])
def test_unknown_qtype(bad):
    pat = rf"(?s)'{re.escape(bad)}'.*int8|int8.*'{re.escape(bad)}'"
    with pytest.raises(ValueError, match=pat):
        qwix.fake_quant(x24(), bad)
    with pytest.raises(ValueError, match=pat):
        qwix.fake_quant_with_scale(x24(), torch.ones(()), bad)
    with pytest.raises(ValueError, match=pat):
        qwix.compute_scale({"absmax": torch.ones(1)}, bad)
    with pytest.raises(ValueError, match=pat):
        qwix.srq_scale(x24(), torch.zeros((), dtype=torch.int32), [torch.zeros(1, 1)], bad)


def test_unknown_qtype_lists_valid_names():
    with pytest.raises(ValueError) as e:
        qwix.fake_quant(x24(), "int9")
    msg = str(e.value)
    for name in ["int2", "int4", "int8", "int16", "uint4", "uint8", "float8_e4m3fn", "float8_e5m2", "float4_e2m1fn", "nf4"]:
        assert name in msg, f"{name} missing from: {msg}"


@pytest.mark.parametrize("qtype", ["float8_e4m3fn", "fp8_e5m2", "float4_e2m1fn", "nf4"])
@pytest.mark.parametrize("method", ["minmax", "minmax,0.9", "fixed,-1,3"])
def test_float_qtype_with_asymmetric_method(qtype, method):
    with pytest.raises(ValueError, match=re.escape(method)):
        qwix.fake_quant(x24(), qtype, calibration_method=method)
    with pytest.raises(ValueError, match=re.escape(qtype)):
        qwix.fake_quant(x24(), qtype, calibration_method=method)
    canonical = ref.ALIASES.get(qtype, qtype)
    named = f"{re.escape(qtype)}|{re.escape(canonical)}"
    with pytest.raises(ValueError, match=named):
        qwix.compute_scale({"min": -torch.ones(1), "max": torch.ones(1)}, qtype)
    with pytest.raises(ValueError, match=named):
        qwix.srq_scale(x24(), torch.zeros((), dtype=torch.int32), [torch.zeros(1, 1)] * 2, qtype, method)


# ------------------------------------------------------------------------------------------------
# calibration methods
# ------------------------------------------------------------------------------------------------

MALFORMED = ["absmax,", "absmax,x", "foo", "fixed", "fixed,1,2", "fixed,-1,-0.5", "absmax,0.5,2", "minmax,,",
             "rms,abc", "fixed,2,1", ",absmax", "absmax,inf", "fixed,nan"]


@pytest.mark.parametrize("method", MALFORMED)
def test_malformed_method(method):
    pat = re.escape(method)
    with pytest.raises(ValueError, match=pat):
        qwix.fake_quant(x24(), "int8", calibration_method=method)
    with pytest.raises(ValueError, match=pat):
        qwix.compute_calibration(x24(), method)
    with pytest.raises(ValueError, match=pat):
        qwix.srq_scale(x24(), torch.zeros((), dtype=torch.int32), [torch.zeros(1, 1)], "int8", method)


def test_meta_kernels_raise_the_same_errors():
    """Meta (FakeTensor / compile) raises the same errors as the CPU kernel."""
    x = torch.empty(4, 6, device="meta")
    with pytest.raises(ValueError, match=re.escape("absmax,x")):
        ops.fake_quant(x, "int8", "absmax,x", [], [], [], None)
    with pytest.raises(ValueError, match="int9"):
        ops.fake_quant(x, "int9", "absmax", [], [], [], None)
    with pytest.raises(IndexError, match=r"\b5\b"):
        ops.fake_quant(x, "int8", "absmax", [5], [], [], None)


# ------------------------------------------------------------------------------------------------
# axes and tiles
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axes", [(2,), (5,), (-3,), (0, 7)])
def test_channelwise_axis_out_of_range(axes):
    bad = [a for a in axes if not -2 <= a < 2][0]
    pat = rf"(?<![\d-]){re.escape(str(bad))}(?!\d)"
    with pytest.raises(IndexError, match=pat):
        qwix.fake_quant(x24(), "int8", channelwise_axes=axes)
    with pytest.raises(IndexError, match=pat):
        qwix.compute_calibration(x24(), channelwise_axes=axes)
    with pytest.raises(IndexError, match=pat):
        ops.fake_quant(x24(), "int8", "absmax", [], [bad], [2], None)


@pytest.mark.parametrize("axis", [2, -3, 9])
def test_tiled_axis_out_of_range(axis):
    with pytest.raises(IndexError, match=rf"(?<![\d-]){re.escape(str(axis))}(?!\d)"):
        qwix.fake_quant(x24(), "int8", tiled_axes={axis: 2})


def test_tiled_axes_take_any_integral_type():
    import numpy as np
    x = x24()
    want = qwix.fake_quant(x, "int8", tiled_axes={1: 3})
    assert torch.equal(qwix.fake_quant(x, "int8", tiled_axes={np.int64(1): np.int32(3)}), want)
    assert torch.equal(qwix.fake_quant(x, "int8", tiled_axes={1: np.float32(0.5)}), want)
    with pytest.raises(TypeError, match=r"tiled axis 1\.0 must be an int, got float"):
        qwix.fake_quant(x, "int8", tiled_axes={1.0: 3})
    with pytest.raises(IndexError, match=r"tiled axis 2 is out of range for a tensor of rank 2"):
        qwix.fake_quant(x, "int8", tiled_axes={np.int64(2): 3})


@pytest.mark.parametrize("axes,tiles,bad", [((0, 0), None, 0), ((1, -1), None, 1), ((0,), {0: 2}, 0), ((), {1: 2, -1: 3}, 1)])
def test_repeated_axis(axes, tiles, bad):
    pat = rf"(?si)(repeat|more than once|twice|duplicate|both).*(?<!\d){bad}|(?<!\d){bad}.*(repeat|more than once|twice|duplicate|both)"
    with pytest.raises(ValueError, match=pat):
        qwix.fake_quant(x24(), "int8", channelwise_axes=axes, tiled_axes=tiles)


@pytest.mark.parametrize("tile", [4, 5, 0, -2, 7])
def test_bad_tile(tile):
    with pytest.raises(ValueError, match=rf"(?<![\d-]){re.escape(str(tile))}(?!\d)"):
        ops.fake_quant(x24(), "int8", "absmax", [], [1], [tile], None)
    with pytest.raises(ValueError, match=rf"(?<![\d-]){re.escape(str(tile))}(?!\d)"):
        ops.calibrate(x24(), "absmax", [], [1], [tile])


def test_bad_fractional_tile():
    # 0.25 of 6 -> round(1.5) = 2 divides; 0.3 of 10 -> 3 does not divide... use axis of 10
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"\b3\b"):
        qwix.fake_quant(x, "int8", tiled_axes={1: 0.3})
    with pytest.raises(ValueError, match=r"1\.5"):
        qwix.fake_quant(x, "int8", tiled_axes={1: 1.5})


def test_tiled_axes_and_tile_sizes_length_mismatch():
    with pytest.raises(ValueError):
        ops.fake_quant(x24(), "int8", "absmax", [], [1], [], None)


# ------------------------------------------------------------------------------------------------
# input dtypes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x,name", [
    (torch.arange(24).reshape(4, 6), r"(?i)long|int64"),
    (torch.arange(24, dtype=torch.int32).reshape(4, 6), r"(?i)\bint\b|int32"),
    (torch.ones(4, 6, dtype=torch.uint8), r"(?i)byte|uint8"),
    (torch.ones(4, 6, dtype=torch.bool), r"(?i)bool"),
    (torch.ones(4, 6, dtype=torch.complex64), r"(?i)complex"),
])
def test_non_float_input(x, name):
    with pytest.raises(TypeError, match=name):
        qwix.fake_quant(x, "int8")
    with pytest.raises(TypeError, match=name):
        qwix.fake_quant_with_scale(x, torch.ones(()), "int8")
    with pytest.raises(TypeError, match=name):
        qwix.compute_calibration(x)
    with pytest.raises(TypeError, match=name):
        qwix.srq_scale(x, torch.zeros((), dtype=torch.int32), [torch.zeros(1, 1)], "int8")


# ------------------------------------------------------------------------------------------------
# scales and zero points
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_shape", [(5,), (4, 4), (3, 1), (2, 4, 6), (4, 5)])
def test_scale_of_wrong_shape(scale_shape):
    with pytest.raises(ValueError, match=re.escape(str(list(scale_shape))) + "|" + re.escape(str(scale_shape))):
        qwix.fake_quant_with_scale(x24(), torch.ones(scale_shape), "int8")


def test_scale_with_more_dims_than_input():
    with pytest.raises(ValueError, match=r"scale"):
        qwix.fake_quant_with_scale(torch.randn(6), torch.ones(1, 6), "int8")


def test_zero_point_with_float_qtype():
    for qtype in ["float8_e4m3fn", "nf4", "float4_e2m1fn"]:
        with pytest.raises(ValueError, match=rf"(?si)zero.?point.*{qtype}|{qtype}.*zero.?point"):
            qwix.fake_quant_with_scale(x24(), torch.ones(4, 1), qtype, zero_point=torch.zeros(4, 1))


@pytest.mark.parametrize("qtype, zp, needle", [
    ("int8", 2.5, r"integers in \[-128, 127\] \(the 'int8' grid\), got values in \[2.5, 2.5\], not all integers"),
    ("int8", 300.0, r"integers in \[-128, 127\].*got values in \[300, 300\]$"),
    ("uint8", -5.0, r"integers in \[0, 255\] \(the 'uint8' grid\), got values in \[-5, -5\]"),
    ("int4", float("inf"), r"integers in \[-8, 7\]"),
])
def test_zero_point_must_be_on_the_grid(qtype, zp, needle):
    # Any value used to be accepted: 300 sent every finite input to -173, 2.5 moved 0.0 to -0.5.
    with pytest.raises(ValueError, match=needle):
        qwix.fake_quant_with_scale(x24(), torch.ones(4, 1), qtype, zero_point=torch.full((4, 1), zp))


def test_zero_point_nan_is_a_nan_group():
    zp = torch.tensor([[0.0], [float("nan")], [3.0], [-2.0]])
    y = qwix.fake_quant_with_scale(x24(), torch.full((4, 1), 0.1), "int8", zero_point=zp)
    assert y[1].isnan().all() and not y[[0, 2, 3]].isnan().any()


def test_zero_point_of_wrong_shape():
    with pytest.raises(ValueError, match=r"(?i)zero.?point"):
        qwix.fake_quant_with_scale(x24(), torch.ones(4, 1), "int8", zero_point=torch.zeros(6))


def test_non_float_scale():
    with pytest.raises(TypeError, match=r"(?i)scale"):
        qwix.fake_quant_with_scale(x24(), torch.ones((), dtype=torch.int64), "int8")


def test_calibration_lists():
    with pytest.raises(ValueError):
        ops.compute_scale([torch.ones(1)] * 3, "int8")
    with pytest.raises(ValueError, match=r"(?s)\[2\].*\[3\]|\[3\].*\[2\]"):
        ops.compute_scale([torch.ones(2), torch.ones(3)], "int8")
    with pytest.raises(ValueError, match=r"(?i)keys"):
        qwix.compute_scale({"absmax": torch.ones(1), "min": torch.ones(1)}, "int8")


def test_update_quant_stat_checks_everything_before_writing():
    count, s0, s1 = torch.tensor(0, dtype=torch.int32), torch.zeros(1, 1), torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"statistic 1 has shape \[2, 2\]"):
        torch.ops.qwix.update_quant_stat(count, [s0, s1], [torch.ones(4, 1)] * 2, [0], 1)
    assert int(count) == 0 and float(s0) == 0.0  # statistic 0 was not updated either
    with pytest.raises(TypeError, match="statistics are float32, got Double"):
        torch.ops.qwix.update_quant_stat(count, [s0, torch.zeros(1, 1, dtype=torch.float64)],
                                         [torch.ones(4, 1)] * 2, [0], 1)
    assert int(count) == 0 and float(s0) == 0.0
    for bad in (torch.tensor(0, dtype=torch.uint8), torch.tensor(False), torch.tensor(0.0)):
        with pytest.raises(ValueError, match=f"count must be an int32 or int64 scalar tensor, got {bad.dtype}"[:40]):
            torch.ops.qwix.update_quant_stat(bad, [s0], [torch.ones(4, 1)], [0], 1)
        with pytest.raises(ValueError, match="count must be an int32 or int64 scalar tensor"):
            torch.ops.qwix.srq_scale(torch.ones(4, 1), bad, [s0], "int8", "absmax", [0], [], [])
    for inc in (0, -1, 2**31):
        with pytest.raises(ValueError, match=rf"count_increment must be in \[1, 2\^31 - 1\], got {inc}"):
            torch.ops.qwix.update_quant_stat(count, [s0], [torch.ones(4, 1)], [0], inc)
    torch.ops.qwix.update_quant_stat(count, [s0], [torch.ones(0, 1)], [0], 1)  # empty: nothing to add
    assert int(count) == 0 and float(s0) == 0.0


def test_update_quant_stat_refuses_statistics_it_cannot_update_in_place():
    # An expanded (stride-0) statistic: sum_of_min was written, then add_ on sum_of_max raised ATen's error.
    count, lo = torch.tensor(0, dtype=torch.int32), torch.zeros(1, 4)
    hi = torch.zeros(1, 1).expand(1, 4)
    cal = [torch.full((2, 4), -1.0), torch.ones(2, 4)]
    with pytest.raises(ValueError, match=r"statistic 1 has elements that share memory .*\.clone\(\)"):
        torch.ops.qwix.update_quant_stat(count, [lo, hi], cal, [0], 1)
    assert int(count) == 0 and torch.equal(lo, torch.zeros(1, 4))  # nothing written
    # A statistic that requires grad: torch's own in-place ops refuse such a leaf; under no_grad both write.
    s = torch.zeros(1, 4, requires_grad=True)
    with pytest.raises(ValueError, match="statistic 0 in place without autograd, but it requires grad"):
        qwix.update_quant_stat_(count, [s], {"absmax": torch.ones(2, 4)})
    assert int(count) == 0 and torch.equal(s.detach(), torch.zeros(1, 4))
    with torch.no_grad():
        qwix.update_quant_stat_(count, [s], {"absmax": torch.ones(2, 4)})
    assert int(count) == 1 and torch.equal(s.detach(), torch.ones(1, 4))


def test_a_count_of_one_element_and_any_rank_is_a_scalar():
    # srq_scale divided by a [1, 1, 1] count and broadcast the scale to rank 3 (an expand error, CPU only).
    x, s = torch.randn(4, 8), torch.full((1, 1), 254.0)
    want = torch.ops.qwix.srq_scale(x, torch.tensor(2, dtype=torch.int32), [s], "int8", "absmax", [], [], [])
    for shape in ((1,), (1, 1, 1)):
        count = torch.full(shape, 2, dtype=torch.int32)
        got = torch.ops.qwix.srq_scale(x, count, [s], "int8", "absmax", [], [], [])
        assert got[0].shape == (1, 1) and torch.equal(got[0], want[0])
        assert float(got[0]) == float(torch.tensor(127.0) / 127.5)  # the average 127 over the int8 bound


def test_python_wrappers_name_malformed_axes_and_tiles():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match=r"tiled_axes must be a mapping \{axis: tile\} \(or None\), got \[\(1, 4\)\]"):
        qwix.fake_quant(x, "int8", tiled_axes=[(1, 4)])
    for bad in (0, "0", [0.5], [True]):
        with pytest.raises(TypeError, match=f"channelwise_axes must be a sequence of ints, got {re.escape(repr(bad))}"):
            qwix.fake_quant(x, "int8", channelwise_axes=bad)
        with pytest.raises(TypeError, match="channelwise_axes must be a sequence of ints"):
            qwix.compute_calibration(x, channelwise_axes=bad)
    with pytest.raises(TypeError, match="batch_axes must be a sequence of ints, got 0"):
        qwix.update_quant_stat_(torch.tensor(0), [torch.zeros(1, 8)], {"absmax": torch.ones(4, 8)}, batch_axes=0)
    # A float tile is a fraction in (0, 1) everywhere: rules and the C++ API (where 1.0 is one element) agree.
    with pytest.raises(ValueError, match=r"fractional tile 1.0 for axis 1 must be in \(0, 1\); use an int"):
        qwix.fake_quant(x, "int8", tiled_axes={1: 1.0})
    assert torch.equal(qwix.fake_quant(x, "int8", tiled_axes={1: 0.5}), qwix.fake_quant(x, "int8", tiled_axes={1: 4}))
    assert torch.equal(qwix.fake_quant(x, "int8", channelwise_axes=range(1)), qwix.fake_quant(x, "int8",
                                                                                              channelwise_axes=[0]))


def test_update_quant_stat_names_bad_batch_axes_and_writes_nothing():
    # (ATen's mean raised them without saying which op or argument)
    count, s = torch.tensor(0, dtype=torch.int32), torch.zeros(1, 8)
    with pytest.raises(IndexError, match=r"qwix: update_quant_stat's batch axis 2 is out of range for a calibration "
                                         r"of rank 2 \(batch_axes \[2\]; allowed: -2 to 1\)"):
        torch.ops.qwix.update_quant_stat(count, [s], [torch.ones(4, 8)], [2], 1)
    with pytest.raises(ValueError, match=r"batch_axes \[0, -2\] name axis 0 twice"):
        torch.ops.qwix.update_quant_stat(count, [s], [torch.ones(4, 8)], [0, -2], 1)
    assert int(count) == 0 and not s.any()
    torch.ops.qwix.update_quant_stat(count, [s], [torch.ones(4, 8)], [-2], 1)
    assert int(count) == 1 and torch.equal(s, torch.ones(1, 8))


def test_update_quant_stat_takes_one_or_two_statistics():
    count = torch.tensor(0, dtype=torch.int32)
    for n in (0, 3):  # 0 read past an empty list (a segfault)
        with pytest.raises(ValueError, match=rf"a calibration is \[absmax\] or \[min, max\], got {n} tensors"):
            torch.ops.qwix.update_quant_stat(count, [torch.zeros(1, 1)] * n, [torch.ones(4, 1)] * n, [0], 1)
    assert int(count) == 0


def test_update_quant_stat_stops_before_count_overflows():
    # Wrapped negative, count would turn SRQ back to dynamic scales while the sums keep growing.
    top = 2**31 - 1
    count, s = torch.tensor(top - 150, dtype=torch.int32), torch.full((1, 1), 5.0)
    torch.ops.qwix.update_quant_stat(count, [s], [torch.full((4, 1), 3.0)], [0], 100)
    assert int(count) == top - 50 and float(s) == 8.0
    torch.ops.qwix.update_quant_stat(count, [s], [torch.full((4, 1), 3.0)], [0], 100)  # would pass 2^31 - 1
    assert int(count) == top - 50 and float(s) == 8.0
    torch.ops.qwix.update_quant_stat(count, [s], [torch.full((4, 1), 3.0)], [0], 50)  # reaches it exactly
    assert int(count) == top and float(s) == 11.0
    wide = torch.tensor(top, dtype=torch.int64)  # an int64 count goes on
    torch.ops.qwix.update_quant_stat(wide, [s], [torch.full((4, 1), 3.0)], [0], 100)
    assert int(wide) == top + 100


def test_operands_on_different_devices_are_an_error():
    # A meta operand among CPU ones picked the meta kernel, which returned uninitialized CPU memory.
    meta = lambda *shape, **kw: torch.ones(*shape, device="meta", **kw)  # noqa: E731
    q = torch.ops.qwix
    with pytest.raises(ValueError, match="mask is on meta but grad is on cpu"):
        q.fake_quant_backward(torch.ones(64, 8), meta(64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="a calibration tensor is on meta but the first is on cpu"):
        q.compute_scale([-torch.ones(4, 1), meta(4, 1)], "int8")
    one = torch.ones((), dtype=torch.int32)
    with pytest.raises(ValueError, match="statistic 0 is on meta but the input is on cpu"):
        q.srq_scale(torch.randn(4, 8), one, [meta(1, 1)], "int8", "absmax", [0], [], [])
    with pytest.raises(ValueError, match="count is on meta but the input is on cpu"):
        q.srq_scale(torch.randn(4, 8), meta((), dtype=torch.int32), [torch.ones(1, 1)], "int8", "absmax", [0], [], [])
    # A CPU scalar count with meta statistics is fine, as PyTorch mixes CPU scalars into other devices' ops.
    assert q.srq_scale(meta(4, 8), one, [meta(1, 1)], "int8", "absmax", [0], [], [])[0].device.type == "meta"
    count, s = torch.zeros((), dtype=torch.int32), torch.zeros(1, 1)
    with pytest.raises(ValueError, match="calibration tensor 0 is on meta but count is on cpu"):
        q.update_quant_stat(count, [s], [meta(4, 1)], [0], 1)
    with pytest.raises(ValueError, match="statistic 0 is on cpu but count is on meta"):
        q.update_quant_stat(meta((), dtype=torch.int32), [s], [torch.full((4, 1), 3.0)], [0], 1)
    assert int(count) == 0 and float(s) == 0.0


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_srq_scale_checks_its_statistics_whatever_the_count(device):
    # The CPU kernel checked the statistics' shape only when count > 0; the meta kernel always.
    x = torch.randn(4, 8, device=device)
    for n in (0, 1):
        count = torch.tensor(n, dtype=torch.int32, device=device)
        with pytest.raises(ValueError, match=r"statistic of shape \[1, 3\] does not broadcast"):
            torch.ops.qwix.srq_scale(x, count, [torch.ones(1, 3, device=device)], "int8", "absmax", [], [], [])
        with pytest.raises(TypeError, match="statistics are float32, got Half for statistic 0"):
            torch.ops.qwix.srq_scale(x, count, [torch.ones(1, 1, dtype=torch.half, device=device)], "int8", "absmax",
                                     [], [], [])
    with pytest.raises(ValueError, match=r"qtype 'nvfp4' .* static \(SRQ\) scales are not supported"):
        torch.ops.qwix.srq_scale(torch.randn(4, 16, device=device), torch.ones((), dtype=torch.int32, device=device),
                                 [torch.ones(1, 1, device=device)], "nvfp4", "absmax", [], [], [])


@pytest.mark.parametrize("method", ["absmax,1e39", "fixed,1e39", "fixed,-1e39,1", "absmax,0x10", "fixed,1e-50",
                                    "minmax,nan", "rms,inf"])
def test_calibration_numbers_must_be_decimal_float32(method):
    number = method.split(",")[1]
    with pytest.raises(ValueError, match=f"'{number}' is not a decimal number that float32 can hold"):
        torch.ops.qwix.fake_quant(torch.randn(4), "int8", method, [], [], [], None)


def test_update_quant_stat_leaves_out_a_non_finite_calibration():
    count, lo, hi = torch.tensor(1, dtype=torch.int32), torch.full((1, 2), -1.0), torch.full((1, 2), 1.0)
    cal_lo, cal_hi = torch.tensor([[-2.0, -3.0], [-1.0, float("-inf")]]), torch.tensor([[2.0, 3.0], [1.0, 1.0]])
    torch.ops.qwix.update_quant_stat(count, [lo, hi], [cal_lo, cal_hi], [0], 1)
    assert int(count) == 1 and lo.tolist() == [[-1.0, -1.0]] and hi.tolist() == [[1.0, 1.0]]
    cal_lo[1, 1] = -5.0
    torch.ops.qwix.update_quant_stat(count, [lo, hi], [cal_lo, cal_hi], [0], 1)
    assert int(count) == 2 and lo.tolist() == [[-2.5, -5.0]] and hi.tolist() == [[2.5, 3.0]]
