"""Training step (fwd + bwd + SGD step) of the ratio-10 STTP ResNet-18 against the dense model.

    python benchmarks/bench_train_step.py [--model PATH --arch SPEC] [--devices cpu cuda]
                                          [--variants per-layer bank bank+graph ...] [--quick] [--merge]

GPU: batch 256 under bf16 autocast; CPU: batch 32. A variant is a base mode joined with options by '+':
  per-layer      each layer builds its own weight in its forward (parametrize's default);
  bank           all weights built together per step (bank.py: frames of equal shape batched across layers);
  bank+graph     the bank's build (fwd and bwd) replayed as one CUDA graph (GPU only);
  bank+sg        the whole forward and backward (the bank's build inside) replayed as CUDA graphs
                 (stepgraph.StepGraph, what finetune runs on one GPU; GPU only), the dense model eager;
  ...+dense-sg   (with bank+sg) the dense model's forward and backward through StepGraph too;
  ...+compile    the bank's build through torch.compile first (slow to compile: minutes; measure once);
  ...+tf32       TF32 matmuls (torch.backends.cuda.matmul.allow_tf32) for dense and STTP alike;
  ...+cl         channels_last model and input, dense and STTP alike.
Each row's dense_ms is the dense model timed with the same options (tf32, cl), in the same rounds:
dense and STTP alternate `--rounds` times (default 5 on GPUs, 1 on CPUs), so a drift of the machine
between them shows as spread rather than as overhead. Two timings on GPUs (column `timing`):
  synced         median of single steps, each followed by torch.cuda.synchronize (a step's latency);
  back-to-back   `repeat` steps queued without a sync, then one sync, per step (a training loop's
                 throughput: finetune syncs only every log_every steps).
dense_ms and sttp_ms are medians over the rounds, overhead the median of the rounds' ratios, with
overhead_min/overhead_max the smallest and largest round. Default variants:
per-layer and bank on CPU; those, bank+graph, bank+graph+tf32, bank+graph+cl and bank+graph+tf32+cl on
GPU. A variant that fails is reported with its error instead of a time. Writes
benchmarks/results/train_step.json rows {device, batch, mode, timing, dense_ms, sttp_ms, overhead, ...}.
`--profile FILE` also writes the CUDA kernels of 10 back-to-back steps of dense, bank+graph and bank+sg (torch.profiler,
summed by kernel name) to FILE, with each model's GPU-busy time per step. Without the
shared checkpoint the model has random weights (the step time does not depend on the values).
`--quick`: batch 8, 2 timed steps, not written (a smoke test).
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import product_version  # noqa: E402
from common import SHARED_MODELS, machine, markdown_table, merge_rows, print_table, time_ms, today, write_results  # noqa: E402

from sttp_compress.train.bank import WeightBank  # noqa: E402
from sttp_compress.compress.convert import compress_to_target  # noqa: E402
from sttp_compress.io.sources import load_model, resolve_arch  # noqa: E402
from sttp_compress.train.stepgraph import StepGraph  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """--model and --arch, defaulting to the shared CIFAR-10 ResNet-18 (random weights when the file is absent)."""
    ap.add_argument("--model", default=str(SHARED_MODELS / "resnet18_cifar10.pt"))
    ap.add_argument("--arch", default=str(SHARED_MODELS / "cifar_models.py") + ":resnet18_cifar")


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
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
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
    base = "+".join(parts[:2]) if parts[:2] in (["bank", "graph"], ["bank", "sg"]) else parts[0]
    opts = set(parts[len(base.split("+")):])
    if (base not in ("per-layer", "bank", "bank+graph", "bank+sg")
            or not opts <= {"compile", "tf32", "cl", "dense-sg"} or ("dense-sg" in opts and base != "bank+sg")):
        raise SystemExit(f"unknown variant {v!r}")
    return base, opts


def back_to_back_ms(fn, device: str, steps: int) -> float:
    """Per-step wall time of `steps` calls of fn queued without a sync (one sync at the end)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t0) * 1e3 / steps


def cpu_ms(fn, n: int = 50) -> str:
    """CPU and wall time per call of `n` calls of fn queued without a sync (after 5 warm-up calls): a GPU
    step whose CPU work takes longer than its kernels leaves the GPU waiting."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0, w0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        fn()
    cpu, launch = (time.process_time() - t0) * 1e3 / n, (time.perf_counter() - w0) * 1e3 / n
    torch.cuda.synchronize()
    done = (time.perf_counter() - w0) * 1e3 / n
    return f"cpu {cpu:.2f} launch-wall {launch:.2f} done-wall {done:.2f}"


def timed_rounds(steps: dict[str, object], device: str, warmup: int, repeat: int, rounds: int,
                 timings: list[str]) -> dict[str, dict[str, list[float]]]:
    """{timing: {name: [ms per round]}}: the step functions alternate, round after round."""
    out: dict[str, dict[str, list[float]]] = {t: {n: [] for n in steps} for t in timings}
    for _ in range(rounds):
        for name, fn in steps.items():
            if "synced" in timings:
                out["synced"][name].append(time_ms(fn, device, warmup=warmup, repeat=repeat))
            if "back-to-back" in timings:
                if "synced" not in timings:
                    back_to_back_ms(fn, device, warmup)
                out["back-to-back"][name].append(back_to_back_ms(fn, device, repeat))
    return out


def summarize(dense: list[float], sttp: list[float]) -> dict:
    """Medians over rounds, the median round ratio and its range."""
    ratios = [s / d for d, s in zip(dense, sttp)]
    return {"dense_ms": round(statistics.median(dense), 2), "sttp_ms": round(statistics.median(sttp), 2),
            "overhead": round(statistics.median(ratios), 3), "overhead_min": round(min(ratios), 3),
            "overhead_max": round(max(ratios), 3), "rounds": len(ratios)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--ratio", type=float, default=10.0)
    ap.add_argument("--devices", nargs="*", default=None)
    ap.add_argument("--variants", nargs="*", default=None, help="default: see the module docstring")
    ap.add_argument("--rounds", type=int, default=None, help="dense/STTP alternations (default 5 GPU, 1 CPU)")
    ap.add_argument("--profile", default=None, help="write a kernel profile of dense, bank+graph and bank+sg (GPU) here")
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
        rounds = args.rounds or (1 if args.quick or not gpu else 5)
        timings = ["synced", "back-to-back"] if gpu else ["synced"]  # a CPU step is synchronous anyway
        torch.backends.cudnn.benchmark = True
        variants = args.variants or (["per-layer", "bank", "bank+graph", "bank+graph+tf32", "bank+graph+cl",
                                      "bank+graph+tf32+cl"] if gpu else ["per-layer", "bank"])
        for variant in variants:
            base, opts = parse_variant(variant)
            if base in ("bank+graph", "bank+sg") and not gpu:
                continue
            torch.backends.cuda.matmul.allow_tf32 = "tf32" in opts
            cl = "cl" in opts
            fmt = torch.channels_last if cl else torch.contiguous_format
            head = {"device": machine(dev), "product": product, "batch": batch, "mode": variant,
                    "ratio": round(achieved, 2)}
            bank = None
            try:
                dense = copy.deepcopy(dense0).to(dev, memory_format=fmt)
                sttp = copy.deepcopy(sttp0).to(dev, memory_format=fmt)
                bank = (WeightBank(sttp, cuda_graph=base == "bank+graph", compile="compile" in opts).attach()
                        if base != "per-layer" else None)
                if base == "bank+sg":  # the bank builds inside the step's graph, not in one of its own
                    sttp = StepGraph(sttp, bank=bank)
                if "dense-sg" in opts:
                    dense = StepGraph(dense)
                fns = {"dense": step_fn(dense, dev, batch, gpu, cl), "sttp": step_fn(sttp, dev, batch, gpu, cl)}
                times = timed_rounds(fns, dev, warmup, repeat, rounds, timings)
                new = [{**head, "timing": t, **summarize(times[t]["dense"], times[t]["sttp"])} for t in timings]
            except Exception as e:  # noqa: BLE001 - report the variant as failed, keep the others
                new = [{**head, "timing": None, "dense_ms": None, "sttp_ms": None, "overhead": None,
                        "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}]
            finally:
                torch.backends.cuda.matmul.allow_tf32 = False
                if bank:
                    bank.detach()
                dense = sttp = fns = None
                if gpu:
                    gc.collect()  # StepGraph's CUDA graphs sit in reference cycles
                    torch.cuda.empty_cache()
            for row in new:
                rows.append(row)
                print(row, flush=True)
            if not args.quick:  # after every variant: a run stopped by a time limit keeps what it measured
                save(rows, args)
        if gpu and args.profile:
            kernel_profile(dense0, sttp0, dev, batch, args.profile)
    print_table(f"Training step, ResNet-18 at ratio {args.ratio:g}" + (" (--quick, not written)" if args.quick else ""),
                rows, COLUMNS + (["error"] if any("error" in r for r in rows) else []))


COLUMNS = ["device", "batch", "mode", "timing", "ratio", "dense_ms", "sttp_ms", "overhead", "overhead_min",
           "overhead_max"]


def kernel_profile(dense0, sttp0, dev: str, batch: int, path: str, steps: int = 10) -> None:
    """CUDA kernel time per step of dense, bank+graph and bank+sg, summed by kernel name, and the step's CPU time
    (plain, then under cProfile with its top functions), written to `path`."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    lines = []
    for name in ("dense", "sttp", "sttp-sg"):  # sttp: bank+graph; sttp-sg: bank+sg
        model = copy.deepcopy(dense0 if name == "dense" else sttp0).to(dev)
        bank = WeightBank(model, cuda_graph=name == "sttp").attach() if name != "dense" else None
        fn = step_fn(StepGraph(model, bank=bank) if name == "sttp-sg" else model, dev, batch, True)
        back_to_back_ms(fn, dev, 10)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            wall = back_to_back_ms(fn, dev, steps)
        kernels: dict[str, list[float]] = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                k = kernels.setdefault(e.name, [0, 0.0])
                k[0] += 1
                k[1] += e.time_range.elapsed_us() / 1e3
        busy = sum(v[1] for v in kernels.values()) / steps
        lines.append(f"== {name}: wall {wall:.2f} ms/step (under the profiler), kernels {busy:.2f} ms/step, "
                     f"{sum(v[0] for v in kernels.values()) / steps:.0f} kernels/step")
        for k, (n, ms) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:40]:
            lines.append(f"{ms / steps:8.3f} ms {n / steps:6.1f}x  {k[:150]}")
        lines.append(f"-- {name} step, ms per step of 30 queued without a sync: {cpu_ms(fn, 30)}")
        cpu = cProfile.Profile()
        torch.cuda.synchronize()
        t0 = time.process_time()
        cpu.enable()
        for _ in range(30):  # launches do not wait while the GPU keeps up, so this is the step's CPU cost
            fn()
        cpu.disable()
        profiled_ms = (time.process_time() - t0) * 1e3 / 30
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(cpu, stream=text).sort_stats("tottime").print_stats(25)
        lines.append(f"-- {name}: CPU time {profiled_ms:.2f} ms/step under cProfile; top functions by own time (30 steps):")
        lines += [ln for ln in text.getvalue().splitlines() if ln.strip()][-27:]
        if bank:
            bank.detach()
        del model
    Path(path).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:3]), flush=True)


def save(rows: list[dict], args) -> None:
    """Write results/train_step.json and .md (rows of other devices kept with --merge)."""
    rows = merge_rows("train_step", rows) if args.merge else rows
    cols = ["device", "product", "batch", "mode", "timing", "ratio", "dense_ms", "sttp_ms", "overhead",
            "overhead_min", "overhead_max"]
    md = (f"# Training step\n\nDate: {today()}. Script: `benchmarks/bench_train_step.py`. fwd + bwd + SGD step; "
          "GPU: batch 256 under bf16 autocast, CPU: batch 32. Modes: see the script's docstring "
          "(`+tf32`, `+cl` = channels_last apply to the dense row they are compared with too). Dense and STTP "
          "alternate in `rounds` rounds; `timing` synced: each step followed by a sync, back-to-back: steps queued "
          "as in a training loop; overhead is the median round's ratio, min/max the extreme rounds.\n\n"
          + markdown_table(rows, cols + (["error"] if any("error" in r for r in rows) else [])))
    write_results("train_step", rows, {"date": today(), "script": "benchmarks/bench_train_step.py"}, md)


if __name__ == "__main__":
    main()
