"""Train a CIFAR-10 teacher of benchmarks/cifar_teachers.py for the frontier benchmark (on a GPU).

    python benchmarks/train_teacher.py --arch wrn16_8 --data ./cifar10 --out .teachers

--data holds train/ and test/ (class subfolders of images, as ../shared/data/cifar10-jpg.tar.xz unpacks). The
whole training split is decoded once into GPU memory and augmented there (random crop with 4-pixel padding,
horizontal flip); SGD with Nesterov momentum, no weight decay on norms and biases, a linear warm-up over the
first 15% of steps then a cosine decay to 0, label smoothing 0.1, bf16 autocast, channels-last. The recipe is
fixed per architecture (RECIPES; flags override it) and nothing is selected on the test split: the test
accuracy after the last epoch is reported, not used. The teacher does not train on the images sttp-compress
later holds out of train/ to choose its best state (`data.images.holdout_indices`, same seed): validation
on images the teacher memorised favours states close to the teacher (seen on 2 CPU cores: the shared
teacher scored 100% on them). Writes OUT/<arch>.pt (float16 state_dict, which
`sttp-compress --arch benchmarks/cifar_teachers.py:<arch>` loads) and OUT/<arch>.json (accuracy, recipe, time,
GPU), and a row of benchmarks/results/teachers. tests/test_benchmarks.py's smoke test runs one epoch on a
tiny folder with `--device cpu --no-save` (no results row); `--subset N` trains on the first N images.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar_teachers import TEACHERS  # noqa: E402
from common import RESULTS, commit, machine, markdown_table, today, write_results  # noqa: E402

from sttp_compress.data.images import DeviceTensorLoader, decode_image_folder, holdout_indices  # noqa: E402

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# epochs, global batch, peak learning rate, weight decay: the recipe each family is held to
RECIPES = {
    "resnet18": {"epochs": 40, "batch_size": 512, "lr": 0.4, "weight_decay": 5e-4},
    "wrn16_8": {"epochs": 40, "batch_size": 512, "lr": 0.4, "weight_decay": 5e-4},
    "mobilenetv2": {"epochs": 40, "batch_size": 512, "lr": 0.4, "weight_decay": 5e-4},
}
WARMUP = 0.15
LABEL_SMOOTHING = 0.1


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up to `peak` over the first WARMUP of the steps, then a cosine decay to 0."""
    warm = max(1, round(WARMUP * total))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader, device: str) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(x.contiguous(memory_format=torch.channels_last))
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def subset(images: torch.Tensor, labels: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n of a seeded permutation (every class kept in proportion on average), or everything."""
    if n is None or n >= len(labels):
        return images, labels
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:n]
    return images[idx], labels[idx]


def build(arch: str, n_classes: int, recipe: dict, device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model (channels-last on the device) and its SGD optimizer, without decay on norms and biases."""
    model = TEACHERS[arch](n_classes).to(device).to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": recipe["weight_decay"]},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=recipe["lr"], momentum=0.9, nesterov=True)
    return model, opt


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               device: str) -> torch.Tensor:
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y,
                               label_smoothing=LABEL_SMOOTHING)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def probe_step_seconds(arch: str, n_classes: int, loader, recipe: dict, device: str, steps: int = 12) -> float:
    """Seconds a training step takes (after 4 warm-up steps) on a throw-away model."""
    model, opt = build(arch, n_classes, recipe, device)
    batches = iter(loader)
    times = []
    for i in range(steps):
        x, y = next(batches, None) or next(iter(loader))
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        train_step(model, opt, x, y, device)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sum(times[4:]) / max(1, len(times[4:]))


def train(args: argparse.Namespace) -> dict:
    recipe = {**RECIPES[args.arch], **{k: v for k, v in vars(args).items() if k in RECIPES[args.arch] and v is not None}}
    device = args.device
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    data = Path(args.data)
    x_train, y_train, classes = decode_image_folder(data / "train")
    x_test, y_test, test_classes = decode_image_folder(data / "test")
    if test_classes != classes:
        raise SystemExit(f"test/ classes {test_classes} differ from train/ classes {classes}")
    held = 0
    if not args.all_train:  # the images the CLI will validate on stay unseen by the teacher
        kept, held_out = holdout_indices(y_train)
        x_train, y_train, held = x_train[kept], y_train[kept], len(held_out)
    x_train, y_train = subset(x_train, y_train, args.subset)
    x_test, y_test = subset(x_test, y_test, args.subset)
    decode_s = time.perf_counter() - t0
    train_loader = DeviceTensorLoader(x_train, y_train, recipe["batch_size"], CIFAR10_MEAN, CIFAR10_STD, True,
                                      device, seed=args.seed)
    test_loader = DeviceTensorLoader(x_test, y_test, 1000, CIFAR10_MEAN, CIFAR10_STD, False, device)
    steps_per_epoch = len(train_loader)
    if args.budget is not None:  # fewer epochs where the recipe's would not fit the time budget
        step_s = probe_step_seconds(args.arch, len(classes), train_loader, recipe, device)
        fit = int(args.budget / (1.1 * step_s * steps_per_epoch))
        print(f"{args.arch}: {step_s * 1e3:.1f} ms a step; {fit} epochs fit {args.budget:.0f} s", flush=True)
        recipe["epochs"] = max(1, min(recipe["epochs"], fit))
    torch.manual_seed(args.seed)
    model, opt = build(args.arch, len(classes), recipe, device)
    total = recipe["epochs"] * steps_per_epoch
    step, t_train = 0, time.perf_counter()
    for epoch in range(recipe["epochs"]):
        model.train()
        t_epoch = time.perf_counter()
        for x, y in train_loader:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, recipe["lr"])
            loss = train_step(model, opt, x, y, device)
            step += 1
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"{args.arch} epoch {epoch + 1}/{recipe['epochs']} loss {loss.item():.3f} "
              f"{time.perf_counter() - t_epoch:.1f}s", flush=True)
    train_s = time.perf_counter() - t_train
    acc = accuracy(model, test_loader, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()}
    tmp = out / f".{args.arch}.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / f"{args.arch}.pt")
    result = {"arch": args.arch, "test_acc": round(acc, 2), "params": sum(p.numel() for p in model.parameters()),
              **recipe, "train_images": len(y_train), "held_out_images": held, "seconds": round(train_s, 1), "decode_seconds": round(decode_s, 1),
              "device": machine(device), "commit": commit(), "date": today(),
              "command": "python benchmarks/train_teacher.py " + " ".join(sys.argv[1:])}
    (out / f"{args.arch}.json").write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_save:  # a row of results/teachers
        record([result])
    print(f"FINAL {args.arch} test_acc {acc:.2f} train {train_s:.0f}s", flush=True)
    return result


TEACHER_COLUMNS = ["arch", "test_acc", "params", "epochs", "batch_size", "lr", "weight_decay", "train_images",
                   "held_out_images", "seconds", "device", "commit", "date"]


def record(results: list[dict]) -> None:
    """Merge teacher results (train_teacher's <arch>.json) into benchmarks/results/teachers.json (+ .md): one row
    per (arch, device), the newest replacing the older."""
    path = RESULTS / "teachers.json"
    mine = {(r["arch"], r["device"]) for r in results}
    rows = [r for r in (json.loads(path.read_text()) if path.exists() else []) if (r["arch"], r["device"]) not in mine]
    rows = sorted(rows + results, key=lambda r: (r["arch"], r["device"]))
    md = (f"# CIFAR-10 teachers for the frontier (benchmarks/train_teacher.py)\n\n"
          "Test accuracy after the last epoch (never used to select anything); `seconds` is the training time, "
          "which runs sharing one GPU count longer. The data is ../shared's CIFAR-10 as lossy JPEG files (about "
          "900 bytes an image, quality near 75): the shared reference ResNet-18 reached 91.3% on them in 100 "
          "epochs, so the 94.5-95% that PNG CIFAR-10 allows is out of reach here.\n\n"
          + markdown_table(rows, TEACHER_COLUMNS))
    write_results("teachers", rows, {"date": today()}, md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", required=True, choices=sorted(TEACHERS))
    ap.add_argument("--data", required=True, help="folder with train/ and test/")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / ".teachers"))
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", type=int, dest="batch_size")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--weight-decay", type=float, dest="weight_decay")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget", type=float, help="seconds of training at most: fewer epochs than the recipe's "
                    "where a probe of the step time says they would not fit (the result records the epochs run)")
    ap.add_argument("--all-train", action="store_true", help="train on every image of train/ (default: leave "
                    "out the share sttp-compress holds out for validation, so that share is unseen by the teacher)")
    ap.add_argument("--subset", type=int, help="train and test on the first N images of each split (smoke test)")
    ap.add_argument("--no-save", action="store_true", help="write no row to benchmarks/results/teachers (the smoke test)")
    train(ap.parse_args())


if __name__ == "__main__":
    main()
