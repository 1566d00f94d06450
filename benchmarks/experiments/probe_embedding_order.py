"""Does the order of the vocabulary rows matter to the token embedding's tensor train? (CPU)

    python benchmarks/probe_embedding_order.py [DIR]     # -> benchmarks/results/embedding_order.{json,md}

A TT tensorizes the row index digit by digit, so rows that share the leading digits share the first cores'
ranks. all-MiniLM-L6-v2's token embedding converted as sttp-compress converts it (STTP, rows weighted by
text.token_weights, power 0.5), in vocabulary order, with the rows sorted by descending weight
(`compress_module(row_order=convert.weight_order(w))`) and in `convert.tiered_order` with 3 tier digits
(weight tiers, then a principal-direction tree in each), at ranks 384 and 512; at rank 512 also tiered orders
with 0, 5, 6 and 9 tier digits (embedding only). For each: the mean relative
row error by the token's count in distill.txt (as probe_embedding_rows), the mean cosine to the original
on the first 600 held-out texts with only the embedding converted, and the same for the ratio-4 student
(bench_minilm.ratio4_student: the encoder by compress_to_target, plain conversion) before distillation.
"""
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_minilm import find, heldout_loader, ratio4_student  # noqa: E402
from common import machine, today, write_results  # noqa: E402
from probe_embedding_rows import embedding_setup, row_errors  # noqa: E402
from bench_minilm import embedding_row_order  # noqa: E402
from sttp_compress.compress.convert import compress_module, count_parameters, layer_tiered_order  # noqa: E402
from sttp_compress.train.embedding_metrics import embed, embedding_agreement
from sttp_compress.data.text import token_weights  # noqa: E402


def main() -> None:
    folder, teacher, train_ds, table, groups, w0 = embedding_setup()
    weights = token_weights(train_ds, table.num_embeddings)
    held = heldout_loader(Path(folder), find("heldout.txt"), 600, 100)
    reference = embed(teacher, held)

    def cosine(model) -> float:
        return round(embedding_agreement(embed(model.eval(), held), reference)["cosine"], 4)

    def label(order) -> str:
        return "by weight" if order is True else f"tiered {order}" if order is not False else "vocabulary"

    rows = []
    runs = [(rank, order, True) for rank in (384, 512) for order in (False, True, 3)]
    runs += [(512, digits, False) for digits in (0, 5, 6, 9)]
    for rank, order, whole in runs:
        student = copy.deepcopy(teacher)
        emb = student.embeddings.word_embeddings
        if order == 0 and order is not False:  # the tree alone: no tier digits (embedding_row_order's 0 is none)
            row_order = layer_tiered_order(emb, weights, 0)
        else:
            row_order = embedding_row_order(emb, weights, order)
        compress_module(emb, rank, "sttp", row_weight=weights, row_order=row_order)
        row = {"rank": rank, "order": label(order), "params": count_parameters(emb),
               **row_errors(emb.weight, w0, groups), "cosine_embedding_only": cosine(student),
               "cosine_ratio4": cosine(ratio4_student(teacher, train_ds, rank, order_rows=order)) if whole else None}
        rows.append(row)
        print(row, flush=True)
    sizes = {g: int(m.sum()) for g, m in groups.items()}
    head = ("| rank | rows | parameters | " + " | ".join(f"{g} ({n:,} tokens)" for g, n in sizes.items())
            + " | cosine, embedding only | cosine, ratio-4 student |")
    md = [f"# Token embedding: rows in vocabulary order, by weight or in weight tiers ({today()})", "",
          " ".join(__doc__.split("\n\n", 2)[2].split()), "", f"Machine: {machine('cpu')}.", "", head,
          "|" + "---|" * (5 + len(sizes))]
    md += [f"| {r['rank']} | {r['order']} | {r['params']:,} | " + " | ".join(f"{r[g]:.3f}" for g in sizes)
           + f" | {r['cosine_embedding_only']:.4f} | "
           + ("–" if r["cosine_ratio4"] is None else f"{r['cosine_ratio4']:.4f}") + " |" for r in rows]
    write_results("embedding_order", rows, {"date": today(), "machine": machine("cpu"), "token_counts": sizes},
                  "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
