"""The demo (`make demo`, `python -m qwix_torch.demo`) in its fast mode: it runs end to end and
writes results.json, the plot and the table with the promised structure."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QTYPES = {"int2", "int4", "int8", "float8_e4m3fn"}


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # One thread: the fast mode's tensors are tiny, and a busy machine makes 2 threads thrash.
    cmd = [sys.executable, "-m", "qwix_torch.demo", "--fast", "--no-progress", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(out / "results.json") as f:
        return out, json.load(f), proc.stdout


def test_results_json_structure(fast_run):
    _, res, _ = fast_run
    assert set(res) >= {"fp32", "configs"}
    assert isinstance(res["fp32"], float) and 0.8 < res["fp32"] <= 1.0
    from qwix_torch.demo import CONFIG_NAMES

    assert list(res["configs"]) == CONFIG_NAMES
    for name, r in res["configs"].items():
        assert set(r) == {"no_qat", "qat"}, name
        for key in ("no_qat", "qat"):
            assert isinstance(r[key], float) and 0.0 <= r[key] <= 1.0, (name, key, r[key])


def test_config_names_contain_their_qtypes(fast_run):
    _, res, _ = fast_run
    names = list(res["configs"])
    for name in names:
        parts = re.fullmatch(r"w-(\w+?)(-t\d+)?-a-(\w+?)(-srq)?", name)
        assert parts, name
        assert parts.group(1) in QTYPES and parts.group(3) in QTYPES, name
    required = ["w-int8-a-int8", "w-int8-a-int8-srq", "w-int4-a-int8", "w-float8_e4m3fn-a-float8_e4m3fn"]
    for name in required:
        assert name in names
    assert any(re.fullmatch(r"w-int[24]-t\d+-a-int8", n) for n in names)  # tiled weights


def test_files_and_table(fast_run):
    out, res, stdout = fast_run
    for f in ("results.json", "accuracy.png", "table.txt", "fp32.pt"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    import torch

    checkpoints = torch.load(out / "fp32.pt")  # one fp32 state_dict per fold
    assert len(checkpoints) == res["settings"]["repeats"] * res["settings"]["folds"] == len(res["folds"])
    from qwix_torch.demo import DigitsCNN

    DigitsCNN().load_state_dict(checkpoints[0])
    with open(out / "accuracy.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.txt").read_text()
    assert table in stdout
    for name in res["configs"]:
        assert name in table
    assert "PASS" in stdout or "FAIL" in stdout  # the bar is reported either way


def test_torchscript_leg(fast_run):
    """The TorchScript leg ran and predicts what the eager model predicts, or says plainly that it
    is pending."""
    _, res, stdout = fast_run
    ts = res["torchscript"]
    assert ts["status"] in ("ok", "pending")
    if ts["status"] == "pending":
        assert "PENDING" in stdout and ts["attempts"]
        return
    assert ts["config"] == "w-int8-a-int8" and ts["n"] == res["settings"]["n_predictions"]
    for leg in ("no_qat", "qat"):
        assert ts[leg]["same_predictions"] == ts["n"]
        assert ts[leg]["accuracy"] == ts[leg]["eager_accuracy"]
        assert ts[leg]["accuracy"] == pytest.approx(res["configs"]["w-int8-a-int8"][leg])
