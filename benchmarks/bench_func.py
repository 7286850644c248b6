#!/usr/bin/env python3
"""Per-sample gradients (DP-SGD style) of a QAT model with torch.func, side by side with the baselines.

The model: Linear(d, 4d) -> ReLU -> Linear(4d, 10), cross entropy, `--batch` samples of width d.
Contenders, all giving every sample's gradient of every parameter:
  fp32 vmap      torch.func.vmap(grad(loss)) through functional_call, the float model
  qwix vmap      the same on quantize_model(..., QuantizationRule(weight_qtype='int4', act_qtype='int8',
                 act_calibration_method='absmax,0.9')): the qwix vmap rules run each fake-quant op
                 once on the whole batch
  qwix vmap loop the same with the rules' per-sample loop (one op call per sample, as PyTorch's vmap
                 fallback would run)
  qwix eager     a Python loop of one forward + backward per sample (no torch.func)
Timing (DESIGN.md section 6): one process, round-robin, medians over rounds; ratios against fp32 vmap.
Informational only: exits 0 unless it crashes.

Usage: .venv/bin/python benchmarks/bench_func.py [--batch 16 64 256] [--width 64] [--rounds 7] [--json PATH]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import qwix_torch as qwix
from qwix_torch import _vmap


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d = args.width
    fp = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, 10))
    rules = [qwix.QuantizationRule(weight_qtype="int4", act_qtype="int8", act_calibration_method="absmax,0.9")]
    q = qwix.quantize_model(copy.deepcopy(fp), qwix.QatProvider(rules), torch.zeros(2, d))

    def per_sample(model):
        params = {k: v.detach() for k, v in model.named_parameters()}
        f = vmap(grad(lambda p, x, y: F.cross_entropy(functional_call(model, p, (x[None],)), y[None])),
                 in_dims=(None, 0, 0))
        return lambda x, y: f(params, x, y)

    def looped(fn):
        def run(x, y):
            _vmap._FORCE_LOOP = True
            try:
                return fn(x, y)
            finally:
                _vmap._FORCE_LOOP = False
        return run

    def eager(x, y):
        out = []
        for i in range(x.shape[0]):
            q.zero_grad(set_to_none=True)
            F.cross_entropy(q(x[i:i + 1]), y[i:i + 1]).backward()
            out.append([p.grad for p in q.parameters()])
        return out

    contenders = {"fp32 vmap": per_sample(fp), "qwix vmap": per_sample(q), "qwix vmap loop": looped(per_sample(q)),
                  "qwix eager": eager}
    results = {}
    print(f"per-sample gradients, width {d}, {args.threads} thread(s), medians of {args.rounds} rounds (ms)")
    print(f"{'batch':>6} " + " ".join(f"{n:>15}" for n in contenders) + "   qwix vmap / fp32   loop / vmap")
    for b in args.batch:
        x, y = torch.randn(b, d), torch.randint(0, 10, (b,))
        times = {n: [] for n in contenders}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for fn in contenders.values():  # warmup
                fn(x, y)
            names = list(contenders)
            for r in range(args.rounds):
                for n in names[r % len(names):] + names[:r % len(names)]:
                    t = time.perf_counter()
                    contenders[n](x, y)
                    times[n].append(time.perf_counter() - t)
        med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        results[b] = {"median_ms": med, "qwix_vmap_over_fp32": med["qwix vmap"] / med["fp32 vmap"],
                      "loop_over_vmap": med["qwix vmap loop"] / med["qwix vmap"],
                      "eager_over_vmap": med["qwix eager"] / med["qwix vmap"]}
        print(f"{b:>6} " + " ".join(f"{med[n]:>15.2f}" for n in contenders) +
              f"   {results[b]['qwix_vmap_over_fp32']:>16.2f}x {results[b]['loop_over_vmap']:>12.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"width": d, "threads": args.threads, "rounds": args.rounds, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
