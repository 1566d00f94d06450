"""Multi-GPU fine-tuning (issue: DistributedDataParallel): the ratio-10 ResNet-18 fine-tune on 1 and 2 GPUs.

    python benchmarks/bench_ddp.py --data DIR [--gpus 1 2] [--global-batch 1024 2048] [--epochs 5] [--runs 2]
    python benchmarks/bench_ddp.py --quick          # CPU smoke test: tiny model, synthetic data, gloo

DIR holds CIFAR-10 as `train/<class>/*.jpg` and `test/<class>/*.jpg` (the shared archive, extracted).
The images are decoded once into a uint8 cache; then every (global batch, run, GPU count) is one
`torchrun --standalone --nproc-per-node G` launch of this script in worker mode, which does what
the CLI does under torchrun on the Python API: rank 0 converts the shared ResNet-18 at ratio 10
(greedy allocation) and broadcasts it (distributed.convert_once), then sttp_compress.train.loop
distils from the original under DistributedDataParallel with the same global batch, learning rate
and schedule for every GPU count (data on the GPU: DeviceTensorLoader, each rank its slice of the
global batch; validation on the test split, sharded and reduced). The test split is only reported:
the final epoch's state is kept, as in bench_finetune_cifar10.py.

Rows {gpus, global_batch, epochs, run, images_per_s, val_accuracy_after, seconds, ...} go to
benchmarks/results/ddp.json (+ .md). images_per_s is the fine-tune's own count: training images
(all ranks) per second of training, without conversion, data decoding, validation or the first
10 steps; seconds is the fine-tune's wall time (validation included), convert_s the conversion's.
Run r of a configuration uses seed + r - 1 (data order, augmentation), so the spread between runs is
the run-to-run noise the 1-GPU/2-GPU accuracy gap is judged against. Configurations that would not
fit --budget-s (estimated from the ones already run) are skipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import machine, markdown_table, today, write_results  # noqa: E402

from sttp_compress.train import distributed  # noqa: E402
from sttp_compress.compress.convert import compress_to_target  # noqa: E402
from sttp_compress.data.images import DeviceTensorLoader  # noqa: E402
from sttp_compress.train.loop import FinetuneConfig, finetune  # noqa: E402

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
COLUMNS = ["gpus", "global_batch", "epochs", "run", "images_per_s", "val_accuracy_after", "seconds",
           "val_accuracy_before", "convert_s", "steps", "device"]


def _shared_models() -> Path:
    """The shared models folder: <repo>/shared/models or ../shared/models, whichever exists."""
    for base in (ROOT / "shared", ROOT.parent / "shared"):
        if (base / "models").is_dir():
            return base / "models"
    return ROOT.parent / "shared" / "models"


def tiny_net(num_classes: int = 10) -> nn.Module:
    """The --quick model: a small CNN with BatchNorm and compressible layers."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, num_classes),
    )


# ---------------------------------------------------------------------------------------------
# worker: one process of a torchrun launch


def worker(args) -> None:
    """One rank: load the cached data and the model, convert once, fine-tune under DDP, rank 0 writes its row."""
    quick = args.quick
    want = "cpu" if quick or not torch.cuda.is_available() else "cuda"
    device = distributed.setup(want) if distributed.launched() else torch.device(want)
    rank, world = distributed.rank(), distributed.world()
    torch.backends.cudnn.benchmark = True
    data = torch.load(args.cache, weights_only=True)
    train = DeviceTensorLoader(data["train_x"], data["train_y"], args.global_batch, CIFAR10_MEAN, CIFAR10_STD,
                               True, device, args.seed, rank=rank, world=world)
    test = DeviceTensorLoader(data["test_x"], data["test_y"], 1000, CIFAR10_MEAN, CIFAR10_STD, False, device,
                              rank=rank, world=world)
    if quick:
        torch.manual_seed(0)
        original = tiny_net()
    else:
        from sttp_compress.io.sources import load_model

        original = load_model(args.model, args.arch)
    teacher = copy.deepcopy(original)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    parts = distributed.convert_once(
        original, lambda m: compress_to_target(m, ratio=args.ratio, allocation="greedy"), device)
    convert_s = time.perf_counter() - t0
    cfg = FinetuneConfig(epochs=args.epochs, device=str(device), batch_size=args.global_batch, workers=0,
                         seed=args.seed, select_best=False, cuda_graph=not args.no_cuda_graph)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        block = finetune(original, teacher, train, test, cfg, progress=False)
    if distributed.is_main():
        row = {"gpus": world, "global_batch": args.global_batch, "epochs": block["epochs"], "run": args.run,
               "seed": args.seed,
               "images_per_s": block["images_per_s"], "val_accuracy_after": block["val_accuracy_after"],
               "seconds": block["seconds"], "val_accuracy_before": block["val_accuracy_before"],
               "original_val_accuracy": block["original_val_accuracy"], "convert_s": round(convert_s, 1),
               "steps": block["steps"], "ratio": round(parts["totals"]["ratio"], 3),
               "device": machine(str(device)), "cuda_graph": not args.no_cuda_graph,
               "warnings": sorted({str(w.message)[:200] for w in caught if "bank" in str(w.message)}),
               "curve": block["curve"]}
        Path(args.row_out).write_text(json.dumps(row))
    distributed.teardown()


# ---------------------------------------------------------------------------------------------
# driver


def _cache(args, folder: Path) -> Path:
    """Decode the images once (or make synthetic ones for --quick) into a uint8 tensor file."""
    path = folder / ("quick.pt" if args.quick else "cifar10-u8.pt")
    t = time.perf_counter()
    if args.quick:
        g = torch.Generator().manual_seed(0)
        blob = {"train_x": torch.randint(0, 256, (1024, 3, 16, 16), dtype=torch.uint8, generator=g),
                "train_y": torch.randint(0, 10, (1024,), generator=g),
                "test_x": torch.randint(0, 256, (256, 3, 16, 16), dtype=torch.uint8, generator=g),
                "test_y": torch.randint(0, 10, (256,), generator=g)}
    else:
        from sttp_compress.data.images import decode_image_folder

        train_x, train_y, _ = decode_image_folder(Path(args.data) / "train")
        test_x, test_y, _ = decode_image_folder(Path(args.data) / "test")
        blob = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    torch.save(blob, path)
    print(f"decoded {len(blob['train_y'])} + {len(blob['test_y'])} images in {time.perf_counter() - t:.1f}s",
          flush=True)
    return path


def _launch(args, gpus: int, batch: int, run: int, cache: Path, folder: Path, timeout: float) -> dict:
    """One torchrun launch of the worker; its row, or a row saying why it has none."""
    row_out = folder / f"row-{gpus}-{batch}-{run}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
           str(Path(__file__).resolve()), "--worker", "--cache", str(cache), "--global-batch", str(batch),
           "--epochs", str(args.epochs), "--repeat", str(run), "--row-out", str(row_out), "--ratio", str(args.ratio),
           "--model", args.model, "--arch", args.arch, "--seed", str(args.seed + run - 1)]
    cmd += ["--quick"] * args.quick + ["--no-cuda-graph"] * args.no_cuda_graph
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = 1 if args.quick else max(1, cpus // gpus)  # rank 0's conversion runs on the CPU
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc, tail = proc.returncode, out[-1500:]
    except subprocess.TimeoutExpired:
        # SIGTERM lets torchrun stop its workers (they run in sessions of their own and hold the GPUs)
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out = ""
        rc, tail = "timeout", (out or "")[-1500:]
    wall = round(time.perf_counter() - t, 1)
    if rc == 0 and row_out.exists():
        return {**json.loads(row_out.read_text()), "process_s": wall}
    print(f"gpus={gpus} batch={batch} run={run} failed ({rc}):\n{tail}", flush=True)
    return {"gpus": gpus, "global_batch": batch, "run": run, "error": f"exit {rc}", "process_s": wall,
            "log_tail": tail}


def summarize(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Per global batch: mean images/s and accuracy per GPU count, speedup, run-to-run noise; target lines."""
    table, lines = [], []
    ok = [r for r in rows if "error" not in r]
    for batch in sorted({r["global_batch"] for r in ok}):
        by_gpus = {g: [r for r in ok if r["global_batch"] == batch and r["gpus"] == g]
                   for g in sorted({r["gpus"] for r in ok if r["global_batch"] == batch})}
        for g, rs in by_gpus.items():
            accs = [r["val_accuracy_after"] for r in rs]
            table.append({"global_batch": batch, "gpus": g, "runs": len(rs),
                          "images_per_s": round(statistics.mean(r["images_per_s"] for r in rs), 1),
                          "val_accuracy_after": round(statistics.mean(accs), 2),
                          "run_to_run": round(max(accs) - min(accs), 2) if len(accs) > 1 else None})
        if 1 in by_gpus and 2 in by_gpus:
            one = [t for t in table if t["global_batch"] == batch and t["gpus"] == 1][0]
            two = [t for t in table if t["global_batch"] == batch and t["gpus"] == 2][0]
            speedup = two["images_per_s"] / one["images_per_s"]
            noise = max(x for x in (one["run_to_run"], two["run_to_run"], 0.0) if x is not None)
            gap = abs(two["val_accuracy_after"] - one["val_accuracy_after"])
            two["speedup"] = round(speedup, 2)
            lines.append(f"- global batch {batch}: 2 GPUs {speedup:.2f}x the images/s of 1 GPU (target >= 1.7x): "
                         f"{'met' if speedup >= 1.7 else 'not met'}")
            lines.append(f"- global batch {batch}: accuracy {one['val_accuracy_after']}% (1 GPU) vs "
                         f"{two['val_accuracy_after']}% (2 GPUs), gap {gap:.2f} points; run-to-run spread "
                         f"{noise:.2f} points: {'within noise' if gap <= max(noise, 0.0) else 'larger than the measured noise'}")
    return table, lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="CIFAR-10 ImageFolder root with train/ and test/")
    models = _shared_models()
    ap.add_argument("--model", default=str(models / "resnet18_cifar10.pt"))
    ap.add_argument("--arch", default=str(models / "cifar_models.py") + ":resnet18_cifar")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--global-batch", type=int, nargs="+", default=[1024, 2048],
                    help="global batch sizes, run in this order (the same for every GPU count)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--runs", type=int, default=2,
                    help="repeats of each configuration, run r with seed + r - 1 (data order, augmentation): "
                         "the run-to-run noise")
    ap.add_argument("--ratio", type=float, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=500,
                    help="seconds for the whole script; configurations that would end later are skipped")
    ap.add_argument("--no-cuda-graph", action="store_true", help="build weights eagerly (no CUDA graph)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: tiny model, synthetic data, no result files")
    ap.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/results alone")
    # worker mode (set by the driver)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--repeat", dest="run", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--row-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.global_batch = args.global_batch[0]
        return worker(args)
    if args.quick:
        args.epochs, args.ratio, args.no_write = min(args.epochs, 1), 3.0, True
        if args.global_batch == ap.get_default("global_batch"):
            args.global_batch = [64]
    elif not args.data:
        ap.error("--data is required (or --quick)")

    start = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_ddp-") as tmp:
        folder = Path(tmp)
        cache = _cache(args, folder)
        estimate: dict[tuple[int, int], float] = {}
        for batch in args.global_batch:
            for run in range(1, args.runs + 1):
                for gpus in args.gpus:
                    left = args.budget_s - (time.perf_counter() - start)
                    guess = estimate.get((gpus, batch), max(estimate.values(), default=60.0))
                    if guess > left:
                        print(f"skip gpus={gpus} batch={batch} run={run}: ~{guess:.0f}s > {left:.0f}s left", flush=True)
                        continue
                    row = _launch(args, gpus, batch, run, cache, folder, timeout=max(left, 30))
                    estimate[(gpus, batch)] = row["process_s"]
                    rows.append(row)
                    print(json.dumps({k: row.get(k) for k in COLUMNS + ["process_s", "warnings", "error"]}),
                          flush=True)
    table, lines = summarize(rows)
    md = (f"# Multi-GPU fine-tuning (DistributedDataParallel)\n\nDate: {today()}. Script: `benchmarks/bench_ddp.py` "
          f"(ratio {args.ratio:g}, {args.epochs} epochs, AdamW lr 1e-3 one-cycle, same global batch and schedule "
          "for every GPU count; test split only reported, final state kept).\n\n## Runs\n\n"
          + markdown_table(rows, COLUMNS + ["process_s"]) + "\n## Means per configuration\n\n"
          + markdown_table(table, ["global_batch", "gpus", "runs", "images_per_s", "val_accuracy_after",
                                   "run_to_run", "speedup"])
          + "\n## Targets\n\n" + ("\n".join(lines) or "- no complete 1-GPU/2-GPU pair") + "\n")
    print(md)
    if not args.no_write:
        meta = {"date": today(), "script": "benchmarks/bench_ddp.py", "machine": machine(),
                "args": {k: v for k, v in vars(args).items() if k not in ("worker", "cache", "run", "row_out")}}
        write_results("ddp", rows, meta, md)


if __name__ == "__main__":
    main()
