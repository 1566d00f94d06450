"""Does length grouping make MiniLM distillation unstable at a given LR? A small CPU run (prints one JSON line).

    python benchmarks/probe_grouped_lr.py --batching group64 --lr 2e-3 [--steps 400] [--batch-size 32] [--threads 1]

--batching: random, or groupN (data.LengthGroupedSampler with windows of N batches). The student is
profile_minilm's ratio-4 MiniLM (token embedding rank 384, frequency-weighted; the rest by
compress_to_target), distilled with the product's loss, token augmentation 0.5 and AdamW one-cycle at
peak --lr. It prints the held-out cosine on 400 texts of heldout.txt, the highest batch loss, and the
training loss averaged over tenths of the run. benchmarks/results/experiments/minilm_grouped_step.md holds runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_minilm import cpu_probe_setup  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir")
    ap.add_argument("--batching", default="group64", help="random or groupN")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden-weight", type=float, default=None,
                    help="layer-wise term weight (default text.HIDDEN_WEIGHT; 0: sentence embeddings only)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from sttp_compress.data.images import make_loaders
    from sttp_compress.train.loop import FinetuneConfig
    from sttp_compress.train.text_distill import EmbeddingDistillLoss, distill_embeddings
    from sttp_compress.train.embedding_metrics import embed, embedding_agreement

    teacher, train_ds, held, ref, student = cpu_probe_setup(args.model_dir)
    grouped = args.batching.startswith("group")
    loader = make_loaders(train_ds, None, args.batch_size, 0, 0, "cpu", group_by_length=grouped,
                          length_group=int(args.batching[5:] or 64) if grouped else 1)[0]
    losses: list[float] = []

    class RecordingLoss(EmbeddingDistillLoss):
        """The product's loss, recording each batch's value; an EmbeddingDistillLoss, so that
        distill_embeddings still feeds it every layer's hidden states (a plain function gets only the
        sentence embeddings: runs before this fix had no layer-wise term)."""

        def __call__(self, s, t):
            value = super().__call__(s, t)
            losses.append(value.item())
            return value

    loss_fn = RecordingLoss() if args.hidden_weight is None else RecordingLoss(hidden=args.hidden_weight)
    cfg = FinetuneConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, device="cpu", workers=0,
                         log_every=10**6, select_best=False, loss_fn=loss_fn,
                         adam_beta2=0.999)  # as when its results were made (text default: 0.98)
    t0 = time.time()
    distill_embeddings(student, teacher, loader, None, cfg, progress=False)
    after = embedding_agreement(embed(student, held), ref)
    k = max(1, args.steps // 10)
    curve = [round(sum(losses[i:i + k]) / len(losses[i:i + k]), 3) for i in range(0, len(losses), k)]
    print(json.dumps({"batching": args.batching, "lr": args.lr, "hidden_weight": loss_fn.hidden,
                      "steps": args.steps, "batch": args.batch_size,
                      "seconds": round(time.time() - t0), "cosine": round(after["cosine"], 4),
                      "max_loss": round(max(losses), 3), "curve": curve}), flush=True)


if __name__ == "__main__":
    main()
