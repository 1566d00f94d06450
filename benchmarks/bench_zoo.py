"""The model zoo through the CLI: every torchvision classification model at ratios 4 and 10, as a user runs it.

    python benchmarks/bench_zoo.py [--models resnet50 vgg11_bn ...] [--ratios 4 10] [--quick]

Each model is built with random weights (seed 0; conversion time and reachability do not depend on
training), saved as a plain state_dict, and compressed by
`sttp-compress M.pt --arch torchvision:NAME --ratio R --quiet --json` in a fresh process, as a new user would
(no data: conversion only). A row per model and ratio: `exit` (0 reached, 2 refused with one line, which
`message` holds; 1 would be a bug), `reached_ratio`, `seconds` (the whole command, Python's start included),
`convert_seconds` (the report's `timings.convert`), `peak_rss_mb` (the command's peak resident memory),
`model_mb` (the float32 state_dict), `rss_over_model` (the peak less that of a process that only imports
torch, torchvision and sttp_compress, over `model_mb`), and the number of `compressed` and `dense` layers.
Rows go to benchmarks/results/zoo.json (+ .md, .meta.json) with the machine, commit and date.
`--quick`: resnet18 and mobilenet_v2 at ratio 4 (a smoke test, not for the results).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine, markdown_table, print_table, today, write_results  # noqa: E402

MODELS = ["resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf",
          "shufflenet_v2_x1_0", "squeezenet1_1", "densenet121", "swin_t", "maxvit_t", "googlenet", "alexnet",
          "vgg11_bn", "vgg16", "mnasnet0_5", "vit_b_16", "inception_v3"]
COLUMNS = ["model", "ratio", "exit", "reached_ratio", "seconds", "convert_seconds", "peak_rss_mb", "model_mb",
           "rss_over_model",
           "compressed", "dense", "message"]


SAVE = """
import sys, torch, torchvision
name, path = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
kwargs = {"init_weights": True} if name in ("googlenet", "inception_v3") else {}
state = torchvision.models.get_model(name, weights=None, **kwargs).state_dict()
torch.save(state, path)
print(sum(t.numel() * t.element_size() for t in state.values()) / 1e6)
"""


def save_model(name: str, folder: Path) -> tuple[Path, float]:
    """The torchvision model `name` with random weights as a state_dict file; (path, float32 size in MB).
    Built in a child process: a child's peak RSS (ru_maxrss) starts from its parent's size at fork, so this
    process stays as small as the baseline's parent."""
    path = folder / f"{name}.pt"
    out = subprocess.run([sys.executable, "-c", SAVE, name, str(path)], check=True, capture_output=True, text=True)
    return path, float(out.stdout.strip().splitlines()[-1])


def run_cli(args: list[str]) -> tuple[int, str, str, float, float]:
    """(exit code, stdout, stderr, seconds, peak RSS in MB) of one command in a fresh process."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        return proc.returncode, out.read(), err.read(), seconds, usage.ru_maxrss / 1024


def baseline_rss_mb() -> float:
    """Peak resident memory of a process that only imports what the command imports (torch, torchvision, ours)."""
    return run_cli([sys.executable, "-c", "import torch, torchvision, sttp_compress.cli"])[4]


def run_model(name: str, ratio: float, path: Path, model_mb: float, folder: Path, baseline: float) -> dict:
    cli = str(Path(sys.executable).with_name("sttp-compress"))
    cmd = [cli, str(path), "--arch", f"torchvision:{name}", "--ratio", f"{ratio:g}", "--quiet", "--json",
           "--force", "--output", str(folder / f"{name}-{ratio:g}.sttp.safetensors")]
    code, out, err, seconds, rss = run_cli(cmd)
    row = {"model": name, "ratio": ratio, "exit": code, "reached_ratio": None, "seconds": round(seconds, 2),
           "convert_seconds": None, "peak_rss_mb": round(rss), "model_mb": round(model_mb, 1),
           "rss_over_model": round((rss - baseline) / model_mb, 2),
           "compressed": None, "dense": None, "message": None,
           "command": " ".join(["sttp-compress", f"{name}.pt", *cmd[2:-2]])}
    if code == 0:
        report = json.loads(out)
        row.update(reached_ratio=round(report["totals"]["ratio"], 3),
                   convert_seconds=report["timings"]["convert"],
                   compressed=len(report["layers"]), dense=len(report["skipped"]))
    else:
        row["message"] = err.strip().splitlines()[-1] if err.strip() else ""
    print(f"{name} ratio {ratio:g}: exit {code}, {row['reached_ratio']}, {seconds:.1f} s, {rss:.0f} MB"
          + (f" -- {row['message'][:160]}" if row["message"] else ""), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--ratios", nargs="+", type=float, default=[4, 10])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    models, ratios = (["resnet18", "mobilenet_v2"], [4]) if args.quick else (args.models, args.ratios)
    rows = []
    baseline = baseline_rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in models:
            path, model_mb = save_model(name, folder)
            for ratio in ratios:
                rows.append(run_model(name, ratio, path, model_mb, folder, baseline))
            for f in folder.iterdir():  # checkpoints and report folders: VGG's alone are 0.5 GB
                shutil.rmtree(f) if f.is_dir() else f.unlink()
    print_table("zoo", rows, COLUMNS)
    if args.quick:
        return
    bad = [r for r in rows if r["exit"] not in (0, 2)]
    meta = {"date": today(), "device": machine("cpu"), "commit": commit(), "exit_1": len(bad),
            "baseline_rss_mb": round(baseline)}
    md = (f"# The torchvision zoo through `sttp-compress` ({today()}, commit {commit()}, {machine('cpu')})\n\n"
          "Random weights, no data (conversion only), one fresh process per row; `seconds` is the whole command, "
          f"`convert_seconds` the report's conversion time, `peak_rss_mb` the command's peak resident memory, "
          f"`rss_over_model` that peak less a process that only imports torch, torchvision and sttp_compress "
          f"({baseline:.0f} MB), over the float32 model's size.\n\n"
          + markdown_table(rows, COLUMNS))
    write_results("zoo", rows, meta, md)


if __name__ == "__main__":
    main()
