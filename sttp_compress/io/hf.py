"""Hugging Face encoders from a local folder (`--arch hf:DIR`), offline, as sentence-embedding modules.

`load_encoder(DIR)` reads a `transformers` model folder (config.json + weights) with `AutoModel`, or a
sentence-transformers folder (modules.json: Transformer, then Pooling and optionally Normalize), and
wraps it in a `SentenceEncoder`: token ids in, one embedding per text out, pooled and normalized as
the folder says (a plain AutoModel folder: mean pooling, no normalization). Nothing is fetched from a
hub: the offline flags are set before transformers is imported and every load passes
`local_files_only=True`. sentence-transformers itself is not needed.

The wrapper's submodules are the AutoModel's own (`embeddings`, `encoder`, `pooler`), so its
state_dict keys and module names are the folder's (`encoder.layer.0.attention.self.query`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sttp_compress.errors import UserError, terms
from sttp_compress.io.specs import HF_PREFIX, hf_folder

__all__ = ["HF_PREFIX", "is_hf_spec", "hf_path", "import_transformers", "EncoderLayout", "read_layout",
           "SentenceEncoder", "load_encoder", "load_tokenizer", "POOLING_MODES"]


INSTALL_HINT = "pip install 'sttp-compress[hf]' (from a checkout: pip install '.[hf]')"
# sentence-transformers' legacy pooling keys, in its concatenation order
_LEGACY_POOLING = (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
                   ("pooling_mode_mean_tokens", "mean"), ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
                   ("pooling_mode_weightedmean_tokens", "weightedmean"), ("pooling_mode_lasttoken", "lasttoken"))
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens")
_ST_MODULES = ("Transformer", "Pooling", "Normalize")
DEFAULT_MAX_LENGTH = 512


def is_hf_spec(spec: Any) -> bool:
    """True for an architecture spec of the form 'hf:DIR'."""
    return isinstance(spec, str) and spec.strip().startswith(HF_PREFIX)


def hf_path(spec: str) -> Path:
    """The folder named by 'hf:DIR' (user-expanded, not resolved)."""
    folder = hf_folder(spec)
    if folder is None:
        raise UserError(f"bad ‹arch› {spec!r}: expected hf:DIR, a local Hugging Face model folder")
    return folder


def import_transformers() -> Any:
    """Import transformers with the hub switched off (offline flags, quiet logs), or a UserError naming the fix."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # quiet in DataLoader workers
    try:
        import transformers
    except ImportError as exc:
        raise UserError(f"‹arch› hf:DIR needs the optional 'transformers' package, which is not installed "
                        f"({exc.name or exc}): {INSTALL_HINT}") from None
    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:  # older transformers have no progress bars to hide
        pass
    return transformers


# --------------------------------------------------------------------------- folder layout


@dataclass(frozen=True)
class EncoderLayout:
    """Where the transformer lives in a model folder and how its token states become one embedding."""

    root: Path
    transformer_dir: Path
    pooling: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_length: int | None = None  # sentence-transformers' max_seq_length, if the folder gives one
    lowercase: bool = False  # sentence-transformers' do_lower_case (its own lower-casing before tokenizing)


def _read_json(path: Path, root: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{root}: cannot read {path.name} ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:120]})") from None


def _pooling_modes(config: dict, root: Path) -> tuple[str, ...]:
    """Pooling modes from a sentence-transformers Pooling config ('pooling_mode' or the legacy flags)."""
    given = config.get("pooling_mode")
    if given is not None:
        modes = (given,) if isinstance(given, str) else tuple(given)
    else:
        modes = tuple(mode for key, mode in _LEGACY_POOLING if config.get(key)) or ("mean",)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown:
        raise UserError(f"{root}: pooling mode {', '.join(map(str, unknown))} is not supported "
                        f"(supported: {', '.join(POOLING_MODES)})")
    if config.get("include_prompt") is False:
        raise UserError(f"{root}: pooling that excludes a prompt (include_prompt: false) is not supported")
    return modes


def read_layout(root: str | os.PathLike) -> EncoderLayout:
    """Read a model folder: a sentence-transformers folder (modules.json) or a plain transformers one."""
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"no such model folder: {root} (‹arch› hf:DIR needs a local Hugging Face model folder)")
    if not root.is_dir():
        raise UserError(f"{root} is not a folder (‹arch› hf:DIR needs a local Hugging Face model folder)")
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        layout = EncoderLayout(root, root)
    else:
        modules = _read_json(modules_file, root)
        if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
            raise UserError(f"{root}: modules.json is not a list of modules")
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        unsupported = [k for k in kinds if k not in _ST_MODULES]
        if unsupported or not kinds or kinds[0] != "Transformer":
            raise UserError(f"{root}: sentence-transformers modules {' → '.join(kinds) or '(none)'} are not "
                            f"supported (supported: Transformer, then Pooling and optionally Normalize)")
        tdir = root / str(modules[0].get("path", ""))
        pooling: tuple[str, ...] = ("mean",)
        for m, kind in zip(modules, kinds):
            pdir = root / str(m.get("path", ""))
            if kind == "Pooling" and (pdir / "config.json").is_file():
                pooling = _pooling_modes(_read_json(pdir / "config.json", root), root)
        st_config = {}
        if (tdir / "sentence_bert_config.json").is_file():
            st_config = _read_json(tdir / "sentence_bert_config.json", root)
        max_length = st_config.get("max_seq_length") if isinstance(st_config, dict) else None
        layout = EncoderLayout(root, tdir, pooling, "Normalize" in kinds,
                               int(max_length) if isinstance(max_length, int) and max_length > 0 else None,
                               bool(isinstance(st_config, dict) and st_config.get("do_lower_case")))
    if not (layout.transformer_dir / "config.json").is_file():
        raise UserError(f"{root} is not a Hugging Face model folder (no config.json in "
                        f"{layout.transformer_dir}); ‹arch› hf:DIR needs a folder saved with save_pretrained")
    return layout


# --------------------------------------------------------------------------- the module


def pool(tokens: Tensor, mask: Tensor, modes: tuple[str, ...] = ("mean",)) -> Tensor:
    """Pool token states (B, L, H) under a 0/1 mask (B, L) as sentence-transformers does (right padding)."""
    m = mask.unsqueeze(-1).to(tokens.dtype)
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(tokens[:, 0])
        elif mode == "max":
            out.append(tokens.masked_fill(m == 0, float("-inf")).max(dim=1).values)
        else:
            total = (tokens * m).sum(dim=1, dtype=torch.float32)
            count = m.sum(dim=1, dtype=torch.float32).clamp_min(1e-9)
            out.append((total / (count if mode == "mean" else count.sqrt())).to(tokens.dtype))
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)


class SentenceEncoder(nn.Module):
    """A transformers encoder plus pooling (and L2 normalization): `forward(input_ids, attention_mask)` → (B, D).

    The AutoModel's children are this module's children, so names and state_dict keys are the model
    folder's own; the AutoModel object is kept (unregistered) only to run its forward pass.
    """

    def __init__(self, model: nn.Module, pooling: tuple[str, ...] = ("mean",), normalize: bool = False):
        super().__init__()
        if next(model.parameters(recurse=False), None) is None and next(model.buffers(recurse=False), None) is None:
            object.__setattr__(self, "_hf", model)  # not registered: its children are registered below
            for name, child in model.named_children():
                self.add_module(name, child)
        else:  # a model with weights of its own: keep it as one child
            self.model = model
            object.__setattr__(self, "_hf", model)
        self.pooling = tuple(pooling)
        self.normalize = normalize

    def train(self, mode: bool = True) -> "SentenceEncoder":
        super().train(mode)
        self._hf.training = mode  # the AutoModel object itself is not a registered child
        return self

    def token_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                     token_type_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The last hidden states (B, L, H) and the attention mask (B, L) they are pooled under."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self._hf(**kwargs)
        states = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return states, attention_mask

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        states, mask = self.token_states(input_ids, attention_mask, token_type_ids)
        return self.pool(states, mask)

    def pool(self, states: Tensor, mask: Tensor) -> Tensor:
        """The sentence embedding of token states (B, L, H) under the mask: pooled, normalized if asked."""
        emb = pool(states, mask, self.pooling)
        return F.normalize(emb, p=2, dim=-1) if self.normalize else emb

    def features(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 token_type_ids: Tensor | None = None) -> dict[str, Any]:
        """{"sentence_embedding", "hidden_states" (embedding output, then every layer's), "attention_mask"}."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "output_hidden_states": True}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = tuple(self._hf(**kwargs).hidden_states)
        return {"sentence_embedding": self.pool(hidden[-1], attention_mask), "hidden_states": hidden,
                "attention_mask": attention_mask}

    def token_embedding_name(self) -> str | None:
        """The module name of the token (word) embedding, None if the model has none."""
        emb = self._hf.get_input_embeddings() if hasattr(self._hf, "get_input_embeddings") else None
        return next((n for n, m in self.named_modules() if m is emb), None) if emb is not None else None

    def sttp_layer_policy(self) -> tuple[dict[str, str], dict[str, str]]:
        """(always dense, dense unless --include'd) layer names with the reason, for `candidate_layers`.

        Poolers are never compressed (the sentence embedding does not use them); embeddings are
        compressed only when --include selects them; every other Linear (attention, feed-forward) is a
        default candidate.
        """
        always, by_default = {}, {}
        for name, m in self.named_modules():
            if not name or not isinstance(m, (nn.Linear, nn.Embedding)):
                continue
            if "pooler" in name.split("."):
                always[name] = "pooler stays dense (not used by the sentence embedding)"
            elif isinstance(m, nn.Embedding):
                by_default[name] = terms("embeddings stay dense unless ‹include› selects them (e.g. ‹include› '*')")
        return always, by_default

    def extra_repr(self) -> str:
        return f"pooling={'+'.join(self.pooling)}, normalize={self.normalize}"


def load_encoder(folder: str | os.PathLike) -> SentenceEncoder:
    """Load a local model folder as a float32 SentenceEncoder in eval mode, offline; UserError when it can't."""
    layout = read_layout(folder)
    tf = import_transformers()
    try:
        model = tf.AutoModel.from_pretrained(str(layout.transformer_dir), local_files_only=True,
                                             trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - missing weights, unknown model type, remote code, ...
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserError(f"cannot load a transformers model from {layout.transformer_dir}: "
                        f"{type(exc).__name__}: {reason}") from None
    enc = SentenceEncoder(model.float(), layout.pooling, layout.normalize)
    enc.layout = layout
    return enc.eval()


def load_tokenizer(folder: str | os.PathLike) -> Any:
    """The folder's tokenizer (offline), or a UserError."""
    layout = read_layout(folder)
    tf = import_transformers()
    try:
        return tf.AutoTokenizer.from_pretrained(str(layout.transformer_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserError(f"cannot load the tokenizer of {layout.transformer_dir}: {type(exc).__name__}: {reason}") from None


def max_length(layout: EncoderLayout, tokenizer: Any) -> int:
    """Token limit per text: sentence-transformers' max_seq_length, else the tokenizer's (at most 512)."""
    if layout.max_length:
        return layout.max_length
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit <= DEFAULT_MAX_LENGTH else DEFAULT_MAX_LENGTH
