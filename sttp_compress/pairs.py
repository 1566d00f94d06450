"""Scored sentence pairs (`pairs:FILE`): how sttp-eval checks an encoder the way similarity benchmarks do.

A sentence-similarity benchmark (STS-B and its kin) scores a model by Spearman's rank correlation between
the cosine similarity of each pair's two embeddings and a human similarity score. `pairs:FILE` is such a
file, tab-separated, one pair per line (`.gz` read transparently):

- with a header line naming `sentence1`, `sentence2` and `score` columns (any order, other columns
  ignored; e.g. sentence-transformers' stsbenchmark.tsv.gz, whose rows of every split are all used), or
- without a header: `sentence1<TAB>sentence2<TAB>score` on every line.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UserError
from .text import embed_in_length_order, embedding_agreement, read_lines, spearman, tokenize_texts

__all__ = ["PAIRS_PREFIX", "is_pairs_spec", "read_pairs", "evaluate_pairs"]

PAIRS_PREFIX = "pairs:"
COLUMNS = ("sentence1", "sentence2", "score")


def is_pairs_spec(spec: Any) -> bool:
    """True when a --data value names a file of scored sentence pairs (`pairs:FILE`)."""
    return isinstance(spec, str) and spec.startswith(PAIRS_PREFIX)


def read_pairs(spec: str | os.PathLike) -> tuple[list[str], list[str], Tensor]:
    """(first sentences, second sentences, float64 scores) of a `pairs:FILE`; a one-line UserError naming
    the file and line for anything malformed."""
    raw = str(spec)
    path = Path(raw[len(PAIRS_PREFIX):] if is_pairs_spec(raw) else raw).expanduser()
    if not str(path).strip() or str(path) == ".":
        raise UserError("bad --data 'pairs:': expected pairs:FILE, tab-separated sentence1, sentence2, score")
    if not path.is_file():
        raise UserError(f"sentence-pair file not found: {path}")
    rows = [(n, line.split("\t")) for n, line in enumerate(read_lines(path, "sentence-pair file"), 1) if line.strip()]
    if not rows:
        raise UserError(f"sentence-pair file {path} has no pairs")
    header = [c.strip().lower() for c in rows[0][1]]
    named = all(c in header for c in COLUMNS)
    cols = [header.index(c) for c in COLUMNS] if named else [0, 1, 2]
    a, b, scores = [], [], []
    for n, fields in rows[1:] if named else rows:
        if not named and len(fields) != 3:
            raise UserError(f"{path} line {n}: expected 3 tab-separated fields (sentence1, sentence2, score) "
                            f"or a header naming those columns, got {len(fields)} field(s)")
        if len(fields) <= max(cols):
            raise UserError(f"{path} line {n}: {len(fields)} tab-separated field(s), fewer than the header's")
        s1, s2, score = (fields[c].strip() for c in cols)
        try:
            value = float(score)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise UserError(f"{path} line {n}: the score {score[:40]!r} is not a finite number")
        if not s1 or not s2:
            raise UserError(f"{path} line {n}: an empty sentence")
        a.append(s1)
        b.append(s2)
        scores.append(value)
    if len(scores) < 2:
        raise UserError(f"sentence-pair file {path} has {len(scores)} pair{'' if len(scores) == 1 else 's'}; "
                        "a rank correlation needs at least 2")
    return a, b, torch.tensor(scores, dtype=torch.float64)


def evaluate_pairs(model: nn.Module, reference: nn.Module | None, spec: str, folder: str | os.PathLike,
                   device: torch.device, batch_size: int, max_batches: int | None = None
                   ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """sttp-eval on pairs:FILE: ({"samples" (pairs), "texts" (distinct sentences), "sts_spearman",
    "sts_spearman_reference", and with a reference the agreement on the distinct sentences: "cosine",
    "nn_agreement", "similarity_spearman", "rel_output_error"}, the first batch of sentences).

    Each distinct sentence is embedded once (length-ordered batches); `max_batches` keeps the file's first
    max_batches × batch_size pairs.
    """
    a, b, scores = read_pairs(spec)
    if max_batches is not None:
        n = min(len(scores), max_batches * batch_size)
        a, b, scores = a[:n], b[:n], scores[:n]
    texts = list(dict.fromkeys(a + b))
    index = {t: i for i, t in enumerate(texts)}
    ia, ib = (torch.tensor([index[t] for t in side]) for side in (a, b))
    data = tokenize_texts(texts, folder)
    first = data.collate_fn(data.ids[:batch_size])
    result: dict[str, Any] = {"samples": len(scores), "texts": len(texts), "sts_spearman": None,
                              "sts_spearman_reference": None, "cosine": None, "nn_agreement": None,
                              "similarity_spearman": None, "rel_output_error": None}
    embs = {}
    for key, m in (("sts_spearman", model), ("sts_spearman_reference", reference)):
        if m is not None:
            embs[key] = embed_in_length_order(m, data, device, batch_size)
            result[key] = spearman(F.cosine_similarity(embs[key][ia].double(), embs[key][ib].double(), dim=-1),
                                   scores)
    if reference is not None:
        result.update(embedding_agreement(embs["sts_spearman"], embs["sts_spearman_reference"]))
    return result, first
