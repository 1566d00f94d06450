"""MiniLM text-distillation throughput with and without the step graph (GPU; a probe, no targets).

    python benchmarks/probe_stepgraph_text.py OUT.json --model-dir .carry-hf/minilm16 [--steps 400] [--rounds 2]

Builds bench_minilm's ratio-4 student (token embedding at rank 384, frequency-weighted; the rest by
compress_to_target, not activation-aware: speed does not depend on it) and runs the product's
`text.distill_embeddings` (batch 1024, length-grouped batches in windows of 64, augmentation 0.5,
layer-wise loss) for `--steps` steps with `step_graph` on (the whole step as CUDA graphs, one per padded
batch shape, stepgraph.StepGraph) and off (only the weight bank's build as a CUDA graph), alternating for
`--rounds` rounds (`--step-graph-only`: on only, e.g. to compare two versions of the package). Writes each run's texts per second (first 10 steps left out; captures of later shapes
included), wall seconds, final train loss, the report's cuda_graph and the peak GPU memory (allocated, and
reserved: the CUDA graphs' pools count in full there).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_minilm import find, model_dir, ratio4_student  # noqa: E402
from common import machine, today  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--model-dir")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--step-graph-only", action="store_true", help="leave out the runs without the step graph")
    args = ap.parse_args()

    from sttp_compress.data.images import LENGTH_GROUP, make_loaders
    from sttp_compress.train.loop import FinetuneConfig
    from sttp_compress.io.hf import load_encoder
    from sttp_compress.data.text import TEXT_AUGMENT, text_datasets
    from sttp_compress.train.text_distill import EmbeddingDistillLoss, distill_embeddings

    folder = model_dir(args.model_dir)
    teacher = load_encoder(folder).cuda()
    train_ds, _ = text_datasets(find('distill.txt'), folder)
    student = ratio4_student(teacher, train_ds)
    train_ds.augment = TEXT_AUGMENT
    rows = []
    for r in range(args.rounds):
        for step_graph in (True,) if args.step_graph_only else (True, False):
            loader = make_loaders(train_ds, None, args.batch_size, 0, r, "cuda", group_by_length=True,
                                  length_group=LENGTH_GROUP)[0]
            cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, device="cuda", workers=0, log_every=50,
                                 select_best=False, loss_fn=EmbeddingDistillLoss(), step_graph=step_graph)
            torch.cuda.empty_cache()  # so that the reserved peak is this run's
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            block = distill_embeddings(copy.deepcopy(student), teacher, loader, None, cfg, progress=False)
            row = {"round": r, "step_graph": step_graph, "cuda_graph": block["cuda_graph"],
                   "texts_per_s": block["images_per_s"], "seconds": round(time.perf_counter() - t0, 2),
                   "train_loss_last": round(block["curve"][-1]["train_loss"], 4),
                   "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}
            rows.append(row)
            print(row, flush=True)
    result = {"date": today(), "device": machine("cuda"), "torch": torch.__version__, "steps": args.steps,
              "batch": args.batch_size, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
