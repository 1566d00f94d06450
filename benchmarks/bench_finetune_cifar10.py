"""Compress the shared CIFAR-10 ResNet-18 and fine-tune it briefly (issue: brief fine-tuning).

    python benchmarks/bench_finetune_cifar10.py --data DIR --runs sttp:10 svdp:10 svd:10 [--epochs 10] [--merge]

DIR holds CIFAR-10 as `train/<class>/*.jpg` and `test/<class>/*.jpg` (the shared archive, extracted).
Each run: compress (sttp / svdp through sttp-compress's own allocation; svd = the obvious baseline,
every layer but the first conv and the classifier replaced by two plain low-rank layers with the
same reduction factor, initialised by truncated SVD), then distil from the original for the same
epoch budget with sttp_compress.train.loop. The test split is only *reported*: the final epoch's
state is kept (no best-epoch selection on it). Writes rows {ratio, method, achieved_ratio,
acc_original, acc_before, acc_after, epochs, seconds, gpu, recipe} to
benchmarks/results/finetune_cifar10.json (+ .md).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_MODELS, RESULTS, machine, markdown_table, today, write_results  # noqa: E402

from sttp_compress.compress.convert import candidate_layers, compress_to_target, count_parameters  # noqa: E402
from sttp_compress.data.images import DeviceTensorLoader, decode_image_folder  # noqa: E402
from sttp_compress.train.loop import FinetuneConfig, evaluate, finetune  # noqa: E402
from sttp_compress.io.sources import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


# ---------------------------------------------------------------------------------------------
# the truncated-SVD baseline


def _low_rank_pair(m: nn.Module, r: int) -> nn.Module:
    """Two plain layers computing the rank-r truncated SVD of m's weight."""
    W = m.weight.detach().double()
    M = W.reshape(W.shape[0], -1)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    a = (Vh[:r] * S[:r, None].sqrt()).float()
    b = (U[:, :r] * S[:r].sqrt()).float()
    bias = m.bias is not None
    if isinstance(m, nn.Conv2d):
        first = nn.Conv2d(m.in_channels, r, m.kernel_size, m.stride, m.padding, m.dilation, bias=False)
        second = nn.Conv2d(r, m.out_channels, 1, bias=bias)
        first.weight.data.copy_(a.reshape(r, *W.shape[1:]))
        second.weight.data.copy_(b.reshape(W.shape[0], r, 1, 1))
    else:
        first, second = nn.Linear(m.in_features, r, bias=False), nn.Linear(r, m.out_features, bias=bias)
        first.weight.data.copy_(a)
        second.weight.data.copy_(b)
    if bias:
        second.bias.data.copy_(m.bias.detach())
    return nn.Sequential(first, second)


def svd_baseline(model: nn.Module, ratio: float) -> float:
    """Replace candidate layers in place by truncated-SVD pairs with one reduction factor; return the ratio."""
    chosen, _ = candidate_layers(model)
    total = count_parameters(model)
    fixed = total - sum(m.weight.numel() for m in chosen.values())

    def ranks(f: float) -> dict[str, int]:
        out = {}
        for n, m in chosen.items():
            d_out, d_in = m.weight.shape[0], m.weight[0].numel()
            out[n] = max(1, math.floor(m.weight.numel() / (f * (d_out + d_in))))
        return out

    def params(rk: dict[str, int]) -> int:
        return fixed + sum(rk[n] * (m.weight.shape[0] + m.weight[0].numel()) for n, m in chosen.items())

    lo, hi = 1.0, 1e4  # smallest reduction factor whose whole-model ratio reaches the target
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if total / params(ranks(mid)) >= ratio:
            hi = mid
        else:
            lo = mid
    rk = ranks(hi)
    for n, m in chosen.items():
        parent = model.get_submodule(n.rpartition(".")[0]) if "." in n else model
        setattr(parent, n.rpartition(".")[2], _low_rank_pair(m, rk[n]))
    return total / count_parameters(model)


# ---------------------------------------------------------------------------------------------


def run(method: str, ratio: float, args, original: nn.Module, loaders, acc_original: float) -> dict:
    torch.manual_seed(args.seed)
    student = copy.deepcopy(original).cpu()
    t0 = time.perf_counter()
    if method == "svd":
        achieved = svd_baseline(student, ratio)
    else:
        parts = compress_to_target(student, ratio=ratio, method=method, spectrum=args.spectrum,
                                   allocation=args.allocation)
        achieved = parts["totals"]["ratio"]
    convert_s = time.perf_counter() - t0
    cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, schedule="onecycle",
                         temperature=args.temperature, alpha=args.alpha, device="cuda" if torch.cuda.is_available() else "cpu",
                         batch_size=args.batch_size, workers=0, seed=args.seed, select_best=False)
    block = finetune(student, copy.deepcopy(original), loaders[0], loaders[1], cfg, progress=False,
                     bn_recalibrate=args.bn_recalibrate)
    return {"ratio": ratio, "method": method, "achieved_ratio": round(achieved, 3),
            "acc_original": round(acc_original, 2), "acc_before": block["val_accuracy_before"],
            "acc_after": block["val_accuracy_after"], "epochs": block["epochs"],
            "seconds": round(block["seconds"] + convert_s, 1), "gpu": machine("cuda") if torch.cuda.is_available() else machine(),
            "recipe": f"{args.optimizer} lr {cfg.resolved_lr:g} onecycle, T={args.temperature:g}, alpha={args.alpha:g}, "
                      f"batch {args.batch_size}, bn_recal {args.bn_recalibrate}, {args.allocation}, {args.spectrum}"
                      + (f", {args.tag}" if args.tag else ""),
            "curve": block["curve"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default=str(SHARED_MODELS / "resnet18_cifar10.pt"))
    ap.add_argument("--arch", default=str(SHARED_MODELS / "cifar_models.py") + ":resnet18_cifar")
    ap.add_argument("--runs", nargs="+", default=[f"{m}:{r}" for r in (5, 10, 20, 50) for m in ("sttp", "svdp", "svd")])
    ap.add_argument("--epochs", type=float, default=10)
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--bn-recalibrate", type=int, default=0)
    ap.add_argument("--allocation", default="greedy")
    ap.add_argument("--spectrum", default="free")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--merge", action="store_true", help="append to the existing results file")
    ap.add_argument("--out", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True

    t = time.perf_counter()
    train_x, train_y, _ = decode_image_folder(Path(args.data) / "train")
    test_x, test_y, _ = decode_image_folder(Path(args.data) / "test")
    print(f"decoded {len(train_y)} + {len(test_y)} images in {time.perf_counter() - t:.1f}s", flush=True)
    train = DeviceTensorLoader(train_x, train_y, args.batch_size, CIFAR10_MEAN, CIFAR10_STD, True, device, args.seed)
    test = DeviceTensorLoader(test_x, test_y, 1000, CIFAR10_MEAN, CIFAR10_STD, False, device)
    original = load_model(args.model, args.arch).to(device)
    acc_original = 100 * evaluate(original, test, device, amp=device == "cuda")["accuracy"]
    original.cpu()
    print(f"original: {acc_original:.2f}% on the test split", flush=True)

    rows = []
    for spec in args.runs:
        method, ratio = spec.split(":")
        row = run(method, float(ratio), args, original, (train, test), acc_original)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2))
    if args.merge and (RESULTS / "finetune_cifar10.json").exists():
        rows = json.loads((RESULTS / "finetune_cifar10.json").read_text()) + rows
    cols = ["ratio", "method", "achieved_ratio", "acc_original", "acc_before", "acc_after", "epochs", "seconds", "gpu", "recipe"]
    write_results("finetune_cifar10", rows, {"date": today(), "script": "benchmarks/bench_finetune_cifar10.py"},
                  f"# Fine-tuning the CIFAR-10 ResNet-18\n\nDate: {today()}\n\n" + markdown_table(rows, cols))
    print(markdown_table(rows, cols))


if __name__ == "__main__":
    main()
