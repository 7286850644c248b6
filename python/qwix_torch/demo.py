"""``make demo``: QAT on real data (scikit-learn's bundled digits), a table, progress bars and a plot.

Run as ``python -m qwix_torch.demo`` or ``python examples/qat_digits.py`` (the same code).

A small CNN is trained in fp32 on the 8x8 digits (1797 images, no download). Then, for each
config (a list of ``QuantizationRule``), starting from that fp32 checkpoint:

* **no QAT**: the fp32 weights evaluated under the quantized numerics (SRQ: static activation
  scales calibrated first with ``qwix_torch.calibrate``);
* **QAT**: a few epochs of quantization-aware training from the checkpoint with small steps,
  then evaluated the same way. The fp32 run uses Adam (lr 5e-3); QAT uses SGD with momentum
  (lr 1e-2, cosine decay), whose steps scale with the gradient: where quantization changes
  little, QAT changes little (Adam's normalized steps move every weight by about lr whatever
  the gradient, which measured slightly noisier: see ``QAT_RECIPE``).

The data set is small: one 70/30 split measures accuracy in steps of 0.19 points, and the
differences this demo is about (a few images) drown in which images land in the test set.
The demo therefore runs 3x repeated 5-fold cross-validation: every step above runs once per
fold (15 fp32 checkpoints), and each accuracy is over 3 x 1797 predictions, each image
predicted by a model that did not train on it.

A control row fine-tunes the fp32 checkpoint with the QAT schedule but no quantization (does
extra training alone explain the QAT column?). A TorchScript leg runs the int8 config through
``quantize_model(torch.jit.script(cnn), ...)`` and checks it predicts exactly what the eager
model predicts. Everything is written under ``--out`` (default ``build/demo``):
``results.json`` (``{"fp32": acc, "configs": {name: {"no_qat": acc, "qat": acc}}, ...}``,
accuracies in [0, 1]), ``accuracy.png``, ``table.txt``, ``fp32.pt`` (the fp32 checkpoint of
each fold) and the TorchScript QAT model. ``--fast`` is a smoke-test mode (2 folds, few epochs).
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
FOLDS = 5
REPEATS = 3  # repeated cross-validation: each image is predicted REPEATS times, by models from different splits
BATCH = 32
CALIB_BATCHES = 10  # SRQ: batches of training inputs for qwix_torch.calibrate


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A training schedule: the learning rate decays to 0 on a cosine over all steps."""
    epochs: int
    lr: float
    optimizer: str = "adam"  # "adam" or "sgd" (momentum 0.9)
    label_smoothing: float = 0.0

    def __str__(self) -> str:
        opt = "Adam" if self.optimizer == "adam" else "SGD"
        s = f"{self.epochs} epoch{'s' if self.epochs != 1 else ''} of {opt} at lr {self.lr:g}"
        return s + (f", label smoothing {self.label_smoothing:g}" if self.label_smoothing else "")


FP32_RECIPE = Recipe(epochs=30, lr=5e-3, optimizer="adam")
# QAT, from the fp32 checkpoint. Measured over 16 seeds (5-fold CV, 1 repeat): SGD lr 1e-2 missed
# "int4 QAT >= no QAT" once (by 5 images of 1797), Adam lr 1e-3 twice, with the same mean gains.
QAT_RECIPE = Recipe(epochs=5, lr=1e-2, optimizer="sgd")
FAST = dict(repeats=1, folds=2, fp32_epochs=10, qat_epochs=1)  # --fast


# ----------------------------------------------------------------------------------------------
# Data and model
# ----------------------------------------------------------------------------------------------
def load_digits() -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (bundled with the package: no download) scaled to [0, 1]:
    ``x [1797, 1, 8, 8]`` float32, ``y [1797]`` int64."""
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None]
    return torch.from_numpy(x), torch.from_numpy(digits.target.astype(np.int64))


def folds(y: torch.Tensor, n_folds: int, seed: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Stratified ``n_folds``-fold split: ``[(train_idx, test_idx), ...]``; every index is in
    exactly one test part."""
    from sklearn.model_selection import StratifiedKFold

    kf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [(torch.from_numpy(tr), torch.from_numpy(te)) for tr, te in kf.split(np.zeros(len(y)), y.numpy())]


class DigitsCNN(nn.Module):
    """conv 3x3 (1->4) -> relu -> conv 3x3 (4->8) -> relu -> maxpool 2 -> fc (128->32) -> relu -> fc (32->10).

    4.8k parameters: small enough that int4 weights cost accuracy without QAT (a wide CNN shrugs
    off int4 on this data, and then there is nothing for QAT to show). Both linears have an ``in``
    size (128, 32) divisible by 16, so their weights can be tiled; convolutions cannot be tiled
    (DESIGN section 2), so the tiled configs tile the linears only.
    """

    def __init__(self, c1: int = 4, c2: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, 10)

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


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: Recipe, *, batch_size: int = BATCH,
          seed: int, desc: str, progress: bool) -> List[float]:
    """``recipe`` on shuffled mini-batches, with one tqdm bar. Returns the per-epoch mean losses."""
    from tqdm.auto import tqdm

    epochs = recipe.epochs
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    if recipe.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    elif recipe.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9)
    else:
        raise ValueError(f"unknown optimizer {recipe.optimizer!r}")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    model.train()
    losses = []
    with tqdm(total=epochs * steps_per_epoch, desc=desc, unit="step", leave=False, disable=not progress,
              dynamic_ncols=True, file=sys.stderr) as bar:
        for epoch in range(epochs):
            total, n = 0.0, 0
            for xb, yb in _batches(x, y, batch_size, gen):
                loss = F.cross_entropy(model(xb), yb, label_smoothing=recipe.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(xb)
                n += len(xb)
                bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss.item():.3f}", refresh=False)
                bar.update(1)
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
TS_WAYS = ("quantize_model(torch.jit.script(cnn), provider, example)", "torch.jit.script(qat_model)")


def torchscript_predict(qwix, cfg: Config, way: str, fp: nn.Module, eager: nn.Module, x: torch.Tensor,
                        example: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.jit.ScriptModule]:
    """``cfg`` through TorchScript, for the weights of ``fp`` (an fp32 ``DigitsCNN``); ``eager`` is
    the eager quantized model with the same weights. Returns (logits, eager logits, script module).

    ``way`` 0, the TorchScript path: ``quantize_model(torch.jit.script(fp), provider, example)``.
    ``way`` 1, the fallback while that path is missing: ``torch.jit.script(eager)``.
    Raises when the result is not the quantized model (its logits are the fp32 model's).
    """
    fp.eval()
    eager.eval()
    if way == TS_WAYS[0]:
        ts = qwix.quantize_model(torch.jit.script(fp), qwix.QatProvider(cfg.rules(qwix)), example)
        if not isinstance(ts, torch.jit.ScriptModule):
            raise TypeError(f"returned a {type(ts).__name__}, not a ScriptModule")
    else:
        ts = torch.jit.script(eager)
    with torch.no_grad():
        logits, ref, fp_logits = ts(x), eager(x), fp(x)
    if torch.equal(logits, fp_logits) and not torch.equal(ref, fp_logits):
        raise RuntimeError("it ran, but its output is the fp32 model's: not quantized")
    return logits, ref, ts


def _one_line(e: BaseException, limit: int = 160) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Report: table and plot
# ----------------------------------------------------------------------------------------------
def check_bar(results: Dict[str, object]) -> Dict[str, object]:
    """The issue's bar: every int8 config's QAT accuracy within 0.5 points of fp32; every int4
    config's QAT accuracy at least its no-QAT accuracy."""
    fp32, out = results["fp32"], {}
    for name, r in results["configs"].items():
        if "int8" in name.split("-a-")[0]:
            gap = 100 * (fp32 - r["qat"])
            out[f"{name}: QAT - fp32"] = {"pass": gap <= 0.5 + 1e-9, "value": round(-gap, 6) + 0.0, "bar": ">= -0.5"}
        if "int4" in name:
            gain = 100 * (r["qat"] - r["no_qat"])
            out[f"{name}: QAT - no QAT"] = {"pass": gain >= -1e-9, "value": round(gain, 6) + 0.0, "bar": ">= 0"}
    return out


def format_table(results: Dict[str, object]) -> str:
    fp32 = results["fp32"]
    lines = []
    head = f"{'config':<40} {'no QAT':>7} {'QAT':>7} {'QAT-noQAT':>10} {'QAT-fp32':>9}"
    lines.append(head)
    lines.append("-" * len(head))
    lines.append(f"{'fp32':<40} {100 * fp32:>7.2f}")
    ctl = results.get("fp32_finetuned")
    if ctl is not None:
        lines.append(f"{'fp32 + the QAT schedule, unquantized':<40} {100 * fp32:>7.2f} {100 * ctl:>7.2f} "
                     f"{100 * (ctl - fp32):>+10.2f} {100 * (ctl - fp32):>+9.2f}")
    for name, r in results["configs"].items():
        lines.append(f"{name:<40} {100 * r['no_qat']:>7.2f} {100 * r['qat']:>7.2f} "
                     f"{100 * (r['qat'] - r['no_qat']):>+10.2f} {100 * (r['qat'] - fp32):>+9.2f}")
    ts = results.get("torchscript")
    if ts:
        label = f"{ts['config']} (TorchScript)"
        if ts["status"] == "ok":
            a, b = ts["no_qat"]["accuracy"], ts["qat"]["accuracy"]
            lines.append(f"{label:<40} {100 * a:>7.2f} {100 * b:>7.2f} {100 * (b - a):>+10.2f} "
                         f"{100 * (b - fp32):>+9.2f}")
        else:
            lines.append(f"{label:<40} {'PENDING':>7} {'PENDING':>7}")
    return "\n".join(lines)


def plot(results: Dict[str, object], path: str) -> None:
    """Grouped bars (no QAT, QAT) per config and the fp32 accuracy as a dashed line; the top panel
    shows the whole range, the bottom one zooms in around fp32."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(n, r["no_qat"], r["qat"]) for n, r in results["configs"].items()]
    ts = results.get("torchscript")
    if ts and ts["status"] == "ok":
        groups.append((f"{ts['config']}\n(TorchScript)", ts["no_qat"]["accuracy"], ts["qat"]["accuracy"]))
    names = [g[0] for g in groups]
    no_qat = [100 * g[1] for g in groups]
    qat = [100 * g[2] for g in groups]
    fp32 = 100 * results["fp32"]
    xs = np.arange(len(names))
    s = results.get("settings", {})
    cv = f"{s.get('folds', '?')}-fold"
    if s.get("repeats", 1) > 1:
        cv = f"{s['repeats']}x{cv}"

    fig, axes = plt.subplots(2, 1, figsize=(11, 8.5), dpi=120, sharex=True,
                             gridspec_kw={"height_ratios": [1, 1.3]})
    low = min(no_qat + qat + [fp32])
    zoom = (min(fp32 - 1.0, min(v for v in no_qat + qat if v > fp32 - 3.0) - 0.2), max(no_qat + qat + [fp32]) + 0.3)
    for ax, (lo, hi), title in ((axes[0], (max(0.0, 5 * np.floor((low - 2) / 5)), 100.5), "all configs"),
                                (axes[1], zoom, "zoomed in around fp32 (\u2193: the bar is below this range)")):
        b1 = ax.bar(xs - 0.2, no_qat, 0.4, label="no QAT (fp32 weights, quantized numerics)", color="#b0b0b0")
        b2 = ax.bar(xs + 0.2, qat, 0.4, label="QAT", color="#2b7bba")
        ax.axhline(fp32, color="#d62728", ls="--", lw=1, label=f"fp32 ({fp32:.2f}%)")
        for bars in (b1, b2):
            for bar in bars:
                v = bar.get_height()
                y, va = (v, "bottom") if v >= lo else (lo, "bottom")
                ax.annotate(f"{v:.2f}" if v >= lo else f"{v:.1f}\u2193", (bar.get_x() + bar.get_width() / 2, y),
                            ha="center", va=va, fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_ylim(lo, hi)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(xs, names, rotation=15, ha="right", fontsize=8)
    axes[1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"qwix-torch demo: digits CNN ({s.get('cnn_parameters', '?')} parameters), accuracy on held-out "
                 f"images, {cv} cross-validation")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def _log(msg: str = "") -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stdout)  # above any progress bar
    sys.stdout.flush()


def run(out_dir: str = "build/demo", *, fast: bool = False, threads: int = 2, progress: bool = True,
        configs: Optional[Sequence[str]] = None, seed: int = SEED,
        log: Callable[[str], None] = _log) -> Dict[str, object]:
    """Runs the demo; returns (and writes to ``out_dir/results.json``) the results."""
    import qwix_torch as qwix
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    torch.set_num_threads(threads)
    os.makedirs(out_dir, exist_ok=True)
    n_repeats, n_folds, fp_recipe, qat_recipe = REPEATS, FOLDS, FP32_RECIPE, QAT_RECIPE
    if fast:
        n_repeats, n_folds = FAST["repeats"], FAST["folds"]
        fp_recipe = dataclasses.replace(fp_recipe, epochs=FAST["fp32_epochs"])
        qat_recipe = dataclasses.replace(qat_recipe, epochs=FAST["qat_epochs"])
    selected = [c for c in _configs() if configs is None or c.name in configs]

    x, y = load_digits()
    n = len(y)
    # (repeat, fold, train indices, test indices); repeat r splits with seed + r.
    splits = [(r, k, tr, te) for r in range(n_repeats) for k, (tr, te) in enumerate(folds(y, n_folds, seed + r))]
    y_all = y.repeat(n_repeats)  # slot r * n + i: image i as predicted in repeat r
    cv = f"{n_repeats}x{n_folds}-fold cross-validation" if n_repeats > 1 else f"{n_folds}-fold cross-validation"
    n_params = sum(p.numel() for p in DigitsCNN().parameters())
    log(f"qwix-torch demo: QAT of a {n_params / 1000:.1f}k-parameter CNN on scikit-learn's digits "
        f"({n} 8x8 images), {cv}{', FAST MODE' if fast else ''}, {threads} threads, seed {seed}")
    log(f"  fp32: {fp_recipe}; QAT and control: {qat_recipe}, from the fp32 checkpoint")

    # Predictions for every image, filled fold by fold (each by the model that did not train on it).
    keys = ["fp32", "control"] + [f"{c.name}/{leg}" for c in selected for leg in ("no_qat", "qat")]
    preds = {k: torch.full_like(y_all, -1) for k in keys}
    ts_cfg = next((c for c in selected if c.name == "w-int8-a-int8"), None)
    ts_way_ok: Optional[str] = None
    ts_ways = list(TS_WAYS)
    ts_attempts: List[str] = []
    ts_preds = {leg: torch.full_like(y_all, -1) for leg in ("no_qat", "qat")}
    ts_same = {"no_qat": 0, "qat": 0}
    ts_diff = {"no_qat": 0.0, "qat": 0.0}
    ts_saved = None
    timings: Dict[str, float] = {"fp32_s": 0.0, "control_s": 0.0, "torchscript_s": 0.0}
    timings.update({f"{c.name}_s": 0.0 for c in selected})
    checkpoints, per_fold = [], []

    fold_bar = tqdm(splits, desc="cross-validation", unit="fold", disable=not progress, file=sys.stderr,
                    dynamic_ncols=True)
    t_repeat = time.perf_counter()
    for r, k, tr, te in fold_bar:
        x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]
        slots = te + r * n
        fold_seed = seed + 1000 * k + 100_000 * r
        fold_acc: Dict[str, float] = {}
        name = f"{r + 1}.{k + 1}" if n_repeats > 1 else f"{k + 1}"  # repeat.fold

        def record(key: str, model: Callable) -> None:
            p = predict(model, x_te)
            preds[key][slots] = p
            fold_acc[key] = (p == y_te).float().mean().item()

        # fp32
        t0 = time.perf_counter()
        seed_everything(fold_seed)
        model = DigitsCNN()
        train(model, x_tr, y_tr, fp_recipe, seed=fold_seed, desc=f"fold {name} fp32", progress=progress)
        record("fp32", model)
        checkpoints.append(copy.deepcopy(model.state_dict()))
        timings["fp32_s"] += time.perf_counter() - t0

        # Control: the QAT schedule without quantization.
        t0 = time.perf_counter()
        control = copy.deepcopy(model)
        train(control, x_tr, y_tr, qat_recipe, seed=fold_seed + 1, desc=f"fold {name} control", progress=progress)
        record("control", control)
        timings["control_s"] += time.perf_counter() - t0

        example = x_tr[:BATCH]
        calib_batches = [x_tr[i:i + BATCH] for i in range(0, min(len(x_tr), CALIB_BATCHES * BATCH), BATCH)]
        for cfg in selected:
            t0 = time.perf_counter()
            provider = qwix.QatProvider(cfg.rules(qwix))
            qmodel = qwix.quantize_model(model, provider, example)  # a new model; `model` stays fp32
            unused = provider.get_unused_rules()
            if unused:
                raise RuntimeError(f"{cfg.name}: rules that matched no op: {unused}")
            if cfg.static_scales:
                qwix.calibrate(qmodel, calib_batches, progress=progress)
            record(f"{cfg.name}/no_qat", qmodel)
            no_qat_model = copy.deepcopy(qmodel) if cfg is ts_cfg else None
            train(qmodel, x_tr, y_tr, qat_recipe, seed=fold_seed + 1, desc=f"fold {name} QAT {cfg.name}",
                  progress=progress)
            record(f"{cfg.name}/qat", qmodel)
            timings[f"{cfg.name}_s"] += time.perf_counter() - t0

            if cfg is ts_cfg and ts_ways:
                # The TorchScript leg: the same CNN, fp32 and QAT-trained weights, through TorchScript.
                t0 = time.perf_counter()
                trained = DigitsCNN()
                fp_keys = set(trained.state_dict())
                trained.load_state_dict({key: v for key, v in qmodel.state_dict().items() if key in fp_keys})
                while ts_ways:
                    way = ts_ways[0]
                    try:
                        out = {leg: torchscript_predict(qwix, cfg, way, fp, eager, x_te, example)
                               for leg, fp, eager in (("no_qat", model, no_qat_model), ("qat", trained, qmodel))}
                    except Exception as e:  # noqa: BLE001 (reported in the output and results.json)
                        ts_attempts.append(f"{way}: {type(e).__name__}: {_one_line(e)}")
                        ts_ways.pop(0)
                        ts_way_ok = None
                        for leg in ts_preds:  # start over with the next way
                            ts_preds[leg].fill_(-1)
                            ts_same[leg], ts_diff[leg] = 0, 0.0
                        if (r, k) != (0, 0):
                            ts_attempts.append("(an earlier fold had worked that way: TorchScript results "
                                               "cover the later folds only)")
                        continue
                    ts_way_ok = way
                    for leg, (logits, ref, ts) in out.items():
                        ts_preds[leg][slots] = logits.argmax(-1)
                        ts_same[leg] += int((logits.argmax(-1) == ref.argmax(-1)).sum().item())
                        ts_diff[leg] = max(ts_diff[leg], (logits - ref).abs().max().item())
                    if ts_saved is None:
                        path = os.path.join(out_dir, f"{cfg.name}_qat_torchscript.pt")
                        try:
                            out["qat"][2].save(path)
                            ts_saved = path
                        except Exception as e:  # noqa: BLE001
                            ts_attempts.append(f"saving {path}: {type(e).__name__}: {_one_line(e)}")
                    break
                timings["torchscript_s"] += time.perf_counter() - t0

        per_fold.append({"repeat": r, "fold": k, "n_train": len(tr), "n_test": len(te),
                         **{key: round(v, 6) for key, v in fold_acc.items()}})
        if k == n_folds - 1:
            rs = slice(r * n, (r + 1) * n)
            log(f"{'repeat ' + str(r + 1) + '/' + str(n_repeats) + ': ' if n_repeats > 1 else ''}"
                f"{n_folds} folds (each trains on {n_folds - 1}/{n_folds} of the images, tests on the rest): fp32 "
                f"{100 * (preds['fp32'][rs] == y).float().mean().item():.2f}%, {len(selected)} configs x (no QAT, QAT) "
                f"({time.perf_counter() - t_repeat:.1f} s)")
            t_repeat = time.perf_counter()
    fold_bar.close()

    def acc(p: torch.Tensor) -> float:
        return (p == y_all).float().mean().item()

    results: Dict[str, object] = {
        "fp32": acc(preds["fp32"]),
        "configs": {c.name: {"no_qat": acc(preds[f"{c.name}/no_qat"]), "qat": acc(preds[f"{c.name}/qat"])}
                    for c in selected},
        "fp32_finetuned": acc(preds["control"]),
    }
    if ts_cfg is not None:
        if ts_way_ok is not None:
            ts_n = int((ts_preds["qat"] >= 0).sum().item())
            results["torchscript"] = {
                "status": "ok", "how": ts_way_ok, "config": ts_cfg.name, "n": ts_n, "saved": ts_saved,
                "attempts": ts_attempts,
                **{leg: {"accuracy": (ts_preds[leg] == y_all)[ts_preds[leg] >= 0].float().mean().item(),
                         "eager_accuracy":
                             (preds[f"{ts_cfg.name}/{leg}"] == y_all)[ts_preds[leg] >= 0].float().mean().item(),
                         "same_predictions": ts_same[leg], "max_abs_logit_diff": ts_diff[leg]}
                   for leg in ("no_qat", "qat")}}
        else:
            results["torchscript"] = {"status": "pending", "config": ts_cfg.name, "attempts": ts_attempts}
    results["bar"] = check_bar(results)
    timings["total_s"] = time.perf_counter() - t_start
    results["settings"] = {"fast": fast, "threads": threads, "seed": seed, "repeats": n_repeats, "folds": n_folds,
                           "n_images": n, "n_predictions": len(y_all),
                           "fp32": dataclasses.asdict(fp_recipe), "qat": dataclasses.asdict(qat_recipe),
                           "batch_size": BATCH, "calibration_batches": CALIB_BATCHES, "cnn_parameters": n_params,
                           "torch": torch.__version__}
    results["timings_s"] = {key: round(v, 2) for key, v in timings.items()}
    results["folds"] = per_fold

    ts = results.get("torchscript")
    if ts is not None:
        log("")
        if ts["status"] == "ok":
            log(f"TorchScript leg: {ts['config']} via {ts['how']}")
            for leg in ("no_qat", "qat"):
                t = ts[leg]
                log(f"  {'no QAT' if leg == 'no_qat' else 'QAT':<6}: {100 * t['accuracy']:.2f}% "
                    f"(eager {100 * t['eager_accuracy']:.2f}%); "
                    f"same prediction as eager for {t['same_predictions']}/{ts['n']}; "
                    f"max |logit - eager logit| = {t['max_abs_logit_diff']:.1e}")
        else:
            log(f"TorchScript leg ({ts['config']}): PENDING, no TorchScript path works yet:")
        for line in ts["attempts"]:
            log(f"  - {line}")

    table = format_table(results)
    log("")
    log(f"Accuracy (%) on held-out images, {cv}: {len(y_all)} predictions "
        f"({'each image ' + str(n_repeats) + ' times, ' if n_repeats > 1 else ''}"
        f"each by a model that did not train on it; "
        f"1 prediction = {100 / len(y_all):.3f} points)")
    log(table)
    log("")
    log("Bar (issue 5): int8 QAT within 0.5 points of fp32; every int4 config's QAT >= its no-QAT accuracy")
    for what, r in results["bar"].items():
        log(f"  {'PASS' if r['pass'] else 'FAIL'}  {what} = {r['value']:+.2f} points (bar: {r['bar']})")

    with open(os.path.join(out_dir, "table.txt"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    torch.save(checkpoints, os.path.join(out_dir, "fp32.pt"))
    plot(results, os.path.join(out_dir, "accuracy.png"))
    files = ["results.json", "accuracy.png", "table.txt", "fp32.pt"]
    files += [os.path.basename(ts_saved)] if ts_saved else []
    log("")
    log(f"wrote {', '.join(os.path.join(out_dir, f) for f in files)}")
    log(f"time: {timings['total_s']:.1f} s (fp32 {timings['fp32_s']:.1f} s, QAT configs "
        f"{sum(timings[f'{c.name}_s'] for c in selected):.1f} s, control {timings['control_s']:.1f} s, "
        f"TorchScript {timings['torchscript_s']:.1f} s)")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwix_torch.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="build/demo", help="output folder (default: build/demo)")
    p.add_argument("--fast", action="store_true",
                   help="smoke-test mode: 2-fold cross-validation, no repeats, few epochs")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--configs", nargs="*", choices=CONFIG_NAMES, help="run only these configs")
    p.add_argument("--seed", type=int, default=SEED,
                   help=f"seed of the folds, the initializations and the batch order (default: {SEED})")
    args = p.parse_args(argv)
    run(args.out, fast=args.fast, threads=args.threads, progress=not args.no_progress, configs=args.configs,
        seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
