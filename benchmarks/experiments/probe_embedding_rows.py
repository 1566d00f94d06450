"""How well the converted token embedding keeps each vocabulary row, by the token's count in distill.txt (CPU).

    python benchmarks/probe_embedding_rows.py [DIR]     # -> benchmarks/results/embedding_rows.{json,md}

all-MiniLM-L6-v2's token embedding converted alone as sttp-compress converts it within the ratio-4 model
(STTP, rows weighted by (count + 1)^power, text.token_weights), at ranks 384 and 512 and powers 0, 0.5 (the
default) and 1. For each: the mean relative error ‖w_i − w0_i‖ / ‖w0_i‖ of the rows of tokens seen 0, 1-9,
10-99, 100-999 and 1000+ times in the distillation texts. Why: after distillation, held-out texts with a
token seen fewer than 10 times stay furthest from the original (bench_minilm's cosine_by_rarity).
"""
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_minilm import find  # noqa: E402
from common import machine, today, write_results  # noqa: E402
from sttp_compress.compress.convert import compress_module  # noqa: E402
from sttp_compress.io.hf import load_encoder  # noqa: E402
from sttp_compress.data.text import text_datasets, token_counts, token_weights  # noqa: E402

BINS = ((0, 0), (1, 9), (10, 99), (100, 999), (1000, None))


def count_groups(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"0-0": mask, "1-9": ..., "1000+": ...}: the vocabulary rows by their token's count (BINS)."""
    return {(f"{lo}-{hi}" if hi is not None else f"{lo}+"): (counts >= lo) & (counts <= (counts.max() if hi is None else hi))
            for lo, hi in BINS}


def row_errors(weight: torch.Tensor, w0: torch.Tensor, groups: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean relative row error ‖w_i − w0_i‖ / ‖w0_i‖ per group of rows."""
    with torch.no_grad():
        err = (weight - w0).norm(dim=1) / w0.norm(dim=1)
    return {g: round(float(err[m].mean()), 3) for g, m in groups.items()}


def embedding_setup():
    """What the token-embedding probes share, on 2 threads: (model folder from argv or
    benchmarks/pack_minilm.py's copy, teacher in eval mode, training texts, its token embedding, the
    vocabulary rows by count group, the embedding's original rows)."""
    torch.set_num_threads(2)
    folder = sys.argv[1] if len(sys.argv) > 1 else ".carry-hf/minilm16"
    teacher = load_encoder(folder).eval()
    train_ds, _ = text_datasets(find('distill.txt'), folder)
    table = teacher.embeddings.word_embeddings
    groups = count_groups(token_counts(train_ds, table.num_embeddings))
    return folder, teacher, train_ds, table, groups, table.weight.detach().clone()


def main() -> None:
    folder, teacher, train_ds, table, groups, w0 = embedding_setup()
    rows = []
    for rank in (384, 512):
        for power in (0.0, 0.5, 1.0):
            emb = copy.deepcopy(table)
            compress_module(emb, rank, "sttp", row_weight=token_weights(train_ds, table.num_embeddings, power))
            row = {"rank": rank, "power": power, "params": sum(p.numel() for p in emb.parameters()),
                   **row_errors(emb.weight, w0, groups)}
            rows.append(row)
            print(row, flush=True)
    sizes = {g: int(m.sum()) for g, m in groups.items()}
    head = "| rank | power | parameters | " + " | ".join(f"{g} ({n:,} tokens)" for g, n in sizes.items()) + " |"
    md = [f"# Token embedding rows after conversion, by the token's count in distill.txt ({today()})", "",
          " ".join(__doc__.split("\n\n", 2)[2].split()), "", f"Machine: {machine('cpu')}.", "", head,
          "|" + "---|" * (3 + len(sizes))]
    md += [f"| {r['rank']} | {r['power']} | {r['params']:,} | " + " | ".join(f"{r[g]:.3f}" for g in sizes) + " |"
           for r in rows]
    write_results("embedding_rows", rows, {"date": today(), "machine": machine("cpu"), "token_counts": sizes},
                  "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
