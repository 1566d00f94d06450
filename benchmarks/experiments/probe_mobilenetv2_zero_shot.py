"""Why MobileNetV2 starts its fine-tune at chance: zero-shot accuracy at ratio 10 through the CLI (CPU).

    python benchmarks/experiments/probe_mobilenetv2_zero_shot.py --teacher .carry/teachers/mobilenetv2.pt --data /tmp/cifar

The frontier's MobileNetV2 rows start their fine-tune at 10% even at ratio 10 (ResNet-18 there: 89%). This runs
`sttp-compress TEACHER --ratio 10 --epochs 0` as a user does (no fine-tuning) with and without
`--bn-recalibrate 100` (BatchNorm statistics re-estimated on 100 training batches) and with the depthwise
convolutions kept dense (`--exclude`) or one global rank (`--allocation uniform`), and reads the report's validation accuracy before fine-tuning (the CLI's
held-out 10% of train/, which the teacher did not train on) and each variant's largest layer errors. Nothing is
chosen on the test split (the CLI reports it; it is not read here). Writes
benchmarks/results/experiments/mobilenetv2_zero_shot.json (+ .md).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_frontier import ARCH_FILE, MEAN, STD, run_cli  # noqa: E402
from common import EXPERIMENT_RESULTS, commit, machine, markdown_table, today, write_results  # noqa: E402

DEPTHWISE_GLOBS = ["features.3.conv.0", "features.[4-9].conv.3", "features.1[0-9].conv.3"]
DEPTHWISE = [arg for glob in DEPTHWISE_GLOBS for arg in ("--exclude", glob)]
VARIANTS = {"defaults": [], "bn-recalibrate 100": ["--bn-recalibrate", "100"], "depthwise dense": DEPTHWISE,
            "depthwise dense, bn-recalibrate 100": [*DEPTHWISE, "--bn-recalibrate", "100"],
            "uniform allocation, bn-recalibrate 100": ["--allocation", "uniform", "--bn-recalibrate", "100"],
            "sensitivity allocation, bn-recalibrate 100": ["--allocation", "sensitivity", "--bn-recalibrate", "100"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, help="MobileNetV2 state_dict (benchmarks/train_teacher.py)")
    ap.add_argument("--data", required=True, help="folder with train/ and test/")
    ap.add_argument("--ratio", type=float, default=10)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                    help="run these only; the stored rows of the others stay")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate((n, VARIANTS[n]) for n in args.variants):
            cmd = ["sttp-compress", args.teacher, "--arch", f"{ARCH_FILE}:mobilenetv2", "--ratio", f"{args.ratio:g}",
                   "--data", args.data, "--epochs", "0", "--mean", MEAN, "--std", STD, "--output",
                   f"{tmp}/m{i}.sttp.safetensors", "--json", *extra]
            t = time.perf_counter()
            try:
                report, _ = run_cli(cmd)
            except RuntimeError as exc:  # the CLI refused or failed: say so, go on
                print(f"{name}: {exc}", flush=True)
                continue
            ft, layers = report["finetune"], report["layers"]
            worst = sorted(layers, key=lambda l: -l["rel_error"])[:3]
            dw = [l for l in layers if any(fnmatch.fnmatchcase(l["name"], g) for g in DEPTHWISE_GLOBS)]
            rows.append({"variant": name, "ratio": args.ratio, "achieved_ratio": round(report["totals"]["ratio"], 2),
                         "compressed_layers": len(layers), "depthwise_compressed": len(dw),
                         "val_acc_teacher": ft.get("original_val_accuracy"), "val_acc_zero_shot": ft.get("val_accuracy_before"),
                         "mean_rel_error": round(sum(l["rel_error"] for l in layers) / len(layers), 4),
                         "worst_layers": ", ".join(f"{l['name']} {l['rel_error']:.2f}" for l in worst),
                         "seconds": round(time.perf_counter() - t, 1), "device": machine("cpu"), "commit": commit(),
                         "date": today()})
            print(json.dumps(rows[-1]), flush=True)
    stored = EXPERIMENT_RESULTS / "mobilenetv2_zero_shot.json"
    mine = {r["variant"] for r in rows}
    rows = [r for r in (json.loads(stored.read_text()) if stored.exists() else []) if r["variant"] not in mine] + rows
    md = (f"# MobileNetV2 at ratio {args.ratio:g} before fine-tuning ({today()}, commit {commit()}, {machine('cpu')})\n\n"
          f"{__doc__.split(chr(10) + chr(10), 1)[1]}\n" + markdown_table(rows, list(rows[0])))
    write_results("mobilenetv2_zero_shot", rows, {"date": today(), "teacher": args.teacher}, md)


if __name__ == "__main__":
    main()
