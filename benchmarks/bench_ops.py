#!/usr/bin/env python3
"""Benchmarks of qwix-torch's fake-quant ops against the roofline and PyTorch's alternatives.

How performance is measured (DESIGN.md section 6): the ops are memory bound, so the
roofline is ``x.clone()`` of the same tensor. Everything runs in one process; for each
(size, dtype) every contender runs once per round, round-robin (the order rotates from
round to round), after a few warmup rounds; we report the median over rounds. On CUDA
every call is bracketed by ``torch.cuda.synchronize()``.

Contenders (per-token = one scale per row, reducing over the last axis):
  ours            qwix_torch.fake_quant(x, 'int8', channelwise_axes=(0,))  (and per-tile 128,
                  per-tensor, float8_e4m3fn per-row, 'absmax,0.9' fwd+bwd with a masked backward)
  clone           x.clone()                                   (the roofline: one read + one write)
  fq              torch.fake_quantize_per_channel_affine / _per_tensor_affine, including the
                  amax pass that computes the dynamic scale   (float32 only: torch's op needs float)
  composed        s = x.abs().amax(-1, keepdim=True) / 127.5; fq = (x / s).round().clamp(-128, 127) * s
                  with the STE  x + (fq - x).detach()         (eager; bf16 input computes in bf16)
  compiled        the composed expression under torch.compile (inductor, dynamic=False)

Forward+backward: x is a leaf requiring grad; each call sets x.grad = None, runs the forward and
y.backward(g) with a preallocated g. Ratios compare to ONE forward clone and to the composed STE.

Bytes saved for backward are counted with torch.autograd.graph.saved_tensors_hooks: the sum of
untyped_storage().nbytes() over saved tensors, deduplicated by data_ptr ("total"), and the same
without x's own storage ("extra": what the op keeps beyond the input autograd already holds).

Usage:
  .venv/bin/python benchmarks/bench_ops.py                       # CPU, 1024^2 and 4096^2, fp32+bf16
  .venv/bin/python benchmarks/bench_ops.py --device cuda         # GPU: benchmarks/bench_cuda.py (8192^2)
  .venv/bin/python benchmarks/bench_ops.py --quick               # smoke test (tiny sizes)
  .venv/bin/python benchmarks/bench_ops.py --json build/bench_ops.json
Informational only: always exits 0 unless it crashes (timings are never test thresholds).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

try:  # run from a checkout without installing: python/ holds the package
    import qwix_torch  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import qwix_torch  # noqa: F401

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# The bar, for dynamic per-token int8 on 4096x4096.
BAR_SIZE = (4096, 4096)


# ----------------------------------------------------------------------------------------------
# Contenders
# ----------------------------------------------------------------------------------------------

def per_token_axes(x: torch.Tensor) -> Tuple[int, ...]:
    return tuple(range(x.dim() - 1))


def composed_fq(x: torch.Tensor) -> torch.Tensor:
    s = x.abs().amax(-1, keepdim=True) / 127.5
    fq = (x / s).round().clamp(-128, 127) * s
    return x + (fq - x).detach()


def make_fq_per_channel(x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    zp = torch.zeros(math.prod(x.shape[:-1]), dtype=torch.int32, device=x.device)

    def fq_per_channel(t: torch.Tensor) -> torch.Tensor:
        t2 = t.reshape(-1, t.shape[-1])
        scale = t2.detach().abs().amax(-1) / 127.5  # the amax pass: part of the cost
        y = torch.fake_quantize_per_channel_affine(t2, scale, zp, 0, -128, 127)
        return y.view(t.shape)

    return fq_per_channel


def make_fq_per_tensor(x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    zp = torch.zeros((), dtype=torch.int32, device=x.device)

    def fq_per_tensor(t: torch.Tensor) -> torch.Tensor:
        scale = t.detach().abs().amax() / 127.5  # tensor scale: no host sync
        return torch.fake_quantize_per_tensor_affine(t, scale, zp, -128, 127)

    return fq_per_tensor


class Case:
    """One row family of the table: our op and the contenders that compute the same thing."""

    def __init__(self, name: str, ours: Callable, fq: Optional[Tuple[str, Callable]] = None,
                 composed: bool = False, backward: bool = False, requires=None):
        self.name = name
        self.ours = ours
        self.fq = fq            # (label, factory(x) -> fn) or None
        self.composed = composed  # composed / compiled expressions compute this case
        self.backward = backward  # also time forward+backward
        self.requires = requires  # callable(shape) -> reason or None


def tile_ok(shape) -> Optional[str]:
    return None if shape[-1] % 128 == 0 else f"last dim {shape[-1]} not a multiple of 128"


def cases() -> List[Case]:
    import qwix_torch as q
    return [
        Case("int8 per-token", lambda t: q.fake_quant(t, "int8", channelwise_axes=per_token_axes(t)),
             fq=("fq_per_channel", make_fq_per_channel), composed=True, backward=True),
        Case("int8 per-token absmax,0.9",
             lambda t: q.fake_quant(t, "int8", calibration_method="absmax,0.9",
                                    channelwise_axes=per_token_axes(t)),
             backward=True),
        Case("int8 tile128",
             lambda t: q.fake_quant(t, "int8", channelwise_axes=per_token_axes(t), tiled_axes={-1: 128}),
             requires=tile_ok),
        Case("int8 per-tensor", lambda t: q.fake_quant(t, "int8"),
             fq=("fq_per_tensor", make_fq_per_tensor)),
        Case("fp8e4m3 per-token",
             lambda t: q.fake_quant(t, "float8_e4m3fn", channelwise_axes=per_token_axes(t))),
        Case("mxfp8 (blocks of 32)", lambda t: q.fake_quant(t, "mxfp8"), requires=tile_ok),
        Case("nvfp4 (16, two-level)", lambda t: q.fake_quant(t, "nvfp4"), requires=tile_ok),
    ]


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

class Contender:
    def __init__(self, key: Tuple[str, str, str], fn: Callable[[], object]):
        self.key = key          # (case, mode, column)
        self.fn = fn
        self.times: List[float] = []
        self.error: Optional[str] = None


def short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else ""
    # Dynamo/inductor errors put the useful line first; keep it short for the table.
    return f"{type(e).__name__}: {first}"[:200]


def run_rounds(contenders: List[Contender], warmup: int, repeats: int, sync: Callable[[], None],
               budget_s: Optional[float], max_repeats: Optional[int] = None) -> None:
    """Round-robin: each round runs every live contender once; order rotates per round.

    With ``max_repeats``, cheap groups (a round under 0.1 s) run up to that many timed rounds."""
    live = list(contenders)
    # First call (compilation happens here for torch.compile) outside the timed rounds,
    # with errors recorded rather than raised.
    for c in live:
        try:
            c.fn()
            sync()
        except Exception as e:  # noqa: BLE001
            c.error = short_error(e)
    live = [c for c in live if c.error is None]
    t_start = time.perf_counter()
    n = len(live)
    total = warmup + repeats
    r = 0
    while r < total:
        order = live[r % n:] + live[:r % n] if n else []
        t_round = time.perf_counter()
        if r == warmup:
            t_start = t_round  # the budget counts timed rounds only
        for c in order:
            sync()
            t0 = time.perf_counter()
            c.fn()
            sync()
            dt = time.perf_counter() - t0
            if r >= warmup:
                c.times.append(dt)
        if r == warmup and max_repeats and time.perf_counter() - t_round < 0.1:
            total = warmup + max(repeats, max_repeats)
        r += 1
        # Keep the run bounded: stop after at least 5 timed rounds once over budget.
        if budget_s is not None and r >= warmup + 5 and time.perf_counter() - t_start > budget_s:
            break


def fwd_bwd(fn: Callable, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    def step():
        x.grad = None
        y = fn(x)
        y.backward(g)
    return step


def fwd(fn: Callable, x: torch.Tensor) -> Callable[[], object]:
    def step():
        return fn(x)
    return step


# ----------------------------------------------------------------------------------------------
# Saved-for-backward bytes
# ----------------------------------------------------------------------------------------------

def saved_bytes(fn: Callable, x_leaf: torch.Tensor) -> Tuple[int, int]:
    """(total, extra) bytes of storages autograd saves for backward; extra excludes x's storage."""
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    def unpack(t):
        return t

    x_leaf.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = fn(x_leaf)
    total = sum(seen.values())
    x_ptr = x_leaf.untyped_storage().data_ptr()
    extra = total - seen.get(x_ptr, 0)
    del y
    return total, extra


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def parse_sizes(s: str) -> List[Tuple[int, ...]]:
    out = []
    for item in s.split(","):
        item = item.strip().lower()
        if item:
            out.append(tuple(int(d) for d in item.split("x")))
    return out


def size_str(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def fmt_ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def fmt_ratio(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.2f}x"


def median_ms(c: Optional[Contender]):
    if c is None:
        return None
    if c.error is not None:
        return "n/a"
    if not c.times:
        return None
    return statistics.median(c.times) * 1e3


def ratio(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
        return a / b
    if a == "n/a" or b == "n/a":
        return "n/a"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sizes", default=None,
                   help="comma-separated AxB[xC...] (default 1024x1024,4096x4096; +8192x8192 on cuda)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 15 cpu, 50 cuda)")
    p.add_argument("--warmup", type=int, default=None, help="warmup rounds (default 3 cpu, 10 cuda)")
    p.add_argument("--json", default=None, metavar="PATH", help="write every median and ratio here")
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (smoke test)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    p.add_argument("--budget-s", type=float, default=None,
                   help="max seconds of timed rounds per (size, dtype); at least 5 rounds run "
                        "(default 25 on cpu, none on cuda)")
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    if dev.type == "cuda":  # the GPU benchmark (issue 3's bar) lives in bench_cuda.py
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_cuda
        return bench_cuda.run_cli(args.sizes or ("256x1024" if args.quick else "1024x1024,4096x4096,8192x8192"),
                                  args.dtypes,
                                  rounds=args.repeats or (3 if args.quick else 15), batch=10,
                                  compile_=not args.no_compile, json_path=args.json)

    if args.quick:
        sizes = parse_sizes(args.sizes or "64x256,256x1024")
        repeats = args.repeats or 3
        warmup = args.warmup if args.warmup is not None else 1
        max_repeats = None
    else:
        default_sizes = "1024x1024,4096x4096" + (",8192x8192" if dev.type == "cuda" else "")
        sizes = parse_sizes(args.sizes or default_sizes)
        repeats = args.repeats or (50 if dev.type == "cuda" else 15)
        # Default only: cheap groups (a round under 0.1 s) get more rounds, as they are noisier.
        max_repeats = None if args.repeats else (200 if dev.type == "cuda" else 60)
        warmup = args.warmup if args.warmup is not None else (10 if dev.type == "cuda" else 3)
    budget_s = args.budget_s if args.budget_s is not None else (25.0 if dev.type == "cpu" else None)
    dtypes = []
    for name in args.dtypes.split(","):
        name = name.strip()
        if name not in DTYPES:
            print(f"error: unknown dtype {name!r}; choose from {sorted(DTYPES)}", file=sys.stderr)
            return 2
        dtypes.append(DTYPES[name])

    if dev.type == "cuda":
        sync = torch.cuda.synchronize
        dev_name = torch.cuda.get_device_name(dev)
    else:
        def sync():
            pass
        dev_name = platform.processor() or platform.machine()

    compile_fn = None
    compile_err = None
    if not args.no_compile:
        try:
            # One compiled graph per (shape, dtype, grad mode): raise the recompile limit so that no
            # variant silently falls back to eager (default limit 8).
            import torch._dynamo as dynamo
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo.config, name):
                    setattr(dynamo.config, name, 64)
            compile_fn = torch.compile(composed_fq, dynamic=False)
        except Exception as e:  # noqa: BLE001
            compile_err = short_error(e)
    else:
        compile_err = "skipped (--no-compile)"

    alloc_note = ("CUDA caching allocator (freed blocks reused; no cudaMalloc in steady state)"
                  if dev.type == "cuda" else
                  "CPU: c10's allocator has no cache, so glibc malloc decides: blocks of >= 32 MiB "
                  "(4096^2 fp32/bf16) are mmap'd and page-faulted afresh on every call, smaller ones "
                  "are usually reused from the heap")
    print("qwix-torch bench_ops")
    print(f"  torch {torch.__version__}, python {platform.python_version()}, device {dev.type} ({dev_name}), "
          f"threads {torch.get_num_threads()}")
    print(f"  rounds: {warmup} warmup + {repeats} timed"
          + (f" ({max_repeats} when a round takes < 0.1 s)" if max_repeats else "")
          + ", round-robin over all contenders of a "
          f"(size, dtype), order rotating; medians over rounds"
          + (f"; timed rounds stop after {budget_s:.0f}s per (size, dtype) (at least 5 run)" if budget_s else ""))
    print("  inputs: allocated once per (size, dtype) (randn), reused by every call; g preallocated")
    print("  outputs: every contender allocates a fresh output each call (ours, clone, fq, composed "
          "intermediates, x.grad in fwd+bwd);")
    print(f"    {alloc_note}")
    print("  per-token = one scale per row (reduce the last axis); composed/compiled on bf16 compute in bf16;"
          " fq_* run on fp32 only (torch's ops need float) and include the amax pass")
    print("  fwd+bwd: x.grad = None; y = f(x); y.backward(g).  ratios: ours/clone (fwd+bwd: vs ONE fwd clone),"
          " fq/ours, composed/ours, compiled/ours")
    print()

    all_cases = cases()
    results: List[dict] = []
    saved: List[dict] = []
    roof: List[dict] = []
    t_all = time.perf_counter()

    for shape in sizes:
        for dtype in dtypes:
            t_group = time.perf_counter()
            torch.manual_seed(0)
            x = torch.randn(shape, device=dev, dtype=torch.float32).to(dtype)
            xg = x.detach().clone().requires_grad_(True)
            g = torch.randn(shape, device=dev, dtype=torch.float32).to(dtype)
            contenders: List[Contender] = []
            skipped: Dict[Tuple[str, str, str], str] = {}

            def add(case: str, mode: str, col: str, fn: Callable):
                contenders.append(Contender((case, mode, col), fn))

            add("*", "fwd", "clone", fwd(lambda t: t.clone(), x))
            # Reference only (not in any ratio): the same copy into a preallocated buffer, i.e.
            # the clone minus allocation / page-fault cost.
            out_buf = torch.empty_like(x)
            add("*", "fwd", "copy_prealloc", fwd(lambda t: out_buf.copy_(t), x))
            has_composed_bwd = False
            for case in all_cases:
                reason = case.requires(shape) if case.requires else None
                if reason:
                    skipped[(case.name, "fwd", "ours")] = reason
                    continue
                add(case.name, "fwd", "ours", fwd(case.ours, x))
                if case.backward:
                    add(case.name, "fwd+bwd", "ours", fwd_bwd(case.ours, xg, g))
                if case.fq is not None and dtype == torch.float32:
                    label, factory = case.fq
                    add(case.name, "fwd", "fq", fwd(factory(x), x))
                    if case.backward:
                        add(case.name, "fwd+bwd", "fq", fwd_bwd(factory(x), xg, g))
                if case.composed:
                    add(case.name, "fwd", "composed", fwd(composed_fq, x))
                    if case.backward:
                        add(case.name, "fwd+bwd", "composed", fwd_bwd(composed_fq, xg, g))
                        has_composed_bwd = True
                    if compile_fn is not None:
                        add(case.name, "fwd", "compiled", fwd(compile_fn, x))
                        if case.backward:
                            add(case.name, "fwd+bwd", "compiled", fwd_bwd(compile_fn, xg, g))
            del has_composed_bwd

            run_rounds(contenders, warmup, repeats, sync, budget_s, max_repeats)
            by_key = {c.key: c for c in contenders}
            clone_ms = median_ms(by_key[("*", "fwd", "clone")])
            copy_ms = median_ms(by_key[("*", "fwd", "copy_prealloc")])
            nbytes = x.numel() * x.element_size()
            roof.append(dict(size=size_str(shape), dtype=str(dtype).replace("torch.", ""), bytes=nbytes,
                             clone_ms=clone_ms, copy_prealloc_ms=copy_ms,
                             clone_gbps=(2 * nbytes / clone_ms / 1e6) if isinstance(clone_ms, float) else None,
                             copy_prealloc_gbps=(2 * nbytes / copy_ms / 1e6) if isinstance(copy_ms, float) else None))
            n_rounds = min((len(c.times) for c in contenders if c.error is None), default=0)

            for case in all_cases:
                modes = ["fwd"] + (["fwd+bwd"] if case.backward else [])
                for mode in modes:
                    if (case.name, "fwd", "ours") in skipped:
                        if mode == "fwd":
                            results.append(dict(case=case.name, mode=mode, size=size_str(shape),
                                                dtype=str(dtype).replace("torch.", ""),
                                                skipped=skipped[(case.name, "fwd", "ours")]))
                        continue
                    cols = {col: by_key.get((case.name, mode, col)) for col in ("ours", "fq", "composed", "compiled")}
                    med = {col: median_ms(c) for col, c in cols.items()}
                    med["clone"] = clone_ms
                    errors = {col: c.error for col, c in cols.items() if c is not None and c.error}
                    if case.composed and compile_fn is None:
                        med["compiled"] = "n/a"
                        errors["compiled"] = compile_err
                    ours = med["ours"]
                    rat = {
                        "ours/clone": ratio(ours, clone_ms),
                        "fq/ours": ratio(med["fq"], ours) if med["fq"] is not None else None,
                        "composed/ours": ratio(med["composed"], ours) if med["composed"] is not None else None,
                        "compiled/ours": ratio(med["compiled"], ours) if med["compiled"] is not None else None,
                    }
                    spread = {}
                    for col, c in cols.items():
                        if c is not None and c.times:
                            ts = sorted(c.times)
                            spread[col] = dict(min_ms=ts[0] * 1e3, max_ms=ts[-1] * 1e3, n=len(ts))
                    results.append(dict(
                        case=case.name, mode=mode, size=size_str(shape),
                        dtype=str(dtype).replace("torch.", ""),
                        fq_op=case.fq[0] if case.fq else None,
                        median_ms=med, ratios=rat, errors=errors, spread=spread))

            # Saved-for-backward bytes (one call each; not timed).
            sb_fns = []
            for case in all_cases:
                if case.backward:
                    sb_fns.append((f"ours {case.name}", case.ours))
            sb_fns.append(("composed STE", composed_fq))
            if dtype == torch.float32:
                sb_fns.append(("fq_per_channel", make_fq_per_channel(x)))
            if compile_fn is not None:
                sb_fns.append(("compiled STE", compile_fn))
            for label, fn in sb_fns:
                entry = dict(what=label, size=size_str(shape), dtype=str(dtype).replace("torch.", ""),
                             numel=x.numel(), numel_div_8=math.ceil(x.numel() / 8))
                try:
                    total, extra = saved_bytes(fn, xg)
                    entry.update(total_bytes=total, extra_bytes=extra)
                except Exception as e:  # noqa: BLE001
                    entry.update(total_bytes=None, extra_bytes=None, error=short_error(e))
                saved.append(entry)
            xg.grad = None

            dt = time.perf_counter() - t_group
            print(f"  [{size_str(shape)} {DTYPE_SHORT.get(dtype, dtype)}: {len(contenders)} contenders, "
                  f"{n_rounds} timed rounds, {dt:.1f}s]", flush=True)
            del x, xg, g, contenders, by_key, out_buf

    total_s = time.perf_counter() - t_all
    print()
    print_roofline(roof)
    print()
    print_table(results)
    print()
    print_saved(saved)
    print()
    bars = bar_summary(results)
    print_bars(bars)
    print()
    errs = sorted({(r["case"], col, e) for r in results for col, e in (r.get("errors") or {}).items() if e})
    if errs:
        print("Notes (n/a):")
        for case, col, e in errs:
            print(f"  {case} / {col}: {e}")
        print()
    print(f"total {total_s:.1f}s")

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        meta = dict(torch=torch.__version__, python=platform.python_version(), device=dev.type,
                    device_name=dev_name, threads=torch.get_num_threads(), warmup=warmup,
                    repeats=repeats, budget_s=budget_s, quick=args.quick,
                    sizes=[size_str(s) for s in sizes], dtypes=[str(d).replace("torch.", "") for d in dtypes],
                    allocation=alloc_note, total_s=total_s,
                    compile_error=compile_err if compile_fn is None else None)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, roofline=roof, results=results, saved_bytes=saved, bars=bars), f, indent=1)
        print(f"wrote {args.json}")
    return 0


# ----------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------

def print_table(results: List[dict]) -> None:
    head = ["case", "mode", "size", "dtype", "ours", "clone", "fq", "composed", "compiled",
            "ours/clone", "fq/ours", "comp/ours", "compiled/ours"]
    rows = []
    for r in results:
        if "skipped" in r:
            rows.append([r["case"], r["mode"], r["size"], DTYPE_SHORT.get(getattr(torch, r["dtype"]), r["dtype"]),
                         f"skipped: {r['skipped']}"] + [""] * 8)
            continue
        m, q = r["median_ms"], r["ratios"]
        fq_label = {"fq_per_channel": "ch", "fq_per_tensor": "t"}.get(r.get("fq_op"), "")
        fq_cell = fmt_ms(m["fq"]) + (f" ({fq_label})" if fq_label and m["fq"] is not None else "")
        rows.append([r["case"], r["mode"], r["size"], DTYPE_SHORT.get(getattr(torch, r["dtype"]), r["dtype"]),
                     fmt_ms(m["ours"]), fmt_ms(m["clone"]), fq_cell, fmt_ms(m["composed"]),
                     fmt_ms(m["compiled"]), fmt_ratio(q["ours/clone"]), fmt_ratio(q["fq/ours"]),
                     fmt_ratio(q["composed/ours"]), fmt_ratio(q["compiled/ours"])])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print("Median ms per call (fq: (ch) fake_quantize_per_channel_affine, (t) _per_tensor_affine, both + amax)")
    print("  ".join(h.ljust(w) if i < 4 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))))
    print("  ".join("-" * w for w in widths))
    prev = None
    for row in rows:
        if prev is not None and (row[2], row[3]) != (prev[2], prev[3]):
            print()
        print("  ".join(str(c).ljust(w) if i < 4 else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))))
        prev = row


def print_roofline(roof: List[dict]) -> None:
    print("Roofline: x.clone() (fresh output, the reference of every ratio) vs copy_ into a preallocated "
          "buffer (reference only); GB/s counts one read + one write")
    head = ["size", "dtype", "MiB", "clone ms", "GB/s", "copy_ prealloc ms", "GB/s"]
    rows = [[r["size"], DTYPE_SHORT.get(getattr(torch, r["dtype"]), r["dtype"]), f"{r['bytes'] / 2 ** 20:.0f}",
             fmt_ms(r["clone_ms"]), f"{r['clone_gbps']:.1f}" if r["clone_gbps"] else "-",
             fmt_ms(r["copy_prealloc_ms"]), f"{r['copy_prealloc_gbps']:.1f}" if r["copy_prealloc_gbps"] else "-"]
            for r in roof]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print("  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    if n < 1024:
        return f"{n} B"
    if n < 1024 ** 2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 ** 2:.2f} MiB"


def print_saved(saved: List[dict]) -> None:
    print("Bytes saved for backward (saved_tensors_hooks; storages deduped by data_ptr; "
          "extra = excluding x's own storage)")
    head = ["what", "size", "dtype", "total", "extra", "numel/8"]
    rows = []
    for s in saved:
        rows.append([s["what"], s["size"], DTYPE_SHORT.get(getattr(torch, s["dtype"]), s["dtype"]),
                     fmt_bytes(s.get("total_bytes")), fmt_bytes(s.get("extra_bytes")),
                     fmt_bytes(s["numel_div_8"]) + ("" if "error" not in s else f"  ({s['error']})")])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print("  ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def bar_summary(results: List[dict]) -> List[dict]:
    """The issue's bar on dynamic per-token int8 (4096x4096 if run, else the largest size run)."""
    def find(mode, dtype, size):
        for r in results:
            if (r["case"] == "int8 per-token" and r["mode"] == mode and r["dtype"] == dtype
                    and r["size"] == size and "skipped" not in r):
                return r
        return None

    sizes = [r["size"] for r in results if r["case"] == "int8 per-token"]
    want = size_str(BAR_SIZE)
    size = want if want in sizes else (max(sizes, key=lambda s: math.prod(int(d) for d in s.split("x")))
                                       if sizes else want)
    bars = []

    def bar(text, r, key, op, target):
        val = r["ratios"][key] if r is not None else None
        ok = None
        if isinstance(val, (int, float)):
            ok = val <= target if op == "<=" else val >= target
        bars.append(dict(bar=text, size=size, ratio_key=key, value=val, target=f"{op} {target}",
                         status="PASS" if ok else ("MISS" if ok is False else "n/a")))

    f32, f32b, b16 = find("fwd", "float32", size), find("fwd+bwd", "float32", size), find("fwd", "bfloat16", size)
    bar("fp32 fwd within 1.5x of clone (ours/clone)", f32, "ours/clone", "<=", 1.5)
    bar(">= 10x faster than fake_quantize_per_channel_affine incl amax (fq/ours)", f32, "fq/ours", ">=", 10.0)
    bar(">= 4x faster than composed eager (composed/ours)", f32, "composed/ours", ">=", 4.0)
    bar("fp32 fwd+bwd within 3x of one clone (ours fwd+bwd / clone)", f32b, "ours/clone", "<=", 3.0)
    bar("bf16 fwd within 1.5x of a bf16 clone (ours/clone)", b16, "ours/clone", "<=", 1.5)
    return bars


def print_bars(bars: List[dict]) -> None:
    if not bars:
        return
    print(f"Bar (dynamic per-token int8, {bars[0]['size']}; informational):")
    for b in bars:
        v = b["value"]
        vs = f"{v:.2f}x" if isinstance(v, (int, float)) else str(v)
        print(f"  {b['status']:4s}  {b['bar']}: {vs} (target {b['target']})")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
