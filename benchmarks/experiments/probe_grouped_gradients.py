"""Gradient scale of MiniLM distillation batches, length-grouped against random (CPU, no training).

    python benchmarks/probe_grouped_gradients.py [--model-dir .carry-hf/minilm16] [--batch-size 64] [--batches 24]

Why: grouped batches (data.LengthGroupedSampler) blew up at lr 2e-3 where random batches did not
(results/experiments/minilm_grouped_step.md). This checks the suspected cause without a GPU. A grouped batch holds
only short or only long texts, and the loss is normalised per batch, so its gradient may differ in scale
between batches much more than a random batch's does.

Builds the ratio-4 student as profile_minilm does (token embedding rank 384, frequency-weighted;
the rest by compress_to_target). For each batch of each loader it computes the distillation loss
(text.EmbeddingDistillLoss) and the gradient norm over the trainable parameters, then prints one row
per batch and a summary per loader: the spread of the gradient norm (max/min, coefficient of
variation) and its correlation with the padded length. Prints only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_minilm import find, model_dir, ratio4_student  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from sttp_compress.data.images import make_loaders
    from sttp_compress.io.hf import load_encoder
    from sttp_compress.train.text_distill import EmbeddingDistillLoss, HiddenStates
    from sttp_compress.data.text import text_datasets

    folder = model_dir(args.model_dir)
    teacher = load_encoder(folder).eval()
    train_ds, _ = text_datasets(find('distill.txt'), folder)
    student = ratio4_student(teacher, train_ds)
    student.eval()  # dropout off, as distill_embeddings does
    params = [p for p in student.parameters() if p.requires_grad]
    loss_fn = EmbeddingDistillLoss()
    s_view, t_view = HiddenStates(student), HiddenStates(teacher)

    summary = {}
    for grouped in (True, False):
        name = "grouped" if grouped else "random"
        loader = make_loaders(train_ds, None, args.batch_size, 0, 0, "cpu", group_by_length=grouped)[0]
        rows = []
        for _, batch in zip(range(args.batches), loader):
            with torch.no_grad():
                t_out = t_view(**batch)
            loss = loss_fn(s_view(**batch), t_out)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads if g is not None))
            length = batch["attention_mask"].shape[1]
            rows.append((length, loss.item(), norm.item()))
            print(f"{name:8s} padded length {length:4d}  loss {loss.item():.4f}  grad norm {norm.item():.4f}",
                  flush=True)
        lengths, losses, norms = (torch.tensor(c, dtype=torch.float64) for c in zip(*rows))
        corr = torch.corrcoef(torch.stack([lengths, norms]))[0, 1] if lengths.std() > 0 else torch.tensor(float("nan"))
        summary[name] = (f"grad norm mean {norms.mean():.3f}, max/min {norms.max() / norms.min():.2f}, "
                         f"CV {norms.std() / norms.mean():.3f}; loss max/min {losses.max() / losses.min():.2f}; "
                         f"corr(length, grad norm) {corr:.2f}; padded length {lengths.min():.0f}-{lengths.max():.0f}")
    for name, line in summary.items():
        print(f"{name}: {line}")


if __name__ == "__main__":
    main()
