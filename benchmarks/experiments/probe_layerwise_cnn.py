"""Does matching the teacher's block outputs help a CNN student that starts at chance? (CPU, short runs.)

    python benchmarks/experiments/probe_layerwise_cnn.py --data /tmp/cifar [--ratio 50] [--train 5000] [--epochs 2]

Why: at ratio 50 the shared ResNet-18 converts to ~11% (chance), and MobileNetV2 already at ratio 10 (frontier:
10% before fine-tuning, -1.80 points after 10 epochs, -7.60 at ratio 20). The text recipe adds a layer-wise
term (hidden states matched, weight ramped 1 -> 0); images have only the logits' distillation. This compares,
on the same converted student, data and steps:
  kd:        the distillation loss on the logits (temperature 4, no labels)
  kd+blocks: the same plus the mean of the normalised MSE of layer1..layer4's outputs to the teacher's,
             weighted 1 -> 0 linearly over the training steps
Both run through `sttp_compress.train.loop.finetune` (AdamW one-cycle at its defaults, the best epoch kept) with
a custom loss on a model wrapper that returns (logits, block outputs). Training images: a seeded subset of
train/. Validation: the first --val images of a seeded shuffle of test/, since the shared teacher was trained on
all of train/ (100% there, which would only measure agreement with it); the rest of test/ is not read. Prints
one JSON line per arm; writes benchmarks/results/experiments/layerwise_cnn.json (+ .md).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import SHARED_MODELS, commit, machine, markdown_table, today, write_results  # noqa: E402

import sttp_compress as sc  # noqa: E402
from sttp_compress.data.images import DeviceTensorLoader, decode_image_folder  # noqa: E402
from sttp_compress.io.sources import load_model  # noqa: E402
from sttp_compress.train.loop import FinetuneConfig, finetune  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
BLOCKS = ["layer1", "layer2", "layer3", "layer4"]
TEMPERATURE = 4.0


class Tapped(nn.Module):
    """A model whose forward returns (logits, [outputs of the named blocks]), caught by forward hooks."""

    def __init__(self, model: nn.Module, blocks: list[str]):
        super().__init__()
        self.model, self.caught = model, []
        for name in blocks:
            model.get_submodule(name).register_forward_hook(lambda _m, _i, out: self.caught.append(out))

    def forward(self, x):
        self.caught = []
        logits = self.model(x)
        return logits, list(self.caught)


def kd(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(s / TEMPERATURE, 1), F.softmax(t / TEMPERATURE, 1), reduction="batchmean") * TEMPERATURE ** 2


def make_loss(blocks: bool, total_steps: int):
    """The arm's loss on (logits, features) pairs; the block term's weight falls 1 -> 0 over the training steps
    (counted on calls with gradients: validation calls run without)."""
    step = [0]

    def loss(s_raw, t_raw):
        (s, s_feats), (t, t_feats) = s_raw, t_raw
        out = kd(s, t)
        if blocks:
            w = max(0.0, 1.0 - step[0] / max(1, total_steps))
            if w > 0:
                out = out + w * sum(F.mse_loss(a, b) / b.pow(2).mean().clamp_min(1e-8)
                                    for a, b in zip(s_feats, t_feats)) / len(t_feats)
        if torch.is_grad_enabled():
            step[0] += 1
        return out

    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="folder with train/ and test/ (class subfolders)")
    ap.add_argument("--ratio", type=float, default=50)
    ap.add_argument("--train", type=int, default=5000)
    ap.add_argument("--val", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    images, labels, _ = decode_image_folder(Path(args.data) / "train")
    tr = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:args.train]
    val_images, val_labels, _ = decode_image_folder(Path(args.data) / "test")
    va = torch.randperm(len(val_labels), generator=torch.Generator().manual_seed(0))[:args.val]
    teacher = load_model(str(SHARED_MODELS / "resnet18_cifar10.pt"), str(SHARED_MODELS / "cifar_models.py") + ":resnet18_cifar").float().eval()
    converted = copy.deepcopy(teacher)
    sc.compress_(converted, sc.CompressConfig(ratio=args.ratio))
    steps = args.epochs * -(-args.train // args.batch_size)
    rows = []
    tapped_teacher = Tapped(teacher, BLOCKS)  # once: each wrapper hooks the teacher's blocks
    for arm in ("kd", "kd+blocks"):
        student = Tapped(copy.deepcopy(converted), BLOCKS)
        train = DeviceTensorLoader(images[tr], labels[tr], args.batch_size, MEAN, STD, True, "cpu", seed=0)
        val = DeviceTensorLoader(val_images[va], val_labels[va], 500, MEAN, STD, False, "cpu")
        cfg = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, loss_fn=make_loss(arm != "kd", steps))
        t = time.perf_counter()
        block = finetune(student, tapped_teacher, train, val, cfg, progress=False)
        row = {"arm": arm, "ratio": args.ratio, "train_images": args.train, "val_images": args.val,
               "epochs": args.epochs, "steps": block["steps"], "val_acc_teacher": block["original_val_accuracy"],
               "val_acc_before": block["val_accuracy_before"], "val_acc_after": block["val_accuracy_after"],
               "curve": [c.get("val_accuracy") for c in block["curve"]], "seconds": round(time.perf_counter() - t, 1),
               "device": machine("cpu"), "commit": commit(), "date": today()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    md = (f"# Layer-wise distillation on a CNN student that starts at chance ({today()}, commit {commit()}, "
          f"{machine('cpu')})\n\n{__doc__.split(chr(10) + chr(10), 1)[1]}\n" + markdown_table(rows, list(rows[0])))
    write_results("layerwise_cnn", rows, {"date": today(), "args": vars(args)}, md)


if __name__ == "__main__":
    main()
