"""Does the token embedding's row order still help after some distillation? A small CPU stand-in (CPU).

    python benchmarks/probe_order_distill.py [STEPS] [DIR]   # -> benchmarks/results/order_distill.{json,md}

The ratio-4 student of the probes (bench_minilm.ratio4_student: token embedding at rank 512, rows weighted by
text.token_weights, the rest by compress_to_target with a plain conversion), its embedding's rows in vocabulary
order or by descending weight (`--order-rows`), distilled for STEPS (default 400) steps at batch 32 on
distill.txt with sttp-compress's text defaults (the layer-wise weight ramped to 0, AdamW β₂ 0.98, token
augmentation 0.5 with a quarter of the replacements from the whole vocabulary). Held-out cosine (first 400
texts of heldout.txt) after conversion and after the steps. Far from the GPU runs (10,400 steps at batch
1024): a sign, not a result.
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_minilm import cpu_probe_texts, ratio4_student  # noqa: E402
from common import machine, today, write_results  # noqa: E402
from sttp_compress.data.images import make_loaders  # noqa: E402
from sttp_compress.train.loop import FinetuneConfig  # noqa: E402
from sttp_compress.data.text import TEXT_AUGMENT, TEXT_VOCAB_SHARE  # noqa: E402
from sttp_compress.train.embedding_metrics import embed, embedding_agreement  # noqa: E402
from sttp_compress.train.text_distill import distill_embeddings  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    folder = sys.argv[2] if len(sys.argv) > 2 else ".carry-hf/minilm16"  # benchmarks/pack_minilm.py's copy
    teacher, train_ds, held, ref = cpu_probe_texts(folder, augment=0.0)  # conversions see plain texts
    rows = []
    for ordered in (False, True):
        student = ratio4_student(teacher, train_ds, 512, order_rows=ordered).eval()
        before = embedding_agreement(embed(student, held), ref)["cosine"]
        train_ds.augment, train_ds.vocab_share = TEXT_AUGMENT, TEXT_VOCAB_SHARE
        loader = make_loaders(train_ds, None, 32, 0, 0, "cpu")[0]
        cfg = FinetuneConfig(steps=steps, batch_size=32, device="cpu", workers=0, log_every=50, select_best=False)
        t = time.time()
        distill_embeddings(student, teacher, loader, None, cfg, progress=False)
        rows.append({"rows": "by weight" if ordered else "vocabulary order", "steps": steps,
                     "seconds": round(time.time() - t, 1), "cosine_before": round(before, 4),
                     "cosine_after": round(embedding_agreement(embed(student.eval(), held), ref)["cosine"], 4)})
        train_ds.augment, train_ds.vocab_share = 0.0, 0.0  # the next student's conversion sees plain texts
        print(rows[-1], flush=True)
    md = [f"# The token embedding's row order through a short distillation ({today()})", "",
          " ".join(__doc__.split("\n\n", 2)[2].split()), "", f"Machine: {machine('cpu')}.", "",
          "| embedding rows | steps | seconds | cosine after conversion | cosine after the steps |", "|---|---|---|---|---|"]
    md += [f"| {r['rows']} | {r['steps']} | {r['seconds']} | {r['cosine_before']:.4f} | {r['cosine_after']:.4f} |"
           for r in rows]
    write_results("order_distill", rows, {"date": today(), "machine": machine("cpu")}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
