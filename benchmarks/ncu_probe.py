"""One launch of each bar case (issue 3) for Nsight Compute: benchmarks/gpu_check.sh runs

    ncu --csv --kernel-name regex:fused_rows --metrics <see gpu_check.sh> python benchmarks/ncu_probe.py

and keeps the CSV (per launch: time, DRAM and SM throughput, warp instructions, registers, occupancy).
Instructions per element = smsp__inst_executed.sum * 32 / numel (numel printed below, launch order)."""
import torch

import qwix_torch as q


def main() -> None:
    n = 8192
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(n, n, device="cuda", dtype=dtype)
        for qtype in ("int8", "float8_e4m3fn"):
            for tile in (None, 128):
                q.fake_quant(x, qtype, channelwise_axes=(0,), tiled_axes=None if tile is None else {1: tile})
                print(f"launch: {dtype} {qtype} {'per-token' if tile is None else 'tile128'} numel={x.numel()}")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
