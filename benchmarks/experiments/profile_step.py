"""Where a GPU fine-tune step of the ratio-10 STTP ResNet-18 spends its time (a profiling aid, no targets).

    python benchmarks/profile_step.py [--batches 256 512 1024] [--out DIR]
    torchrun --nproc-per-node 2 benchmarks/profile_step.py --batches 1024   # DDP: global batches

Prints, per batch size: the dense train step, the teacher's forward, the STTP train step (weight bank
replayed as a CUDA graph) and the fine-tune's distillation step (`finetune._train_step`: teacher forward
+ student forward/backward + AdamW), each the median of CUDA-event timings; then the weight bank's build
alone (forward+backward, graphed for several `--waste` bucketings and eager) and the profiler's top
kernels of the eager build. Under
torchrun the distillation step runs through DistributedDataParallel with the global batch split over the
ranks, as in the fine-tune. Random inputs (the step time does not depend on the values).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_train_step import build as build_models  # noqa: E402
from common import machine  # noqa: E402

from sttp_compress.train import distributed  # noqa: E402
from sttp_compress.train.bank import WeightBank  # noqa: E402
from sttp_compress.train.loop import FinetuneConfig, _train_step, _wrap_ddp, build_optimizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def cuda_ms(fn, warmup: int = 5, repeat: int = 20) -> float:
    """Median CUDA-event time of fn() in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def ce_step(net, opt, x, y):
    """One bf16 cross-entropy train step of `net` on (x, y) with `opt`, as a closure to time."""
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / ".carry" / "resnet18_cifar10.pt"))
    ap.add_argument("--arch", default=str(ROOT / ".carry" / "cifar_models.py") + ":resnet18_cifar")
    ap.add_argument("--ratio", type=float, default=10.0)
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--waste", type=float, nargs="+", default=[1.0, 2.0, 4.0, 1e9],
                    help="FramePlan max_waste values to time the graphed build with (1: one call per shape)")
    ap.add_argument("--out", default=None, help="folder for the JSON and the profiler table")
    args = ap.parse_args()

    multi = distributed.launched()
    device = distributed.setup("cuda") if multi else torch.device("cuda")
    world = distributed.world() if multi else 1
    torch.backends.cudnn.benchmark = True
    dense, sttp, _ = build_models(args.model, args.arch, args.ratio)  # bench_train_step's: greedy allocation on the CPU
    dense = dense.to(device).train()
    teacher = copy.deepcopy(dense).eval()
    sttp = sttp.to(device).train()
    cfg = FinetuneConfig(device=str(device))
    rows: list[dict] = []

    bank = WeightBank(sttp, cuda_graph=True)
    bank.prepare()
    net = _wrap_ddp(sttp, device) if multi else sttp
    bank.attach()
    opt = build_optimizer(sttp, cfg)
    trainable = [p for g in opt.param_groups for p in g["params"]]
    dense_opt = build_optimizer(dense, cfg)
    if multi:
        from torch.nn.parallel import DistributedDataParallel

        dense_net = DistributedDataParallel(dense, device_ids=[device.index])
    else:
        dense_net = dense

    for gb in args.batches:
        b = gb // world
        x = torch.randn(b, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (b,), device=device)

        def teacher_fwd():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                teacher(x)

        def distill_step():
            _train_step(sttp, teacher, (x, y), opt, trainable, cfg, device, True, check_labels=False, net=net)

        row = {"global_batch": gb, "rank_batch": b, "world": world}
        row["dense_step_ms"] = cuda_ms(ce_step(dense_net, dense_opt, x, y))  # under DDP too: a dense model's scaling
        row["teacher_fwd_ms"] = cuda_ms(teacher_fwd)
        row["sttp_step_ms"] = cuda_ms(ce_step(net, opt, x, y))
        row["distill_step_ms"] = cuda_ms(distill_step)
        row["images_per_s"] = gb / row["distill_step_ms"] * 1000
        rows.append(row)
        if distributed.is_main():
            print(json.dumps(row), flush=True)

    if not multi:
        bank.detach()
        flat = bank.flat_originals
        grads = None

        def build_bwd(b: WeightBank):
            nonlocal grads
            ws = b.build()
            if grads is None:
                grads = [torch.randn_like(w) for w in ws]
            torch.autograd.backward(ws, grads)

        build = {"frames": len(flat)}
        for waste in args.waste:
            b = WeightBank(sttp, cuda_graph=True, max_waste=waste)
            build[f"graphed_build_fwd_bwd_ms_waste{waste:g}"] = cuda_ms(lambda: build_bwd(b))
            build[f"buckets_waste{waste:g}"] = len(b._plan(device).buckets)
        torch.backends.cuda.matmul.allow_tf32 = True
        b = WeightBank(sttp, cuda_graph=True)
        build["graphed_build_fwd_bwd_ms_tf32"] = cuda_ms(lambda: build_bwd(b))
        torch.backends.cuda.matmul.allow_tf32 = False
        eager = WeightBank(sttp, cuda_graph=False)
        build["eager_build_fwd_bwd_ms"] = cuda_ms(lambda: build_bwd(eager))
        with torch.no_grad():
            build["eager_build_fwd_ms"] = cuda_ms(lambda: eager.build())
        print(json.dumps(build), flush=True)
        rows.append(build)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                build_bwd(eager)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
        print(table, flush=True)
        if args.out:
            Path(args.out, "profile_build.txt").write_text(table)

    if distributed.is_main():
        meta = {"device": machine(str(device)), "world": world, "rows": rows}
        print(json.dumps(meta["device"]))
        if args.out:
            Path(args.out, f"profile_step_w{world}.json").write_text(json.dumps(meta, indent=1))
    if multi:
        distributed.teardown()


if __name__ == "__main__":
    main()
