"""CUDA benchmark of the qwix fake-quant ops against a plain copy and torch.compile (issue 3's bar).

Run as ``benchmarks/bench_ops.py --device cuda`` (or this file directly).

Method: one process, one GPU. Every contender is timed with CUDA events around a batch of
``--batch`` back-to-back calls (host launch overhead overlaps the GPU, as in training), the
batches of all contenders of a (size, dtype) run round-robin with a rotating order, and the
median over rounds is reported. Outputs are fresh tensors from the caching allocator.

Baselines: ``copy_`` (same-dtype contiguous copy into a preallocated buffer, cudaMemcpyAsync),
``sm_copy`` (``torch.neg(x, out=buf)``: one elementwise SM kernel, one read + one write) and
``clone``. "copy" in the bar = the faster of copy_ and sm_copy (the stricter reference).
Bandwidth counts bytes read + written once (2 * numel * element size; the mask, when written,
is not counted, so masked rows are slightly penalised).

Forward+backward: ``torch.autograd.grad(f(x), x, g)`` with a preallocated g: the op's forward
and backward only (``y.backward`` on a leaf would add AccumulateGrad's copy of g to every
contender alike).

Contenders per case: ours (qwix_torch.fake_quant), compiled (the composed plain-PyTorch
expression with a straight-through estimator under torch.compile, inductor, dynamic=False;
it computes in float32 like ours), for int8 per-token the same expression in eager mode
("composed") and, in float32, torch.fake_quantize_per_channel_affine plus its amax pass.
Also printed: bytes saved for backward (ours plain / masked, composed STE).

Bar (8192x8192, float32 and bfloat16; per-token and per-tile(128) int8 and float8_e4m3fn):
  ours reaches >= 85% of the copy bandwidth; ours is faster than compiled; forward+backward
  takes <= 2.2x the copy time. Informational: timings are never test thresholds.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

import qwix_torch as q
from bench_ops import saved_bytes  # the CPU benchmark's saved-for-backward count

BAR_CASES = ["int8 per-token", "int8 tile128", "fp8e4m3 per-token", "fp8e4m3 tile128"]
FP8_MAX = 448.0


def _tiles(x: torch.Tensor, tile: Optional[int]) -> torch.Tensor:
    return x if tile is None else x.unflatten(-1, (x.shape[-1] // tile, tile))


def composed(qtype: str, tile: Optional[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The plain-PyTorch expression of dynamic per-row (or per-tile of the last axis) fake quant + STE."""

    def f(x: torch.Tensor) -> torch.Tensor:
        xf = _tiles(x.float(), tile)
        amax = xf.abs().amax(-1, keepdim=True)
        if qtype == "int8":
            s = torch.where(amax > 0, amax / 127.5, torch.ones_like(amax))
            fq = (xf / s).round().clamp(-128, 127) * s
        else:
            s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
            fq = (xf / s).to(torch.float8_e4m3fn).float() * s
        fq = fq.flatten(-2) if tile is not None else fq
        return x + (fq.to(x.dtype) - x).detach()

    return f


def ours(qtype: str, tile: Optional[int], method: str = "absmax", axes=None):
    def f(x: torch.Tensor) -> torch.Tensor:
        ch = tuple(range(x.dim() - 1)) if axes is None else axes
        return q.fake_quant(x, qtype, calibration_method=method, channelwise_axes=ch,
                            tiled_axes=None if tile is None else {-1: tile})

    return f


def fq_per_channel(x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    zp = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)

    def f(t: torch.Tensor) -> torch.Tensor:
        scale = t.detach().abs().amax(-1) / 127.5
        return torch.fake_quantize_per_channel_affine(t, scale, zp, 0, -128, 127)

    return f


class Contender:
    def __init__(self, case: str, mode: str, col: str, fn: Callable[[], object]):
        self.case, self.mode, self.col, self.fn = case, mode, col, fn
        self.ms: List[float] = []
        self.error: Optional[str] = None


def fwd(fn, x):
    return lambda: fn(x)


def fwd_bwd(fn, xg, g):
    return lambda: torch.autograd.grad(fn(xg), xg, g)


def time_rounds(contenders: List[Contender], rounds: int, batch: int, warmup: int) -> None:
    for c in contenders:  # first call (compilation) and warmup, errors recorded
        try:
            for _ in range(warmup):
                c.fn()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001
            c.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:160]
    live = [c for c in contenders if c.error is None]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for r in range(rounds):
        order = live[r % len(live):] + live[:r % len(live)]
        for c in order:
            torch.cuda.synchronize()
            start.record()
            for _ in range(batch):
                c.fn()
            end.record()
            end.synchronize()
            c.ms.append(start.elapsed_time(end) / batch)


def median(c: Optional[Contender]) -> Optional[float]:
    return statistics.median(c.ms) if c is not None and c.ms else None


def run(sizes: List[Tuple[int, ...]], dtypes: List[torch.dtype], rounds: int, batch: int, warmup: int,
        compile_: bool, json_path: Optional[str], device: str = "cuda") -> int:
    dev = torch.device(device)  # "cpu" only to smoke-test the harness (tests/python/test_bench_cuda.py)
    import torch._dynamo as dynamo
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, 64)
    print("qwix-torch bench (CUDA)")
    print(f"  torch {torch.__version__} (CUDA {torch.version.cuda}), python {platform.python_version()}, "
          f"{torch.cuda.get_device_name(dev)}")
    print(f"  {rounds} rounds x {batch} back-to-back calls per contender (CUDA events), round-robin, medians")
    results: List[dict] = []
    saved: List[dict] = []
    t_all = time.perf_counter()
    for shape in sizes:
        for dtype in dtypes:
            t0 = time.perf_counter()
            torch.manual_seed(0)
            x = torch.randn(shape, device=dev, dtype=torch.float32).to(dtype)
            xg = x.detach().clone().requires_grad_(True)
            g = torch.randn(shape, device=dev, dtype=torch.float32).to(dtype)
            buf, buf2 = torch.empty_like(x), torch.empty_like(x)
            scale = (x.abs().amax() / 127.5).float().reshape(1, 1)
            # SRQ of [B, T, E] activations: per-token statistics averaged over the batch, scale [1, T, 1].
            x3 = x.view(8, -1, shape[-1]) if shape[0] % 8 == 0 else x.view(1, -1, shape[-1])
            tok_scale = (x3.abs().amax(-1, keepdim=True).float().mean(0, keepdim=True) / 127.5)
            cs: List[Contender] = [
                Contender("*", "fwd", "copy_", fwd(lambda t: buf.copy_(t), x)),
                Contender("*", "fwd", "sm_copy", fwd(lambda t: torch.neg(t, out=buf2), x)),
                Contender("*", "fwd", "clone", fwd(lambda t: t.clone(), x)),
            ]
            cases: Dict[str, Tuple[Callable, Optional[Callable], bool]] = {
                # name: (ours, composed or None, also fwd+bwd)
                "int8 per-token": (ours("int8", None), composed("int8", None), True),
                "int8 tile128": (ours("int8", 128), composed("int8", 128), True),
                "fp8e4m3 per-token": (ours("float8_e4m3fn", None), composed("fp8", None), True),
                "fp8e4m3 tile128": (ours("float8_e4m3fn", 128), composed("fp8", 128), True),
                "int8 per-token absmax,0.9 (mask)": (ours("int8", None, "absmax,0.9"), None, True),
                "int8 per-tensor": (ours("int8", None, axes=()), None, False),
                "int8 per-channel of last axis": (ours("int8", None, axes=(len(shape) - 1,)), None, False),
                "int8 static per-tensor (SRQ)": (lambda t: q.fake_quant_with_scale(t, scale, "int8"), None, True),
                "int8 static [1,T,1] of [B,T,E] (SRQ)": (
                    lambda t: q.fake_quant_with_scale(t.view(x3.shape), tok_scale, "int8"), None, False),
                "calibrate per-token (reads x only)": (
                    lambda t: q.compute_calibration(t, channelwise_axes=tuple(range(t.dim() - 1))), None, False),
                "mxfp8 (blocks of 32)": (lambda t: q.fake_quant(t, "mxfp8"), None, False),
                "nvfp4 (16, two-level)": (lambda t: q.fake_quant(t, "nvfp4"), None, False),
            }
            for name, (fo, fc, bwd) in cases.items():
                cs.append(Contender(name, "fwd", "ours", fwd(fo, x)))
                if bwd:
                    cs.append(Contender(name, "fwd+bwd", "ours", fwd_bwd(fo, xg, g)))
                if name == "int8 per-token":  # DESIGN 6: the composed eager expression too
                    cs.append(Contender(name, "fwd", "composed", fwd(fc, x)))
                    cs.append(Contender(name, "fwd+bwd", "composed", fwd_bwd(fc, xg, g)))
                if fc is not None and compile_:
                    cc = torch.compile(fc, dynamic=False)
                    cs.append(Contender(name, "fwd", "compiled", fwd(cc, x)))
                    if name == "int8 per-token":
                        cs.append(Contender(name, "fwd+bwd", "compiled", fwd_bwd(cc, xg, g)))
                if name == "int8 per-token" and dtype == torch.float32 and len(shape) == 2:
                    cs.append(Contender(name, "fwd", "fq_per_channel", fwd(fq_per_channel(x), x)))
            time_rounds(cs, rounds, batch, warmup)
            by = {(c.case, c.mode, c.col): c for c in cs}
            copy_ms = min(m for m in (median(by[("*", "fwd", "copy_")]), median(by[("*", "fwd", "sm_copy")]))
                          if m is not None)
            nbytes = 2 * x.numel() * x.element_size()
            base = dict(size="x".join(map(str, shape)), dtype=str(dtype).replace("torch.", ""))
            for col in ("copy_", "sm_copy", "clone"):
                m = median(by[("*", "fwd", col)])
                results.append(dict(base, case=col, mode="fwd", col=col, ms=m, gbps=nbytes / m / 1e6 if m else None))
            for c in cs:
                if c.case == "*":
                    continue
                m = median(c)
                results.append(dict(base, case=c.case, mode=c.mode, col=c.col, ms=m, error=c.error,
                                    gbps=nbytes / m / 1e6 if m and c.mode == "fwd" else None,
                                    copy_ms=copy_ms, vs_copy=(m / copy_ms) if m else None))
            for what, fn in [("ours int8 per-token", cases["int8 per-token"][0]),
                             ("ours int8 per-token absmax,0.9", cases["int8 per-token absmax,0.9 (mask)"][0]),
                             ("composed STE", cases["int8 per-token"][1])]:
                total, extra = saved_bytes(fn, xg)
                saved.append(dict(base, what=what, total_bytes=total, extra_bytes=extra,
                                  numel_div_8=math.ceil(x.numel() / 8)))
            print(f"  [{base['size']} {base['dtype']}: {len(cs)} contenders, {time.perf_counter() - t0:.1f}s]",
                  flush=True)
            del x, xg, g, buf, buf2, cs, by
            torch.cuda.empty_cache()

    print_results(results)
    print()
    print("Bytes saved for backward beyond x itself (saved_tensors_hooks, storages deduped):")
    for s in saved:
        print(f"  {s['size']} {s['dtype']} {s['what']}: {s['extra_bytes']} B (numel/8 = {s['numel_div_8']})")
    bars = bar_lines(results)
    print()
    print("Bar (issue 3: 8192x8192, else the largest size run; informational):")
    for b in bars:
        print(f"  {b['status']:4s}  {b['text']}")
    print(f"total {time.perf_counter() - t_all:.1f}s")
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(dict(meta=dict(torch=torch.__version__, device=torch.cuda.get_device_name(dev),
                                     rounds=rounds, batch=batch), results=results, saved_bytes=saved, bars=bars),
                      f, indent=1)
        print(f"wrote {json_path}")
    return 0


def print_results(results: List[dict]) -> None:
    head = ["size", "dtype", "case", "mode", "contender", "ms", "GB/s", "x copy"]
    rows = []
    for r in results:
        rows.append([r["size"], r["dtype"], r["case"], r["mode"], r["col"],
                     f"{r['ms']:.4f}" if r.get("ms") else (r.get("error") or "n/a"),
                     f"{r['gbps']:.0f}" if r.get("gbps") else "",
                     f"{r['vs_copy']:.2f}" if r.get("vs_copy") else ""])
    w = [max(len(str(v)) for v in col) for col in zip(head, *rows)]
    print()
    print("Median ms per call; GB/s = (read + write) bytes / time; x copy = time / copy time "
          "(copy = faster of copy_ and sm_copy)")
    print("  ".join(h.ljust(n) for h, n in zip(head, w)))
    for row in rows:
        print("  ".join(str(v).ljust(n) for v, n in zip(row, w)))


def bar_lines(results: List[dict]) -> List[dict]:
    def get(size, dtype, case, mode, col):
        for r in results:
            if (r["size"], r["dtype"], r["case"], r["mode"], r["col"]) == (size, dtype, case, mode, col):
                return r.get("ms"), r.get("copy_ms")
        return None, None

    bars = []

    def add(text, ok, value):
        bars.append(dict(text=f"{text}: {value}", status="n/a" if ok is None else ("PASS" if ok else "MISS")))

    sizes = {r["size"] for r in results}
    size = "8192x8192" if "8192x8192" in sizes or not sizes else max(
        sizes, key=lambda s: math.prod(int(d) for d in s.split("x")))
    for dtype in ("float32", "bfloat16"):
        for case in BAR_CASES:
            o, copy_ms = get(size, dtype, case, "fwd", "ours")
            c, _ = get(size, dtype, case, "fwd", "compiled")
            ob, _ = get(size, dtype, case, "fwd+bwd", "ours")
            tag = f"{size} {dtype} {case}"
            add(f"{tag}: bandwidth >= 85% of copy", None if not o else copy_ms / o >= 0.85,
                f"{100 * copy_ms / o:.1f}%" if o else "n/a")
            add(f"{tag}: faster than compiled", None if not (o and c) else c > o,
                f"compiled/ours {c / o:.2f}x" if o and c else "n/a")
            add(f"{tag}: fwd+bwd <= 2.2x copy", None if not ob else ob / copy_ms <= 2.2,
                f"{ob / copy_ms:.2f}x" if ob else "n/a")
    return bars


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1024x1024,4096x4096,8192x8192")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    return run_cli(a.sizes, a.dtypes, a.rounds, a.batch, not a.no_compile, a.json)


def run_cli(sizes: str, dtypes: str, rounds: int, batch: int, compile_: bool, json_path: Optional[str]) -> int:
    if not torch.cuda.is_available():
        print("error: no CUDA device (torch.cuda.is_available() is False)")
        return 2
    shapes = [tuple(int(d) for d in s.lower().split("x")) for s in sizes.split(",") if s.strip()]
    dts = [getattr(torch, d.strip()) for d in dtypes.split(",")]
    return run(shapes, dts, rounds, batch, warmup=3, compile_=compile_, json_path=json_path)


if __name__ == "__main__":
    raise SystemExit(main())
