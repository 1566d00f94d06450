"""How close a student's sentence embeddings are to the teacher's: mean cosine similarity, nearest-neighbour
agreement and pair-similarity rank correlation (validation during distillation, and what `sttp-eval` reports)."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from scipy.stats import spearmanr
import torch.nn.functional as F
from torch import Tensor, nn

from sttp_compress.errors import UserError

__all__ = ["MAX_PAIRS", "embed", "nearest_neighbours", "similarity_spearman", "spearman", "embedding_agreement"]

MAX_PAIRS = 5_000_000  # similarity_spearman: all pairs of up to 3,162 texts, else of a seeded sample of them


@torch.no_grad()
def embed(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu",
          max_batches: int | None = None) -> Tensor:
    """Embeddings (N, D) float32 on CPU of every batch of `loader` (dicts of token tensors), in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            out.append(model(**batch).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def nearest_neighbours(emb: Tensor, chunk: int = 2048) -> Tensor:
    """For each row, the index of the most cosine-similar other row (N ≥ 2), in chunks of `chunk` rows."""
    E = F.normalize(emb.double(), dim=-1)
    out = torch.empty(len(E), dtype=torch.long)
    for start in range(0, len(E), chunk):
        sims = E[start:start + chunk] @ E.T
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + start] = -math.inf  # not itself
        out[start:start + chunk] = sims.argmax(dim=1)
    return out


@torch.no_grad()
def similarity_spearman(emb: Tensor, ref: Tensor, max_pairs: int = MAX_PAIRS, seed: int = 0) -> float | None:
    """Spearman's ρ between the two models' cosine similarities over every pair of texts: how well the
    order of similarities, which semantic-similarity benchmarks score, is kept. With more than `max_pairs`
    pairs, over every pair of a seeded random subset of the texts instead. None with fewer than 3 texts or
    when either model's similarities are all equal."""
    n = len(emb)
    if n < 3:
        return None
    keep = torch.arange(n)
    m = max(3, (1 + math.isqrt(1 + 8 * max_pairs)) // 2)  # the most texts with at most max_pairs pairs
    if n > m:
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m]
    e, r = (F.normalize(x[keep].double(), dim=-1) for x in (emb, ref))
    i, j = torch.triu_indices(len(keep), len(keep), offset=1)
    return spearman((e @ e.T)[i, j], (r @ r.T)[i, j])  # m×m matrices: 80 MB each at the default


def spearman(x: Tensor, y: Tensor) -> float | None:
    """Spearman's rank correlation of two equally long 1-D tensors (ties take their mean rank); None when
    either is constant or shorter than 2."""
    if len(x) < 2:
        return None
    a, b = (v.detach().double().flatten().cpu().numpy() for v in (x, y))
    if (a == a[0]).all() or (b == b[0]).all():  # constant: no order to correlate
        return None
    return float(spearmanr(a, b).statistic)


def embedding_agreement(emb: Tensor, ref: Tensor) -> dict[str, float | None]:
    """Mean cosine similarity to the reference embeddings, top-1 nearest-neighbour agreement (%), Spearman's
    ρ between the two models' pairwise similarities and the relative error ‖emb − ref‖ / ‖ref‖ over all texts."""
    if emb.shape != ref.shape:
        raise UserError(f"the compressed model's embeddings {list(emb.shape)} differ in shape from the "
                        f"reference's {list(ref.shape)}")
    e, r = emb.double(), ref.double()
    cosine = float(F.cosine_similarity(e, r, dim=-1).mean())
    agree = None
    if len(e) >= 2:
        agree = 100.0 * float((nearest_neighbours(e) == nearest_neighbours(r)).double().mean())
    rel = float((e - r).norm() / r.norm().clamp_min(1e-30))
    return {"cosine": cosine, "nn_agreement": agree, "similarity_spearman": similarity_spearman(e, r),
            "rel_output_error": rel}
