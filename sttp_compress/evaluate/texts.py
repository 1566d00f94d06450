"""sttp-eval on texts and scored pairs (`text:FILE`, `pairs:FILE`): embeddings of both models, compared."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sttp_compress.data.pairs import read_pairs
from sttp_compress.data.text import TokenizedTexts, by_length, read_texts, tokenize_texts
from sttp_compress.train.embedding_metrics import embed, embedding_agreement, spearman

__all__ = ["evaluate_texts", "evaluate_pairs", "embed_in_length_order"]


def evaluate_texts(model: nn.Module, reference: nn.Module | None, path: str | os.PathLike, folder: str | os.PathLike,
                   device: torch.device, batch_size: int, max_batches: int | None = None
                   ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """sttp-eval on text:FILE: ({"samples", "cosine", "nn_agreement", "similarity_spearman", "rel_output_error"},
    first batch).

    The texts are tokenized with `folder`'s tokenizer; without a reference only "samples" is measured.
    """
    data = tokenize_texts(read_texts(path), folder)
    first = data.collate_fn(data.ids[:batch_size])  # the file's first batch, for the latency
    if max_batches is not None:
        data = data.subset(range(min(len(data), max_batches * batch_size)))
    emb, ref = (None if m is None else embed_in_length_order(m, data, device, batch_size) for m in (model, reference))
    result: dict[str, Any] = {"samples": len(emb), "cosine": None, "nn_agreement": None, "similarity_spearman": None,
                              "rel_output_error": None}
    if ref is not None:
        result.update(embedding_agreement(emb, ref))
    return result, first


def embed_in_length_order(model: nn.Module, data: TokenizedTexts, device: torch.device, batch_size: int) -> Tensor:
    """Embeddings (N, D) of `data`'s texts in their order, computed in batches of similar lengths (little padding)."""
    from torch.utils.data import DataLoader

    order = by_length(data)
    loader = DataLoader(data.subset(order), batch_size=batch_size, shuffle=False, collate_fn=data.collate_fn)
    return embed(model, loader, device)[torch.tensor(order).argsort()]


def evaluate_pairs(model: nn.Module, reference: nn.Module | None, path: str | os.PathLike, folder: str | os.PathLike,
                   device: torch.device, batch_size: int, max_batches: int | None = None
                   ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """sttp-eval on pairs:FILE: ({"samples" (pairs), "texts" (distinct sentences), "sts_spearman",
    "sts_spearman_reference", and with a reference the agreement on the distinct sentences: "cosine",
    "nn_agreement", "similarity_spearman", "rel_output_error"}, the first batch of sentences).

    Each distinct sentence is embedded once (length-ordered batches); `max_batches` keeps the file's first
    max_batches × batch_size pairs.
    """
    a, b, scores = read_pairs(path)
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
