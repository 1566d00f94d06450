"""Eval-mode latency of compressed models against their dense originals, with FLOPs per input row.

    python benchmarks/bench_inference.py [--devices cpu cuda] [--threads N] [--modes materialized cached auto factors tt]
                                         [--gpu-dtype bf16|fp32] [--quick] [--merge]

Models: the ratio-10 CIFAR ResNet-18 (input 3x32x32; the shared checkpoint, random weights when it is
absent) and a transformer-sized stack of 4 x nn.Linear(4096, 4096) with GELU between, every Linear
compressed by `compress_module` at the rank that brings the stack to ~20x (`compress_to_target` would
keep the last Linear dense as the classifier). The ResNet-18 takes the per-layer ranks that
`compress_to_target(model, ratio=10)` chose in bench_convert.py (benchmarks/results/convert.meta.json),
or runs `compress_to_target` itself without that file.

Batches 1 and 256 (plus 1024 and 4096 for the Linear stack: tokens, e.g. 16 sequences of 256), under
torch.no_grad after warm-up, median of several runs. GPU rows run under bf16 autocast by default
(`--gpu-dtype fp32` for float32), CPU rows in float32. Modes:
  materialized  the serving path: `sttp_compress.freeze(model)` builds every weight once and binds it to
                its layer as a plain tensor, so the layers run the dense kernels with no parametrization
                in between;
  cached        the compressed model as loaded, without freeze: in eval mode each layer caches its
                built weight, but every call goes through torch.nn.utils.parametrize (for reference);
  auto          `freeze(model, shortcut="auto")`: each compressed Linear whose factors form
                y = ((x V) sigma) U^T needs fewer FLOPs uses it on the calls whose rows pay for the extra
                kernel call (`contract.CALL_OVERHEAD_FLOPS` of the device), else its dense weight
                (ResNet-18: no compressed Linear, so no row);
  factors       the factors form forced on every call (freeze with zero overhead), to calibrate `auto`;
  tt            `contract.use_shortcut(model, "tt")`: the full TT contraction on every call (reference).
FLOPs are per input row (one image, one token), 2 per multiply-add, of the Conv/Linear layers only,
for the form each layer runs at that batch. Rows {device, model, batch, mode, dtype, dense_ms,
compressed_ms, speedup, ratio, dense_flops, compressed_flops, forms, load_avg} go to
benchmarks/results/inference.json (+ .md, .meta.json); --merge keeps rows of other devices.
`--quick`: a 2 x 512 stack and batch 1 and 8 only, 2 runs (a smoke test, not for the results).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import product_version  # noqa: E402
from common import SHARED_MODELS, RESULTS, machine, markdown_table, merge_rows, print_table, time_ms, today, write_results  # noqa: E402

from sttp_compress.compress.convert import compress, compress_module, compress_to_target, count_parameters  # noqa: E402
from sttp_compress.core.forms import call_overhead, remove_shortcut, row_flops, use_shortcut  # noqa: E402
from sttp_compress.compress.serve import freeze, unfreeze  # noqa: E402
from sttp_compress.io.sources import load_model, resolve_arch  # noqa: E402
from sttp_compress.core.tt import TTShape  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- models


def resnet18(model_path: str, arch: str, ratio: float, ranks_from: Path, notes: list[str]):
    if Path(model_path).exists():
        dense = load_model(model_path, arch)
    else:
        dense = resolve_arch(arch).eval()
        notes.append(f"{model_path} is absent: the ResNet-18 has random weights (latency does not depend on them).")
    comp = copy.deepcopy(dense)
    ranks = json.loads(ranks_from.read_text()).get("ranks", {}).get("resnet18") if ranks_from.exists() else None
    if ranks:
        compress(comp, rank=ranks)
        notes.append(f"ResNet-18 compressed with the per-layer ranks compress_to_target(ratio={ratio:g}) chose, "
                     f"read from {ranks_from.relative_to(ROOT) if ranks_from.is_relative_to(ROOT) else ranks_from}.")
    else:
        compress_to_target(comp, ratio=ratio)
        notes.append(f"ResNet-18 compressed here by compress_to_target(ratio={ratio:g}).")
    return dense, comp.eval()


def stack_rank(d: int, ratio: float) -> int:
    """Largest rank whose DOF (+ bias) is at most 1/ratio of a d x d Linear (weight + bias)."""
    budget = (d * d + d) / ratio - d
    lo, hi = 1, d
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if TTShape.from_dims([d], [d], mid).dof() <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def linear_stack(width: int, depth: int, ratio: float, notes: list[str], device: str = "cpu"):
    """The stack and its compressed copy; the TT-SVDs run on `device` (a GPU does 4096^2 in about a second)."""
    torch.manual_seed(0)
    layers = []
    for i in range(depth):
        layers += [nn.Linear(width, width)] + ([nn.GELU()] if i < depth - 1 else [])
    dense = nn.Sequential(*layers).eval()
    comp = copy.deepcopy(dense).to(device)
    r = stack_rank(width, ratio)
    for m in comp:
        if isinstance(m, nn.Linear):
            compress_module(m, r)
    dof = TTShape.from_dims([width], [width], r).dof()
    comp = comp.cpu()
    notes.append(f"Linear stack: {depth} x Linear({width}, {width}) with GELU between, random weights "
                 f"(seed 0), every Linear compressed by compress_module at rank {r} ({dof:,} DOF per layer). "
                 f"The factors form contracts the TT cores into U, V ({width} x {r}) once, so it "
                 f"does r(d_in + d_out) = {r * 2 * width:,} multiply-adds per row and layer: "
                 f"{width * width / (r * 2 * width):.1f}x fewer than dense, not the {width * width / dof:.0f}x "
                 "of the parameter count (random weights have a flat spectrum, hence the large out_rel_diff).")
    return dense, comp.eval()


# --------------------------------------------------------------------------- FLOPs


def flops_per_row(model: nn.Module, x: torch.Tensor) -> int:
    """2 x multiply-adds of the Conv/Linear layers for one input row (the hooks count out[0], the batch's
    first row), in the form each layer runs at this batch size."""
    total = [0]

    def conv_hook(m, inp, out):
        total[0] += 2 * out[0].numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def linear_hook(m, inp, out):
        form, per = layer_form(m, inp[0])
        total[0] += per * (out[0].numel() // m.out_features)

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    with torch.no_grad():
        model(x)  # the whole batch: a shortcut's choice depends on the rows of the call
    for h in hooks:
        h.remove()
    return total[0]


def layer_form(m: nn.Linear, x: torch.Tensor) -> tuple[str, int]:
    """(form, FLOPs per row) a Linear runs for input x: a live shortcut (contract.use_shortcut), a frozen
    factors form (serve.freeze(shortcut="auto")) or its dense weight."""
    rows, dense = x.numel() // m.in_features, 2 * m.in_features * m.out_features
    sc = m.__dict__.get("_sttp_shortcut")
    if sc is not None:
        uses = sc.overhead is None or rows * sc.saving >= call_overhead(x, sc.overhead)
        return (sc.form, row_flops(sc.p.tt, sc.form)) if uses else ("dense", dense)
    overhead = m.__dict__.get("_sttp_overhead")
    if overhead is not None and rows * m._sttp_saving >= call_overhead(x, overhead):
        return "factors", 2 * m._sttp_vs.shape[0] * (m.in_features + m.out_features)
    return "dense", dense


def forms_used(model: nn.Module, x: torch.Tensor) -> str:
    """Which form each compressed Linear runs at this batch, e.g. 'factors x4' or 'dense x2, factors x2'."""
    got = []
    hooks = [m.register_forward_hook(lambda m, inp, out: got.append(layer_form(m, inp[0])[0]))
             for m in model.modules() if isinstance(m, nn.Linear) and ("_sttp_shortcut" in m.__dict__
                                                                       or "_sttp_overhead" in m.__dict__)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return ", ".join(f"{f} x{got.count(f)}" for f in sorted(set(got))) or "-"


def apply_mode(comp: nn.Module, mode: str) -> bool:
    """Put the compressed model into `mode` (see the module doc); False when it changes nothing."""
    unfreeze(comp)
    remove_shortcut(comp)
    if mode == "materialized":
        freeze(comp)
    elif mode in ("auto", "factors"):
        forms = freeze(comp, "auto", overhead=None if mode == "auto" else {})
        return any(f != "dense" for f in forms.values())
    elif mode == "tt":
        return any(f != "dense" for f in use_shortcut(comp, "tt").values())
    return True


def paired_ms(dense_fn, comp_fn, device: str, warmup: int, repeat: int) -> tuple[float, float]:
    """Median ms of the dense and the compressed call, timed alternately so load drift hits both alike."""
    d, c = [], []
    for _ in range(warmup):
        dense_fn()
        comp_fn()
    for _ in range(repeat):
        d.append(time_ms(dense_fn, device, warmup=0, repeat=1))
        c.append(time_ms(comp_fn, device, warmup=0, repeat=1))
    return statistics.median(d), statistics.median(c)


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED_MODELS / "resnet18_cifar10.pt"))
    ap.add_argument("--arch", default=str(SHARED_MODELS / "cifar_models.py") + ":resnet18_cifar")
    ap.add_argument("--ratio", type=float, default=10.0, help="ResNet-18 compression ratio")
    ap.add_argument("--ranks-from", default=str(RESULTS / "convert.meta.json"))
    ap.add_argument("--stack-ratio", type=float, default=20.0)
    ap.add_argument("--stack-width", type=int, default=4096)
    ap.add_argument("--stack-depth", type=int, default=4)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 256])
    ap.add_argument("--stack-batches", type=int, nargs="*", default=[1, 256, 1024, 4096])
    ap.add_argument("--modes", nargs="*", default=["materialized", "cached", "auto", "factors"],
                    choices=["materialized", "cached", "auto", "factors", "tt"])
    ap.add_argument("--devices", nargs="*", default=None)
    ap.add_argument("--gpu-dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--quick", action="store_true", help="smoke test: small stack, small batches, 2 runs")
    ap.add_argument("--merge", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.stack_width, args.stack_depth, args.batches, args.stack_batches = 512, 2, [1, 8], [1, 8]
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    notes: list[str] = []
    r_dense, r_comp = resnet18(args.model, args.arch, args.ratio, Path(args.ranks_from), notes)
    s_dense, s_comp = linear_stack(args.stack_width, args.stack_depth, args.stack_ratio, notes,
                                   "cuda" if any(d.startswith("cuda") for d in devices) else "cpu")
    models = {"resnet18-cifar": (r_dense, r_comp, (3, 32, 32)),
              f"linear-stack-{args.stack_depth}x{args.stack_width}": (s_dense, s_comp, (args.stack_width,))}

    rows, product = [], product_version()
    for dev in devices:
        gpu = dev.startswith("cuda")
        amp = gpu and args.gpu_dtype == "bf16"
        dtype = "bf16 autocast" if amp else "fp32"
        torch.backends.cudnn.benchmark = True
        for name, (dense0, comp0, in_shape) in models.items():
            dense, comp = copy.deepcopy(dense0).to(dev).eval(), copy.deepcopy(comp0).to(dev).eval()
            ratio = count_parameters(dense) / count_parameters(comp)
            for batch in (args.batches if name.startswith("resnet") else args.stack_batches):
                torch.manual_seed(1)
                x = torch.randn(batch, *in_shape, device=dev)
                slow = not gpu and batch >= 64 and name.startswith("resnet")
                warmup, repeat = (5, 30) if gpu else ((1, 3) if slow else (3, 15))
                if args.quick:
                    warmup, repeat = 1, 2
                with torch.no_grad(), torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=amp):
                    ref = dense(x)
                    dense_flops = flops_per_row(dense, x)
                    apply_mode(comp, "cached")
                    want = comp(x)  # what every mode must reproduce
                    for mode in args.modes:
                        if not apply_mode(comp, mode):
                            continue  # nothing would change (ResNet-18: no compressed Linear)
                        out = comp(x)
                        err = float((out.float() - want.float()).norm() / want.float().norm())
                        # fp32: the same function up to rounding; bf16: recorded (other rounding order)
                        assert amp or err < 1e-4, f"{mode} differs from the parametrized output: {err:.2e}"
                        dense_ms, ms = paired_ms(lambda: dense(x), lambda: comp(x), dev, warmup, repeat)
                        rows.append({"device": machine(dev), "model": name, "batch": batch, "mode": mode,
                                     "dtype": dtype, "dense_ms": round(dense_ms, 3), "compressed_ms": round(ms, 3),
                                     "speedup": round(dense_ms / ms, 2), "ratio": round(ratio, 2),
                                     "dense_flops": dense_flops, "compressed_flops": flops_per_row(comp, x),
                                     "forms": forms_used(comp, x),
                                     "out_rel_diff": round(float((out.float() - ref.float()).norm() / ref.float().norm()), 4),
                                     "vs_parametrized": float(f"{err:.2g}"),
                                     "load_avg": None if gpu else round(os.getloadavg()[0], 2),
                                     "date": today(), "product": product})
                        Console().print(f"{dev} {name} batch {batch} {mode}: dense {dense_ms:.3f} ms, "
                                        f"compressed {ms:.3f} ms")
                    apply_mode(comp, "cached")
    if args.quick:
        print_table("Eval-mode latency (--quick smoke test, not written)", rows,
                    ["device", "model", "batch", "mode", "dense_ms", "compressed_ms", "speedup", "forms"])
        return
    if args.merge:
        rows = merge_rows("inference", rows)
    cols = ["device", "product", "model", "batch", "mode", "dtype", "ratio", "dense_ms", "compressed_ms", "speedup",
            "forms", "dense_flops", "compressed_flops", "load_avg"]
    print_table("Eval-mode latency, compressed vs dense", rows, cols)
    md = (f"# Inference latency\n\nDate: {today()}. Script: `benchmarks/bench_inference.py`.\n\n"
          "Eval mode under torch.no_grad, median wall time after warm-up, dense and compressed calls alternating (GPU: 5 warm-up + 30 runs, bf16 "
          "autocast unless `dtype` says fp32; CPU: 3 + 15, ResNet-18 batch 256 on CPU 1 + 3, float32). "
          "Modes (see the script's docstring): `materialized` = `sttp_compress.freeze(model)`, each built "
          "weight bound to its layer as a plain tensor (the serving path); `cached` = the parametrized model "
          "as loaded (eval-mode weight cache behind torch.nn.utils.parametrize); `auto` = "
          "`freeze(model, shortcut=\"auto\")`, compressed Linears with fewer FLOPs in the factors form "
          "y = ((x V) sigma) U^T use it on calls whose rows pay for the extra kernel call (`forms`: what the "
          "layers ran at that batch), else the dense weight; `factors` = that form forced on every call; "
          "`tt` = the full TT contraction on every call. FLOPs are per "
          "input row (image or token), 2 per multiply-add, Conv/Linear layers only. `out_rel_diff` = "
          "||y_compressed - y_dense|| / ||y_dense|| (the compression error seen at the output); `vs_parametrized` the "
          "same against the parametrized compressed model (rounding only). CPU rows: "
          "2 cores shared with other work, `load_avg` = 1-minute load average after the row.\n\n"
          + markdown_table(rows, cols + ["out_rel_diff", "vs_parametrized"])
          + "\n## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    write_results("inference", rows, {"date": today(), "script": "benchmarks/bench_inference.py", "product": product,
                                      "notes": notes}, md)


if __name__ == "__main__":
    main()
