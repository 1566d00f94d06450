"""Does a fine-tune that starts after BatchNorm recalibration end higher? MobileNetV2 at ratio 10 through the CLI (CPU).

    python benchmarks/experiments/probe_mobilenetv2_recal_finetune.py --teacher .carry/teachers/mobilenetv2.pt \
        --data /tmp/cifar_small --steps 150

The converted MobileNetV2 starts its fine-tune at 10%, and `--bn-recalibrate 100` lifts that start to 38.9%
(mobilenetv2_zero_shot.md). This runs `sttp-compress TEACHER --ratio 10 --steps N` with and without it on a
small ImageFolder (a few thousand training images: a short CPU stand-in for the GPU's 10 epochs) and reads the
report's validation accuracy (the CLI's held-out share of train/) before and after. The test split is not read.
Writes benchmarks/results/experiments/mobilenetv2_recal_finetune.json (+ .md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_frontier import ARCH_FILE, MEAN, STD, run_cli  # noqa: E402
from common import commit, machine, markdown_table, today, write_results  # noqa: E402

VARIANTS = {"defaults": [], "bn-recalibrate 100": ["--bn-recalibrate", "100"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, help="MobileNetV2 state_dict (benchmarks/train_teacher.py)")
    ap.add_argument("--data", required=True, help="folder with train/ (and test/, not read here)")
    ap.add_argument("--ratio", type=float, default=10)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(VARIANTS.items()):
            cmd = ["sttp-compress", args.teacher, "--arch", f"{ARCH_FILE}:mobilenetv2", "--ratio", f"{args.ratio:g}",
                   "--data", args.data, "--steps", str(args.steps), "--mean", MEAN, "--std", STD, "--output",
                   f"{tmp}/m{i}.sttp.safetensors", "--json", *extra]
            t = time.perf_counter()
            try:
                report, _ = run_cli(cmd)
            except RuntimeError as exc:  # the CLI refused or failed: say so, go on
                print(f"{name}: {exc}", flush=True)
                continue
            ft = report["finetune"]
            rows.append({"variant": name, "ratio": args.ratio, "steps": args.steps,
                         "val_acc_teacher": ft.get("original_val_accuracy"),
                         "val_acc_before": ft.get("val_accuracy_before"), "val_acc_after": ft.get("val_accuracy_after"),
                         "seconds": round(time.perf_counter() - t, 1), "device": machine("cpu"), "commit": commit(),
                         "date": today()})
            print(json.dumps(rows[-1]), flush=True)
    md = (f"# MobileNetV2 at ratio {args.ratio:g}: fine-tune after BatchNorm recalibration ({today()}, commit "
          f"{commit()}, {machine('cpu')})\n\n{__doc__.split(chr(10) + chr(10), 1)[1]}\n" + markdown_table(rows, list(rows[0])))
    write_results("mobilenetv2_recal_finetune", rows, {"date": today(), "teacher": args.teacher, "data": args.data}, md)


if __name__ == "__main__":
    main()
