"""Where a MiniLM text-distillation step's time goes (GPU): the product's step against its parts.

    python benchmarks/profile_minilm.py --model-dir .carry-hf/minilm16 [--batch-size 128] [--augment 0.5]
    python benchmarks/profile_minilm.py --model-dir .carry-hf/minilm16 --batch-size 1024 --embedding-rank 512 --grouped-only

Builds the ratio-4 student of bench_minilm (token embedding at rank 384, frequency-weighted, the rest
allocated by compress_to_target) and times, per step at the distillation batch size: the product's
distillation step (`text.distill_embeddings`, difference of two runs' wall times), the same loop with
a dense (uncompressed) student, and the teacher's forward alone, with length-grouped and with random
batches; then prints a torch.profiler table of
a few product steps (self CPU and CUDA time per op). Prints only; nothing is written.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_minilm import find, model_dir, ratio4_student  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--embedding-rank", type=int, default=384, help="the token embedding's rank (the README's: 512)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-timing", action="store_true", help="only the profiler tables")
    ap.add_argument("--stacks", action="store_true", help="also the ops with most self CPU time by call stack")
    ap.add_argument("--cprofile", action="store_true", help="also a cProfile of the same steps (Python time)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--augment", type=float, default=0.5, help="text augmentation fraction (text.TEXT_AUGMENT)")
    ap.add_argument("--grouped-only", action="store_true", help="time length-grouped batches only (the default)")
    args = ap.parse_args()

    from sttp_compress.compress.convert import count_parameters
    from sttp_compress.data.images import make_loaders
    from sttp_compress.train.loop import FinetuneConfig
    from sttp_compress.io.hf import load_encoder
    from sttp_compress.train.text_distill import EmbeddingDistillLoss, distill_embeddings
    from sttp_compress.data.text import text_datasets

    device = args.device

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    folder = model_dir(args.model_dir)
    teacher = load_encoder(folder).to(device)
    train_ds, _ = text_datasets(find('distill.txt'), folder)
    student = ratio4_student(teacher, train_ds, rank=args.embedding_rank)
    print(f"student {count_parameters(student):,} params (ratio {count_parameters(teacher) / count_parameters(student):.2f})",
          flush=True)
    train_ds.augment = args.augment
    loaders = {g: make_loaders(train_ds, None, args.batch_size, 0, 0, device, group_by_length=g)[0]
               for g in (True, False)}

    def step_ms(model, loader, **options) -> float:
        cfg = FinetuneConfig(steps=1, batch_size=args.batch_size, device=device, workers=0, log_every=50,
                             select_best=False, loss_fn=EmbeddingDistillLoss(), **options)
        times = {}
        for n in (10, 10, 10 + args.steps):
            cfg.steps = n
            probe = copy.deepcopy(model)
            sync()
            t0 = time.perf_counter()
            distill_embeddings(probe, teacher, loader, None, cfg, progress=False)
            sync()
            times[n] = time.perf_counter() - t0
        return 1000 * (times[10 + args.steps] - times[10]) / args.steps

    def teacher_ms() -> float:
        batches = [{k: v.to(device) for k, v in b.items()} for _, b in zip(range(20), loader)]
        with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
            for b in batches[:5]:
                teacher(**b)
            sync()
            t0 = time.perf_counter()
            for b in batches:
                teacher(**b)
            sync()
        return 1000 * (time.perf_counter() - t0) / len(batches)

    for grouped, loader in ({} if args.no_timing else loaders).items():
        if args.grouped_only and not grouped:
            continue
        name = "length-grouped" if grouped else "random"
        padded = [b["attention_mask"].shape[1] for _, b in zip(range(50), loader)]
        print(f"{name} batches of {args.batch_size}: mean padded length {sum(padded) / len(padded):.1f}",
              flush=True)
        print(f"  teacher forward (bf16 autocast, no grad): {teacher_ms():.2f} ms", flush=True)
        print(f"  distillation step, dense student: {step_ms(copy.deepcopy(teacher).cpu(), loader):.2f} ms",
              flush=True)
        print(f"  distillation step, STTP student:  {step_ms(student, loader):.2f} ms", flush=True)
        print(f"  ... with AdamW unfused (foreach): {step_ms(student, loader, fused=False):.2f} ms", flush=True)
    loader = loaders[True]
    if args.no_profile:
        return
    from torch.profiler import ProfilerActivity, profile

    # eager (no step graph): the profiler sees each kernel, whose times are those a graph replays
    cfg = FinetuneConfig(steps=30, batch_size=args.batch_size, device=device, workers=0, log_every=50,
                         select_best=False, loss_fn=EmbeddingDistillLoss(), step_graph=False)
    probe = copy.deepcopy(student)
    if args.cprofile:  # Python-level: which functions hold the (CPU-bound) step
        import cProfile
        import pstats

        distill_embeddings(probe, teacher, loader, None, cfg, progress=False)  # warm every shape first
        prof_py = cProfile.Profile()
        prof_py.enable()
        distill_embeddings(probe, teacher, loader, None, cfg, progress=False)
        prof_py.disable()
        stats = pstats.Stats(prof_py)
        stats.sort_stats("tottime").print_stats(35)
        stats.sort_stats("cumulative").print_stats(60)
    from torch._C._profiler import _ExperimentalConfig

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=args.stacks,
                 experimental_config=_ExperimentalConfig(verbose=True) if args.stacks else None) as prof:
        distill_embeddings(probe, teacher, loader, None, cfg, progress=False)
    if args.stacks:
        rows = sorted(prof.key_averages(group_by_stack_n=8), key=lambda e: -e.self_cpu_time_total)
        for e in rows[:30]:
            print(f"{e.self_cpu_time_total / 1e3:9.1f} ms self CPU  {e.count:6d} calls  {e.key}")
            for frame in e.stack[:8]:
                print(f"      {frame}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=50))
    kernels = sum(e.self_device_time_total for e in prof.key_averages())  # every op's own kernels, once
    print(f"CUDA kernel time: {kernels / 1e3 / cfg.steps:.2f} ms per step ({cfg.steps} steps, incl. first-batch costs)")
    launches = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"CUDA kernels launched: {launches / cfg.steps:.0f} per step")


if __name__ == "__main__":
    main()
