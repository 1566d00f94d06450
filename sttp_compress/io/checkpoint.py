"""Compressed checkpoints: a safetensors file (the tensors) with JSON metadata in its header; nothing pickled.

Any safetensors reader opens the file. Its tensors are the compressed model's state dict (each STTP/SVDP layer's
parametrization originals and buffers, and the layers that stay dense) less its zero-size tensors (frames with no
free parameter: their shapes follow from `layers`, and each one cost a header entry of ~120 bytes, ~5% of a small
int8 file); its header metadata holds strings::

    format          "sttp-compress"
    format_version  "3" (2: the same, with the zero-size tensors stored too); "4" for int8 files (block scales
                    packed) and for folded BatchNorms
    batchnorm_affine  JSON [name, ...] (format 4 only): BatchNorms stored as their eval-mode affine (weight, bias;
                    compress/batchnorm.py), rebuilt as `ChannelAffine` layers on load
    int8_scales_float32  JSON [name, ...] (format 4, int8, when not empty): the matrices whose block scales are in
                    the float32 packed tensor (io/quantize.py: pack_scales); the others' are in the float16 one
    tool_version    "0.1.0"
    arch            "torchvision:resnet18?num_classes=10" | "model.py:build" | "hf:all-MiniLM-L6-v2" | ""
    dtype           "float32" | "float16" | "bfloat16" | "int8" (matrices int8, a scale per 64 values: io/quantize.py);
                    all but float32 also store int64 buffers (row orders) as int16/int32 where their values fit
    layers          JSON {name: {"kind", "weight_shape", "rank", "method", "spectrum", ...}}
    meta            JSON {"params_original", "size_bytes_original", "input_shape", ..., "hf_config_sha256"}
    summary         JSON {"layers", "params_compressed", "params_original", "ratio"}: a summary of the report

The metadata records no path of the machine that wrote it: a file spec keeps the file's name only (pass `arch`
to rebuild it, as the trust rules require anyway) and an `hf:DIR` model its folder's name plus the SHA-256 of
its config.json, checked when the file is opened with another folder.

Files of format version 1 (`.sttp.pt`: a dict saved with torch.save) stay readable with weights_only=True, and a
name ending in `.pt` still writes that format. Loading rebuilds the architecture from `arch` (or the recorded
spec), attaches each layer's STTP/SVDP structure without running a TT-SVD, and loads the state dict.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sttp_compress import __version__
from sttp_compress.compress.batchnorm import affine_names, attach_affines
from sttp_compress.compress.convert import attach_structure, compressed_layers, named_layers, weight_of
from sttp_compress.errors import UserError
from sttp_compress.io.specs import HF_PREFIX, hf_folder
from sttp_compress.core.spectral_tt import weight_name
from sttp_compress.io.sources import looks_like_safetensors, recorded_arch_problem, resolve_arch
from sttp_compress.io.outputs import atomic_write
from sttp_compress.io.quantize import SCALES, dequantize_state, pack_scales, quantize_state, unpack_scales
from sttp_compress.core.tt import SPECTRA

__all__ = ["FORMAT", "FORMAT_VERSION", "DTYPES", "FLOAT_DTYPES", "checkpoint_payload", "save_compressed",
           "load_compressed", "read_compressed", "recorded_arch", "write_payload", "stored_state", "stored_values"]

FORMAT = "sttp-compress"
FORMAT_VERSION = 4  # the newest read; 4: 3 with int8 block scales packed and folded BatchNorms; 3: safetensors,
# zero-size tensors left out; 2: with them; 1: a torch.save dict (.pt names). A file gets the lowest version that
# holds it: 3 for a float file without folded BatchNorms.
METHODS = ("sttp", "svdp")
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPES = (*FLOAT_DTYPES, "int8")  # stored value types; int8: io.quantize (matrices int8 with block scales)


def recorded_arch(spec: str | None) -> tuple[str | None, dict]:
    """The architecture spec as a checkpoint records it, with no path of this machine, and what to check it by.

    `torchvision:` and `package.module:factory` specs stay as they are; a file spec keeps the file's name
    (`path/to/model.py:build` -> `model.py:build`); `hf:DIR` keeps the folder's name, and the second value
    gives the SHA-256 of its config.json ({"hf_config_sha256": ...}) for `load_compressed` to compare."""
    if not spec:
        return spec, {}
    folder = hf_folder(spec)
    if folder is not None:
        config = folder / "config.json"
        extra = {"hf_config_sha256": _sha256(config)} if config.is_file() else {}
        return HF_PREFIX + folder.resolve().name, extra
    module, sep, rest = spec.partition(":")
    if sep and (module.endswith(".py") or os.sep in module or "/" in module):
        return Path(module).name + sep + rest, {}
    return spec, {}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_safetensors_name(path: str | os.PathLike) -> bool:
    """True unless the name ends in `.pt` or `.pth` (the format-1 torch.save files)."""
    return Path(path).suffix.lower() not in (".pt", ".pth")


@torch.no_grad()
def stored_values(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """`state` as a checkpoint in `dtype` stores it and loads it back: int8 matrices rounded with their block
    scales, floating tensors rounded to float16/bfloat16; same dtypes and devices as `state`."""
    if dtype not in DTYPES:
        raise UserError(f"‹dtype› must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "int8":
        back = dequantize_state(quantize_state({k: v.detach() for k, v in state.items()}))
        return {k: back[k].to(v.device, v.dtype) for k, v in state.items()}
    return {k: v.detach().to(FLOAT_DTYPES[dtype]).to(v.dtype) if v.is_floating_point() else v.detach()
            for k, v in state.items()}


def _narrowed_integers(t: torch.Tensor) -> torch.Tensor:
    """An int64 tensor as int16 or int32 where its values fit (a 30,522-row embedding's row order: 244 → 61 KB);
    anything else unchanged. Never int8, which marks a quantized matrix; `load_state_dict` casts it back."""
    if t.dtype != torch.int64 or t.numel() == 0:
        return t
    top = max(abs(int(t.min())), abs(int(t.max())))
    return t.to(torch.int16) if top < 2**15 else t.to(torch.int32) if top < 2**31 else t


def checkpoint_payload(model: nn.Module, arch: str | None, dtype: str = "float32", meta: dict | None = None,
                       summary: dict | None = None) -> dict:
    """The dict a compressed checkpoint file holds (see the module docstring), tensors on the CPU in `dtype`."""
    if dtype not in DTYPES:
        raise UserError(f"‹dtype› must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "int8":
        state = {k: v.contiguous() for k, v in quantize_state({k: v.cpu() for k, v in model.state_dict().items()}).items()}
    else:
        tdtype = FLOAT_DTYPES[dtype]
        state = {k: (v.detach().to("cpu", tdtype) if v.is_floating_point() else v.detach().cpu()).contiguous().clone()
                 for k, v in model.state_dict().items()}
    if dtype != "float32":  # the smaller storages: index buffers (row orders) in the narrowest integer type too
        state = {k: _narrowed_integers(v) for k, v in state.items()}
    spec, check = recorded_arch(arch)
    affines = affine_names(model)
    return {"format": FORMAT, "format_version": 4 if affines or dtype == "int8" else 3, "tool_version": __version__,
            "arch": spec, "dtype": dtype,
            "layers": {n: p.config() for n, p in compressed_layers(model).items()}, "batchnorm_affine": affines,
            "state_dict": state, "meta": {**(meta or {}), **check}, "summary": summary or {}}


def write_payload(payload: dict, path: str | os.PathLike, name: str | os.PathLike | None = None) -> None:
    """Write a checkpoint dict to `path` as safetensors with JSON metadata, or as format 1 (torch.save) when the
    output's `name` (default: `path`; a temp file's final name) ends in `.pt`/`.pth`."""
    if not _is_safetensors_name(path if name is None else name):
        torch.save({**payload, "format_version": 1}, path)
        return
    from safetensors.torch import save_file

    header = {"format": FORMAT, "format_version": str(payload["format_version"]), "tool_version": str(payload["tool_version"]),
              "arch": payload["arch"] or "", "dtype": payload["dtype"], "layers": json.dumps(payload["layers"]),
              "meta": json.dumps(payload.get("meta") or {}), "summary": json.dumps(payload.get("summary") or {})}
    if payload.get("batchnorm_affine"):
        header["batchnorm_affine"] = json.dumps(payload["batchnorm_affine"])
    tensors = {k: v for k, v in payload["state_dict"].items() if v.numel()}
    if payload["format_version"] >= 4:  # one header entry for all block scales of a dtype, not one a matrix
        tensors, wide = pack_scales(tensors)
        if wide:
            header["int8_scales_float32"] = json.dumps(wide)
    save_file(tensors, str(path), metadata=header)


def save_compressed(model: nn.Module, path: str | os.PathLike, arch: str | None,
                    dtype: str = "float32", meta: dict | None = None, force: bool = False) -> int:
    """Write the compressed model atomically (safetensors, or format 1 for a `.pt` name); returns its size in bytes."""
    payload = checkpoint_payload(model, arch, dtype, meta)
    atomic_write(path, lambda tmp: write_payload(payload, tmp, path), force=force)
    return Path(path).stat().st_size


def read_compressed(path: str | os.PathLike) -> dict:
    """Load and validate a compressed checkpoint's dict (weights_only: no code is unpickled).

    Every field is checked for type and range, and every tensor for NaN/Inf, so a tampered or broken file
    ends in one UserError here rather than somewhere inside the model.
    """
    data = _load_dict(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not an sttp-compress checkpoint (no 'format': '{FORMAT}' entry); "
                        "compress it first with sttp-compress")
    version = data.get("format_version")
    if not _is_int(version) or version < 1:
        raise UserError(f"{path} is a damaged sttp-compress checkpoint: 'format_version' must be a positive "
                        f"integer, got {_shown(version)}")
    if version > FORMAT_VERSION:
        raise UserError(f"{path} has format version {version}; this sttp-compress "
                        f"({__version__}) reads up to {FORMAT_VERSION}: upgrade sttp-compress")
    problem = _payload_problem(data)
    if problem:
        raise UserError(f"{path} is a damaged sttp-compress checkpoint: {problem}")
    bad = _non_finite(data["state_dict"])
    if bad:
        raise UserError(f"{path}: tensor '{bad[0]}' contains {bad[1]} values; the checkpoint is broken "
                        "(diverged fine-tuning or a damaged file)")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """A short, one-line rendering of a value from the file for an error message."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _layer_problem(name: str, cfg: Any) -> str | None:
    """What is wrong with one entry of 'layers', or None."""
    if not isinstance(cfg, dict):
        return f"layer {name!r} is a {type(cfg).__name__}, not a dict"
    shape = cfg.get("weight_shape")
    if not isinstance(shape, (list, tuple)) or len(shape) < 2 or not all(_is_int(d) and d >= 1 for d in shape):
        return f"layer {name!r} has weight_shape {_shown(shape)}, not a list of positive integers"
    if not _is_int(cfg.get("rank")) or cfg["rank"] < 1:
        return f"layer {name!r} has rank {_shown(cfg.get('rank'))}; a rank is an integer of at least 1"
    if cfg.get("method") not in METHODS:
        return f"layer {name!r} has method {_shown(cfg.get('method'))}; known: {', '.join(METHODS)}"
    if cfg.get("spectrum") not in SPECTRA:
        return f"layer {name!r} has spectrum {_shown(cfg.get('spectrum'))}; known: {', '.join(SPECTRA)}"
    for flag in ("row_scaled", "col_scaled", "row_ordered"):
        if not isinstance(cfg.get(flag, False), bool):
            return f"layer {name!r} has {flag} {_shown(cfg.get(flag))}, not true or false"
    return None


def _meta_problem(meta: Any) -> str | None:
    """What is wrong with 'meta' (the numbers sttp-eval reads from it), or None."""
    if meta is None:
        return None
    if not isinstance(meta, dict):
        return f"'meta' is a {type(meta).__name__}, not a dict"
    checks = {
        "params_original": lambda v: _is_int(v) and v >= 0,
        "size_bytes_original": lambda v: _is_int(v) and v >= 0,
        "image_size": lambda v: _is_int(v) and v >= 1,
        "input_shape": lambda v: isinstance(v, list) and all(_is_int(d) and d >= 1 for d in v),
        "mean": lambda v: isinstance(v, list) and v and all(_is_real(x) for x in v),
        "std": lambda v: isinstance(v, list) and v and all(_is_real(x) and x > 0 for x in v),
    }
    for key, fits in checks.items():
        if meta.get(key) is not None and not fits(meta[key]):
            return f"meta entry {key!r} is {_shown(meta[key])}"
    return None


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _payload_problem(data: dict) -> str | None:
    """The first structural problem of a checkpoint dict (types of every entry the loader reads), or None."""
    if data.get("arch") is not None and not isinstance(data["arch"], str):
        return f"'arch' is a {type(data['arch']).__name__}, not a spec string"
    if not isinstance(data.get("dtype", "float32"), str) or data.get("dtype", "float32") not in DTYPES:
        return f"'dtype' is {_shown(data.get('dtype'))}; known: {', '.join(DTYPES)}"
    layers, state = data.get("layers"), data.get("state_dict")
    if not isinstance(layers, dict):
        return "'layers' is missing" if layers is None else f"'layers' is a {type(layers).__name__}, not a dict"
    if not isinstance(state, dict):
        return ("'state_dict' is missing" if state is None
                else f"'state_dict' is a {type(state).__name__}, not a dict")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            return f"state_dict entry {_shown(key)} is a {type(value).__name__}, not a tensor"
    for name, cfg in layers.items():
        problem = _layer_problem(str(name), cfg)
        if problem:
            return problem
    affines = data.get("batchnorm_affine", [])
    if not isinstance(affines, list) or not all(isinstance(n, str) and n for n in affines):
        return f"'batchnorm_affine' is {_shown(affines)}, not a list of layer names"
    return _meta_problem(data.get("meta"))


def _non_finite(state: dict[str, torch.Tensor]) -> tuple[str, str] | None:
    """(name, 'NaN' or 'Inf') of the first floating tensor that is not all finite, or None."""
    for key, t in state.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            return key, "NaN" if bool(torch.isnan(t).any()) else "Inf"
    return None


def _load_dict(path: str | os.PathLike) -> dict:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{path} is a directory, not a compressed checkpoint")
    if not p.is_file():
        raise UserError(f"no such file: {path}")
    try:
        return _read_safetensors(p) if looks_like_safetensors(p) else torch.load(p, map_location="cpu",
                                                                                 weights_only=True)
    except UserError:
        raise
    except Exception as e:  # corrupt, truncated, or not ours
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable sttp-compress checkpoint (corrupt or truncated?): "
                        f"{reason}") from None


def _read_safetensors(path: Path) -> dict:
    """The checkpoint dict of a safetensors file: its metadata's JSON fields decoded, its tensors the state dict."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    data: dict[str, Any] = {k: header.get(k) for k in ("format", "format_version", "tool_version", "dtype")}
    version = data["format_version"]
    data["format_version"] = int(version) if isinstance(version, str) and version.isdigit() else version
    data["arch"] = header.get("arch") or None
    for key in ("layers", "meta", "summary", "batchnorm_affine", "int8_scales_float32"):
        if key in header:
            try:
                data[key] = json.loads(header[key])
            except ValueError:
                raise UserError(f"{path} is a damaged sttp-compress checkpoint: metadata {key!r} is not JSON") from None
    wide = data.pop("int8_scales_float32", [])
    try:
        if not isinstance(wide, list) or not all(isinstance(n, str) for n in wide):
            raise ValueError(f"'int8_scales_float32' is {_shown(wide)}, not a list of tensor names")
        data["state_dict"] = unpack_scales(state, wide)
    except ValueError as exc:
        raise UserError(f"{path} is a damaged sttp-compress checkpoint: {exc}") from None
    return data


def load_compressed(path: str | os.PathLike, arch: str | None = None,
                    trust_arch: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild the compressed model from the file: from `arch` when given, else from the architecture the
    file records -- which is built on its own only when it is data (`recorded_arch_problem`): any recorded
    spec that would import or run code needs `trust_arch=True`.

    Returns (model in eval mode, float32, the checkpoint dict without its state_dict).
    """
    data = read_compressed(path)
    spec = arch or _recorded_arch(path, _found_hf(path, data.get("arch")), trust_arch)
    _check_hf_config(path, spec, data.get("meta") or {})
    model = resolve_arch(spec)
    try:
        attach_affines(model, data.get("batchnorm_affine", []))
    except ValueError as exc:
        raise UserError(f"architecture {spec} does not match {path}: {exc}") from None
    _attach_layers(model, data["layers"], spec, path)
    state = stored_state(data, path, model)
    _check_state_fits(model, state, spec, path)
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - custom _load_from_state_dict hooks may raise anything
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise UserError(f"architecture {spec} does not load the state of {path}: {reason}") from None
    model.float().eval()
    info = {k: v for k, v in data.items() if k != "state_dict"}
    return model, info


def stored_state(data: dict, path: str | os.PathLike, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The float32 state dict of a checkpoint dict (int8 storage dequantized; UserError if it does not fit).

    With `model` (the architecture with the file's layers attached), the zero-size tensors a format-3 file leaves
    out are added at the model's shapes, so that `model.load_state_dict` takes the result as it is."""
    state = data["state_dict"]
    if data.get("dtype") == "int8" or any(k.startswith(SCALES) for k in state):
        try:
            state = dequantize_state(state)
        except ValueError as exc:
            raise UserError(f"{path} is a damaged sttp-compress checkpoint: {exc}") from None
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    if model is not None:
        for key, want in model.state_dict().items():
            if key not in state and want.numel() == 0:
                state[key] = torch.empty(want.shape, dtype=torch.float32 if want.is_floating_point() else want.dtype)
    return state


def _recorded_arch(path: str | os.PathLike, spec: str | None, trust_arch: bool) -> str:
    """The recorded architecture spec, if it may be built: it is data, or the user trusts the file."""
    if not spec:
        raise UserError(f"{path} does not record an architecture; pass ‹arch› SPEC")
    problem = recorded_arch_problem(spec)
    if problem and not trust_arch:
        raise UserError(f"{path} records the architecture {spec!r}, which is not used on its own because "
                        f"{problem}: pass ‹arch› SPEC to give the architecture yourself, or ‹trust_arch› to "
                        "build the recorded one if you trust the file")
    return spec


def _found_hf(path: str | os.PathLike, spec: str | None) -> str | None:
    """A recorded `hf:NAME` (a folder's name) as the folder of that name in the working directory or beside the
    checkpoint, whichever exists; UserError naming the fix when neither does. Other specs pass unchanged."""
    folder = hf_folder(spec)
    if folder is None or folder.is_absolute():  # format 1 recorded absolute folders
        return spec
    for base in (Path.cwd(), Path(path).absolute().parent):
        if (base / folder).is_dir():
            return HF_PREFIX + str(base / folder)
    raise UserError(f"{path} was made from the Hugging Face model folder {folder.name!r}, which is neither in the "
                    "working directory nor beside the checkpoint: pass ‹arch› hf:DIR naming that folder")


def _check_hf_config(path: str | os.PathLike, spec: str, meta: dict) -> None:
    """An `hf:DIR` model must be the one the checkpoint was made from: same config.json (when recorded)."""
    folder, want = hf_folder(spec), meta.get("hf_config_sha256")
    if folder is None or not isinstance(want, str):
        return
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(f"{path} was made from a Hugging Face model folder named {folder.name!r}; "
                        f"{folder} has no config.json here: pass ‹arch› hf:DIR with that model's folder")
    if _sha256(config) != want:
        raise UserError(f"{config} is not the config.json that {path} was made with (SHA-256 differs): "
                        "pass ‹arch› hf:DIR with the original model's folder")


def _attach_layers(model: nn.Module, layers: dict, spec: str, path: str | os.PathLike) -> None:
    """Give each recorded layer its STTP/SVDP structure (no TT-SVD), checking it exists with that shape."""
    modules = named_layers(model)
    for name, cfg in layers.items():
        m = modules.get(name)
        W = weight_of(m) if m is not None and hasattr(m, weight_name(m)) else None
        if W is None or tuple(W.shape) != tuple(cfg["weight_shape"]):
            found = "missing" if W is None else f"shape {list(W.shape)}"
            raise UserError(f"architecture {spec} does not match {path}: layer {name} is {found}, "
                            f"the checkpoint has {cfg['weight_shape']}")
        try:
            attach_structure(m, cfg)
        except (ValueError, TypeError, RuntimeError) as exc:
            reason = " ".join(str(exc).split())[:160] or type(exc).__name__
            raise UserError(f"{path}: layer {name}'s recorded structure cannot be rebuilt: {reason}") from None


def _check_state_fits(model: nn.Module, state: dict, spec: str, path: str | os.PathLike) -> None:
    """Refuse a state dict whose keys or shapes disagree with the rebuilt model, naming the first few."""
    expected = model.state_dict()
    miss = [k for k in expected if k not in state]
    unexp = [k for k in state if k not in expected]
    if miss or unexp:
        raise UserError(f"architecture {spec} does not match {path}: {len(miss)} missing "
                        f"({', '.join(miss[:3])}), {len(unexp)} unexpected ({', '.join(unexp[:3])})")
    for key, want in expected.items():
        if tuple(state[key].shape) != tuple(want.shape):
            raise UserError(f"{path}: tensor {key} has shape {list(state[key].shape)}, but its layer's "
                            f"recorded structure needs {list(want.shape)} (a damaged or edited checkpoint)")
