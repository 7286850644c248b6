"""Per-element instruction cost of the CUDA fake-quant forms, read from SASS.

Needs no GPU: compiles benchmarks/sass_cost.cu (one chunk of 8 elements per
thread, per form) with nvcc, disassembles it with cuobjdump and subtracts the
plain copy kernel. The fused kernels are issue-bound on 16-bit inputs (Nsight
on an H200: SM 84%, DRAM 46%), so instructions per element is the number that
decides whether they reach copy bandwidth (~34 SASS instructions per element is
the whole issue budget of an H200 at bf16 copy speed).

    python benchmarks/sass_cost.py [--arch sm_90] [--json out.json]

cuobjdump and nvdisasm come from the pip packages nvidia-cuda-cuobjdump / -nvdisasm when not on PATH.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMS = {0: "checked division", 1: "unchecked division", 2: "unchecked + symmetric", 3: "chosen per chunk"}
KINDS = {"0": "int", "1": "float", "2": "nf4"}


def cuobjdump_env() -> tuple:
    """(cuobjdump path, environment): from PATH, else from the pip packages nvidia-cuda-cuobjdump and
    nvidia-cuda-nvdisasm (installed into this interpreter's environment when missing)."""
    found = shutil.which("cuobjdump")
    if found and shutil.which("nvdisasm"):
        return found, os.environ.copy()
    try:
        import nvidia.cu13  # noqa: F401
        bin_dir = os.path.join(list(nvidia.cu13.__path__)[0], "bin")
        missing = not all(os.path.exists(os.path.join(bin_dir, t)) for t in ("cuobjdump", "nvdisasm"))
    except ImportError:
        missing = True
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "nvidia-cuda-cuobjdump",
                        "nvidia-cuda-nvdisasm"], check=True)
    import importlib

    import nvidia.cu13

    importlib.reload(nvidia.cu13)
    bin_dir = os.path.join(list(nvidia.cu13.__path__)[0], "bin")
    for tool in ("cuobjdump", "nvdisasm"):
        os.chmod(os.path.join(bin_dir, tool), 0o755)
    env = os.environ.copy()
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return os.path.join(bin_dir, "cuobjdump"), env


def sass_functions(cubin: str) -> dict:
    """Function name -> [(address, instruction)] without NOPs."""
    tool, env = cuobjdump_env()
    text = subprocess.run([tool, "-sass", cubin], check=True, capture_output=True, text=True, env=env).stdout
    out = {}
    for chunk in re.split(r"\n\s*Function : ", text)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        ins = []
        for ln in chunk.split("\n"):
            m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", ln)
            if m and not m.group(2).startswith("NOP"):
                ins.append((int(m.group(1), 16), m.group(2)))
        out[name] = ins
    return out


def shortest_path(ins: list) -> int:
    """Instructions issued on the cheapest path from entry to EXIT (BFS over the
    control flow): the hot path, where slow branches (checked division of Inf/NaN
    or overflowing quotients) are skipped. Equals the static count when branch-free."""
    index = {a: n for n, (a, _) in enumerate(ins)}
    dist = {0: 1}
    frontier = [0]
    while frontier:
        nxt = []
        for n in frontier:
            op = ins[n][1]
            if re.match(r"(@!?U?P\w+ )?EXIT\b", op) and not op.startswith("@"):
                return dist[n]
            succ = []
            m = re.match(r"(@!?U?P\w+ )?BRA(\.\w+)* (?:\w+, )?(0x[0-9a-f]+)", op)
            if m:
                succ.append(index[int(m.group(3), 16)])
            if not (m and not m.group(1)) and n + 1 < len(ins):
                succ.append(n + 1)  # falls through unless an unconditional branch
            for t in succ:
                if t not in dist:
                    dist[t] = dist[n] + 1
                    nxt.append(t)
        frontier = nxt
    raise RuntimeError("no path to EXIT")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch.utils.cpp_extension as ext

    nvcc = os.environ.get("NVCC", "nvcc")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "cost.cubin")
        cmd = [nvcc, "-cubin", "-std=c++20", "-O3", "--expt-relaxed-constexpr", f"-arch={args.arch}",
               "-I" + os.path.join(ROOT, "csrc"), "-I" + ROOT, "-I" + os.path.join(ROOT, "cuda", "compile_check")]
        cmd += ["-I" + p for p in ext.include_paths()]
        subprocess.run(cmd + [os.path.join(ROOT, "benchmarks", "sass_cost.cu"), "-o", cubin], check=True)
        funcs = sass_functions(cubin)
    copies = {("f" if "IfE" in n else "bf16"): shortest_path(i) for n, i in funcs.items() if "copy_chunk" in n}
    rows = []
    for name, ins in funcs.items():
        m = re.search(r"cost_chunkI(f|N3c108BFloat16E)LNS_5QKindE(\d)ELi(\d)E", name)
        if not m:
            continue
        dtype = "f" if m.group(1) == "f" else "bf16"
        hot = (shortest_path(ins) - copies[dtype]) / 8
        static = (len(ins) - len(funcs[next(n for n in funcs if "copy_chunk" in n and (("IfE" in n) == (dtype == "f")))]))
        branches = sum(1 for a, i in ins if re.match(r"(@!?U?P\w+ )?BRA\b", i) and not i.endswith(hex(a)))
        rows.append({"dtype": "float32" if dtype == "f" else "bfloat16", "kind": KINDS[m.group(2)],
                     "form": FORMS[int(m.group(3))], "hot_per_element": round(hot, 2),
                     "static_per_element": round(static / 8, 2), "branches": branches})
    rows.sort(key=lambda r: (r["dtype"], r["kind"], r["form"]))
    print(f"SASS instructions per element on {args.arch}: hot = cheapest path through the kernel (slow")
    print("branches for Inf/NaN or overflowing quotients skipped), static = all code; both minus the copy kernel, / 8")
    print(f"{'dtype':9} {'kind':6} {'form':24} {'hot':>7} {'static':>7} {'branches':>8}")
    for r in rows:
        print(f"{r['dtype']:9} {r['kind']:6} {r['form']:24} {r['hot_per_element']:7.2f} "
              f"{r['static_per_element']:7.2f} {r['branches']:8d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
