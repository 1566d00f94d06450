"""Eval-mode latency of compressed models against their dense originals, with FLOPs per input row.

    python benchmarks/bench_inference.py [--devices cpu cuda] [--threads N] [--merge]

Models: the ratio-10 CIFAR ResNet-18 (input 3x32x32; the shared checkpoint, random weights when it is
absent) and a transformer-sized stack of 4 x nn.Linear(4096, 4096) with GELU between, every Linear
compressed by `compress_module` at the rank that brings the stack to ~20x (`compress_to_target` would
keep the last Linear dense as the classifier, and its allocation profile of 4096 x 4096 layers takes far
too long). The ResNet-18 takes the per-layer ranks that `compress_to_target(model, ratio=10)` chose in
bench_convert.py (benchmarks/results/convert.meta.json, same layers and ranks, without re-running the
allocation profile); without that file it runs `compress_to_target` itself.

Batches 1 and 256, under torch.no_grad after warm-up, median of several runs (fewer for the slow CPU
batch-256 ResNet). Modes:
  materialized  the product's inference path: in eval mode a compressed layer caches its built dense
                weight, so it runs the same dense kernels;
  shortcut      a PROTOTYPE of the TT-contraction shortcut, implemented here in the benchmark only (not
                in the product yet), for Linear layers: y = ((x V) * sigma) U^T + b with (U, sigma, V)
                from `SpectralTT.factors(*originals)` computed once up front, as an inference cache
                would: r (d_in + d_out) multiply-adds per row instead of d_in d_out.
FLOPs are per input row (one image, one token), 2 per multiply-add, of the Conv/Linear layers only.
Rows {device, model, batch, mode, dense_ms, compressed_ms, speedup, ratio, dense_flops,
compressed_flops, load_avg} go to benchmarks/results/inference.json (+ .md, .meta.json); --merge keeps
rows of other devices.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import product_version  # noqa: E402
from common import RESULTS, machine, markdown_table, merge_rows, print_table, time_ms, today, write_results  # noqa: E402

from sttp_compress.convert import compress, compress_module, compress_to_target, count_parameters  # noqa: E402
from sttp_compress.layers import SpectralTT  # noqa: E402
from sttp_compress.loading import load_model, resolve_arch  # noqa: E402
from sttp_compress.tt import TTShape  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "models"


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


def linear_stack(width: int, depth: int, ratio: float, notes: list[str]):
    torch.manual_seed(0)
    layers = []
    for i in range(depth):
        layers += [nn.Linear(width, width)] + ([nn.GELU()] if i < depth - 1 else [])
    dense = nn.Sequential(*layers).eval()
    comp = copy.deepcopy(dense)
    r = stack_rank(width, ratio)
    for m in comp:
        if isinstance(m, nn.Linear):
            compress_module(m, r)
    dof = TTShape.from_dims([width], [width], r).dof()
    notes.append(f"Linear stack: {depth} x Linear({width}, {width}) with GELU between, random weights "
                 f"(seed 0), every Linear compressed by compress_module at rank {r} ({dof:,} DOF per layer). "
                 f"The shortcut prototype contracts the TT cores into dense U, V ({width} x {r}) first, so it "
                 f"does r(d_in + d_out) = {r * 2 * width:,} multiply-adds per row and layer: "
                 f"{width * width / (r * 2 * width):.1f}x fewer than dense, not the {width * width / dof:.0f}x "
                 "of the parameter count (random weights have a flat spectrum, hence the large out_rel_diff).")
    return dense, comp.eval()


# --------------------------------------------------------------------------- shortcut prototype


class ShortcutLinear(nn.Module):
    """PROTOTYPE (benchmark only): y = ((x V) * sigma) U^T + b without forming W = U diag(sigma) V^T."""

    def __init__(self, m: nn.Linear):
        super().__init__()
        p = m.parametrizations.weight
        st = next(q for q in p if isinstance(q, SpectralTT))
        n = 0
        while hasattr(p, f"original{n}"):
            n += 1
        with torch.no_grad():
            U, s, V = st.factors(*[getattr(p, f"original{i}") for i in range(n)])
        self.V = V.detach().contiguous()        # d_in x r
        self.s = s.detach().contiguous()        # r
        self.Ut = U.detach().T.contiguous()     # r x d_out
        self.b = m.bias.detach() if m.bias is not None else None

    def forward(self, x):
        h = (x @ self.V) * self.s
        if self.b is not None and h.dim() == 2:
            return torch.addmm(self.b, h, self.Ut)
        y = h @ self.Ut
        return y if self.b is None else y + self.b

    def flops(self) -> int:
        d_in, r = self.V.shape
        return 2 * r * (d_in + self.Ut.shape[1]) + r


def shortcut_of(comp: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(*[ShortcutLinear(m) if isinstance(m, nn.Linear) else copy.deepcopy(m) for m in comp]).eval()


# --------------------------------------------------------------------------- FLOPs


def flops_per_row(model: nn.Module, x: torch.Tensor) -> int:
    """2 x multiply-adds of the Conv/Linear/ShortcutLinear layers for one input row."""
    total = [0]

    def conv_hook(m, inp, out):
        total[0] += 2 * out[0].numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def linear_hook(m, inp, out):
        total[0] += 2 * m.in_features * m.out_features * (out[0].numel() // m.out_features)

    def shortcut_hook(m, inp, out):
        total[0] += m.flops() * (out[0].numel() // m.Ut.shape[1])

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, ShortcutLinear):
            hooks.append(m.register_forward_hook(shortcut_hook))
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    return total[0]


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "resnet18_cifar10.pt"))
    ap.add_argument("--arch", default=str(SHARED / "cifar_models.py") + ":resnet18_cifar")
    ap.add_argument("--ratio", type=float, default=10.0, help="ResNet-18 compression ratio")
    ap.add_argument("--ranks-from", default=str(RESULTS / "convert.meta.json"))
    ap.add_argument("--stack-ratio", type=float, default=20.0)
    ap.add_argument("--stack-width", type=int, default=4096)
    ap.add_argument("--stack-depth", type=int, default=4)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 256])
    ap.add_argument("--devices", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--merge", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    notes: list[str] = []
    r_dense, r_comp = resnet18(args.model, args.arch, args.ratio, Path(args.ranks_from), notes)
    s_dense, s_comp = linear_stack(args.stack_width, args.stack_depth, args.stack_ratio, notes)
    models = {"resnet18-cifar": (r_dense, r_comp, (3, 32, 32)),
              f"linear-stack-{args.stack_depth}x{args.stack_width}": (s_dense, s_comp, (args.stack_width,))}

    rows, product = [], product_version()
    for dev in devices:
        gpu = dev.startswith("cuda")
        torch.backends.cudnn.benchmark = True
        for name, (dense0, comp0, in_shape) in models.items():
            dense, comp = copy.deepcopy(dense0).to(dev).eval(), copy.deepcopy(comp0).to(dev).eval()
            ratio = count_parameters(dense) / count_parameters(comp)
            variants = [("materialized", comp)]
            if isinstance(comp, nn.Sequential) and all(isinstance(m, (nn.Linear, nn.GELU)) for m in comp):
                variants.append(("shortcut", shortcut_of(comp)))
            for batch in args.batches:
                torch.manual_seed(1)
                x = torch.randn(batch, *in_shape, device=dev)
                slow = not gpu and batch >= 64 and name.startswith("resnet")
                warmup, repeat = (5, 30) if gpu else ((1, 3) if slow else (3, 15))
                with torch.no_grad():
                    ref = dense(x)
                    dense_ms = time_ms(lambda: dense(x), dev, warmup=warmup, repeat=repeat)
                    dense_flops = flops_per_row(dense, x)
                    for mode, model in variants:
                        out = model(x)
                        if mode == "shortcut":  # the prototype must reproduce the materialized output
                            want = comp(x)
                            err = float((out - want).norm() / want.norm())
                            assert err < 1e-4, f"shortcut differs from the materialized output: {err:.2e}"
                        ms = time_ms(lambda: model(x), dev, warmup=warmup, repeat=repeat)
                        rows.append({"device": machine(dev), "model": name, "batch": batch, "mode": mode,
                                     "dense_ms": round(dense_ms, 3), "compressed_ms": round(ms, 3),
                                     "speedup": round(dense_ms / ms, 2), "ratio": round(ratio, 2),
                                     "dense_flops": dense_flops, "compressed_flops": flops_per_row(model, x),
                                     "out_rel_diff": round(float((out - ref).norm() / ref.norm()), 4),
                                     "load_avg": None if gpu else round(os.getloadavg()[0], 2),
                                     "date": today(), "product": product})
                        Console().print(f"{dev} {name} batch {batch} {mode}: dense {dense_ms:.2f} ms, "
                                        f"compressed {ms:.2f} ms")
    if args.merge:
        rows = merge_rows("inference", rows)
    cols = ["device", "product", "model", "batch", "mode", "ratio", "dense_ms", "compressed_ms", "speedup",
            "dense_flops", "compressed_flops", "load_avg"]
    print_table("Eval-mode latency, compressed vs dense", rows, cols)
    md = (f"# Inference latency\n\nDate: {today()}. Script: `benchmarks/bench_inference.py`.\n\n"
          "Eval mode under torch.no_grad, median wall time after warm-up (GPU: 5 warm-up + 30 runs; CPU: "
          "3 + 15, ResNet-18 batch 256 on CPU 1 + 3). `materialized`: the product's path, each compressed "
          "layer caching its built dense weight. `shortcut`: **a prototype of the TT-contraction shortcut "
          "implemented in this benchmark only, not yet in the product**: y = ((x V) * sigma) U^T + b "
          "with (U, sigma, V) from `SpectralTT.factors` precomputed once. FLOPs are per input row "
          "(image or token), 2 per multiply-add, Conv/Linear layers only. `out_rel_diff` = "
          "||y_compressed - y_dense|| / ||y_dense|| (the compression error seen at the output). CPU rows: "
          "2 cores shared with other work, `load_avg` = 1-minute load average after the row.\n\n"
          + markdown_table(rows, cols + ["out_rel_diff"])
          + "\n## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    write_results("inference", rows, {"date": today(), "script": "benchmarks/bench_inference.py", "product": product,
                                      "notes": notes}, md)


if __name__ == "__main__":
    main()
