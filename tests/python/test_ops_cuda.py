"""The CUDA kernels against the CPU kernels (bit-exact for float32) and the
reference; opcheck and torch.compile on CUDA. Runs wherever CUDA exists (the
lent GPU machine runs it via benchmarks/gpu_check.sh); elsewhere the module is
skipped as a whole, since there is no device to run on."""
import contextlib

import pytest
import torch

import qwix_torch as qwix
from _helpers import assert_same, make_input
from reference import ref_fake_quant

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES_AXES = [
    # Row layouts take the fused kernel; its threads-per-row config depends on the row length.
    ((300, 96), dict(channelwise_axes=(0,))),  # <= 128: 8 threads per row, rows % 32 != 0
    ((70, 256), dict(channelwise_axes=(0,))),  # <= 512: a warp per row
    ((24, 1032), dict(channelwise_axes=(0,))),  # <= 2048: 2 warps per row
    ((64, 4096), dict(channelwise_axes=(0,))),  # <= 8192: block of 256 per row
    ((3, 20480), dict(channelwise_axes=(0,))),  # > 16384: past the register cache, re-read
    ((300, 100), dict(channelwise_axes=(0,))),  # row length % 8 != 0: generic kernels
    ((33, 7, 40), dict(channelwise_axes=(0, 1))),  # rows not 16-byte aligned: generic path
    ((32, 512), dict(channelwise_axes=(0,), tiled_axes={1: 128})),  # tiles of the last axis
    ((256, 64), dict(channelwise_axes=(1,))),  # columns: inner kept (8 columns per thread)
    ((200, 48), dict(channelwise_axes=(1,))),  # columns, a partial span of rows
    ((67, 16), dict(channelwise_axes=(1,))),  # columns: a last span of 3 rows (rows loaded 4 / 2 at a time)
    ((6, 70, 24), dict(channelwise_axes=(0, 2))),  # columns under a kept outer axis
    ((90, 12), dict(channelwise_axes=(1,))),  # columns % 8 != 0: generic kernels
    ((6, 8, 16), dict(channelwise_axes=(1,))),  # kept axis in the middle: generic kernels
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
@pytest.mark.parametrize("qtype", ["int8", "float8_e4m3fn", "nf4"])
@pytest.mark.parametrize("shape", [(128, 1024), (8, 8192), (37, 24)])
def test_cuda_half_types_match_cpu(dtype, qtype, shape):
    x = make_input(shape, dtype=dtype)
    kws = [dict(channelwise_axes=(0,)), dict(), dict(channelwise_axes=(1,))]
    if shape[1] % 128 == 0:
        kws.append(dict(channelwise_axes=(0,), tiled_axes={1: 128}))
    for kw in kws:
        for method in ["absmax", "absmax,0.7"]:
            y, m = torch.ops.qwix.fake_quant_forward(
                x.cuda(), qtype, method, list(kw.get("channelwise_axes", ())),
                *qwix.resolve_tiled_axes(x.shape, kw.get("tiled_axes")), True)
            y_cpu, m_cpu = torch.ops.qwix.fake_quant_forward(
                x, qtype, method, list(kw.get("channelwise_axes", ())),
                *qwix.resolve_tiled_axes(x.shape, kw.get("tiled_axes")), True)
            assert_same(y.cpu(), y_cpu, f"{dtype} {qtype} {shape} {kw} {method}")
            assert torch.equal(m.cpu(), m_cpu)


def unaligned_and_strided_inputs(dtype):
    """A storage offset that breaks 16-byte alignment, a transposed and a channels_last tensor."""
    base = make_input((64 * 256 + 1,), dtype=dtype)
    return [base[1:].view(64, 256), make_input((256, 64), dtype=dtype).t(),
            make_input((4, 8, 6, 6), dtype=dtype).to(memory_format=torch.channels_last)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_unaligned_and_strided_inputs(dtype):
    for x in unaligned_and_strided_inputs(dtype):
        for kw in [dict(channelwise_axes=(0,)), dict()]:
            assert_same(qwix.fake_quant(x.cuda(), "int8", **kw).cpu(), qwix.fake_quant(x, "int8", **kw))
            assert_same(qwix.fake_quant(x.cuda(), "int4", calibration_method="absmax,0.9", **kw).cpu(),
                        qwix.fake_quant(x, "int4", calibration_method="absmax,0.9", **kw))


def test_cuda_backward_matches_cpu():
    """Masked backward (bit-packed mask), odd sizes, aligned and not."""
    for shape in [(64, 256), (7, 13), (5, 1000)]:
        x = make_input(shape)
        g = make_input(shape, seed=1)
        grads = []
        for dev in ["cpu", "cuda"]:
            xg = x.detach().to(dev).clone().requires_grad_()
            qwix.fake_quant(xg, "int8", calibration_method="absmax,0.6", channelwise_axes=(0,)).backward(g.to(dev))
            grads.append(xg.grad.cpu())
        assert_same(grads[1], grads[0], str(shape))
        assert (grads[0] == 0).any() and (grads[0] != 0).any()


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
    # Static per-channel scales of the last axis (the columns kernel), with the mask.
    s_col = qwix.compute_scale(qwix.compute_calibration(x, "absmax", channelwise_axes=(1,)), "int8")[0] * 0.7
    for xx in (x, make_input((64, 256), dtype=torch.bfloat16)):
        y, m = torch.ops.qwix.fake_quant_with_scale_forward(xx, s_col, None, "int8", True)
        yc, mc = torch.ops.qwix.fake_quant_with_scale_forward(xx.cuda(), s_col.cuda(), None, "int8", True)
        assert_same(yc.cpu(), y)
        assert torch.equal(mc.cpu(), m) and 0 < int(m.sum()) < 255 * m.numel()
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


def test_cuda_qat_model_matches_cpu():
    """A QAT model (dynamic int8 + SRQ) on CUDA: same forward, gradients and statistics as on CPU."""
    torch.manual_seed(0)
    fp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16))
    rules = [qwix.QuantizationRule(module_path="0", weight_qtype="int8", act_qtype="int8", act_static_scale=True),
             qwix.QuantizationRule(weight_qtype="int4", act_qtype="int8", tile_size=32)]
    x = make_input((32, 64))
    outs, grads, stats = [], [], []
    for dev in ["cpu", "cuda"]:
        m = qwix.quantize_model(fp.to(dev), qwix.QatProvider(rules), x.to(dev))
        for _ in range(2):
            y = m(x.to(dev))
        y.sum().backward()
        outs.append(y.detach().cpu())
        grads.append([p.grad.cpu() for p in m.parameters()])
        stats.append({k: v.cpu() for k, v in m.state_dict().items() if "sum_of" in k or k.endswith("count")})
    # Layer 0 sees the same input on both devices: its per-token calibration is bit-equal, and its batch
    # mean (ATen's mean, which sums in another order on CUDA) within a few ulps. Later layers see matmul
    # outputs (cuBLAS vs CPU BLAS sum in other orders), so they agree closely.
    first = [k for k in stats[0] if k.startswith("0.")]
    assert first and stats[0].keys() == stats[1].keys()
    for k in stats[0]:
        if not stats[0][k].is_floating_point():
            assert_same(stats[1][k], stats[0][k], k)
        else:
            torch.testing.assert_close(stats[1][k], stats[0][k], rtol=1e-6 if k in first else 1e-4, atol=0)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=float(outs[0].abs().max()) * 2e-2)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=float(b.abs().max()) * 2e-2)


def test_cuda_decomposed_attention_matches_cpu():
    """F.scaled_dot_product_attention decomposed and quantized (SRQ) on CUDA: as on CPU, same statistics."""
    from test_qat_attention import SdpaAttention, _masks

    torch.manual_seed(0)
    fp = SdpaAttention()
    rules = [qwix.QuantizationRule(weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
    x, mask = make_input((2, 6, 16)), _masks(6)["bool"]
    outs, stats = [], []
    for dev in ["cpu", "cuda"]:
        m = qwix.quantize_model(fp.to(dev), qwix.QatProvider(rules), x.to(dev), mask.to(dev))
        y = m(x.to(dev), mask.to(dev))
        y.sum().backward()
        outs.append(y.detach().cpu())
        stats.append({k: v.cpu() for k, v in m.state_dict().items() if "sum_of" in k or k.endswith("count")})
    assert stats[0].keys() == stats[1].keys() and "matmul1_rhs.sum_of_absmax" in stats[0]
    for k in stats[0]:
        torch.testing.assert_close(stats[1][k], stats[0][k], rtol=1e-4, atol=0)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=float(outs[0].abs().max()) * 2e-2)


def special_values_input(dtype):
    """[16, 256]: rows with NaN, +Inf, -Inf, values up to +-3e38, -0, subnormals, a run of zeros."""
    x = make_input((16, 256))
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    x[3, 7] = -float("inf")
    x[4] = torch.linspace(-3.0e38, 3.0e38, 256)
    x[5, :8] = -0.0
    x[6] = x[6] * 1e-42  # subnormal and tiny
    x[7, 100:] = 0.0
    return x.to(dtype)


@pytest.mark.parametrize("qtype,method", [("int8", "absmax"), ("nf4", "absmax"), ("int4", "minmax"),
                                          ("float4_e2m1fn", "absmax"), ("float8_e4m3fn", "absmax,0.5")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_special_values_match_cpu(qtype, method, dtype):
    """NaN/Inf groups, values near FLT_MAX (huge scales), subnormals and -0: the kernels' fast
    reciprocal path falls back to the checked division and gives the CPU's bits."""
    x = special_values_input(dtype)
    for kw in [dict(ch=[0]), dict(ch=[]), dict(ch=[1]), dict(ch=[0], tiled=[1], tiles=[128])]:
        args = (qtype, method, kw["ch"], kw.get("tiled", []), kw.get("tiles", []), True)
        y, m = torch.ops.qwix.fake_quant_forward(x, *args)
        yc, mc = torch.ops.qwix.fake_quant_forward(x.cuda(), *args)
        assert_same(yc.cpu(), y, f"{kw}")
        assert torch.equal(mc.cpu(), m)


def test_cuda_static_scale_overflowing_quotients_match_cpu():
    """A tiny static scale makes x / scale overflow float32: saturates like the CPU."""
    x = make_input((8, 64)) * 1e25
    x[0, 0] = float("nan")
    for scale in [torch.tensor(1e-19), torch.tensor(2e-20), torch.full((8, 1), 1e-12)]:
        for qtype in ["int8", "float8_e4m3fn", "nf4"]:
            y, m = torch.ops.qwix.fake_quant_with_scale_forward(x, scale, None, qtype, True)
            yc, mc = torch.ops.qwix.fake_quant_with_scale_forward(x.cuda(), scale.cuda(), None, qtype, True)
            assert_same(yc.cpu(), y, f"{qtype} {scale.shape}")
            assert torch.equal(mc.cpu(), m)


@pytest.mark.parametrize("qtype", ["mxfp8", "mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_block_formats_match_cpu(qtype, dtype):
    """MX blocks of 32 (the fused row kernel with 4 or 8 threads per block) and power-of-two scales;
    nvfp4 (composed from calibrate and fake_quant_with_scale on the device)."""
    for shape in [(64, 256), (3, 5, 96), (4, 8192)]:
        x = make_input(shape, dtype=dtype)
        for method in (["absmax"] if qtype == "nvfp4" else ["absmax", "absmax,0.8", "fixed,2"]):
            y, m = torch.ops.qwix.fake_quant_forward(x, qtype, method, [], [], [], True)
            yc, mc = torch.ops.qwix.fake_quant_forward(x.cuda(), qtype, method, [], [], [], True)
            assert_same(yc.cpu(), y, f"{qtype} {shape} {method}")
            assert torch.equal(mc.cpu(), m)


def test_cuda_operands_on_the_cpu_are_a_clear_error():
    # The CUDA kernels set their device guard from the first operand, which threw torch's "CUDAGuardImpl
    # initialized with non-CUDA DeviceType" for a CPU one before the device checks ran.
    x = make_input((4, 8))
    q = torch.ops.qwix
    with pytest.raises(ValueError, match="mask is on cuda:0 but grad is on cpu"):
        q.fake_quant_backward(x, torch.zeros(4, dtype=torch.uint8, device="cuda"))
    with pytest.raises(ValueError, match="scale is on cuda:0 but the input is on cpu"):
        q.fake_quant_with_scale_forward(x, torch.ones((), device="cuda"), None, "int8", False)
    with pytest.raises(ValueError, match="a calibration tensor is on cuda:0 but the first is on cpu"):
        q.compute_scale([torch.ones(4, 1), torch.ones(4, 1, device="cuda")], "int8")


def test_cuda_srq_scale_with_a_cpu_count_matches_cpu():
    # A CPU scalar count divided the CUDA sums as a multiply by its rounded reciprocal (one ulp off).
    x, sums = make_input((4, 8)), [torch.rand(4, 1) + 0.5]
    for n in (3, 5, 7, 11):
        count = torch.tensor(n, dtype=torch.int32)
        want = torch.ops.qwix.srq_scale(x, count, sums, "int8", "absmax", [0], [], [])
        got = torch.ops.qwix.srq_scale(x.cuda(), count, [s.cuda() for s in sums], "int8", "absmax", [0], [], [])
        assert_same(got[0].cpu(), want[0], f"count {n}")


def _row_calibration_and_chunk_groups(device):
    """The calibrate op of row layouts (one reduction kernel per row length config) and static scales
    shared by runs of elements (SRQ's [1, T, 1] scales of [B, T, E] activations) against the CPU."""
    for shape, axes in SHAPES_AXES[:8]:
        for dtype in (torch.float32, torch.bfloat16):
            x = make_input(shape, dtype=dtype)
            x.view(-1)[5] = float("inf")  # one non-finite group
            ax, tiles = qwix.resolve_tiled_axes(x.shape, axes.get("tiled_axes"))
            ch = list(axes.get("channelwise_axes", ()))
            for method in ["absmax", "absmax,0.8", "minmax", "rms,3"]:
                want = torch.ops.qwix.calibrate(x, method, ch, ax, tiles)
                got = torch.ops.qwix.calibrate(x.to(device), method, ch, ax, tiles)
                for g, w in zip(got, want):
                    if method.startswith("rms"):  # float64 sums in another order
                        torch.testing.assert_close(g.cpu(), w, rtol=1e-6, atol=0, equal_nan=True)
                    else:
                        assert_same(g.cpu(), w, f"{shape} {dtype} {method}")
    for shape in [(4, 6, 64), (3, 5, 40), (2, 9, 12)]:  # E % 8 == 0 (one lookup per chunk) and not
        b, t, e = shape
        for dtype in (torch.float32, torch.bfloat16):
            x = make_input(shape, dtype=dtype)
            s = torch.rand(1, t, 1) * 0.05 + 0.01
            z = torch.randint(0, 255, (1, t, 1)).float()
            for qtype, zp in [("int8", None), ("uint8", z), ("float8_e4m3fn", None)]:
                y, m = torch.ops.qwix.fake_quant_with_scale_forward(x, s, zp, qtype, True)
                zd = zp.to(device) if zp is not None else None
                yd, md = torch.ops.qwix.fake_quant_with_scale_forward(x.to(device), s.to(device), zd, qtype, True)
                assert_same(yd.cpu(), y, f"{shape} {dtype} {qtype}")
                assert torch.equal(md.cpu(), m)


def test_cuda_row_calibration_and_chunk_groups_match_cpu():
    _row_calibration_and_chunk_groups("cuda")


def _func_transform_results(dev):
    from torch.func import grad, jvp, vmap

    def fq(a):
        return qwix.fake_quant(a, "int8", calibration_method="absmax,0.7", channelwise_axes=(0,))

    def fq_w(w):
        return qwix.fake_quant(w, "int4", calibration_method="absmax,0.8", channelwise_axes=(1,))

    xs, g, w = (make_input(s, i).to(dev) for i, s in enumerate([(6, 4, 24), (4, 24), (24, 8)]))
    cot = make_input((6, 24, 8), 4).to(dev)
    return [
        vmap(grad(lambda a: (fq(a) * g).sum()))(xs),  # per-sample masks (the rule's whole-batch call)
        vmap(grad(lambda a: (fq(a.t()) * g.t()).sum()))(xs),  # transposed samples
        jvp(fq, (xs[0],), (g,))[1],  # forward mode
        vmap(grad(lambda w, c: (fq_w(w) * c).sum()), in_dims=(None, 0))(w, cot),  # a shared weight mask
    ]


def test_cuda_func_transforms_match_cpu():
    """torch.func on CUDA (vmap rules, the straight-through node, forward-mode AD): as on the CPU, bit for bit."""
    for i, (a, b) in enumerate(zip(_func_transform_results("cpu"), _func_transform_results("cuda"))):
        assert_same(b.cpu(), a, f"result {i}")


def ops_and_a_qat_training_step(device, guard=contextlib.nullcontext):
    """Every op, its backward and a QAT training step (dynamic and SRQ statistics, an SGD step) on
    `device`, the work inside `guard` (test_ops_integration runs it on the CPU, so it stays valid)."""
    torch.manual_seed(0)
    fp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16)).to(device)
    rules = [qwix.QuantizationRule(module_path="0", weight_qtype="int8", act_qtype="int8", act_static_scale=True),
             qwix.QuantizationRule(weight_qtype="int4", act_qtype="float8_e4m3fn", tile_size=32)]
    x = make_input((32, 64)).to(device)
    model = qwix.quantize_model(fp, qwix.QatProvider(rules), x)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xs = make_input((64, 256)).to(device).requires_grad_()
    count = torch.zeros((), dtype=torch.int32, device=device)
    sums = [torch.zeros(64, 1, device=device)]
    with guard():
        for kw in [dict(channelwise_axes=(0,)), dict(), dict(channelwise_axes=(1,)),
                   dict(channelwise_axes=(0,), tiled_axes={1: 128})]:
            qwix.fake_quant(xs, "int8", calibration_method="absmax,0.8", **kw).sum().backward()
        for qtype in ["nvfp4", "mxfp8"]:
            torch.ops.qwix.fake_quant_forward(xs.detach(), qtype, "absmax", [], [], [], True)
        cal = qwix.compute_calibration(xs.detach(), "minmax", channelwise_axes=(0,))
        s, z = qwix.compute_scale(cal, "uint8")
        qwix.fake_quant_with_scale(xs, s, "uint8", zero_point=z).sum().backward()
        for _ in range(2):
            qwix.srq_scale(xs.detach(), count, sums, "int8", channelwise_axes=(0,))
            qwix.update_quant_stat_(count, sums, qwix.compute_calibration(xs.detach(), channelwise_axes=(0,)), ())
        for _ in range(2):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    assert int(count) == 2 and xs.grad is not None and all(p.grad is not None for p in model.parameters())


@contextlib.contextmanager
def _raise_on_host_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_cuda_ops_and_a_qat_training_step_never_sync_with_the_host():
    """Issue 3's "no host syncs anywhere": torch's sync debug mode raises on any synchronization."""
    ops_and_a_qat_training_step("cuda", _raise_on_host_sync)
