"""Frames from reflectors: our compact-WY `frame` vs torch.linalg.householder_product, fwd+bwd.

    python benchmarks/bench_householder.py            # CPU, and CUDA when present
    python benchmarks/bench_householder.py --merge    # keep rows of other devices already in the file
    python benchmarks/bench_householder.py --quick    # small sizes, nothing written (smoke test)

Writes benchmarks/results/householder.json: rows {device, batch, d, r, ours_ms,
torch_householder_product_ms, speedup}. The target (issue 2) is speedup >= 20 on CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, merge_rows, print_table, time_ms, today, write_results  # noqa: E402

from sttp_compress.core.householder import frame, frame_numel, reflectors  # noqa: E402

SIZES = [(64, 512, 64), (16, 2304, 64)]


def bench(device: str, batch: int, d: int, r: int, quick: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)
    p = (0.1 * torch.randn(batch, frame_numel(d, r), generator=g)).to(device).requires_grad_()
    G = torch.randn(batch, d, r, generator=g).to(device)

    def ours():
        (frame(p, d, r) * G).sum().backward()

    def reference():
        V = reflectors(p, d, r)
        tau = 2 / (V * V).sum(-2)
        (torch.linalg.householder_product(V, tau) * G).sum().backward()

    with torch.no_grad():  # same function, so the comparison is fair
        V = reflectors(p, d, r)
        assert (frame(p, d, r) - torch.linalg.householder_product(V, 2 / (V * V).sum(-2))).abs().max() < 1e-4
    slow_repeat = 1 if quick else (3 if device == "cpu" else 10)
    ours_ms = time_ms(ours, device, warmup=1 if quick else 2, repeat=2 if quick else 10)
    ref_ms = time_ms(reference, device, warmup=1, repeat=slow_repeat)  # seconds per run on CPU
    return {"device": machine(device), "batch": batch, "d": d, "r": r, "ours_ms": round(ours_ms, 3),
            "torch_householder_product_ms": round(ref_ms, 3), "speedup": round(ref_ms / ours_ms, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--merge", action="store_true", help="keep rows for other devices in the results file")
    ap.add_argument("--devices", nargs="*", default=None)
    ap.add_argument("--quick", action="store_true", help="small sizes, nothing written (smoke test)")
    args = ap.parse_args()
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    sizes = [(4, 64, 8)] if args.quick else SIZES
    rows = [bench(dev, *size, quick=args.quick) for dev in devices for size in sizes]
    if args.quick:
        print_table("Householder frames, fwd+bwd (--quick, not written)", rows,
                    ["device", "batch", "d", "r", "ours_ms", "torch_householder_product_ms", "speedup"])
        return
    if args.merge:
        rows = merge_rows("householder", rows)
    cols = ["device", "batch", "d", "r", "ours_ms", "torch_householder_product_ms", "speedup"]
    print_table("Householder frames, fwd+bwd", rows, cols)
    write_results("householder", rows, {"date": today(), "script": "benchmarks/bench_householder.py"},
                  f"# Householder frames, fwd+bwd\n\nDate: {today()}\n\n" + markdown_table(rows, cols))


if __name__ == "__main__":
    main()
