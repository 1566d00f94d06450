"""CPU time of the ResNet-18 ratio-10 train step on a GPU machine, dense against STTP (a probe, no targets).

    python benchmarks/probe_step_cpu.py OUT.txt [--model PATH --arch SPEC]

A GPU step whose CPU work (Python, dispatch, kernel launches) takes longer than its kernels leaves the
GPU waiting. For each model this times 50 steps queued without a sync: the process's CPU time per step,
the wall time to queue them, and the wall time until they are done; then the same for the forward alone,
forward + backward, and for STTP the weight bank's build alone (and with its backward). It ends with
torch.profiler's self-CPU table over 10 steps, written to OUT.txt with the numbers.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_train_step import add_model_args, build, cpu_ms, step_fn  # noqa: E402

from sttp_compress.train.bank import WeightBank  # noqa: E402


def main() -> None:
    from torch.profiler import ProfilerActivity, profile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    add_model_args(ap)
    args = ap.parse_args()
    dense0, sttp0, _ = build(args.model, args.arch, 10.0)
    torch.backends.cudnn.benchmark = True
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch 256 bf16, ms per call"]
    for name in ("dense", "sttp"):
        m = copy.deepcopy(dense0 if name == "dense" else sttp0).cuda()
        bank = WeightBank(m, cuda_graph=True).attach() if name == "sttp" else None
        fn = step_fn(m, "cuda", 256, True)
        lines.append(f"{name} step: {cpu_ms(fn)}")
        x = torch.randn(256, 3, 32, 32, device="cuda")

        def fwd():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return m(x).float().sum()
        lines.append(f"{name} forward with grad: {cpu_ms(fwd)}")
        lines.append(f"{name} forward+backward: {cpu_ms(lambda: fwd().backward())}")
        if bank:
            lines.append(f"bank.build(): {cpu_ms(bank.build)}")

            def build_bwd():
                ws = bank.build()
                torch.autograd.backward(ws, [torch.ones_like(w) for w in ws])
            lines.append(f"bank.build()+backward: {cpu_ms(build_bwd)}")
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        lines.append(f"== {name}: profiler self CPU by op (10 steps)")
        lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30,
                                               max_name_column_width=70))
        if bank:
            bank.detach()
        del m
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(ln for ln in lines if "\n" not in ln), flush=True)


if __name__ == "__main__":
    main()
