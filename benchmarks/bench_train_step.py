"""Training step (fwd + bwd + SGD step) of the ratio-10 STTP ResNet-18 against the dense model.

    python benchmarks/bench_train_step.py [--model PATH --arch SPEC] [--devices cpu cuda] [--merge]

GPU: batch 256 under bf16 autocast; CPU: batch 32. STTP is timed three ways: each layer building
its own weight ("per-layer"), all weights built together ("bank", bank.py), and the bank replayed
as a CUDA graph ("bank+graph", GPU only). Writes benchmarks/results/train_step.json rows
{device, batch, mode, dense_ms, sttp_ms, overhead}. Without the shared checkpoint the model has
random weights (the step time does not depend on the values).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, merge_rows, print_table, time_ms, today, write_results  # noqa: E402

from sttp_compress.bank import WeightBank  # noqa: E402
from sttp_compress.convert import compress_to_target  # noqa: E402
from sttp_compress.loading import load_model, resolve_arch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "models"


def build(model_path: str | None, arch: str, ratio: float):
    dense = load_model(model_path, arch) if model_path and Path(model_path).exists() else resolve_arch(arch)
    sttp = copy.deepcopy(dense)
    parts = compress_to_target(sttp, ratio=ratio)
    return dense, sttp, parts["totals"]["ratio"]


def step_fn(model, device, batch, amp):
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "resnet18_cifar10.pt"))
    ap.add_argument("--arch", default=str(SHARED / "cifar_models.py") + ":resnet18_cifar")
    ap.add_argument("--ratio", type=float, default=10.0)
    ap.add_argument("--devices", nargs="*", default=None)
    ap.add_argument("--merge", action="store_true")
    args = ap.parse_args()
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    dense0, sttp0, achieved = build(args.model, args.arch, args.ratio)
    rows = []
    for dev in devices:
        gpu = dev == "cuda"
        batch = 256 if gpu else 32
        torch.backends.cudnn.benchmark = True
        dense = copy.deepcopy(dense0).to(dev)
        dense_ms = time_ms(step_fn(dense, dev, batch, gpu), dev, warmup=5 if gpu else 2, repeat=30 if gpu else 5)
        modes = ["per-layer", "bank"] + (["bank+graph"] if gpu else [])
        for mode in modes:
            sttp = copy.deepcopy(sttp0).to(dev)
            bank = WeightBank(sttp, cuda_graph=mode == "bank+graph").attach() if mode != "per-layer" else None
            ms = time_ms(step_fn(sttp, dev, batch, gpu), dev, warmup=5 if gpu else 2, repeat=30 if gpu else 5)
            if bank:
                bank.detach()
            rows.append({"device": machine(dev), "batch": batch, "mode": mode, "ratio": round(achieved, 2),
                         "dense_ms": round(dense_ms, 2), "sttp_ms": round(ms, 2), "overhead": round(ms / dense_ms, 2)})
    if args.merge:
        rows = merge_rows("train_step", rows)
    cols = ["device", "batch", "mode", "ratio", "dense_ms", "sttp_ms", "overhead"]
    print_table(f"Training step, ResNet-18 at ratio {args.ratio:g}", rows, cols)
    write_results("train_step", rows, {"date": today(), "script": "benchmarks/bench_train_step.py"},
                  f"# Training step\n\nDate: {today()}\n\n" + markdown_table(rows, cols))


if __name__ == "__main__":
    main()
