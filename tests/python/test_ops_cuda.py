"""The CUDA kernels against the CPU kernels (bit-exact for float32) and the
reference; opcheck and torch.compile on CUDA. Runs wherever CUDA exists (the
lent GPU machine runs it via benchmarks/gpu_check.sh); elsewhere the module is
skipped as a whole, since there is no device to run on."""
import pytest
import torch

import qwix_torch as qwix
from _helpers import assert_same, make_input
from reference import ref_fake_quant

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES_AXES = [
    ((64, 4096), dict(channelwise_axes=(0,))),  # per-token, long rows (block per row)
    ((300, 96), dict(channelwise_axes=(0,))),  # short rows (warp per row), rows % 8 != 0
    ((33, 7, 40), dict(channelwise_axes=(0, 1))),  # rows not 16-byte aligned: generic path
    ((32, 512), dict(channelwise_axes=(0,), tiled_axes={1: 128})),  # tiles of the last axis
    ((256, 64), dict(channelwise_axes=(1,))),  # columns: inner kept
    ((1000, 37), dict()),  # per-tensor
    ((4, 6, 8, 8), dict(channelwise_axes=(0,))),  # conv activation
]
QTYPES = ["int8", "int4", "uint8", "float8_e4m3fn", "float8_e5m2", "float4_e2m1fn", "nf4"]
METHODS = ["absmax", "absmax,0.8", "minmax", "rms,3", "fixed,2"]


# minmax needs an integer qtype (other pairs are errors, tested in test_ops_errors).
VALID = [(q, m) for q in QTYPES for m in METHODS if m != "minmax" or q.startswith(("int", "uint"))]


@pytest.mark.parametrize("shape,axes", SHAPES_AXES)
@pytest.mark.parametrize("qtype,method", VALID)
@pytest.mark.parametrize("with_mask", [False, True])
def test_cuda_matches_cpu_fp32(shape, axes, qtype, method, with_mask):
    x = make_input(shape)
    ax, tiles = qwix.resolve_tiled_axes(x.shape, axes.get("tiled_axes"))
    ch = list(axes.get("channelwise_axes", ()))
    y_cpu, m_cpu = torch.ops.qwix.fake_quant_forward(x, qtype, method, ch, ax, tiles, with_mask)
    y_gpu, m_gpu = torch.ops.qwix.fake_quant_forward(x.cuda(), qtype, method, ch, ax, tiles, with_mask)
    if method.startswith("rms"):  # float64 sums in another order: the scale may differ in the last bit
        torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=0, atol=float(y_cpu.abs().max()) * 1e-2)
        return
    assert_same(y_gpu.cpu(), y_cpu, f"{shape} {qtype} {method}")
    assert_same(y_gpu.cpu(), ref_fake_quant(x, qtype, method, axes.get("channelwise_axes", ()), axes.get("tiled_axes")))
    assert torch.equal(m_gpu.cpu(), m_cpu)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_types_match_cpu(dtype):
    x = make_input((128, 1024), dtype=dtype)
    for kw in [dict(channelwise_axes=(0,)), dict(channelwise_axes=(0,), tiled_axes={1: 128}), dict()]:
        assert_same(qwix.fake_quant(x.cuda(), "int8", **kw).cpu(), qwix.fake_quant(x, "int8", **kw))


def test_cuda_with_scale_calibrate_and_backward():
    x = make_input((64, 256))
    xc = x.cuda()
    cal, cal_c = qwix.compute_calibration(x, "minmax", channelwise_axes=(0,)), qwix.compute_calibration(
        xc, "minmax", channelwise_axes=(0,)
    )
    for k in cal:
        assert_same(cal_c[k].cpu(), cal[k])
    s, z = qwix.compute_scale(cal, "uint8")
    sc, zc = qwix.compute_scale(cal_c, "uint8")
    assert_same(sc.cpu(), s)
    assert_same(zc.cpu(), z)
    y = qwix.fake_quant_with_scale(x, s, "uint8", zero_point=z)
    assert_same(qwix.fake_quant_with_scale(xc, sc, "uint8", zero_point=zc).cpu(), y)
    xg = xc.clone().requires_grad_()
    qwix.fake_quant(xg, "int8", calibration_method="absmax,0.5", channelwise_axes=(0,)).sum().backward()
    xr = x.clone().requires_grad_()
    qwix.fake_quant(xr, "int8", calibration_method="absmax,0.5", channelwise_axes=(0,)).sum().backward()
    assert torch.equal(xg.grad.cpu(), xr.grad)


def test_cuda_srq_update_without_host_sync():
    x = make_input((16, 8, 32)).cuda()
    count = torch.zeros((), dtype=torch.int32, device="cuda")
    sums = [torch.zeros(1, 8, 1, device="cuda")]
    s0, _ = qwix.srq_scale(x, count, sums, "int8", channelwise_axes=(0, 1))  # count 0: dynamic
    assert_same(s0.cpu(), qwix.compute_scale(qwix.compute_calibration(x.cpu(), channelwise_axes=(0, 1)), "int8")[0])
    qwix.update_quant_stat_(count, sums, qwix.compute_calibration(x, channelwise_axes=(0, 1)), (0,))
    assert count.item() == 1


def test_cuda_opcheck_and_compile():
    x = make_input((32, 64)).cuda()
    torch.library.opcheck(torch.ops.qwix.fake_quant, (x, "int8", "absmax", [0], [], [], None))
    torch.library.opcheck(torch.ops.qwix.fake_quant_forward, (x, "int4", "minmax", [0], [], [], True))
    torch.library.opcheck(torch.ops.qwix.calibrate, (x, "absmax", [0], [], []))
    xg = x.clone().requires_grad_()
    torch.library.opcheck(torch.ops.qwix.fake_quant, (xg, "int8", "absmax,0.9", [0], [1], [16], None))

    def f(t):
        return qwix.fake_quant(t, "int8", channelwise_axes=(0,)) * 2

    assert_same(torch.compile(f, fullgraph=True)(x), f(x))
