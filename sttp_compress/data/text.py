"""Text data for `hf:DIR` encoders (`--data text:FILE`): one text per line, tokenized once.

- `read_texts(FILE)`: one text per line (UTF-8; `.gz` read transparently; blank lines skipped).
- `TokenizedTexts`: the texts tokenized once with the model folder's tokenizer; its `collate_fn` pads
  each batch to its longest text and returns `{"input_ids", "attention_mask"}`, the keyword arguments
  of `SentenceEncoder.forward`; `perturb_tokens` is its training-time augmentation.
- `token_weights`: how often each token occurs, for a frequency-weighted conversion of the token embedding.
"""

from __future__ import annotations

import copy
import gzip
import os
from itertools import chain
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from sttp_compress.errors import UserError

__all__ = ["VAL_FRACTION", "MAX_VAL_TEXTS", "SPLIT_SEED", "TOKEN_WEIGHT_POWER", "TEXT_VOCAB_SHARE",
           "PAD_MULTIPLE", "TEXT_AUGMENT", "REPLACE_PROB", "read_texts", "read_lines",
           "TokenizedTexts", "perturb_tokens", "tokenize_texts", "ordinary_tokens", "text_datasets",
           "token_weights", "token_counts", "by_length"]

VAL_FRACTION = 0.1  # of the texts held out for validation during distillation ...
MAX_VAL_TEXTS = 2000  # ... but at most this many (validation runs every epoch)
SPLIT_SEED = 0
TOKEN_WEIGHT_POWER = 0.5  # token embedding rows weighted by (count + 1)^power in the conversion (token_weights)
TEXT_VOCAB_SHARE = 0.25  # share of the augmentation's replacement tokens drawn from the whole vocabulary
_TOKENIZE_CHUNK = 4096
PAD_MULTIPLE = 8  # padded batch lengths: fewer distinct shapes, GEMM sizes tensor cores like
TEXT_AUGMENT = 0.5  # default fraction of a training batch's texts perturbed (--text-augment; minilm_augment.md)
REPLACE_PROB = 0.25  # augmentation: chance that a token of a perturbed text is replaced (perturb_tokens)


def read_texts(path: str | os.PathLike) -> list[str]:
    """The non-blank lines of a UTF-8 text file (gzip-compressed when it ends in .gz), stripped."""
    path = Path(path)
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
    from sttp_compress.io.hf import load_tokenizer, max_length, read_layout

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


def text_datasets(path: str | os.PathLike, folder: str | os.PathLike) -> tuple[TokenizedTexts, TokenizedTexts]:
    """A text file (`text:FILE`) tokenized and split with a fixed seed: 10% (at most 2,000 texts) for validation."""
    texts = read_texts(path)
    if len(texts) < 2:
        raise UserError(f"text data {path} needs at least 2 texts to split into train and val, "
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


def by_length(data: TokenizedTexts) -> list[int]:
    """Indices of the texts from shortest to longest (stable): evaluation batches in this order pad
    little (sttp-eval on 3,001 held-out texts, MiniLM and its reference, 2 CPU cores: see docs/transformers.md)."""
    lengths = data.lengths()
    return sorted(range(len(lengths)), key=lengths.__getitem__)
