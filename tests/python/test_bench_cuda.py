"""The CUDA benchmark's harness, smoke-tested on the CPU (tiny sizes, no compile) so that
benchmarks/gpu_check.sh does not first break on the GPU machine. Timings are not checked."""
import json
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import bench_cuda  # noqa: E402


class _CpuEvent:
    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def test_bench_cuda_harness_on_cpu(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "Event", _CpuEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "cpu (harness test)")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    out = tmp_path / "b.json"
    assert bench_cuda.run([(16, 256)], [torch.float32, torch.bfloat16], rounds=2, batch=2, warmup=1,
                          compile_=False, json_path=str(out), device="cpu") == 0
    data = json.loads(out.read_text())
    ours = [r for r in data["results"] if r["col"] == "ours"]
    # 12 cases x 2 dtypes forward, 6 of them also forward+backward; all ran without error.
    assert len(ours) == 2 * (12 + 6) and all(r["ms"] and not r.get("error") for r in ours)
    assert {b["status"] for b in data["bars"]} <= {"PASS", "MISS", "n/a"} and len(data["bars"]) == 24
    assert "Bar (issue 3" in capsys.readouterr().out
    saved = {s["dtype"] + " " + s["what"]: s["extra_bytes"] for s in data["saved_bytes"]}
    assert saved["float32 ours int8 per-token"] == 0  # identity backward keeps nothing
    assert saved["float32 ours int8 per-token absmax,0.9"] == 16 * 256 // 8  # one bit per element
    assert saved["float32 composed STE"] > 0
    assert {r["col"] for r in data["results"] if r["case"] == "int8 per-token"} >= {"ours", "composed"}


@pytest.mark.parametrize("qtype,tile", [("int8", None), ("int8", 128), ("fp8", None), ("fp8", 128)])
def test_composed_contender_computes_the_same_fake_quant(qtype, tile):
    """The compiled contender must compute what our op computes, or the race is unfair."""
    import qwix_torch as qwix

    x = torch.randn(8, 512, generator=torch.Generator().manual_seed(0))
    ours = bench_cuda.ours("int8" if qtype == "int8" else "float8_e4m3fn", tile)(x)
    assert torch.equal(bench_cuda.composed(qtype, tile)(x), ours)
    assert not torch.equal(ours, x) and qwix is not None
