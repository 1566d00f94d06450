"""Text data and sentence-embedding distillation for `hf:DIR` encoders (`--data text:FILE`).

- `read_texts("text:FILE")`: one text per line (UTF-8; `.gz` read transparently; blank lines skipped).
- `TokenizedTexts`: the texts tokenized once with the model folder's tokenizer; its `collate_fn` pads
  each batch to its longest text and returns `{"input_ids", "attention_mask"}`, the keyword arguments
  of `SentenceEncoder.forward`.
- `embedding_distillation_loss`: (1 − cosine) + relative MSE between student and teacher embeddings.
- `embed`, `nearest_neighbours`, `embedding_agreement`: mean cosine similarity to the original's
  embeddings and top-1 nearest-neighbour agreement among the texts (what `sttp-eval` reports).
"""

from __future__ import annotations

import copy
import gzip
import math
import os
from itertools import chain
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from .errors import UserError

__all__ = ["TEXT_PREFIX", "is_text_spec", "text_path", "read_texts", "TokenizedTexts", "tokenize_texts",
           "text_datasets", "embedding_distillation_loss", "embed", "nearest_neighbours", "embedding_agreement",
           "similarity_spearman", "spearman", "embed_in_length_order", "read_lines", "COSINE_WEIGHT", "MSE_WEIGHT", "perturb_tokens"]

TEXT_PREFIX = "text:"
VAL_FRACTION = 0.1  # of the texts held out for validation during distillation ...
MAX_VAL_TEXTS = 2000  # ... but at most this many (validation runs every epoch)
SPLIT_SEED = 0
TOKEN_WEIGHT_POWER = 0.5  # token embedding rows weighted by (count + 1)^power in the conversion (token_weights)
COSINE_WEIGHT = 1.0  # weight of (1 − cos(student, teacher)) in the distillation loss
MSE_WEIGHT = 1.0  # weight of ‖student − teacher‖² / mean ‖teacher‖² (scale-free MSE)
HIDDEN_WEIGHT = 1.0  # weight of the layer-wise hidden-state term (0: sentence embeddings only)
# distill_embeddings' recipe (benchmarks/results/minilm_recipe.md, MiniLM at ratio 4 on H200s):
HIDDEN_END = 0.0  # the layer-wise weight ramps from HIDDEN_WEIGHT to this by the last step (~+0.001 cosine)
TEXT_ADAM_BETA2 = 0.98  # AdamW's beta2: no loss spike in 8 runs, against 5 of 15 at PyTorch's 0.999
TEXT_SPECTRUM_LR_MULT = 10.0  # spectra and row/column scales at 10x the lr: 0.9455 against 0.9448 (minilm_recipe.md)
TEXT_FREE_CORES = True  # cores trained as free matrices (freecores.py): 0.9512 against 0.9467 in 5 minutes
TEXT_VOCAB_SHARE = 0.25  # share of the augmentation's replacement tokens drawn from the whole vocabulary
_TOKENIZE_CHUNK = 4096
PAD_MULTIPLE = 8  # padded batch lengths: fewer distinct shapes, GEMM sizes tensor cores like
TEXT_AUGMENT = 0.5  # default fraction of a training batch's texts perturbed (--text-augment; minilm_augment.md)
REPLACE_PROB = 0.25  # augmentation: chance that a token of a perturbed text is replaced (perturb_tokens)


def is_text_spec(spec: Any) -> bool:
    """True when a --data value names a text file (`text:FILE`)."""
    return isinstance(spec, str) and spec.startswith(TEXT_PREFIX)


def text_path(spec: str) -> Path:
    """The file of 'text:FILE'."""
    path = spec[len(TEXT_PREFIX):] if is_text_spec(spec) else spec
    if not path.strip():
        raise UserError("bad --data 'text:': expected text:FILE, a file with one text per line")
    return Path(path).expanduser()


def read_texts(spec: str | os.PathLike) -> list[str]:
    """The non-blank lines of a UTF-8 text file (gzip-compressed when it ends in .gz), stripped."""
    path = text_path(str(spec))
    if not path.exists():
        raise UserError(f"text data file not found: {path}")
    if path.is_dir():
        raise UserError(f"text data {path} is a folder; text:FILE needs a file with one text per line")
    texts = [t for t in (line.strip() for line in read_lines(path, "text data")) if t]
    if not texts:
        raise UserError(f"text data {path} has no texts (expected one text per line)")
    return texts


def read_lines(path: Path, what: str) -> list[str]:
    """The lines of a UTF-8 file (gzip-compressed when it ends in .gz), line ends removed; a one-line UserError
    naming `what` (e.g. "text data") and the file when it cannot be read or decoded."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {what} {path}: {' '.join(str(exc).split())[:160]}") from None


class TokenizedTexts(Dataset):
    """Token id sequences, one per text; batches come padded as SentenceEncoder keyword arguments.

    A DataLoader fetches a whole batch at once (`__getitems__`): the texts are gathered from one flat
    token tensor and padded by tensor indexing, not a Python list per text (collating lists took ~12 ms
    of CPU per MiniLM step of 1024 texts on the H200 host, with the GPU waiting on it).
    """

    def __init__(self, ids: list[list[int]], pad_id: int = 0, max_length: int | None = None,
                 augment: float = 0.0, vocab: Tensor | None = None, vocab_share: float = 0.0,
                 vocab_rows: int = 0):
        self.ids = ids
        self.pad_id = int(pad_id)
        self.max_length = max_length  # the padded length is rounded up, but never beyond this
        self.augment = augment  # fraction of each batch's texts perturbed by perturb_tokens (training only)
        self.vocab = vocab  # the tokenizer's ordinary token ids (tokenize_texts), for vocab_share
        self.vocab_share = vocab_share  # share of perturb_tokens' replacements drawn from vocab, not the batch
        self.vocab_rows = vocab_rows  # per batch, this many ids drawn from vocab ("vocab_ids", the loss's vocab term)
        self._flat: tuple[Tensor, Tensor, Tensor] | None = None  # tokens, offsets, lengths (built lazily)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> list[int]:
        return self.ids[index]

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        """The padded batch of these texts (DataLoader's batched fetch; collate_fn passes it through)."""
        return self._batch(*self.flat(), torch.as_tensor(indices, dtype=torch.long))

    def flat(self) -> tuple[Tensor, Tensor, Tensor]:
        """(every token in one long tensor, each text's start in it, each text's length), built once."""
        if self._flat is None:
            self._flat = _flatten(self.ids)
        return self._flat

    def lengths(self) -> list[int]:
        """Token counts, for length-grouped batching (data.LengthGroupedSampler)."""
        return [len(x) for x in self.ids]

    def subset(self, indices: Iterable[int]) -> "TokenizedTexts":
        return TokenizedTexts([self.ids[i] for i in indices], self.pad_id, self.max_length, self.augment,
                              self.vocab, self.vocab_share, self.vocab_rows)

    def plain(self) -> "TokenizedTexts":
        """These texts without the training extras (no augmentation, no "vocab_ids"), e.g. for calibration."""
        data = copy.copy(self)
        data.augment, data.vocab_rows = 0.0, 0
        return data

    def collate_fn(self, batch: list[list[int]] | dict[str, Tensor]) -> dict[str, Tensor]:
        """Right-pad to the longest text rounded up to a multiple of PAD_MULTIPLE (at most max_length):
        {"input_ids": (B, L) long, "attention_mask": (B, L) long}; a batch `__getitems__` already
        padded is returned as it is."""
        if isinstance(batch, dict):
            return batch
        return self._batch(*_flatten(batch), torch.arange(len(batch)))

    def _batch(self, tokens: Tensor, offsets: Tensor, lengths: Tensor, index: Tensor) -> dict[str, Tensor]:
        n = lengths[index]
        longest = int(n.max()) if len(n) else 0
        rounded = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
        longest = max(longest, min(rounded, self.max_length)) if self.max_length else rounded
        pos = torch.arange(longest)
        valid = pos < n.unsqueeze(1)
        where = (offsets[index].unsqueeze(1) + pos).clamp_(max=max(len(tokens) - 1, 0))
        ids = torch.where(valid, tokens[where] if len(tokens) else self.pad_id, self.pad_id)
        mask = valid.long()
        if self.augment > 0:
            ids = perturb_tokens(ids, mask, self.augment, vocab=self.vocab, vocab_share=self.vocab_share)
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.vocab_rows > 0 and self.vocab is not None and len(self.vocab):
            batch["vocab_ids"] = self.vocab[torch.randint(len(self.vocab), (self.vocab_rows,))]
        return batch


def _flatten(ids: list[list[int]]) -> tuple[Tensor, Tensor, Tensor]:
    """(all tokens in one long tensor, each text's start in it, each text's length).

    numpy's fromiter fills the buffer straight from the lists: 2.6x faster than torch.tensor of one long
    list (164k texts: 0.16 s against 0.41 s on 2 CPU cores)."""
    import numpy as np

    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    tokens = torch.from_numpy(flat)
    offsets = torch.cumsum(lengths, 0) - lengths
    return tokens, offsets, lengths


def perturb_tokens(ids: Tensor, mask: Tensor, fraction: float, prob: float = REPLACE_PROB,
                   generator: torch.Generator | None = None, vocab: Tensor | None = None,
                   vocab_share: float = 0.0) -> Tensor:
    """Distillation inputs beyond the data: in a `fraction` of the texts, each token between the first
    and the last ([CLS] ... [SEP]) is replaced with chance `prob` by a token drawn from the batch's own
    such tokens (so by their frequency), or, for a `vocab_share` of the replacements, uniformly from
    `vocab` (so that tokens rare or absent in the texts are trained in context too). Teacher and student
    see the same perturbed batch, so the targets stay exact; the student learns the teacher's function
    around the texts, not only on them."""
    lengths = mask.sum(1, keepdim=True)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    inner = (pos > 0) & (pos < lengths - 1)
    pool = ids[inner]
    if pool.numel() == 0 or fraction <= 0:
        return ids
    chosen = torch.rand(ids.shape[0], 1, generator=generator) < fraction
    replace = inner & chosen & (torch.rand(ids.shape, generator=generator) < prob)
    n = int(replace.sum())
    if n == 0:
        return ids
    out = ids.clone()
    new = pool[torch.randint(pool.numel(), (n,), generator=generator)]
    if vocab is not None and len(vocab) and vocab_share > 0:
        wide = torch.rand(n, generator=generator) < vocab_share
        new[wide] = vocab[torch.randint(len(vocab), (int(wide.sum()),), generator=generator)].to(new.dtype)
    out[replace] = new
    return out


def tokenize_texts(texts: list[str], folder: str | os.PathLike) -> TokenizedTexts:
    """Tokenize texts with the model folder's tokenizer, truncated to its max_seq_length (offline)."""
    from .hf import load_tokenizer, max_length, read_layout

    layout = read_layout(folder)
    tokenizer = load_tokenizer(folder)
    limit = max_length(layout, tokenizer)
    if layout.lowercase:
        texts = [t.lower() for t in texts]
    ids: list[list[int]] = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        ids += tokenizer(texts[start:start + _TOKENIZE_CHUNK], truncation=True, max_length=limit)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TokenizedTexts(ids, pad, limit, vocab=ordinary_tokens(tokenizer))


def ordinary_tokens(tokenizer: Any) -> Tensor:
    """The ids of a tokenizer's ordinary tokens: not special ([CLS], [PAD], ...) nor bracketed
    placeholders ([unused17]), sorted."""
    special = set(tokenizer.all_special_ids)
    keep = [i for tok, i in tokenizer.get_vocab().items()
            if i not in special and not (tok.startswith("[") and tok.endswith("]"))]
    return torch.tensor(sorted(keep), dtype=torch.long)


def text_datasets(spec: str, folder: str | os.PathLike) -> tuple[TokenizedTexts, TokenizedTexts]:
    """text:FILE tokenized and split with a fixed seed: 10% (at most 2,000 texts) for validation."""
    texts = read_texts(spec)
    if len(texts) < 2:
        raise UserError(f"text data {text_path(spec)} needs at least 2 texts to split into train and val, "
                        f"got {len(texts)}")
    data = tokenize_texts(texts, folder)
    n_val = min(MAX_VAL_TEXTS, max(1, round(len(data) * VAL_FRACTION)))
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    val = data.subset(perm[:n_val])
    return data.subset(perm[n_val:]), val.subset(by_length(val))  # validation pads little in length order


def token_weights(data: TokenizedTexts, vocab_size: int, power: float = TOKEN_WEIGHT_POWER) -> Tensor:
    """(count + 1)^power of every token id in the texts (float64, length vocab_size): the row weights of
    the token embedding's conversion (convert.compress_to_target's row_weights).

    Power 1 would minimize the embedding's error per token occurrence, 0 per vocabulary entry; 0.5 sits
    between, so rare and unseen tokens (weight 1) still count. On all-MiniLM-L6-v2 with only the
    embedding compressed (rank 512, 5.8×), held-out cosine to the original: 0.648 unweighted, 0.868 with
    power 0.5, 0.840 with power 1 (600 texts of benchmarks/make_text_data.py's heldout.txt).
    """
    return (token_counts(data, vocab_size).double() + 1.0).pow(power)


def token_counts(data: TokenizedTexts, vocab_size: int) -> Tensor:
    """How often each token id (0 .. vocab_size − 1) occurs in the texts (int64, length vocab_size)."""
    ids = data.flat()[0]  # the same tensor the training batches are gathered from
    return torch.bincount(ids[(ids >= 0) & (ids < vocab_size)], minlength=vocab_size)


# --------------------------------------------------------------------------- loss


def embedding_distillation_loss(student_out: Tensor, teacher_out: Tensor, cosine_weight: float = COSINE_WEIGHT,
                                mse_weight: float = MSE_WEIGHT) -> Tensor:
    """cosine_weight·mean(1 − cos(s, t)) + mse_weight·Σ‖s − t‖² / Σ‖t‖², in float32.

    The MSE term is divided by the teacher's mean squared norm so that it does not depend on the
    embedding's scale; for L2-normalized embeddings it equals 2·(1 − cos) and only sharpens the
    cosine term, for unnormalized ones it also matches the norms.
    """
    s, t = student_out.float(), teacher_out.detach().float()
    if s.shape != t.shape:
        raise UserError(f"student embeddings {tuple(s.shape)} differ from the teacher's {tuple(t.shape)}")
    cos = F.cosine_similarity(s, t, dim=-1).mean()
    mse = (s - t).pow(2).sum(-1).mean() / t.pow(2).sum(-1).mean().clamp_min(1e-12)
    return cosine_weight * (1.0 - cos) + mse_weight * mse


def hidden_state_loss(student: tuple[Tensor, ...], teacher: tuple[Tensor, ...], mask: Tensor) -> Tensor:
    """Mean over layers of Σ‖h_s − h_t‖² / Σ‖h_t‖² over the real (unpadded) tokens, in float32."""
    if len(student) != len(teacher):
        raise UserError(f"the student has {len(student)} hidden states, the teacher {len(teacher)}")
    m = mask.unsqueeze(-1).float()
    return torch.stack([relative_sq_error(hs, ht, m) for hs, ht in zip(student, teacher)]).mean()


def relative_sq_error(student: Tensor, teacher: Tensor, weight: Tensor | float = 1.0) -> Tensor:
    """Σ w‖s − t‖² / Σ w‖t‖² in float32, the teacher detached (hidden states under their mask, embedding rows)."""
    s, t = student.float(), teacher.detach().float()
    return ((s - t).pow(2) * weight).sum() / (t.pow(2) * weight).sum().clamp_min(1e-12)


class EmbeddingDistillLoss:
    """The text distillation loss on `HiddenStates` outputs: embedding_distillation_loss on the sentence
    embeddings + hidden·hidden_state_loss over every layer's token states (plain tensors: the first part).

    With `vocab` > 0 and training batches carrying "vocab_ids" (TokenizedTexts.vocab_rows), it adds
    vocab·‖E_s − E_t‖² / ‖E_t‖² over those token-embedding rows, drawn from the whole vocabulary each
    step: rows of tokens the texts rarely or never hold are trained toward the original's too.

    With `hidden_end` the layer-wise weight moves linearly from `hidden` at the first step to `hidden_end`
    at the last (`set_progress`, which the fine-tune loop calls before each step): the layers' states
    guide the start, the sentence embedding the finish. The weight is a device tensor the loss reads, so
    a step replayed as a CUDA graph sees each step's value.
    """

    def __init__(self, cosine: float = COSINE_WEIGHT, mse: float = MSE_WEIGHT, hidden: float = HIDDEN_WEIGHT,
                 hidden_end: float | None = None, vocab: float = 0.0):
        self.cosine, self.mse, self.hidden, self.hidden_end = cosine, mse, hidden, hidden_end
        self.vocab = vocab  # weight of the token-embedding rows term (needs batches with "vocab_ids")
        self._weight: Tensor | None = None  # the current layer-wise weight (hidden_end given), on the loss's device

    @property
    def layerwise(self) -> bool:
        """Whether the hidden states are needed at any step."""
        return self.hidden > 0 or bool(self.hidden_end)

    def set_progress(self, fraction: float) -> None:
        """The fraction of the fine-tune's steps done (0 at the first step, 1 at the end)."""
        if self.hidden_end is not None and self._weight is not None:
            f = min(max(fraction, 0.0), 1.0)
            self._weight.fill_(self.hidden + f * (self.hidden_end - self.hidden))

    def __call__(self, student_out: Any, teacher_out: Any) -> Tensor:
        both = isinstance(student_out, dict) and isinstance(teacher_out, dict)
        s = student_out["sentence_embedding"] if both else student_out
        t = teacher_out["sentence_embedding"] if both else teacher_out
        loss = embedding_distillation_loss(s, t, self.cosine, self.mse)
        if both and self.layerwise:
            weight: float | Tensor = self.hidden
            if self.hidden_end is not None:
                if self._weight is None or self._weight.device != loss.device:
                    self._weight = torch.tensor(float(self.hidden), device=loss.device)
                weight = self._weight
            loss = loss + weight * hidden_state_loss(student_out["hidden_states"], teacher_out["hidden_states"],
                                                     teacher_out["attention_mask"])
        if both and self.vocab and "vocab_rows" in student_out and "vocab_rows" in teacher_out:
            loss = loss + self.vocab * relative_sq_error(student_out["vocab_rows"], teacher_out["vocab_rows"])
        return loss


class HiddenStates(nn.Module):
    """A view of a SentenceEncoder whose forward returns its `features` dict (embedding first), for distillation."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, vocab_ids: Tensor | None = None) -> dict[str, Any]:
        out = self.encoder.features(input_ids, attention_mask, token_type_ids)
        if vocab_ids is not None:  # rows of the token embedding (EmbeddingDistillLoss's vocab term)
            out["vocab_rows"] = self.encoder._hf.get_input_embeddings()(vocab_ids)
        return out


# --------------------------------------------------------------------------- metrics


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


MAX_PAIRS = 5_000_000  # similarity_spearman: all pairs of up to 3,162 texts, else of a seeded sample of them


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of a 1-D tensor's values, ties sharing their mean rank (as Spearman's ρ needs)."""
    order = x.argsort()
    _, group, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    mean_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[order] = mean_rank[group]
    return ranks


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
    ranks = [_average_ranks(v.double().flatten()) for v in (x, y)]
    ranks = [v - v.mean() for v in ranks]
    norm = float(ranks[0].norm() * ranks[1].norm())
    return float(ranks[0] @ ranks[1]) / norm if norm > 0 else None


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


# --------------------------------------------------------------------------- distillation and evaluation


def distill_embeddings(student: nn.Module, teacher: nn.Module, train_loader: Iterable, val_loader: Iterable | None,
                       cfg: Any, progress: bool = True) -> dict[str, Any]:
    """`finetune` with the text loss (default EmbeddingDistillLoss(hidden_end=HIDDEN_END): sentence embeddings
    and, through HiddenStates views, every layer's token states), AdamW's beta2 at TEXT_ADAM_BETA2 and the
    spectra's lr multiple at TEXT_SPECTRUM_LR_MULT and free cores when every spectrum allows
    (TEXT_FREE_CORES) unless `cfg` sets them, and the student's dropout off; the
    block also gets the beta2, the lr multiple and the layer-wise weights, and the validation texts' mean
    cosine similarity to the teacher, top-1 nearest-neighbour agreement (%) and pair-similarity rank
    correlation (`similarity_spearman`), before and after."""
    from dataclasses import replace

    from .finetune import finetune, resolve_device
    from .freecores import can_release

    cfg = replace(cfg, loss_fn=cfg.loss_fn or EmbeddingDistillLoss(hidden_end=HIDDEN_END),
                  adam_beta2=TEXT_ADAM_BETA2 if cfg.adam_beta2 is None else cfg.adam_beta2,
                  spectrum_lr_mult=TEXT_SPECTRUM_LR_MULT if cfg.spectrum_lr_mult is None else cfg.spectrum_lr_mult,
                  free_cores=TEXT_FREE_CORES and can_release(student) if cfg.free_cores is None else cfg.free_cores)
    rows = getattr(getattr(train_loader, "dataset", None), "vocab_rows", 0) > 0  # batches carry "vocab_ids"
    layerwise = rows or isinstance(cfg.loss_fn, EmbeddingDistillLoss) and cfg.loss_fn.layerwise
    device = resolve_device(cfg.device)
    ref = before = None
    if val_loader is not None:
        teacher.to(device)
        student.to(device)
        ref = embed(teacher, val_loader, device)
        before = embedding_agreement(embed(student, val_loader, device), ref)
    views = (HiddenStates(student), HiddenStates(teacher)) if layerwise else (student, teacher)
    dropouts = [(m, m.p) for m in student.modules() if isinstance(m, nn.Dropout)]
    try:
        for m, _ in dropouts:  # the student matches the teacher's deterministic (eval-mode) function
            m.p = 0.0
        block = finetune(*views, train_loader, val_loader, cfg, progress=progress)
    finally:
        for m, p in dropouts:
            m.p = p
    block["adam_beta2"], block["spectrum_lr_mult"] = cfg.adam_beta2, cfg.spectrum_lr_mult
    if isinstance(cfg.loss_fn, EmbeddingDistillLoss):
        block["hidden_weight"], block["hidden_end"] = cfg.loss_fn.hidden, cfg.loss_fn.hidden_end
    if ref is not None:
        after = embedding_agreement(embed(student, val_loader, device), ref)
        block.update({"val_cosine_before": before["cosine"], "val_cosine_after": after["cosine"],
                      "val_nn_agreement_before": before["nn_agreement"],
                      "val_nn_agreement_after": after["nn_agreement"],
                      "val_similarity_spearman_before": before["similarity_spearman"],
                      "val_similarity_spearman_after": after["similarity_spearman"]})
    return block


def evaluate_texts(model: nn.Module, reference: nn.Module | None, spec: str, folder: str | os.PathLike,
                   device: torch.device, batch_size: int, max_batches: int | None = None
                   ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """sttp-eval on text:FILE: ({"samples", "cosine", "nn_agreement", "similarity_spearman", "rel_output_error"},
    first batch).

    The texts are tokenized with `folder`'s tokenizer; without a reference only "samples" is measured.
    """
    data = tokenize_texts(read_texts(spec), folder)
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


def by_length(data: TokenizedTexts) -> list[int]:
    """Indices of the texts from shortest to longest (stable): evaluation batches in this order pad
    little (sttp-eval on 3,001 held-out texts, MiniLM and its reference, 2 CPU cores: see docs/transformers.md)."""
    lengths = data.lengths()
    return sorted(range(len(lengths)), key=lengths.__getitem__)
