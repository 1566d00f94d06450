"""Compressed checkpoints: save and load, loadable with `torch.load(..., weights_only=True)`.

The file is a plain dict of strings, numbers, lists and tensors::

    {"format": "sttp-compress", "format_version": 1, "tool_version": "0.1.0",
     "arch": "torchvision:resnet18?num_classes=10" | None, "dtype": "float32" | "float16",
     "layers": {name: {"kind", "weight_shape", "rank", "method", "spectrum"}},
     "state_dict": {...}, "meta": {...}}

Loading rebuilds the architecture from `arch` (or an override), attaches each layer's STTP/SVDP
structure without running a TT-SVD, and loads the state dict.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .convert import attach_structure, compressed_layers, named_layers, weight_of
from .errors import UserError
from .layers import weight_name
from .loading import atomic_torch_save, resolve_arch

__all__ = ["FORMAT", "FORMAT_VERSION", "save_compressed", "load_compressed", "read_compressed",
           "portable_arch"]

FORMAT = "sttp-compress"
FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def portable_arch(spec: str | None) -> str | None:
    """Make a `path/file.py:factory` or `hf:DIR` spec absolute so the checkpoint resolves from any folder."""
    if not spec:
        return spec
    if spec.strip().startswith("hf:"):  # a local model folder
        return "hf:" + str(Path(spec.strip()[3:].strip()).expanduser().resolve())
    module, sep, rest = spec.partition(":")
    if sep and (module.endswith(".py") or os.sep in module or "/" in module):
        return str(Path(module).resolve()) + sep + rest
    return spec


def save_compressed(model: nn.Module, path: str | os.PathLike, arch: str | None,
                    dtype: str = "float32", meta: dict | None = None, force: bool = False) -> int:
    """Write the compressed model atomically; returns the file size in bytes."""
    if dtype not in _DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    tdtype = _DTYPES[dtype]
    state = {k: (v.detach().to("cpu", tdtype) if v.is_floating_point() else v.detach().cpu()).clone()
             for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "tool_version": __version__,
               "arch": portable_arch(arch), "dtype": dtype,
               "layers": {n: p.config() for n, p in compressed_layers(model).items()},
               "state_dict": state, "meta": meta or {}}
    atomic_torch_save(payload, path, force=force)
    return Path(path).stat().st_size


def read_compressed(path: str | os.PathLike) -> dict:
    """Load and validate a compressed checkpoint's dict (weights_only: no code is unpickled)."""
    data = _load_dict(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not an sttp-compress checkpoint (no 'format': '{FORMAT}' entry); "
                        "compress it first with sttp-compress")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} has format version {data['format_version']}; this sttp-compress "
                        f"({__version__}) reads up to {FORMAT_VERSION}: upgrade sttp-compress")
    return data


def _load_dict(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no such file: {path}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or not ours
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable sttp-compress checkpoint (corrupt or truncated?): "
                        f"{reason}") from None


def load_compressed(path: str | os.PathLike, arch: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the compressed model from the file (its arch spec, or `arch` to override).

    Returns (model in eval mode, float32, the checkpoint dict without its state_dict).
    """
    data = read_compressed(path)
    spec = arch or data.get("arch")
    if not spec:
        raise UserError(f"{path} does not record an architecture; pass --arch SPEC")
    model = resolve_arch(spec)
    modules = named_layers(model)
    for name, cfg in data["layers"].items():
        m = modules.get(name)
        W = weight_of(m) if m is not None and hasattr(m, weight_name(m)) else None
        if W is None or tuple(W.shape) != tuple(cfg["weight_shape"]):
            found = "missing" if W is None else f"shape {list(W.shape)}"
            raise UserError(f"architecture {spec} does not match {path}: layer {name} is {found}, "
                            f"the checkpoint has {cfg['weight_shape']}")
        attach_structure(m, cfg)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in data["state_dict"].items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        miss, unexp = result.missing_keys, result.unexpected_keys
        raise UserError(f"architecture {spec} does not match {path}: {len(miss)} missing "
                        f"({', '.join(miss[:3])}), {len(unexp)} unexpected ({', '.join(unexp[:3])})")
    model.float().eval()
    info = {k: v for k, v in data.items() if k != "state_dict"}
    return model, info
