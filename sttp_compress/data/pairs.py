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

import torch
from torch import Tensor

from sttp_compress.errors import UserError
from sttp_compress.data.text import read_lines

__all__ = ["read_pairs"]

COLUMNS = ("sentence1", "sentence2", "score")


def read_pairs(path: str | os.PathLike) -> tuple[list[str], list[str], Tensor]:
    """(first sentences, second sentences, float64 scores) of a scored sentence-pair file (`pairs:FILE`); a
    one-line UserError naming the file and line for anything malformed."""
    path = Path(path)
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
