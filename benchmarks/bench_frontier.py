"""The accuracy-size frontier through the CLI itself: `sttp-compress` as a user runs it, on CIFAR-10 teachers
of three families (train_teacher.py), against the same fine-tune of the dense teacher.

    python benchmarks/bench_frontier.py --teachers .teachers --data ./cifar10 [--dry-run]
        [--models resnet18 wrn16_8 mobilenetv2] [--methods sttp svdp svd] [--ratios 10 20 50] [--seeds 0]

For every teacher (TEACHER/<arch>.pt and the <arch>.json train_teacher.py wrote), method and ratio it runs

    sttp-compress TEACHER.pt --arch benchmarks/cifar_teachers.py:ARCH --ratio R [method flags]
        --data DATA --epochs 10 --mean ... --std ...  --output ... --json

that is the CLI's defaults plus the epochs, the data and its normalisation. Methods: `sttp` (the default),
`svdp` (`--method svdp`: the SVD with orthonormal frames) and `svd` (`--method svdp --free-cores`: a
truncated SVD whose factors train as free matrices, the same fine-tune). Ratios 10, 20, 50, and 33 for the
wide ResNet (~3% of its parameters). --data holds train/ and test/: the CLI chooses its best state on a
held-out part of train/ and reports test/ (acc_before, acc_after are test accuracies). The dense teacher is
fine-tuned for the same epochs through the same pipeline (`sttp_compress.api.finetune` on the datasets and
loaders the CLI builds) for the time ratio `seconds / dense_finetune_seconds`.

Rows go to benchmarks/results/frontier.json (+ .md, .meta.json): model, teacher_acc, method, target_ratio,
achieved_ratio (parameters), size_ratio (file bytes), size_bytes (the written checkpoint), dtype, acc_before,
acc_after (for --dtype int8/float16, the model as the file stores it; acc_after_float32 beside it), epochs,
seconds (the CLI's fine-tune), dense_finetune_seconds, gpu, command, commit, date.
`--dtypes float32 float16 int8` adds STTP stored in fewer bits (the CLI's --dtype; `int8+fold` with
--fold-batchnorm, `int8+qat` / `int8+fold+qat` with --qat-steps 300, as the rows' dtype says; `qat` holds the
report's QAT block: steps, kept, the rounded model's accuracies); `--anchors 8 4 3 2` adds
weight-only quantization of the dense teacher (weight_quant.py) at those widths: acc_before zero-shot,
acc_after after the same fine-tune (FinetuneConfig defaults, the CLI's loaders) through straight-through
rounding, size_bytes the packed size (not a written file). Rows of
other runs (model, method, ratio, seed, dtype, GPU) already there stay; `warnings` lists what the
command printed as a warning (the goal: none). `--dry-run` prints the commands, one a line, and runs nothing.
`python benchmarks/bench_frontier.py --table` prints the README table from the stored rows.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import copy
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, commit, machine, markdown_table, merge_rows, table_header, today, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
ARCH_FILE = "benchmarks/cifar_teachers.py"
MEAN, STD = "0.4914,0.4822,0.4465", "0.2470,0.2435,0.2616"  # the normalisation train_teacher.py used
MODELS = ["resnet18", "wrn16_8", "mobilenetv2"]
RATIOS = {"resnet18": [10, 20, 50], "wrn16_8": [10, 20, 33, 50], "mobilenetv2": [10, 20, 50]}
METHODS = {"sttp": [], "svdp": ["--method", "svdp"], "svd": ["--method", "svdp", "--free-cores"]}
EPOCHS = 10
FOLD = "+fold"  # a dtype's suffix for runs with --fold-batchnorm (the rows' dtype says it too)
QAT = "+qat"  # an int8 dtype's suffix (after +fold, if both) for runs with --qat-steps QAT_STEPS
QAT_STEPS = 300  # about one epoch of the CLI's CIFAR-10 fine-tune (45,000 images, batch 128)
DTYPES = ["float32", "float16", "int8", "int8" + QAT, *(d + FOLD for d in ("float32", "float16", "int8")),
          "int8" + FOLD + QAT]
COLUMNS = ["model", "teacher_acc", "method", "target_ratio", "achieved_ratio", "size_ratio", "size_bytes", "dtype",
           "acc_before", "acc_after", "epochs", "seconds", "dense_finetune_seconds", "gpu"]


def compress_command(teacher: Path, arch: str, method: str, ratio: float, data: Path, epochs: int, output: Path,
                     seed: int = 0, dtype: str = "float32") -> list[str]:
    """The sttp-compress command line of one run: CLI defaults plus epochs, data and its normalisation."""
    cmd = ["sttp-compress", str(teacher), "--arch", f"{ARCH_FILE}:{arch}", "--ratio", f"{ratio:g}",
           *METHODS[method], "--data", str(data), "--epochs", str(epochs), "--mean", MEAN, "--std", STD,
           "--output", str(output), "--json"]
    if seed:
        cmd += ["--seed", str(seed)]
    qat = dtype.endswith(QAT)
    stored = dtype.removesuffix(QAT).removesuffix(FOLD)
    if stored != "float32":
        cmd += ["--dtype", stored]
    if dtype.removesuffix(QAT).endswith(FOLD):
        cmd += ["--fold-batchnorm"]
    if qat:
        cmd += ["--qat-steps", str(QAT_STEPS)]
    return cmd


def plan(models: list[str], methods: list[str], ratios: list[float] | None, seeds: list[int], teachers: Path,
         data: Path, epochs: int, out: Path, dtypes: list[str] = ("float32",)) -> list[dict]:
    """Every run: {model, method, ratio, seed, dtype, command}; extra seeds for STTP at the smallest and largest
    ratio (float32), other storage dtypes for STTP (seed 0)."""
    runs = []
    for model in models:
        for method in methods:
            chosen = ratios or RATIOS[model]
            for ratio in chosen:
                run_seeds = seeds if method == "sttp" and ratio in (min(chosen), max(chosen)) else seeds[:1]
                variants = [(seed, "float32") for seed in run_seeds] if "float32" in dtypes else []
                if method == "sttp":
                    variants += [(seeds[0], d) for d in dtypes if d != "float32"]
                for seed, dtype in variants:
                    output = out / f"{model}-{method}-{ratio:g}-{dtype}-s{seed}.sttp.safetensors"  # the CLI's default format
                    runs.append({"model": model, "method": method, "ratio": ratio, "seed": seed, "dtype": dtype,
                                 "command": compress_command(teachers / f"{model}.pt", model, method, ratio, data,
                                                             epochs, output, seed, dtype)})
    return runs


def run_cli(cmd: list[str]) -> tuple[dict, list[str]]:
    """Run one command from the repository root: its report.json (stdout of --json) and the warnings it printed.
    Where `sttp-compress` is not on the PATH (a checkout on PYTHONPATH), the same module runs with `python -m`."""
    argv = cmd if shutil.which(cmd[0]) else [sys.executable, "-m", "sttp_compress.cli", *cmd[1:]]
    proc = subprocess.run(argv, cwd=HERE.parent, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    warned = [line.strip() for line in proc.stderr.splitlines() if "Warning" in line or "warning:" in line.lower()]
    return json.loads(proc.stdout), warned


def row(run: dict, report: dict, warned: list[str], teacher_acc: float | None, dense_s: float | None,
        device: str) -> dict:
    ft, totals = report["finetune"], report["totals"]
    output = Path(report["model"]["output"])
    return {"model": run["model"], "teacher_acc": teacher_acc, "method": run["method"], "target_ratio": run["ratio"],
            "achieved_ratio": round(totals["ratio"], 2), "size_ratio": round(totals["size_ratio"], 2),
            "size_bytes": output.stat().st_size if output.exists() else totals["size_bytes_compressed"],
            "dtype": (report["dtype"] + (FOLD if report.get("batchnorm_folded") else "")
                      + (QAT if (ft.get("qat") or {}).get("steps") else "")), "seed": run["seed"],
            "qat": ft.get("qat"),
            "acc_before": ft.get("test_accuracy_before"),
            # stored in fewer bits: the accuracy of the file's model (the CLI measures it), not the float32 one's
            "acc_after": ft.get("test_accuracy_stored", ft.get("test_accuracy_after")),
            "acc_after_float32": ft.get("test_accuracy_after"),
            "teacher_acc_measured": ft.get("original_test_accuracy"),
            "val_acc_after": ft.get("val_accuracy_after"), "validation": ft.get("validation"),
            "epochs": ft["epochs"], "seconds": ft["seconds"], "dense_finetune_seconds": dense_s,
            "time_ratio": round(ft["seconds"] / dense_s, 2) if dense_s else None,
            "warnings": warned, "gpu": machine(device), "command": shlex.join(run["command"]), "commit": commit(),
            "date": today()}


def cli_data(data: Path, device: str) -> tuple:
    """(train loader, val loader, test loader) as the CLI builds them from --data with its defaults: the held-out
    validation and `finetune_loaders` (device memory on a GPU)."""
    from sttp_compress.api import FinetuneConfig
    from sttp_compress.data.images import (ImageDataConfig, build_image_splits, finetune_loaders, image_folder_splits,
                                           resolve_image_config)

    splits = image_folder_splits(str(data), None, None)
    cfg = resolve_image_config(ImageDataConfig(mean=tuple(float(v) for v in MEAN.split(",")),
                                               std=tuple(float(v) for v in STD.split(","))), splits.train)
    ds = build_image_splits(splits, cfg)
    ft = FinetuneConfig()
    return finetune_loaders(ds.train, ds.val, ds.test, cfg, ft.batch_size, ft.workers, ft.seed, device)


def finetune_like_cli(model: torch.nn.Module, teacher: torch.nn.Module, loaders: tuple, epochs: int) -> dict:
    """The CLI's fine-tune (`FinetuneConfig` defaults, `epochs`) of any model against `teacher`; its block."""
    from sttp_compress.api import FinetuneConfig
    from sttp_compress.train.loop import finetune

    train_loader, val_loader, test_loader = loaders
    return finetune(model, teacher, train_loader, val_loader, FinetuneConfig(epochs=epochs), progress=False,
                    test_loader=test_loader)


def load_teacher(teacher: Path, arch: str) -> torch.nn.Module:
    from sttp_compress.io.sources import load_model

    return load_model(str(teacher), f"{ARCH_FILE}:{arch}").eval()


def dense_finetune_seconds(teacher: Path, arch: str, loaders: tuple, epochs: int) -> float:
    """Seconds of the CLI's fine-tune on the dense teacher (distilling from itself), on the CLI's loaders."""
    model = load_teacher(teacher, arch)
    return finetune_like_cli(model, copy.deepcopy(model), loaders, epochs)["seconds"]


def anchor_rows(teacher: Path, arch: str, loaders: tuple, epochs: int, bits_list: list[int], teacher_acc: float | None,
                dense_s: float | None, device: str) -> list[dict]:
    """Weight-only quantization of the dense teacher (weight_quant.py) at each width: accuracy zero-shot
    (acc_before) and after the same fine-tune through straight-through rounding (acc_after)."""
    from sttp_compress.train.loop import evaluate
    from weight_quant import packed_bytes, quantize_, settle_, straight_through

    dense = load_teacher(teacher, arch)
    dense_bytes = sum(t.numel() * 4 for t in dense.state_dict().values())
    rows = []
    for bits in bits_list:
        zero = copy.deepcopy(dense)
        size = packed_bytes(zero, bits)
        quantize_(zero, bits)
        acc_before = round(100 * evaluate(zero.to(device), loaders[2], device, "off")["accuracy"], 2)
        student, original = copy.deepcopy(dense), copy.deepcopy(dense)
        straight_through(student, bits)
        block = finetune_like_cli(student, original, loaders, epochs)
        settle_(student)
        acc_after = round(100 * evaluate(student.to(device), loaders[2], device, "off")["accuracy"], 2)
        rows.append({"model": arch, "teacher_acc": teacher_acc, "method": "weight-only", "target_ratio": None,
                     "achieved_ratio": 1.0, "size_ratio": round(dense_bytes / size, 2), "size_bytes": size,
                     "size_from": "packed (bits/8 a weight + a float16 scale a channel, the rest float16), not a written file",
                     "dtype": f"int{bits}", "seed": 0, "acc_before": acc_before, "acc_after": acc_after,
                     "epochs": block["epochs"], "seconds": block["seconds"], "dense_finetune_seconds": dense_s,
                     "time_ratio": round(block["seconds"] / dense_s, 2) if dense_s else None, "warnings": [],
                     "gpu": machine(device), "command": f"python benchmarks/bench_frontier.py --models {arch} "
                     f"--anchors {bits} --epochs {epochs}", "commit": commit(), "date": today()})
        print(f"{arch} weight-only int{bits}: {acc_before}% zero-shot, {acc_after}% after {epochs} epochs "
              f"({block['seconds']:.0f} s)", flush=True)
    return rows


def _key(r: dict) -> tuple:
    return r["model"], r["method"], r["target_ratio"], r.get("seed", 0), r["dtype"], r["gpu"]


def merge(rows: list[dict]) -> list[dict]:
    """The stored rows of other runs (model, method, ratio, seed, dtype, GPU), then these."""
    return merge_rows("frontier", rows, _key)


def readme_table(rows: list[dict]) -> str:
    """The README's table: test accuracy against both ratios, per teacher, method and storage (seed 0 rows),
    in order of file ratio."""
    lines = ["| Teacher (test acc.) | Method | Target ratio | Parameter ratio | File ratio | File | Test acc. before "
             "fine-tune | Test acc. after (change) | Fine-tune time vs dense | GPU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r.get("seed", 0) == 0),
                    key=lambda r: (r["model"], r["size_ratio"], r["method"], r["dtype"])):
        change = "-" if r["acc_after"] is None or r["teacher_acc"] is None else f"{r['acc_after'] - r['teacher_acc']:+.2f}"
        time_ratio = "-" if not r.get("time_ratio") else f"{r['time_ratio']:.2f}x"
        target = "-" if r["target_ratio"] is None else f"{r['target_ratio']:g}"
        method = r["method"] if r["dtype"] == "float32" else f"{r['method']} {r['dtype']}"
        lines.append(f"| {r['model']} ({r['teacher_acc']}%) | {method} | {target} | "
                     f"{r['achieved_ratio']:.1f}x | {r['size_ratio']:.1f}x | {r['size_bytes'] / 1e6:.2f} MB | "
                     f"{r['acc_before']}% | {r['acc_after']}% ({change}) | {time_ratio} | {r['gpu']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", default=str(HERE.parent / ".teachers"), help="folder of <arch>.pt and <arch>.json")
    ap.add_argument("--data", help="folder with train/ and test/")
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS),
                    help="none (a bare --methods): no compression runs, only --anchors")
    ap.add_argument("--ratios", nargs="+", type=float, help="default: 10 20 50 (and 33 for wrn16_8)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="STTP at the smallest and largest ratio "
                    "runs every seed; the rest seed 0")
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=DTYPES,
                    help="STTP's storage (--dtype of the CLI; +fold: with --fold-batchnorm; +qat: with --qat-steps "
                         f"{QAT_STEPS}); not float32 for the sttp method only")
    ap.add_argument("--anchors", nargs="*", type=int, default=[], metavar="BITS",
                    help="weight-only quantization of the dense teacher at these widths (e.g. 8 4 3 2), zero-shot "
                         "and after the same fine-tune with straight-through rounding")
    ap.add_argument("--out", help="folder for the checkpoints (default: a temporary folder)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense fine-tune (no time ratio)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, one a line, and run nothing")
    ap.add_argument("--no-save", action="store_true", help="print the rows, write no results (the smoke test)")
    ap.add_argument("--table", action="store_true", help="print the README table of the stored rows")
    args = ap.parse_args()
    if args.table:
        print(readme_table(json.loads((RESULTS / "frontier.json").read_text())), end="")
        return
    if not args.data:
        ap.error("--data is required (a folder with train/ and test/)")
    teachers, data = Path(args.teachers), Path(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        runs = plan(args.models, args.methods, args.ratios, args.seeds, teachers, data, args.epochs, out, args.dtypes)
        if args.dry_run:
            for run in runs:
                print(shlex.join(run["command"]))
            return
        out.mkdir(parents=True, exist_ok=True)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        rows = []
        for model in args.models:
            info_path = teachers / f"{model}.json"
            teacher_acc = json.loads(info_path.read_text())["test_acc"] if info_path.exists() else None
            loaders = cli_data(data, device) if not (args.no_dense and not args.anchors) else None
            dense_s = None if args.no_dense else dense_finetune_seconds(teachers / f"{model}.pt", model, loaders,
                                                                       args.epochs)
            if dense_s is not None:
                print(f"{model} dense fine-tune: {dense_s:.0f} s", flush=True)
            for run in (r for r in runs if r["model"] == model):
                t = time.perf_counter()
                try:
                    report, warned = run_cli(run["command"])
                except RuntimeError as exc:  # the CLI refused or failed: say so, go on with the next run
                    print(exc, file=sys.stderr, flush=True)
                    continue
                rows.append(row(run, report, warned, teacher_acc, dense_s, device))
                print(f"{model} {run['method']} {run['ratio']:g} seed {run['seed']}: test {rows[-1]['acc_after']}% "
                      f"({time.perf_counter() - t:.0f} s)", flush=True)
                if not args.no_save:  # after every run: a run cut short keeps what finished
                    save(rows, device, args.epochs, data)
            if args.anchors:
                rows += anchor_rows(teachers / f"{model}.pt", model, loaders, args.epochs, args.anchors, teacher_acc,
                                    dense_s, device)
                if not args.no_save:
                    save(rows, device, args.epochs, data)
        if args.no_save:
            print(json.dumps(rows, indent=1))


def save(rows: list[dict], device: str, epochs: int, data: Path) -> None:
    """Merge these rows into the stored table under a lock: the device calls run several of these side by side."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / ".frontier.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = merge(rows)
        md = table_header("frontier", "Frontier through the CLI", rows) + readme_table(rows) + "\n" + markdown_table(rows, COLUMNS)
        write_results("frontier", rows, {"date": today(), "device": machine(device), "epochs": epochs,
                                         "data": str(data)}, md)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
