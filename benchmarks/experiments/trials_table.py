"""The MobileNetV2 recipe trials of a device call (frontier_trials.sh's TRIALS) as one table.

    python benchmarks/experiments/trials_table.py LOGS --gpu "NVIDIA H100 80GB HBM3" --commit 3827cfa

LOGS is the call's /tmp/logs (unpacked from back.tgz): each trial's `sttp-compress --json` report is
mb_<trial>.json, its stderr mb_<trial>.err. A trial is judged on the CLI's held-out validation
(`val_after`, 5,000 images held out of train/); `test_after` is reported, never used to choose. A trial that
wrote no report (cut off by the call's END) is a row with its stderr's last line. Rows merge into
results/experiments/mobilenetv2_trials.json by (trial, gpu, commit).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import markdown_table, merge_rows, today, write_results  # noqa: E402

COLUMNS = ["trial", "flags", "ratio", "size_ratio", "val_teacher", "val_before", "val_after", "test_teacher",
           "test_after", "seconds", "status", "gpu", "commit", "date"]


def flags_of(script: Path) -> dict[str, str]:
    """{trial: its flags} from frontier_trials.sh's table (`[name]="flags"`)."""
    out = {}
    for line in script.read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and "]=" in line:
            name, _, flags = line[1:].partition("]=")
            out[name] = flags.strip('"').replace("$DW", "(depthwise kept dense)")
    return out


def row(logs: Path, trial: str, flags: str, gpu: str, commit: str) -> dict:
    base = {"trial": trial, "flags": flags, "gpu": gpu, "commit": commit, "date": today()}
    try:
        report = json.loads((logs / f"mb_{trial}.json").read_text())
    except (OSError, ValueError):
        err = logs / f"mb_{trial}.err"
        lines = err.read_text().strip().splitlines() if err.exists() else []
        return {**base, "status": lines[-1][:120] if lines else "no report"}
    ft, totals = report.get("finetune", {}), report.get("totals", {})
    return {**base, "ratio": round(totals.get("ratio", 0), 2), "size_ratio": round(totals.get("size_ratio", 0), 2),
            "val_teacher": ft.get("original_val_accuracy"), "val_before": ft.get("val_accuracy_before"),
            "val_after": ft.get("val_accuracy_after"), "test_teacher": ft.get("original_test_accuracy"),
            "test_after": ft.get("test_accuracy_after"), "seconds": ft.get("seconds"), "status": "ok"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", type=Path)
    ap.add_argument("--gpu", required=True, help="the card the call ran on")
    ap.add_argument("--commit", required=True, help="the commit the call ran")
    args = ap.parse_args()
    flags = flags_of(Path(__file__).resolve().parents[1] / "device" / "frontier_trials.sh")
    trials = sorted(p.stem[3:] for p in args.logs.glob("mb_*.err"))
    rows = [row(args.logs, t, flags.get(t, "?"), args.gpu, args.commit) for t in trials]
    rows = merge_rows("mobilenetv2_trials", rows, lambda r: (r["trial"], r["gpu"], r["commit"]))
    md = ("# MobileNetV2 recipe trials at ratio 10 (frontier_trials.sh TRIALS; teacher mobilenetv2.pt)\n\n"
          "`sttp-compress` with the flags shown, `--epochs 10`, several trials side by side on one GPU (their seconds "
          "are not fine-tune times alone). Judged on `val_after`, the CLI's held-out validation (5,000 images of "
          "train/); `test_after` is the test split, reported and not used to choose.\n\n"
          + markdown_table(rows, COLUMNS))
    write_results("mobilenetv2_trials", rows, {"date": today()}, md)
    print(md)


if __name__ == "__main__":
    main()
