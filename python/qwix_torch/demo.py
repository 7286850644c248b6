"""``make demo``: QAT on real data (scikit-learn's bundled digits), a table, progress bars and a plot.

Run as ``python -m qwix_torch.demo`` or ``python examples/qat_digits.py`` (the same code).

A small CNN is trained in fp32 on the 8x8 digits (1797 images, no download). Then, for each
config (a list of ``QuantizationRule``), starting from the same fp32 checkpoint:

* **no QAT**: the fp32 weights evaluated under the quantized numerics (SRQ: static activation
  scales calibrated first with ``qwix_torch.calibrate``);
* **QAT**: a few epochs of quantization-aware training from that checkpoint at a smaller
  learning rate, then evaluated the same way.

One leg runs the QAT-trained int8 CNN through TorchScript and checks it gives the same accuracy.
Everything is written under ``--out`` (default ``build/demo``): ``results.json``
(``{"fp32": acc, "configs": {name: {"no_qat": acc, "qat": acc}}, ...}``, accuracies in [0, 1]),
``accuracy.png``, ``table.txt`` and ``fp32.pt``. ``--fast`` is a smoke-test mode (fewer epochs).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SEED = 0


# ----------------------------------------------------------------------------------------------
# Data and model
# ----------------------------------------------------------------------------------------------
def load_data(seed: int = SEED) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (bundled with the package: no download), scaled to [0, 1], split
    70/30 stratified. Returns ``x_train [N, 1, 8, 8], y_train, x_test, y_test``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None]  # [1797, 1, 8, 8]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
    return torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te)


class DigitsCNN(nn.Module):
    """conv 3x3 (1->16) -> relu -> conv 3x3 (16->32) -> relu -> maxpool 2 -> fc (512->64) -> relu -> fc (64->10).

    Both linears have an ``in`` size (512, 64) divisible by 16 and 32, so their weights can be
    tiled; convolutions cannot be tiled (DESIGN section 2), so tiled configs target linears only.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


# ----------------------------------------------------------------------------------------------
# Configs: the rules of each quantized variant
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Config:
    name: str  # contains its qtypes, e.g. "w-int4-a-int8"
    description: str
    rules: Callable[[object], list]  # qwix module -> [QuantizationRule, ...]
    static_scales: bool = False  # SRQ: calibrate before evaluating / training


def _configs() -> List[Config]:
    return [
        Config("w-int8-a-int8", "int8 weights per channel, int8 activations dynamic",
               lambda q: [q.QuantizationRule(weight_qtype="int8", act_qtype="int8")]),
        Config("w-int8-a-int8-srq", "int8 weights, int8 activations with static (calibrated) scales",
               lambda q: [q.QuantizationRule(weight_qtype="int8", act_qtype="int8", act_static_scale=True)],
               static_scales=True),
        Config("w-int4-a-int8", "int4 weights per channel, int8 activations dynamic",
               lambda q: [q.QuantizationRule(weight_qtype="int4", act_qtype="int8")]),
        Config("w-float8_e4m3fn-a-float8_e4m3fn", "float8_e4m3fn weights and activations",
               lambda q: [q.QuantizationRule(weight_qtype="float8_e4m3fn", act_qtype="float8_e4m3fn")]),
        # Convolutions cannot be tiled: the first rule (op_names) tiles the linears only, the
        # second catches the convolutions (first match wins).
        Config("w-int4-t16-a-int8", "int4 weights in tiles of 16 (linears; convs per channel), int8 act.",
               lambda q: [q.QuantizationRule(op_names=("linear",), weight_qtype="int4", act_qtype="int8", tile_size=16),
                          q.QuantizationRule(weight_qtype="int4", act_qtype="int8")]),
        Config("w-int2-t16-a-int8", "int2 weights in tiles of 16 (linears; convs int4 per channel), int8 act.",
               lambda q: [q.QuantizationRule(op_names=("linear",), weight_qtype="int2", act_qtype="int8", tile_size=16),
                          q.QuantizationRule(weight_qtype="int4", act_qtype="int8")]),
    ]


CONFIG_NAMES = [c.name for c in _configs()]


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: Optional[torch.Generator]):
    order = torch.randperm(len(x), generator=generator) if generator is not None else torch.arange(len(x))
    for i in range(0, len(x), batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch_size: int,
          seed: int, desc: str, progress: bool) -> List[float]:
    """Adam + cosine decay over all steps, shuffled mini-batches, one tqdm bar. Returns per-epoch mean losses."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    model.train()
    losses = []
    with tqdm(total=epochs * steps_per_epoch, desc=desc, unit="step", leave=False, disable=not progress,
              dynamic_ncols=True, file=sys.stderr) as bar:
        for epoch in range(epochs):
            total, n = 0.0, 0
            for xb, yb in _batches(x, y, batch_size, gen):
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(xb)
                n += len(xb)
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss.item():.3f}")
            losses.append(total / n)
    model.eval()
    return losses


@torch.no_grad()
def predict(model: Callable, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    if isinstance(model, nn.Module):
        model.eval()
    return torch.cat([model(x[i:i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)])


def accuracy(model: Callable, x: torch.Tensor, y: torch.Tensor) -> float:
    return (predict(model, x) == y).float().mean().item()


# ----------------------------------------------------------------------------------------------
# The TorchScript leg
# ----------------------------------------------------------------------------------------------
def torchscript_leg(qwix, cfg: Config, qat_model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor,
                    example: torch.Tensor, out_dir: str) -> Dict[str, object]:
    """Runs ``cfg``'s QAT-trained CNN through TorchScript; it must give the eager QAT model's accuracy.

    Preferred: the TorchScript path, ``quantize_model(torch.jit.script(fp_model), provider, example)``
    with the QAT-trained weights. Fallback: ``torch.jit.script(qat_model)``. A result that is not
    the quantized model (its logits equal the fp32 model's) does not count.
    """
    state = {k: v for k, v in qat_model.state_dict().items() if k in DigitsCNN().state_dict()}
    fp = DigitsCNN()
    fp.load_state_dict(state)
    fp.eval()
    qat_model.eval()
    with torch.no_grad():
        ref_logits = qat_model(x_test)
        fp_logits = fp(x_test)
    eager_acc = (ref_logits.argmax(-1) == y_test).float().mean().item()
    attempts = []

    def check(ts, how: str) -> Optional[Dict[str, object]]:
        with torch.no_grad():
            logits = ts(x_test)
        if torch.equal(logits, fp_logits) and not torch.equal(ref_logits, fp_logits):
            attempts.append(f"{how}: ran, but its output is the fp32 model's (not quantized)")
            return None
        acc = (logits.argmax(-1) == y_test).float().mean().item()
        path = os.path.join(out_dir, "qat_int8_torchscript.pt")
        try:
            ts.save(path)
        except Exception as e:  # noqa: BLE001 (saving is a bonus; report it)
            path = f"not saved ({type(e).__name__}: {e})"
        return {"status": "ok", "how": how, "config": cfg.name, "accuracy": acc, "eager_qat_accuracy": eager_acc,
                "max_abs_logit_diff": (logits - ref_logits).abs().max().item(),
                "same_predictions": int((logits.argmax(-1) == ref_logits.argmax(-1)).sum().item()),
                "n_test": len(y_test), "saved": path, "attempts": attempts}

    # 1. The TorchScript path of quantize_model.
    try:
        scripted_fp = torch.jit.script(fp)
        ts = qwix.quantize_model(scripted_fp, qwix.QatProvider(cfg.rules(qwix)), example)
        if not isinstance(ts, torch.jit.ScriptModule):
            raise TypeError(f"returned a {type(ts).__name__}, not a ScriptModule")
        res = check(ts, "quantize_model(torch.jit.script(fp_model), provider, example)")
        if res is not None:
            return res
    except Exception as e:  # noqa: BLE001
        attempts.append(f"quantize_model(torch.jit.script(...)): {type(e).__name__}: {_one_line(e)}")
    # 2. Scripting the QAT-quantized eager model.
    try:
        ts = torch.jit.script(qat_model)
        res = check(ts, "torch.jit.script(qat_model)")
        if res is not None:
            return res
    except Exception as e:  # noqa: BLE001
        attempts.append(f"torch.jit.script(qat_model): {type(e).__name__}: {_one_line(e)}")
    return {"status": "pending", "config": cfg.name, "eager_qat_accuracy": eager_acc, "attempts": attempts}


def _one_line(e: BaseException, limit: int = 160) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Report: table and plot
# ----------------------------------------------------------------------------------------------
def format_table(results: Dict[str, object]) -> str:
    fp32 = results["fp32"]
    lines = []
    head = f"{'config':<33} {'no QAT':>7} {'QAT':>7} {'QAT-noQAT':>10} {'QAT-fp32':>9}"
    lines.append(head)
    lines.append("-" * len(head))
    lines.append(f"{'fp32':<33} {100 * fp32:>7.2f} {'':>7} {'':>10} {'':>9}")
    for name, r in results["configs"].items():
        lines.append(f"{name:<33} {100 * r['no_qat']:>7.2f} {100 * r['qat']:>7.2f} "
                     f"{100 * (r['qat'] - r['no_qat']):>+10.2f} {100 * (r['qat'] - fp32):>+9.2f}")
    ts = results.get("torchscript")
    if ts:
        if ts["status"] == "ok":
            lines.append(f"{'torchscript (' + ts['config'] + ')':<33} {'':>7} {100 * ts['accuracy']:>7.2f} "
                         f"{'':>10} {100 * (ts['accuracy'] - fp32):>+9.2f}")
        else:
            lines.append(f"{'torchscript (' + ts['config'] + ')':<33} {'PENDING':>7}")
    return "\n".join(lines)


def plot(results: Dict[str, object], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["configs"])
    no_qat = [100 * results["configs"][n]["no_qat"] for n in names]
    qat = [100 * results["configs"][n]["qat"] for n in names]
    xs = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    b1 = ax.bar(xs - 0.2, no_qat, 0.4, label="no QAT (fp32 weights, quantized numerics)", color="#bbbbbb")
    b2 = ax.bar(xs + 0.2, qat, 0.4, label="QAT", color="#2b7bba")
    ax.axhline(100 * results["fp32"], color="#d62728", ls="--", lw=1, label=f"fp32 ({100 * results['fp32']:.2f}%)")
    for bars in (b1, b2):
        for b in bars:
            ax.annotate(f"{b.get_height():.1f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(xs, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("qwix-torch: digits CNN, test accuracy per quantization config")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def run(out_dir: str = "build/demo", *, fast: bool = False, threads: int = 2, progress: bool = True,
        configs: Optional[Sequence[str]] = None, log: Callable[[str], None] = print) -> Dict[str, object]:
    """Runs the demo; returns (and writes to ``out_dir/results.json``) the results."""
    import qwix_torch as qwix

    t_start = time.perf_counter()
    torch.set_num_threads(threads)
    os.makedirs(out_dir, exist_ok=True)
    fp_epochs, qat_epochs = (4, 1) if fast else (FP32_EPOCHS, QAT_EPOCHS)
    selected = [c for c in _configs() if configs is None or c.name in configs]

    seed_everything(SEED)
    x_tr, y_tr, x_te, y_te = load_data()
    log(f"qwix-torch demo: QAT on scikit-learn digits ({len(x_tr)} train / {len(x_te)} test 8x8 images), "
        f"{'fast mode, ' if fast else ''}{threads} threads, seed {SEED}")

    # fp32
    t0 = time.perf_counter()
    seed_everything(SEED)
    model = DigitsCNN()
    train(model, x_tr, y_tr, epochs=fp_epochs, lr=FP32_LR, batch_size=BATCH, seed=SEED,
          desc="fp32 train", progress=progress)
    fp32_acc = accuracy(model, x_te, y_te)
    torch.save(model.state_dict(), os.path.join(out_dir, "fp32.pt"))
    timings = {"fp32_train_s": time.perf_counter() - t0}
    log(f"fp32: {fp_epochs} epochs at lr {FP32_LR}: test accuracy {100 * fp32_acc:.2f}%  "
        f"({timings['fp32_train_s']:.1f} s)")

    results: Dict[str, object] = {"fp32": fp32_acc, "configs": {}}
    example = x_tr[:BATCH]
    calib_batches = [x_tr[i:i + BATCH] for i in range(0, min(len(x_tr), CALIB_BATCHES * BATCH), BATCH)]
    qat_models = {}
    for cfg in selected:
        t0 = time.perf_counter()
        provider = qwix.QatProvider(cfg.rules(qwix))
        qmodel = qwix.quantize_model(model, provider, example)  # a new model; `model` stays fp32
        unused = provider.get_unused_rules() if hasattr(provider, "get_unused_rules") else []
        if unused:
            raise RuntimeError(f"{cfg.name}: rules that matched nothing: {unused}")
        if cfg.static_scales:
            qwix.calibrate(qmodel, calib_batches)
        no_qat = accuracy(qmodel, x_te, y_te)
        seed_everything(SEED)
        train(qmodel, x_tr, y_tr, epochs=qat_epochs, lr=QAT_LR, batch_size=BATCH, seed=SEED + 1,
              desc=f"QAT {cfg.name}", progress=progress)
        qat = accuracy(qmodel, x_te, y_te)
        dt = time.perf_counter() - t0
        timings[f"{cfg.name}_s"] = dt
        results["configs"][cfg.name] = {"no_qat": no_qat, "qat": qat}
        qat_models[cfg.name] = (cfg, qmodel)
        log(f"{cfg.name:<33} no QAT {100 * no_qat:6.2f}%   QAT ({qat_epochs} ep, lr {QAT_LR}) {100 * qat:6.2f}%   "
            f"({dt:.1f} s)  [{cfg.description}]")

    # TorchScript leg: the QAT-trained int8 CNN.
    if "w-int8-a-int8" in qat_models:
        t0 = time.perf_counter()
        cfg, qmodel = qat_models["w-int8-a-int8"]
        ts = torchscript_leg(qwix, cfg, qmodel, x_te, y_te, example, out_dir)
        timings["torchscript_s"] = time.perf_counter() - t0
        results["torchscript"] = ts
        if ts["status"] == "ok":
            log(f"TorchScript leg ({ts['how']}): accuracy {100 * ts['accuracy']:.2f}% vs eager QAT "
                f"{100 * ts['eager_qat_accuracy']:.2f}%, same predictions on {ts['same_predictions']}/{ts['n_test']}, "
                f"max |logit diff| {ts['max_abs_logit_diff']:.2e}")
        else:
            log("TorchScript leg: PENDING (the TorchScript path is not available yet):")
        for a in ts["attempts"]:
            log(f"  - {a}")

    timings["total_s"] = time.perf_counter() - t_start
    results["settings"] = {"fast": fast, "threads": threads, "seed": SEED, "fp32_epochs": fp_epochs,
                           "fp32_lr": FP32_LR, "qat_epochs": qat_epochs, "qat_lr": QAT_LR, "batch_size": BATCH,
                           "n_train": len(x_tr), "n_test": len(x_te), "torch": torch.__version__}
    results["timings_s"] = {k: round(v, 2) for k, v in timings.items()}

    table = format_table(results)
    log("")
    log("Test accuracy (%), " + f"{len(x_te)} test images:")
    log(table)
    with open(os.path.join(out_dir, "table.txt"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot(results, os.path.join(out_dir, "accuracy.png"))
    log("")
    log(f"wrote {out_dir}/results.json, {out_dir}/accuracy.png, {out_dir}/table.txt, {out_dir}/fp32.pt"
        f"  (total {timings['total_s']:.1f} s)")
    return results


FP32_EPOCHS, FP32_LR = 20, 3e-3
QAT_EPOCHS, QAT_LR = 3, 5e-4
BATCH = 32
CALIB_BATCHES = 10


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwix_torch.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="build/demo", help="output folder (default: build/demo)")
    p.add_argument("--fast", action="store_true", help="smoke-test mode: fewer epochs")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--configs", nargs="*", choices=CONFIG_NAMES, help="run only these configs")
    args = p.parse_args(argv)
    run(args.out, fast=args.fast, threads=args.threads, progress=not args.no_progress, configs=args.configs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
