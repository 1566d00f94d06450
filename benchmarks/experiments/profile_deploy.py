"""Where the frozen MiniLM's serving time goes, against dense: wall time and the top kernels per forward.

    python benchmarks/experiments/profile_deploy.py --device cuda --minilm .carry/minilm16 [--batch 256]

bench_deploy.py measured on one H100 (3827cfa) the ratio-4 MiniLM `freeze`d at 0.73x the dense time at
batch 256 x 16 tokens, while its 12 FFN Linears timed alone ran 1.26x faster. This times, on the same model
and inputs, dense and `freeze` with shortcut "none" (every layer its dense weight), "auto" (the product's) and
"factors", each alone on the device (median of CUDA-synchronised calls), and for each prints the kernels (CUDA)
or operators (CPU) with the most self time in one profiled forward, and the number of kernel launches.
Writes results/experiments/profile_deploy.json (+ .md).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_deploy as bd  # noqa: E402
from common import commit, machine, markdown_table, time_ms, today, write_results  # noqa: E402

import sttp_compress as sc  # noqa: E402
from sttp_compress.compress.convert import compress_to_target  # noqa: E402

TOP = 12


def profile(model: torch.nn.Module, x: dict, device: str) -> tuple[int, list[tuple[str, float, int]]]:
    """(kernel launches or operator calls, [(name, self µs, calls)] of the top TOP) of one forward."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.no_grad(), torch.profiler.profile(activities=acts) as prof:
        bd.call(model, x)
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    if device == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        key = "self_device_time_total"
    else:
        kernels = [e for e in events if e.key.startswith("aten::")]
        key = "self_cpu_time_total"
    top = sorted(kernels, key=lambda e: getattr(e, key), reverse=True)[:TOP]
    return sum(e.count for e in kernels), [(e.key[:70], round(getattr(e, key), 1), e.count) for e in top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--minilm", default=None, help="folder of all-MiniLM-L6-v2 (default: the package's)")
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    dense, inputs = bd.minilm([], args.minilm)
    comp = copy.deepcopy(dense)
    compress_to_target(comp, ratio=4, include=["*"])
    comp.eval()
    x = bd.to_device(inputs(args.batch), args.device)
    variants = {"dense": dense}
    for shortcut in ("none", "auto", "factors"):
        variants[f"freeze {shortcut}"] = m = copy.deepcopy(comp)
        sc.freeze(m, shortcut=shortcut)
    rows, lines = [], []
    for name, model in variants.items():
        model.to(args.device)
        with torch.no_grad():
            ms = time_ms(lambda: bd.call(model, x), args.device, warmup=3, repeat=20, min_seconds=1.0)
        launches, top = profile(model, x, args.device)
        model.cpu()
        rows.append({"variant": name, "batch": args.batch, "ms": round(ms, 3), "launches": launches,
                     "device": machine(args.device), "commit": commit(), "date": today()})
        unit = "kernels" if args.device == "cuda" else "operators"
        table = "".join(f"| {n} | {t} | {c} |\n" for n, t, c in top)
        lines.append(f"\n### {name}: {ms:.3f} ms, {launches} {unit}\n\n| name | self µs | calls |\n|---|---|---|\n{table}")
        print(lines[-1], flush=True)
    md = (f"# Frozen MiniLM (ratio 4) against dense, batch {args.batch} x {bd.SEQ} tokens ({today()}, "
          f"{machine(args.device)})\n\n" + markdown_table(rows, list(rows[0])) + "".join(lines))
    write_results("profile_deploy", rows, {"date": today(), "device": machine(args.device)}, md)


if __name__ == "__main__":
    main()
