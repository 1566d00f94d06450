"""Does `--allocation sensitivity` start the fine-tune higher than the greedy allocation? Zero-shot, CPU.

    python benchmarks/experiments/probe_allocation_sensitivity.py --teachers .carry/teachers --data /tmp/cifar \
        --runs resnet18:10 resnet18:20 mobilenetv2:10

Runs `sttp-compress TEACHER --ratio R --epochs 0 --bn-recalibrate 100` as a user does, once with each allocation
(`greedy`, `sensitivity`), and reads the report's validation accuracy before fine-tuning (the CLI's held-out 10% of
train/, which train_teacher.py's teachers did not train on), the mean layer error and the seconds. Nothing is
chosen on the test split (the CLI reports it; it is not read here). The fine-tuned comparison is a GPU run
(bench_frontier.py). Writes benchmarks/results/experiments/allocation_sensitivity.json (+ .md); rows of other
(model, ratio, allocation) stay.
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
from common import EXPERIMENT_RESULTS, commit, machine, markdown_table, today, write_results  # noqa: E402

ALLOCATIONS = ["greedy", "sensitivity"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teachers", required=True, help="folder of <arch>.pt (benchmarks/train_teacher.py)")
    ap.add_argument("--data", required=True, help="folder with train/ and test/")
    ap.add_argument("--runs", nargs="+", default=["resnet18:10", "resnet18:20", "mobilenetv2:10"],
                    help="MODEL:RATIO pairs")
    ap.add_argument("--allocations", nargs="+", choices=ALLOCATIONS, default=ALLOCATIONS)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            model, ratio = run.split(":")
            for allocation in args.allocations:
                cmd = ["sttp-compress", f"{args.teachers}/{model}.pt", "--arch", f"{ARCH_FILE}:{model}", "--ratio",
                       ratio, "--data", args.data, "--epochs", "0", "--bn-recalibrate", "100", "--mean", MEAN,
                       "--std", STD, "--allocation", allocation, "--output", f"{tmp}/{model}_{ratio}_{allocation}.sttp.safetensors",
                       "--json"]
                t = time.perf_counter()
                try:
                    report, _ = run_cli(cmd)
                except RuntimeError as exc:  # the CLI refused or failed: say so, go on
                    print(f"{run} {allocation}: {exc}", flush=True)
                    continue
                ft, layers = report["finetune"], report["layers"]
                rows.append({"model": model, "ratio": float(ratio), "allocation": allocation,
                             "achieved_ratio": round(report["totals"]["ratio"], 2),
                             "val_acc_teacher": ft.get("original_val_accuracy"),
                             "val_acc_zero_shot": ft.get("val_accuracy_before"),
                             "mean_rel_error": round(sum(l["rel_error"] for l in layers) / len(layers), 4),
                             "convert_seconds": round(report["timings"]["convert"], 1),
                             "seconds": round(time.perf_counter() - t, 1), "device": machine("cpu"),
                             "commit": commit(), "date": today()})
                print(json.dumps(rows[-1]), flush=True)
    stored = EXPERIMENT_RESULTS / "allocation_sensitivity.json"
    key = lambda r: (r["model"], r["ratio"], r["allocation"])  # noqa: E731
    mine = {key(r) for r in rows}
    rows = [r for r in (json.loads(stored.read_text()) if stored.exists() else []) if key(r) not in mine] + rows
    rows.sort(key=key)
    md = (f"# The sensitivity allocation before fine-tuning ({today()}, {machine('cpu')})\n\n"
          f"{__doc__.split(chr(10) + chr(10), 2)[2]}\n" + markdown_table(rows, list(rows[0])))
    write_results("allocation_sensitivity", rows, {"date": today(), "teachers": args.teachers}, md)


if __name__ == "__main__":
    main()
