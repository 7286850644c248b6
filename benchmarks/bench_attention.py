#!/usr/bin/env python3
"""What quantizing attention costs: a training step of a causal self-attention block whose attention is
F.scaled_dot_product_attention, side by side in one run.

The model: Linear(d, 3d) -> F.scaled_dot_product_attention(is_causal=True) over d/64 heads -> Linear(d, d),
trained with MSE and SGD on a fixed batch of [B, T, d] (the step of bench_qat.py).

Contenders (same initial weights, same data):
  fp32          the float model (the fused sdpa kernel)
  qwix linear   int8 weights and activations on the two linears only (op_names=("linear",)): sdpa stays fused
  qwix all      int8 everywhere: sdpa runs decomposed and q, kᵀ, the attention weights and v are
                fake-quantized per row (docs/qat.md, "F.scaled_dot_product_attention")
  fp32 math     the float model with sdpa forced to its math backend (SDPBackend.MATH): what an
                unfused attention costs without any quantization

Timing: medians over interleaved rounds after warmup (as bench_qat.py). Informational only: exits 0 unless
it crashes (timings are never test thresholds).

Usage:
  .venv/bin/python benchmarks/bench_attention.py                 # d 512, B 4, T 256 and 1024
  .venv/bin/python benchmarks/bench_attention.py --quick         # smoke test
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench_qat import Contender, qwix


class AttentionBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class MathBackend(nn.Module):
    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        with sdpa_kernel(SDPBackend.MATH):
            return self.m(x)


def run(d: int, batch: int, seq: int, rounds: int, warmup: int) -> Dict:
    torch.manual_seed(0)
    fp = AttentionBlock(d, max(1, d // 64))
    x, y = torch.randn(batch, seq, d), torch.randn(batch, seq, d)
    linear_only = qwix.QatProvider([qwix.QuantizationRule(weight_qtype="int8", act_qtype="int8",
                                                          op_names=("linear",))])
    everything = qwix.QatProvider([qwix.QuantizationRule(weight_qtype="int8", act_qtype="int8")])
    contenders = [
        Contender("fp32", copy.deepcopy(fp), x, y),
        Contender("qwix linear", qwix.quantize_model(fp, linear_only), x, y),
        Contender("qwix all", qwix.quantize_model(fp, everything), x, y),
        Contender("fp32 math", MathBackend(copy.deepcopy(fp)), x, y),
    ]
    for _ in range(warmup):
        for c in contenders:
            c.step()
    for r in range(rounds):
        for c in contenders[r % len(contenders):] + contenders[: r % len(contenders)]:
            c.times.append(c.step())
    med = {c.name: statistics.median(c.times) for c in contenders}
    return {"d": d, "batch": batch, "seq": seq, "rounds": rounds, "median_s": med,
            "ratio_vs_fp32": {n: t / med["fp32"] for n, t in med.items()},
            "all_vs_linear": med["qwix all"] / med["qwix linear"]}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke test: d 64, T 16, 2 rounds")
    ap.add_argument("--json", help="write every median and ratio here")
    a = ap.parse_args(argv)
    if a.quick:
        a.d, a.batch, a.seq, a.rounds, a.warmup = 64, 2, [16], 2, 1
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    print(f"torch {info['torch']}, {info['threads']} threads; attention block d={a.d}, {max(1, a.d // 64)} heads, "
          f"batch {a.batch}, SGD step, medians of {a.rounds} interleaved rounds")
    results = []
    for t in a.seq:
        res = run(a.d, a.batch, t, a.rounds, a.warmup)
        results.append(res)
        print(f"\nT = {t}")
        print(f"  {'contender':<12} {'median ms':>10} {'x fp32':>7}")
        for n, s in res["median_s"].items():
            print(f"  {n:<12} {s * 1e3:>10.1f} {res['ratio_vs_fp32'][n]:>7.2f}")
        print(f"  quantizing the attention products: qwix all / qwix linear = {res['all_vs_linear']:.2f}")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=2)
        print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
