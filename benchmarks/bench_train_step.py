"""Training step (fwd + bwd + SGD step) of the ratio-10 STTP ResNet-18 against the dense model.

    python benchmarks/bench_train_step.py [--model PATH --arch SPEC] [--devices cpu cuda]
                                          [--variants per-layer bank bank+graph ...] [--quick] [--merge]

GPU: batch 256 under bf16 autocast; CPU: batch 32. A variant is a base mode joined with options by '+':
  per-layer      each layer builds its own weight in its forward (parametrize's default);
  bank           all weights built together per step (bank.py: frames of equal shape batched across layers);
  bank+graph     the bank's build (fwd and bwd) replayed as one CUDA graph (GPU only);
  ...+compile    the bank's build through torch.compile first (slow to compile: minutes; measure once);
  ...+tf32       TF32 matmuls (torch.backends.cuda.matmul.allow_tf32) for dense and STTP alike;
  ...+cl         channels_last model and input, dense and STTP alike.
Each row's dense_ms is the dense model timed with the same options (tf32, cl). Default variants:
per-layer and bank on CPU; those, bank+graph, bank+graph+tf32, bank+graph+cl and bank+graph+tf32+cl on
GPU. A variant that fails is reported with its error instead of a time. Writes
benchmarks/results/train_step.json rows {device, batch, mode, dense_ms, sttp_ms, overhead}. Without the
shared checkpoint the model has random weights (the step time does not depend on the values).
`--quick`: batch 8, 2 timed steps, not written (a smoke test).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import product_version  # noqa: E402
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


def step_fn(model, device, batch, amp, channels_last=False):
    x = torch.randn(batch, 3, 32, 32, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
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


def parse_variant(v: str) -> tuple[str, set[str]]:
    """'bank+graph+tf32' -> ('bank+graph', {'tf32'})."""
    parts = v.split("+")
    base = "bank+graph" if parts[:2] == ["bank", "graph"] else parts[0]
    opts = set(parts[2:] if base == "bank+graph" else parts[1:])
    if base not in ("per-layer", "bank", "bank+graph") or not opts <= {"compile", "tf32", "cl"}:
        raise SystemExit(f"unknown variant {v!r}")
    return base, opts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "resnet18_cifar10.pt"))
    ap.add_argument("--arch", default=str(SHARED / "cifar_models.py") + ":resnet18_cifar")
    ap.add_argument("--ratio", type=float, default=10.0)
    ap.add_argument("--devices", nargs="*", default=None)
    ap.add_argument("--variants", nargs="*", default=None, help="default: see the module docstring")
    ap.add_argument("--quick", action="store_true", help="smoke test: batch 8, 2 steps, nothing written")
    ap.add_argument("--merge", action="store_true")
    args = ap.parse_args()
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    dense0, sttp0, achieved = build(args.model, args.arch, args.ratio)
    product = product_version()
    rows: list[dict] = []
    for dev in devices:
        gpu = dev == "cuda"
        batch = 8 if args.quick else (256 if gpu else 32)
        warmup, repeat = (1, 2) if args.quick else ((5, 30) if gpu else (2, 5))
        torch.backends.cudnn.benchmark = True
        variants = args.variants or (["per-layer", "bank", "bank+graph", "bank+graph+tf32", "bank+graph+cl",
                                      "bank+graph+tf32+cl"] if gpu else ["per-layer", "bank"])
        dense_ms: dict[tuple, float] = {}
        for variant in variants:
            base, opts = parse_variant(variant)
            if base == "bank+graph" and not gpu:
                continue
            torch.backends.cuda.matmul.allow_tf32 = "tf32" in opts
            cl = "cl" in opts
            fmt = torch.channels_last if cl else torch.contiguous_format
            key = ("tf32" in opts, cl)
            row = {"device": machine(dev), "product": product, "batch": batch, "mode": variant,
                   "ratio": round(achieved, 2)}
            try:
                if key not in dense_ms:
                    dense = copy.deepcopy(dense0).to(dev, memory_format=fmt)
                    dense_ms[key] = time_ms(step_fn(dense, dev, batch, gpu, cl), dev, warmup=warmup, repeat=repeat)
                    del dense
                sttp = copy.deepcopy(sttp0).to(dev, memory_format=fmt)
                bank = (WeightBank(sttp, cuda_graph=base == "bank+graph", compile="compile" in opts).attach()
                        if base != "per-layer" else None)
                ms = time_ms(step_fn(sttp, dev, batch, gpu, cl), dev, warmup=warmup, repeat=repeat)
                if bank:
                    bank.detach()
                row.update({"dense_ms": round(dense_ms[key], 2), "sttp_ms": round(ms, 2),
                            "overhead": round(ms / dense_ms[key], 2)})
            except Exception as e:  # noqa: BLE001 - report the variant as failed, keep the others
                row.update({"dense_ms": None, "sttp_ms": None, "overhead": None,
                            "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"})
            finally:
                torch.backends.cuda.matmul.allow_tf32 = False
            rows.append(row)
            print(row, flush=True)
            if not args.quick:  # after every variant: a run stopped by a time limit keeps what it measured
                save(rows, args)
    cols = ["device", "batch", "mode", "ratio", "dense_ms", "sttp_ms", "overhead"]
    print_table(f"Training step, ResNet-18 at ratio {args.ratio:g}" + (" (--quick, not written)" if args.quick else ""),
                rows, cols + (["error"] if any("error" in r for r in rows) else []))


def save(rows: list[dict], args) -> None:
    """Write results/train_step.json and .md (rows of other devices kept with --merge)."""
    rows = merge_rows("train_step", rows) if args.merge else rows
    cols = ["device", "product", "batch", "mode", "ratio", "dense_ms", "sttp_ms", "overhead"]
    md = (f"# Training step\n\nDate: {today()}. Script: `benchmarks/bench_train_step.py`. fwd + bwd + SGD step; "
          "GPU: batch 256 under bf16 autocast, CPU: batch 32. Modes: see the script's docstring "
          "(`+tf32`, `+cl` = channels_last apply to the dense row they are compared with too).\n\n"
          + markdown_table(rows, cols + (["error"] if any("error" in r for r in rows) else [])))
    write_results("train_step", rows, {"date": today(), "script": "benchmarks/bench_train_step.py"}, md)


if __name__ == "__main__":
    main()
