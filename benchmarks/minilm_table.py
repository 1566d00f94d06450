"""The issue's MiniLM table, benchmarks/results/minilm.json (+ .md), assembled from the bench runs it quotes.

    python benchmarks/minilm_table.py

Each row is one row of a `bench_minilm.py` result file (named in SOURCES, with the command that made it);
this script copies the rows, adds `source` and `seconds_budget`, and writes the table. Nothing is measured
here: rerun the commands on a GPU, then this script.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import EXPERIMENT_RESULTS, markdown_table, write_results  # noqa: E402

B = ("python benchmarks/bench_minilm.py --model-dir .carry-hf/minilm16 --batch-size 1024 --lr 1e-3 --seed 0")
# (result file, ratio of the row in it, include of the row, distillation budget in s, the command)
SOURCES = [
    ("minilm_rows_free", 2.0, "*", 140.0, f"{B} --ratios 2,8 --encoder-only max --seconds 140"),
    ("minilm_stats_full", 4.0, "*", 293.0, f"{B} --ratios 4 --encoder-only none --embedding-rank 512 "
                                           "--seconds 293 --free-cores on --name minilm_stats_full"),
    ("minilm_rows_free", 8.0, "*", 140.0, "(the first command's ratio-8 row)"),
    ("minilm_rows_free", None, "encoder only", 140.0, "(the first command's encoder-only row)"),
]
COLUMNS = ["ratio", "include", "allocation", "order_rows", "achieved_ratio", "params", "embedding_params", "convert_seconds",
           "cosine_before", "cosine_after", "nn_agreement_after", "wordnet_after", "steps", "seconds",
           "seconds_budget", "device", "source"]


def main() -> None:
    rows, metas = [], {}
    for name, ratio, include, budget, _ in SOURCES:
        found = [r for r in json.loads((EXPERIMENT_RESULTS / f"{name}.json").read_text())
                 if r["include"] == include and (ratio is None or r["ratio"] == ratio)]
        if len(found) != 1:
            raise SystemExit(f"{name}.json: expected one row for ratio {ratio}, include {include!r}; found {len(found)}")
        rows.append({**found[0], "source": name, "seconds_budget": budget})
        metas.setdefault(name, json.loads((EXPERIMENT_RESULTS / f"{name}.meta.json").read_text()))
    # what the sources' meta files say (one value each when the runs agree)
    dates, machines, torches, transformers = (sorted({m[k] for m in metas.values()})
                                              for k in ("date", "machine", "torch", "transformers"))
    commands = "\n".join(f"    {cmd}   # {name}" for name, _, _, _, cmd in SOURCES)
    text = f"""# all-MiniLM-L6-v2 compressed with STTP, distilled on text ({", ".join(dates)})

The issue's table (`benchmarks/minilm_table.py` assembles it from the bench runs below): whole-model ratios
2, 4 and 8 with the token embedding included, and the largest encoder-only ratio (the embedding dense, every
encoder Linear at rank 1). Held-out text: the 3,001 lines of .data/text/heldout.txt (make_text_data.py);
`wordnet_after` is Spearman's ρ on heldout_pairs.tsv (the original model: 0.7324). {" / ".join(machines)}
(device tool, one GPU), torch {" / ".join(torches)}, transformers {" / ".join(transformers)}, one run at a
time, the float16 copy of the model (pack_minilm.py) as the original.

Every row has the product's text recipe: activation-aware conversion, token-weighted
embedding with its rows in `convert.tiered_order`, length-grouped batches of 1024, augmentation 0.5 with
vocabulary draws, the layer-wise term ramped 1 → 0, AdamW lr 1e-3 one-cycle with β₂ 0.98, the spectra at 10×
the lr, TF32 build, step graphs, and the cores trained free with the gauge restored afterwards
(`freecores.py`; `free_cores` True). The token embedding's rank: sttp-compress's rule (its width, 384) at
ratios 2 and 8, and 512 at ratio 4 (the README command's `--layer-rank`, the best measured there). Ratio 4 had
the issue's 5 minutes (a 293 s budget: 12,290 steps, 294.0 s with its validations), the other rows a 140 s
budget each. The ratio-4 row is from 2026-12-03, with the activation statistics over real tokens only
(commit 73f8644); the other rows are from 2026-12-02, before that change (their statistics also counted
padding). Ratio 4 before the change: 0.9512 (12,438 steps, `minilm_free_cores.json`). The table before
free cores (ratio 4 at 10,800 steps with Householder-generated cores, 0.9467; ratios 2 and 8 also before the
tiered order) is in git history (this file's sources then: minilm_rows2026,
minilm_tiered3, minilm_rows2026_r8).

**Ratio 4 reaches the issue's 0.95, by a thin margin: 0.9508 (seed 0; the README's commands at seed 1:
0.9507 in 295.2 s of distillation, minilm_cli_stats.json).**

{markdown_table([{k: "–" if v is None else v for k, v in r.items()} for r in rows], COLUMNS)}
Commands (the rows' `source`):

{commands}
    python benchmarks/minilm_table.py
"""
    meta = {"dates": dates, "machine": " / ".join(machines), "torch": " / ".join(torches),
            "transformers": " / ".join(transformers), "sources": list(metas)}
    write_results("minilm", rows, meta, markdown=text)
    print(text)


if __name__ == "__main__":
    main()
