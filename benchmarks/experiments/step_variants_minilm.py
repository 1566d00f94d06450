"""Steady-state time of a MiniLM ratio-4 text-distillation step (GPU), for variants of the step.

    python benchmarks/step_variants_minilm.py --model-dir .carry-hf/minilm16 [--variants default,foreach,...]

Builds the ratio-4 student (token embedding at rank 512, the rest by compress_to_target) and runs the
product's distillation (`text.distill_embeddings`, the text defaults: augmentation with vocabulary draws,
layer-wise ramp, β₂ 0.98, TF32 build, step graphs) for `--steps` steps per variant; the clock runs from
step `--skip` (every batch shape has been captured by then) to the last, with a device sync at both ends.
Variants (each changes one thing from the product's default):

    default        as sttp-compress runs it (fused AdamW, batch 1024, gradient clipping at 5)
    foreach        AdamW without the fused kernel (FinetuneConfig.fused=False)
    noclip         no gradient clipping (grad_clip=0): what the clipping costs
    teacher_bf16   the teacher's Linear weights and biases stored in bfloat16 (autocast casts them anyway)
    b512, b2048    batch 512 / 2048 (the step's fixed cost against its per-text cost)
    compile_layers each transformer layer of student and teacher through torch.compile (dynamic shapes;
                   fuses the layer's small kernels; its compile time is in the run's `run_s`)

Prints a table and writes benchmarks/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_minilm import find, model_dir, compile_layers, ratio4_student  # noqa: E402
from common import machine, markdown_table, today, write_results  # noqa: E402

VARIANTS = ("default", "foreach", "noclip", "teacher_bf16", "b512", "b2048", "compile_layers")


def bf16_linears(model: nn.Module) -> nn.Module:
    """A copy of `model` whose nn.Linear weights and biases are bfloat16 (what autocast casts them to)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.to(torch.bfloat16)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--skip", type=int, default=200, help="steps before the clock starts")
    ap.add_argument("--embedding-rank", type=int, default=512)
    ap.add_argument("--name", default="minilm_step_variants2")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import sttp_compress.train.loop as ft
    from sttp_compress.data.images import make_loaders
    from sttp_compress.train.loop import FinetuneConfig
    from sttp_compress.io.hf import load_encoder
    from sttp_compress.data.text import TEXT_AUGMENT, TEXT_VOCAB_SHARE, text_datasets
    from sttp_compress.train.text_distill import HIDDEN_END, EmbeddingDistillLoss, distill_embeddings

    device = args.device
    folder = model_dir(args.model_dir)
    teacher = load_encoder(folder).to(device).eval()
    train_ds, _ = text_datasets(find('distill.txt'), folder)
    train_ds.augment, train_ds.vocab_share = TEXT_AUGMENT, TEXT_VOCAB_SHARE
    student = ratio4_student(teacher, train_ds, rank=args.embedding_rank)

    marks: dict[int, float] = {}
    real_step = ft._train_step

    def timed_step(*a, **k):  # the loop's step, with a sync and a timestamp at the clock's two ends
        out = real_step(*a, **k)
        timed_step.n += 1
        if timed_step.n in (args.skip, args.steps):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            marks[timed_step.n] = time.perf_counter()
        return out

    ft._train_step = timed_step
    rows = []
    for name in args.variants.split(","):
        batch = {"b512": 512, "b2048": 2048}.get(name, 1024)
        cfg = FinetuneConfig(steps=args.steps, batch_size=batch, device=device, workers=0, log_every=50,
                             select_best=False, loss_fn=EmbeddingDistillLoss(hidden_end=HIDDEN_END),
                             fused=name != "foreach", grad_clip=0.0 if name == "noclip" else 5.0)
        loader = make_loaders(train_ds, None, batch, 0, 0, device)[0]
        ref = bf16_linears(teacher) if name == "teacher_bf16" else teacher
        probe = copy.deepcopy(student)
        if name == "compile_layers":
            ref, probe = compile_layers(copy.deepcopy(teacher)), compile_layers(probe)
        marks.clear()
        timed_step.n = 0
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        block = distill_embeddings(probe, ref, loader, None, cfg, progress=False)
        total = time.perf_counter() - t0
        ms = 1000 * (marks[args.steps] - marks[args.skip]) / (args.steps - args.skip)
        rows.append({"variant": name, "batch": batch, "steps": args.steps, "timed_steps": args.steps - args.skip,
                     "ms_per_step": round(ms, 2), "texts_per_s": round(batch / ms * 1000),
                     "run_s": round(total, 1), "final_loss": round(block["curve"][-1]["train_loss"], 4)
                     if block.get("curve") else None})
        print(rows[-1], flush=True)
    base = next((r for r in rows if r["variant"] == "default"), rows[0])
    for r in rows:
        r["texts_per_s_vs_default"] = round(r["texts_per_s"] / base["texts_per_s"], 3)
    table = markdown_table(rows, list(rows[0]))
    print(table)
    if not args.no_write:
        meta = {"device": machine(device), "torch": torch.__version__, "date": today(),
                "command": " ".join(sys.argv)}
        title = (f"# MiniLM ratio-4 distillation step: steady-state time of variants ({meta['date']})\n\n"
                 f"{meta['device']}, torch {meta['torch']}; steps {args.skip}-{args.steps} of each run timed.\n\n")
        write_results(args.name, rows, meta, markdown=title + table)
    else:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
