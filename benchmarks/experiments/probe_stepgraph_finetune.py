"""Fine-tune throughput of the ratio-10 STTP ResNet-18 with and without CUDA graphs (a probe, no targets).

    python benchmarks/probe_stepgraph_finetune.py OUT.json [--model PATH --arch SPEC] [--steps 300] [--rounds 3]

Runs the product's `finetune.finetune` (distillation from the dense model, SGD, one-cycle, bf16, batch 256,
the GPU-side augmenting loader) on 10,240 random CIFAR-sized images in three modes, alternating for `rounds`
rounds: `step` (the default since 2026-11-29: the whole step as CUDA graphs, stepgraph.StepGraph), `build`
(step_graph=False: only the weight bank's build as a CUDA graph, the default before) and `eager`
(cuda_graph=False). Writes the reported images_per_s of each run (first 10 steps excluded) with the final
train loss. The data are random: this measures speed, not accuracy.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_train_step import add_model_args, build  # noqa: E402
from common import machine, today  # noqa: E402

from sttp_compress.data.images import DeviceTensorLoader  # noqa: E402
from sttp_compress.train.loop import FinetuneConfig, finetune  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    add_model_args(ap)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    dense, sttp0, _ = build(args.model, args.arch, 10.0)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10240, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (10240,), generator=g)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    rows = []
    for r in range(args.rounds):
        for mode, graph, step_graph in (("step", True, True), ("build", True, False), ("eager", False, False)):
            loader = DeviceTensorLoader(images, labels, 256, mean, std, train=True, device="cuda", seed=r)
            cfg = FinetuneConfig(steps=args.steps, optimizer="sgd", device="cuda", batch_size=256, cuda_graph=graph,
                                 step_graph=step_graph, val_every_epoch=False, log_every=50)
            out = finetune(copy.deepcopy(sttp0), copy.deepcopy(dense), loader, None, cfg, progress=False)
            row = {"round": r, "mode": mode, "cuda_graph": out["cuda_graph"], "images_per_s": out["images_per_s"],
                   "train_loss_last": round(out["curve"][-1]["train_loss"], 4), "seconds": out["seconds"]}
            rows.append(row)
            print(row, flush=True)
    result = {"date": today(), "device": machine("cuda"), "torch": torch.__version__, "steps": args.steps, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
