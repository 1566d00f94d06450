"""Do the token embedding's rare rows drift during distillation, and does the vocab term hold them? (CPU)

    python benchmarks/probe_row_drift.py [STEPS] [DIR]   # -> benchmarks/results/row_drift.{json,md}

all-MiniLM-L6-v2 with only its token embedding converted (STTP rank 512, rows weighted by (count + 1)^0.5 as
sttp-compress does), distilled for STEPS (default 300) steps at batch 32 on distill.txt with the product's
text loss, without and with the vocabulary term (EmbeddingDistillLoss(vocab=1), 2,048 rows drawn from the
whole vocabulary per batch). For each: the mean relative row error ‖w_i − w0_i‖ / ‖w0_i‖ by the token's count in
distill.txt, after conversion and after the steps, and the held-out cosine (first 400 texts of heldout.txt).
A small CPU stand-in for the GPU runs, where texts with tokens seen fewer than 10 times end furthest from the
original (bench_minilm's cosine_by_rarity).
"""
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_minilm import cpu_probe_texts  # noqa: E402
from common import machine, today, write_results  # noqa: E402
from probe_embedding_rows import count_groups, row_errors  # noqa: E402
from sttp_compress.compress.convert import compress_module  # noqa: E402
from sttp_compress.data.images import make_loaders  # noqa: E402
from sttp_compress.train.loop import FinetuneConfig  # noqa: E402
from sttp_compress.data.text import token_counts, token_weights  # noqa: E402
from sttp_compress.train.embedding_metrics import embed, embedding_agreement  # noqa: E402
from sttp_compress.train.text_distill import EmbeddingDistillLoss, distill_embeddings  # noqa: E402

ROWS = 2048


def main() -> None:
    torch.set_num_threads(2)
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    folder = sys.argv[2] if len(sys.argv) > 2 else ".carry-hf/minilm16"  # benchmarks/pack_minilm.py's copy
    teacher, train_ds, held, ref = cpu_probe_texts(folder, augment=0.5)
    table = teacher.embeddings.word_embeddings
    counts = token_counts(train_ds, table.num_embeddings)
    w0 = table.weight.detach().clone()
    groups = count_groups(counts)
    start = copy.deepcopy(teacher)
    compress_module(start.embeddings.word_embeddings, 512, "sttp", row_weight=token_weights(train_ds, table.num_embeddings))

    def errors(model) -> dict:
        return row_errors(model.embeddings.word_embeddings.weight, w0, groups)

    rows = [{"variant": "converted", "steps": 0, "cosine": round(embedding_agreement(embed(start, held), ref)["cosine"], 4),
             **errors(start)}]
    print(rows[-1], flush=True)
    for name, vocab_rows, weight in (("distilled", 0, 0.0), ("distilled + vocab term", ROWS, 1.0)):
        student = copy.deepcopy(start)
        train_ds.vocab_rows = vocab_rows
        loader = make_loaders(train_ds, None, 32, 0, 0, "cpu")[0]
        cfg = FinetuneConfig(steps=steps, batch_size=32, device="cpu", workers=0, log_every=50, select_best=False,
                             loss_fn=EmbeddingDistillLoss(vocab=weight),
                             adam_beta2=0.999)  # as when its results were made (text default: 0.98)
        t = time.time()
        distill_embeddings(student, teacher, loader, None, cfg, progress=False)
        rows.append({"variant": name, "steps": steps, "seconds": round(time.time() - t, 1),
                     "cosine": round(embedding_agreement(embed(student, held), ref)["cosine"], 4), **errors(student)})
        print(rows[-1], flush=True)
    sizes = {g: int(m.sum()) for g, m in groups.items()}
    md = [f"# Token embedding rows during distillation, by the token's count in distill.txt ({today()})", "",
          " ".join(__doc__.split("\n\n", 2)[2].split()), "", f"Machine: {machine('cpu')}.", "",
          "| variant | steps | held-out cosine | " + " | ".join(f"row error {g} ({n:,} tokens)" for g, n in sizes.items()) + " |",
          "|" + "---|" * (3 + len(sizes))]
    md += [f"| {r['variant']} | {r['steps']} | {r['cosine']:.4f} | " + " | ".join(f"{r[g]:.3f}" for g in sizes) + " |"
           for r in rows]
    write_results("row_drift", rows, {"date": today(), "machine": machine("cpu"), "token_counts": sizes,
                                      "vocab_rows": ROWS}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
