#!/usr/bin/env python3
"""A QAT training step vs the fp32 step (the bar of issue 4), side by side with torch.ao's QAT.

The model: an MLP of 4096-wide linears, Linear(4096, 4096) -> ReLU -> Linear -> ReLU -> Linear,
trained with MSE and plain SGD on a fixed batch of ``--batch`` tokens. One step is
``zero_grad(set_to_none=True); loss = mse(model(x), y); loss.backward(); opt.step()``.

Contenders (same initial weights, same data):
  fp32        the float model
  qwix        qwix_torch.quantize_model with QuantizationRule(weight_qtype='int8', act_qtype='int8'):
              int8 weights per output channel, int8 activations per token, dynamic scales
  torch.ao    torch.ao.quantization.prepare_qat with get_default_qat_qconfig('x86') (weights int8
              per channel, activations quint8 per tensor with moving-average observers) and a
              QuantStub at the input so the first linear's input is fake-quantized too
  torchao     torchao's QAT (Int8DynActInt4WeightQATQuantizer / IntXQuantizationAwareTrainingConfig)
              only if `import torchao` works; it is not installed by requirements-dev.txt, so it is
              reported as skipped otherwise (nothing is installed by this script)
  *+compile   with --compile: fp32 and qwix under torch.compile(fullgraph=True) (inductor)

Timing (DESIGN.md section 6): one process; every round runs each contender's step once,
round-robin with the order rotated per round, after warmup rounds; we report medians over
rounds. Ratios are against the fp32 eager step. Allocation: every step allocates its outputs
fresh through PyTorch's CPU allocator (no caching on CPU; the 64 MB fake-quantized weight copies
go through mmap and page-fault on these VMs) -- the same for every contender.

Usage:
  .venv/bin/python benchmarks/bench_qat.py                         # batch 256, 7 rounds
  .venv/bin/python benchmarks/bench_qat.py --batch 64 256 1024 --rounds 9 --json build/bench_qat.json
  .venv/bin/python benchmarks/bench_qat.py --quick                  # smoke test (width 256)
Informational only: exits 0 unless it crashes (timings are never test thresholds).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # run from a checkout without installing: python/ holds the package
    import qwix_torch as qwix
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import qwix_torch as qwix

BAR = 1.5  # issue 4: a QAT step costs at most 1.5x the fp32 step


def make_mlp(width: int, layers: int) -> nn.Sequential:
    mods: List[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(width, width))
        if i + 1 < layers:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def make_torch_ao(fp: nn.Module) -> nn.Module:
    import torch.ao.quantization as tq

    m = nn.Sequential(tq.QuantStub(), *copy.deepcopy(fp), tq.DeQuantStub())
    m.train()
    m.qconfig = tq.get_default_qat_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tq.prepare_qat(m, inplace=False)


def make_torchao(fp: nn.Module) -> nn.Module:
    import torchao  # noqa: F401  (ImportError: skipped)

    m = copy.deepcopy(fp)
    try:  # torchao >= 0.10
        from torchao.quantization import quantize_
        from torchao.quantization.qat import FakeQuantizeConfig, IntXQuantizationAwareTrainingConfig

        act = FakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
        weight = FakeQuantizeConfig(torch.int8, "per_channel")
        quantize_(m, IntXQuantizationAwareTrainingConfig(act, weight))
        return m
    except ImportError:
        from torchao.quantization.qat import Int8DynActInt4WeightQATQuantizer

        return Int8DynActInt4WeightQATQuantizer().prepare(m)


class Contender:
    def __init__(self, name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 1e-4):
        self.name, self.model, self.x, self.y = name, model, x, y
        self.opt = torch.optim.SGD(model.parameters(), lr=lr)
        self.times: List[float] = []

    def step(self) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0


def run(width: int, layers: int, batch: int, rounds: int, warmup: int, compile_: bool) -> Dict:
    torch.manual_seed(0)
    fp = make_mlp(width, layers)
    x, y = torch.randn(batch, width), torch.randn(batch, width)
    provider = qwix.QatProvider([qwix.QuantizationRule(weight_qtype="int8", act_qtype="int8")])
    builders: Dict[str, Callable[[], nn.Module]] = {
        "fp32": lambda: copy.deepcopy(fp),
        "qwix": lambda: qwix.quantize_model(fp, provider, x[:2]),
        "torch.ao": lambda: make_torch_ao(fp),
        "torchao": lambda: make_torchao(fp),
    }
    if compile_:
        builders["fp32+compile"] = lambda: torch.compile(copy.deepcopy(fp), fullgraph=True)
        builders["qwix+compile"] = lambda: torch.compile(qwix.quantize_model(fp, provider, x[:2]), fullgraph=True)
    contenders, skipped = [], {}
    for name, build in builders.items():
        try:
            contenders.append(Contender(name, build(), x, y))
        except ImportError as e:
            skipped[name] = f"not installed ({e})"
        except Exception as e:  # pragma: no cover - report and go on
            skipped[name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    for _ in range(warmup):
        for c in contenders:
            c.step()
    for r in range(rounds):
        order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]
        for c in order:
            c.times.append(c.step())
    med = {c.name: statistics.median(c.times) for c in contenders}
    base = med["fp32"]
    return {
        "width": width, "layers": layers, "batch": batch, "rounds": rounds, "warmup": warmup,
        "median_s": med, "min_s": {c.name: min(c.times) for c in contenders},
        "ratio_vs_fp32": {n: t / base for n, t in med.items()},
        "qwix_vs_torch_ao": (med["qwix"] / med["torch.ao"]) if "torch.ao" in med else None,
        "skipped": skipped,
    }


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--batch", type=int, nargs="+", default=[256], help="tokens per step (one run per value)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--compile", action="store_true", help="add torch.compile(fullgraph=True) contenders")
    ap.add_argument("--quick", action="store_true", help="smoke test: width 256, 3 rounds")
    ap.add_argument("--json", help="write every median and ratio here")
    a = ap.parse_args(argv)
    if a.quick:
        a.width, a.batch, a.rounds, a.warmup = 256, [32], 3, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "allocation": "fresh outputs every step (CPU allocator)"}
    print(f"torch {info['torch']}, {info['threads']} threads, {info['cpus']} CPUs; "
          f"MLP {a.layers} x Linear({a.width}, {a.width}), SGD step, medians of {a.rounds} interleaved rounds")
    results = []
    for b in a.batch:
        res = run(a.width, a.layers, b, a.rounds, a.warmup, a.compile)
        results.append(res)
        print(f"\nbatch {b} tokens")
        print(f"  {'contender':<14} {'median ms':>10} {'min ms':>9} {'x fp32':>7}")
        for n, t in res["median_s"].items():
            print(f"  {n:<14} {t * 1e3:>10.1f} {res['min_s'][n] * 1e3:>9.1f} {res['ratio_vs_fp32'][n]:>7.2f}")
        for n, why in res["skipped"].items():
            print(f"  {n:<14} skipped: {why}")
        q = res["ratio_vs_fp32"]["qwix"]
        print(f"  bar: qwix QAT step / fp32 step = {q:.2f} (<= {BAR}: {'met' if q <= BAR else 'NOT met'})"
              + (f"; qwix / torch.ao = {res['qwix_vs_torch_ao']:.2f}" if res["qwix_vs_torch_ao"] else ""))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"info": info, "bar": BAR, "results": results}, f, indent=2)
        print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
