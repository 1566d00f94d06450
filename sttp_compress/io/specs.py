"""Data and architecture specs, parsed in one place into types that the rest of the code asks instead of
sniffing strings: `--data DIR | tensors:FILE.pt | text:FILE | pairs:FILE` and `--arch hf:DIR | ...`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sttp_compress.errors import UserError

__all__ = ["DataSpec", "parse_data", "WithDataSpec", "DATA_PREFIXES", "HF_PREFIX", "hf_folder"]

DataKind = Literal["images", "tensors", "text", "pairs"]
DATA_PREFIXES: dict[str, DataKind] = {"tensors:": "tensors", "text:": "text", "pairs:": "pairs"}
HF_PREFIX = "hf:"
_EXPECTED = {"tensors": "tensors:FILE.pt, a saved dict of 'inputs' (and 'targets')",
             "text": "text:FILE, a file with one text per line",
             "pairs": "pairs:FILE, tab-separated sentence1, sentence2, score"}


@dataclass(frozen=True)
class DataSpec:
    """What `--data` names: an image folder (`images`), saved tensors, texts, or scored sentence pairs."""

    kind: DataKind
    path: Path
    raw: str  # as given, for messages and reports

    def __str__(self) -> str:
        return self.raw

    @property
    def textual(self) -> bool:
        """Texts or pairs: data for an `hf:DIR` encoder, tokenized with its tokenizer."""
        return self.kind in ("text", "pairs")


def parse_data(spec: str | DataSpec | None) -> DataSpec | None:
    """The DataSpec of a `--data` value (None stays None); an empty file part is a UserError."""
    if spec is None or isinstance(spec, DataSpec):
        return spec
    raw = str(spec)
    for prefix, kind in DATA_PREFIXES.items():
        if raw.startswith(prefix):
            rest = raw[len(prefix):].strip()
            if not rest:
                raise UserError(f"bad ‹data› {raw!r}: expected {_EXPECTED[kind]}")
            return DataSpec(kind, Path(rest).expanduser(), raw)
    return DataSpec("images", Path(raw).expanduser(), raw)


class WithDataSpec:
    """Typed views of a `data` attribute holding a --data string (CompressJob, EvalOptions)."""

    @property
    def data_spec(self) -> DataSpec | None:
        """--data as a DataSpec (None without data)."""
        return parse_data(self.data)  # type: ignore[attr-defined]

    @property
    def data_kind(self) -> str | None:
        """'images', 'tensors', 'text' or 'pairs'; None without --data."""
        spec = self.data_spec
        return None if spec is None else spec.kind


def hf_folder(spec: str | None) -> Path | None:
    """The folder of an `hf:DIR` architecture spec (user-expanded), or None for any other spec."""
    if not isinstance(spec, str) or not spec.strip().startswith(HF_PREFIX):
        return None
    text = spec.strip()[len(HF_PREFIX):].strip()
    if not text:
        raise UserError("bad ‹arch› 'hf:': expected hf:DIR, a local Hugging Face model folder")
    return Path(text).expanduser()
