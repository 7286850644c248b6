"""The CUDA kernels (cuda/*.cu) run on the CPU under the CUDA emulator
(tests/cuda_emu) against the CPU kernels: bit-exact for every dtype, the same
cases as test_ops_cuda.py runs on a GPU. CI has no GPU; this is where it runs
the kernels' indexing, row/column/tile choices, reductions, tails and masks.
The library is built with AddressSanitizer and UBSan (out-of-bounds accesses
and misaligned vector loads abort), so `make test-cuda-emu` runs this module
with their runtimes preloaded; a plain pytest run skips it.

The emulated ops are `torch.ops.qwix_cuda_emu.*`: the CUDA entry points
themselves, taking CPU tensors. nvfp4 composes qwix ops through the
dispatcher, so it runs on the emulated kernels only where the qwix ops' CPU
kernels are routed to them (the QAT model tests at the end). The emulator does
not run the numerics' device-only branches (`__CUDA_ARCH__`: NaN-propagating
min/max, fmaf intrinsics) or nvcc's code generation; the GPU run checks those."""
import os
import subprocess
import sys

import pytest
import torch

import qwix_torch as qwix
from _helpers import assert_same, make_input
from test_ops_cuda import SHAPES_AXES, VALID, special_values_input, unaligned_and_strided_inputs

LIB = os.environ.get("QWIX_CUDA_EMU_LIB")
pytestmark = pytest.mark.skipif(
    not LIB, reason="runs under `make test-cuda-emu` (needs the ASan runtime preloaded)")
if LIB:
    torch.ops.load_library(LIB)

Q = torch.ops.qwix
E = torch.ops.qwix_cuda_emu if LIB else None


@pytest.fixture(autouse=True)
def _uninitialized_memory_is_nan():
    """Fresh tensors (at::empty) come filled with NaN (integers: their max), as garbage on a GPU
    would be anything: an output element a kernel never writes cannot pass as a zero."""
    before = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.utils.deterministic.fill_uninitialized_memory = before[1]


def _forward_both(x, qtype, method, ch, tiled, tiles, with_mask=True):
    want = Q.fake_quant_forward(x, qtype, method, ch, tiled, tiles, with_mask)
    got = E.fake_quant_forward(x, qtype, method, ch, tiled, tiles, with_mask)
    return got, want


def _assert_forward_same(x, qtype, method, ch, tiled=(), tiles=(), what=""):
    (y, m), (yw, mw) = _forward_both(x, qtype, method, list(ch), list(tiled), list(tiles))
    if method.startswith("rms"):
        # float64 sums in another order: the scale may differ from the CPU's in the last bit. Exact
        # instead: the CPU's quantization with the scale of the emulated kernels' own calibration (the
        # mask, [-rms * 3, rms * 3], is the CPU's: only an element within an ulp of it could differ).
        scale = Q.compute_scale(E.calibrate(x, method, list(ch), list(tiled), list(tiles)), qtype)[0]
        yw = Q.fake_quant_with_scale_forward(x, scale, None, qtype, False)[0]
    assert_same(y, yw, what)
    assert torch.equal(m, mw), f"{what}: masks differ"


# ------------------------------------------------------------------ the emulator itself
S = torch.ops.qwix_cuda_emu_selftest if LIB else None


def test_emulator_shuffles_and_barriers_give_cudas_results():
    x = torch.randint(-1000, 1000, (512,), dtype=torch.long)
    for width in (8, 32):
        want = x.view(-1, width).sum(1, keepdim=True).expand(-1, width).reshape(-1)
        assert torch.equal(S.lanes_sum(x, width), want)
    assert torch.equal(S.block_reverse(x), x.view(-1, 256).flip(1).reshape(-1))


def _shuffle_want(lane_mask, width, active):
    """CUDA's __shfl_xor_sync on a (16, 4) block: lanes are linear indices mod 32; a source lane in a
    later group of `width` lanes gives the caller's own value; exited lanes write nothing (-1)."""
    want = []
    for t in range(64):
        lane = t % 32
        src = lane ^ lane_mask
        want.append(-1 if lane >= active else t if src // width > lane // width else t - lane + src)
    return torch.tensor(want)


@pytest.mark.parametrize("lane_mask,width,mask,active", [
    (16, 32, 0xFFFFFFFF, 32),  # a 2-D block: lanes count x fastest, then y
    (8, 8, 0xFFFFFFFF, 32),  # sources in a later group of 8 return the caller's own value
    (1, 32, 0x0000FFFF, 16),  # a partial mask: lanes 0-15 shuffle among themselves
    (1, 8, 0xFFFFFFFF, 8),  # a full mask whose lanes 8-31 exited first (defined: they take no part)
])
def test_emulator_shuffle_semantics(lane_mask, width, mask, active):
    assert torch.equal(S.shuffle(lane_mask, width, mask, active), _shuffle_want(lane_mask, width, active))


def test_emulator_shows_a_missing_barrier_and_shared_garbage():
    """Warps run ahead of each other, so a shared array reused without a barrier gives wrong sums; an
    unwritten __shared__ slot reads as garbage (0xA5 bytes), not as a convenient zero."""
    x = torch.randint(1, 100, (128,), dtype=torch.long)
    assert torch.equal(S.block_sum_twice(x, True), torch.full((128,), 3 * int(x.sum())))
    assert not torch.equal(S.block_sum_twice(x, False), torch.full((128,), 3 * int(x.sum())))
    garbage = int.from_bytes(b"\xa5" * 8, "little", signed=True)  # block 0 writes 64 slots, block 1 only 32
    assert torch.equal(S.unwritten_shared(), torch.cat([torch.arange(64), torch.arange(32), torch.full((32,), garbage)]))


@pytest.mark.parametrize("fault,message", [
    ("early_exit", r"deadlock in block \(0,0,0\): 63 threads wait at __syncthreads .* e.g. thread \(0,0,0\) exited"),
    ("empty_grid", r"invalid grid \(0, 1, 1\)"),
    ("big_block", r"invalid block \(2048, 1, 1\)"),
    ("over_launch_bounds", r"launched with 512 threads per block, over its __launch_bounds__\(256\)"),
])
def test_emulator_reports_gpu_faults(fault, message):
    with pytest.raises(RuntimeError, match=message):
        S.launch_fault(fault, True)


def test_emulator_reports_a_shuffle_from_a_lane_that_takes_no_part():
    with pytest.raises(RuntimeError, match=r"from lane 8, which takes no part"):
        S.shuffle(8, 32, 0xFFFFFFFF, 8)


def test_emulator_raises_an_unchecked_launch_error_at_the_next_launch():
    """As on a GPU, a failed launch surfaces at C10_CUDA_KERNEL_LAUNCH_CHECK; a launch whose check is
    missing fails the next launch instead of passing silently."""
    S.launch_fault("empty_grid", False)
    with pytest.raises(RuntimeError, match=r"an earlier launch failed and no C10_CUDA_KERNEL_LAUNCH_CHECK .*grid"):
        S.lanes_sum(torch.zeros(64, dtype=torch.long), 8)
    assert torch.equal(S.lanes_sum(torch.ones(64, dtype=torch.long), 8), torch.full((64,), 8))


def test_emulator_catches_out_of_bounds_reads():
    """AddressSanitizer sees a kernel's read past the end of a tensor (in a child: it aborts)."""
    code = (f"import torch; torch.ops.load_library({LIB!r}); "
            "torch.ops.qwix_cuda_emu_selftest.launch_fault('out_of_bounds', True)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "heap-buffer-overflow" in r.stderr and "out_of_bounds_kernel" in r.stderr, r.stderr[-3000:]


# ------------------------------------------------------------------ the qwix kernels
@pytest.mark.parametrize("shape,axes", SHAPES_AXES)
@pytest.mark.parametrize("qtype,method", VALID)
def test_emulated_cuda_matches_cpu_fp32(shape, axes, qtype, method):
    x = make_input(shape)
    tiled, tiles = qwix.resolve_tiled_axes(x.shape, axes.get("tiled_axes"))
    ch = list(axes.get("channelwise_axes", ()))
    _assert_forward_same(x, qtype, method, ch, tiled, tiles, f"{shape} {qtype} {method}")
    y, m = E.fake_quant_forward(x, qtype, method, ch, tiled, tiles, False)  # the kernels without mask work
    assert m.numel() == 0
    assert_same(y, E.fake_quant_forward(x, qtype, method, ch, tiled, tiles, True)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,axes", SHAPES_AXES)
def test_emulated_cuda_half_types_match_cpu(dtype, shape, axes):
    x = make_input(shape, dtype=dtype)
    tiled, tiles = qwix.resolve_tiled_axes(x.shape, axes.get("tiled_axes"))
    for qtype, method in [("int8", "absmax"), ("float8_e4m3fn", "absmax,0.7"), ("uint8", "minmax"),
                          ("nf4", "absmax"), ("int4", "rms,3"), ("float8_e5m2", "fixed,2")]:
        _assert_forward_same(x, qtype, method, axes.get("channelwise_axes", ()), tiled, tiles,
                             f"{dtype} {shape} {qtype} {method}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_cuda_unaligned_and_strided_inputs(dtype):
    for x in unaligned_and_strided_inputs(dtype):
        for ch in [(0,), (), (1,)]:
            for qtype, method in [("int8", "absmax"), ("int4", "absmax,0.9"), ("uint8", "minmax")]:
                _assert_forward_same(x, qtype, method, ch, what=f"{x.shape} {x.stride()} {ch} {qtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_emulated_cuda_backward_matches_cpu(dtype):
    """Masked backward from the bit-packed mask: odd sizes, aligned and not (a storage offset)."""
    for shape in [(64, 256), (7, 13), (5, 1000), (3, 8)]:
        x, g = make_input(shape, dtype=dtype), make_input(shape, seed=1, dtype=dtype)
        _, mask = Q.fake_quant_forward(x, "int8", "absmax,0.6", [0], [], [], True)
        grad = E.fake_quant_backward(g, mask)
        assert_same(grad, Q.fake_quant_backward(g, mask), f"{shape}")
        offset = make_input((g.numel() + 1,), seed=2, dtype=dtype)[1:].view(shape)
        assert_same(E.fake_quant_backward(offset, mask), Q.fake_quant_backward(offset, mask), f"{shape} offset")
        assert (grad == 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_cuda_calibrate_and_compute_scale_match_cpu(dtype):
    """calibrate (the row-statistics kernel per row length, columns, per-tensor, generic), compute_scale."""
    for shape, axes in SHAPES_AXES:
        x = make_input(shape, dtype=dtype)
        x.view(-1)[5] = float("inf")  # one non-finite group
        tiled, tiles = qwix.resolve_tiled_axes(x.shape, axes.get("tiled_axes"))
        ch = list(axes.get("channelwise_axes", ()))
        for method in ["absmax", "absmax,0.8", "minmax", "rms,3", "fixed,2"]:
            want = Q.calibrate(x, method, ch, tiled, tiles)
            got = E.calibrate(x, method, ch, tiled, tiles)
            assert len(got) == len(want)
            for g, w in zip(got, want):
                if method.startswith("rms"):  # float64 sums in another order
                    torch.testing.assert_close(g, w, rtol=1e-6, atol=0, equal_nan=True)
                else:
                    assert_same(g, w, f"{shape} {dtype} {method}")
            for qtype in (["uint8", "int4"] if method == "minmax" else ["int8", "float8_e4m3fn", "nf4"]):
                cal = [t.nan_to_num(posinf=7.0) for t in want]
                for g, w in zip(E.compute_scale(cal, qtype), Q.compute_scale(cal, qtype)):
                    assert_same(g, w, f"{shape} {method} {qtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_emulated_cuda_with_scale_matches_cpu(dtype):
    """Static scales: per-tensor, per-channel of the last axis (the columns kernel), per-token runs
    (one lookup per chunk when E % 8 == 0), a kept middle axis (generic walk), with zero points."""
    cases = [((64, 256), (1, 256)), ((64, 256), (64, 1)), ((64, 256), ()), ((4, 6, 64), (1, 6, 1)),
             ((3, 5, 40), (1, 5, 1)), ((2, 9, 12), (1, 9, 1)), ((6, 70, 24), (6, 1, 24)), ((90, 12), (1, 12))]
    for shape, sshape in cases:
        x = make_input(shape, dtype=dtype)
        s = torch.rand(sshape) * 0.05 + 0.01
        z = torch.randint(0, 255, sshape).float()
        for qtype, zp in [("int8", None), ("uint8", z), ("float8_e4m3fn", None), ("int4", None), ("nf4", None)]:
            y, m = Q.fake_quant_with_scale_forward(x, s, zp, qtype, True)
            ye, me = E.fake_quant_with_scale_forward(x, s, zp, qtype, True)
            assert_same(ye, y, f"{shape} {sshape} {dtype} {qtype}")
            assert torch.equal(me, m) and 0 < int(m.sum()), f"{shape} {sshape} {qtype}"


@pytest.mark.parametrize("qtype,method", [("int8", "absmax"), ("nf4", "absmax"), ("int4", "minmax"),
                                          ("float4_e2m1fn", "absmax"), ("float8_e4m3fn", "absmax,0.5")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_cuda_special_values_match_cpu(qtype, method, dtype):
    """NaN/Inf groups, values near FLT_MAX (huge scales), subnormals and -0: the fast reciprocal path
    falls back to the checked division."""
    x = special_values_input(dtype)
    for ch, tiled, tiles in [([0], [], []), ([], [], []), ([1], [], []), ([0], [1], [128])]:
        _assert_forward_same(x, qtype, method, ch, tiled, tiles, f"{ch} {tiled}")


def test_emulated_cuda_static_scale_overflowing_quotients_match_cpu():
    x = make_input((8, 64)) * 1e25
    x[0, 0] = float("nan")
    for scale in [torch.tensor(1e-19), torch.tensor(2e-20), torch.full((8, 1), 1e-12), torch.full((1, 64), 1e-12)]:
        for qtype in ["int8", "float8_e4m3fn", "nf4"]:
            y, m = Q.fake_quant_with_scale_forward(x, scale, None, qtype, True)
            ye, me = E.fake_quant_with_scale_forward(x, scale, None, qtype, True)
            assert_same(ye, y, f"{qtype} {scale.shape}")
            assert torch.equal(me, m)


@pytest.mark.parametrize("qtype", ["mxfp8", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_cuda_mx_blocks_match_cpu(qtype, dtype):
    """MX blocks of 32 along the last axis: the fused row kernel with 4 or 8 threads per block."""
    for shape in [(64, 256), (3, 5, 96), (4, 8192)]:
        x = make_input(shape, dtype=dtype)
        for method in ["absmax", "absmax,0.8", "fixed,2"]:
            _assert_forward_same(x, qtype, method, [], what=f"{qtype} {shape} {method}")


def test_emulated_cuda_many_rows_and_long_rows():
    """Row counts that leave a block partly idle, and rows past the register cache (re-read)."""
    for shape in [(1, 8), (5, 8), (33, 16), (257, 64), (2, 40000), (1, 16392)]:
        x = make_input(shape)
        for qtype, method in [("int8", "absmax"), ("uint8", "minmax"), ("int4", "rms,3")]:
            _assert_forward_same(x, qtype, method, [0], what=f"{shape} {qtype} {method}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_cuda_issue3_bar_configurations(dtype):
    """The benchmark's kernels on a few rows of 8192: per-token (256 threads x 4 cached chunks per row)
    and per-tile(128) (4 or 8 threads per tile), int8 and float8_e4m3fn, forward and backward."""
    x, g = make_input((6, 8192), dtype=dtype), make_input((6, 8192), seed=1, dtype=dtype)
    for tiled, tiles in [([], []), ([1], [128])]:
        for qtype in ["int8", "float8_e4m3fn"]:
            _assert_forward_same(x, qtype, "absmax", [0], tiled, tiles, f"{tiles} {qtype}")
            _, mask = Q.fake_quant_forward(x, qtype, "absmax,0.5", [0], tiled, tiles, True)
            assert_same(E.fake_quant_backward(g, mask), Q.fake_quant_backward(g, mask), f"{tiles} {qtype}")


def _random_case(rng):
    """A random layout: rank 1-5, a random subset of channelwise axes, maybe a tile of one other axis,
    a permuted / offset (misaligned) / strided / expanded view, any dtype, any valid qtype and method."""
    rank = rng.randint(1, 5)
    shape = [rng.choice([1, 2, 3, 5, 8, 12, 16, 24, 40, 64, 96, 128, 136, 256]) for _ in range(rank)]
    if rng.random() < 0.5:
        shape[-1] = rng.choice([8, 16, 64, 128, 520, 1032, 2056, 4104, 16392])
    while torch.Size(shape).numel() > 60_000:
        shape[shape.index(max(shape))] //= 2
    ch = sorted(rng.sample(range(rank), rng.randint(0, rank)))
    tiled, tiles = [], []
    others = [a for a in range(rank) if a not in ch and shape[a] % 2 == 0]
    if others and rng.random() < 0.3:
        a = rng.choice(others)
        tiled, tiles = [a], [rng.choice([t for t in (2, 4, 8, 16, 32, 128) if shape[a] % t == 0] or [shape[a]])]
    dtype = rng.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16])
    view = rng.choice(["contiguous", "permute", "offset", "step", "expand"])
    if view == "permute":
        perm = rng.sample(range(rank), rank)
        x = make_input([shape[p] for p in perm], dtype=dtype).permute([perm.index(a) for a in range(rank)])
    elif view == "offset":
        x = make_input([torch.Size(shape).numel() + 3], dtype=dtype)[3:].view(shape)
    elif view == "step":
        x = make_input(shape[:-1] + [shape[-1] * 2], dtype=dtype)[..., ::2]
    elif view == "expand":
        x = make_input([1] + shape[1:], dtype=dtype).expand(shape)
    else:
        x = make_input(shape, dtype=dtype)
    qtype, method = rng.choice(VALID)
    return x, qtype, method, ch, tiled, tiles, f"{shape} {view} {dtype} ch={ch} tiles={tiled}{tiles} {qtype} {method}"


@pytest.mark.parametrize("seed", range(16))
def test_emulated_cuda_random_layouts_match_cpu(seed):
    """Seeded random layouts (40 per seed): every layout the kernels pick between -- fused rows,
    columns, per-tensor, the generic walk -- on views of every kind, against the CPU kernels."""
    import random

    rng = random.Random(seed)
    for _ in range(40):
        x, qtype, method, ch, tiled, tiles, what = _random_case(rng)
        _assert_forward_same(x, qtype, method, ch, tiled, tiles, what)


class _EmulatedCudaKernels:
    """Routes the qwix ops' CPU kernels to the emulated CUDA entry points for a while, so a whole QAT
    model (its Python rules, the SRQ statistics, the composite ops, nvfp4's composition) runs on the
    CUDA kernels while every other op stays the same CPU op."""

    OPS = ["fake_quant_forward", "fake_quant_with_scale_forward", "calibrate", "compute_scale",
           "fake_quant_backward"]

    def __enter__(self):
        import warnings

        self.calls = {name: 0 for name in self.OPS}
        self.lib = torch.library.Library("qwix", "IMPL")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
                for name in self.OPS:
                    self.lib.impl(name, self._positional(name), "CPU")
        except BaseException:
            self.lib._destroy()  # no override outlives a failed setup
            raise
        return self

    def _positional(self, name):
        """The emulated op takes its arguments by position (its schema's names are inferred: _0, _1, ...)."""
        params = getattr(Q, name).default._schema.arguments
        emulated = getattr(E, name)

        def call(*args, **kwargs):
            self.calls[name] += 1
            return emulated(*args, *[kwargs.get(a.name, a.default_value) for a in params[len(args):]])

        return call

    def __exit__(self, *exc):
        self.lib._destroy()  # the CPU kernels are back


def _qat_run(model_fn, rules, inputs, steps=2):
    torch.manual_seed(0)
    model = qwix.quantize_model(model_fn(), qwix.QatProvider(rules), *inputs)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    outs = []
    for _ in range(steps):
        opt.zero_grad()
        y = model(*inputs)
        y.square().mean().backward()
        opt.step()
        outs.append(y.detach())
    return outs, [p.grad for p in model.parameters()], model.state_dict()


def _assert_runs_same(got, want):
    """Outputs, gradients and the state dict (weights, SRQ statistics) of two _qat_run runs, bit for bit."""
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert_same(a, b)
    assert got[2].keys() == want[2].keys()
    for k in want[2]:
        assert_same(got[2][k], want[2][k], k)


def test_a_qat_model_on_the_emulated_cuda_kernels_matches_the_cpu():
    """Dynamic per-token / per-tile / nvfp4 and SRQ rules, trained two steps: outputs, gradients,
    weights and SRQ statistics bit-equal to the CPU kernels' run."""
    def model_fn():
        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
                                   torch.nn.ReLU(), torch.nn.Linear(128, 16))

    rules = [qwix.QuantizationRule(module_path="0", weight_qtype="int8", act_qtype="int8", act_static_scale=True),
             qwix.QuantizationRule(module_path="2", weight_qtype="nvfp4", act_qtype="float8_e4m3fn",
                                   act_calibration_method="absmax,0.9"),
             qwix.QuantizationRule(weight_qtype="int4", act_qtype="uint8", act_calibration_method="minmax",
                                   tile_size=32)]
    inputs = (make_input((32, 64)),)
    want = _qat_run(model_fn, rules, inputs)
    with _EmulatedCudaKernels() as emulated:
        got = _qat_run(model_fn, rules, inputs)
    assert all(emulated.calls.values()), emulated.calls  # every op ran on the emulated kernels
    calls = dict(emulated.calls)
    _qat_run(model_fn, rules, inputs, steps=1)
    assert emulated.calls == calls  # and the CPU kernels are back
    _assert_runs_same(got, want)
    assert any("sum_of" in k for k in want[2])


def test_decomposed_attention_on_the_emulated_cuda_kernels_matches_the_cpu():
    """F.scaled_dot_product_attention decomposed and quantized (SRQ on both matmuls' operands)."""
    from test_qat_attention import SdpaAttention, _masks

    rules = [qwix.QuantizationRule(weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
    inputs = (make_input((2, 6, 16)), _masks(6)["bool"])
    want = _qat_run(SdpaAttention, rules, inputs)
    with _EmulatedCudaKernels() as emulated:
        got = _qat_run(SdpaAttention, rules, inputs)
    assert emulated.calls["fake_quant_forward"] and emulated.calls["calibrate"]
    _assert_runs_same(got, want)
    assert "matmul1_rhs.sum_of_absmax" in want[2]
