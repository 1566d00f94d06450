"""Loading checkpoints and architectures, and writing outputs safely.

Everything that can go wrong because of what the user typed or pointed at is turned
into a one-line :class:`~sttp_compress.errors.UserError`; anything else is a bug and
propagates unchanged.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import os
from collections import OrderedDict
import pickle
import re
import sys
import uuid
import warnings
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sttp_compress.errors import UserError
from sttp_compress.io.specs import HF_PREFIX, hf_folder

__all__ = [
    "load_weights",
    "resolve_arch",
    "recorded_arch_problem",
    "load_model",
    "parse_size",
    "looks_like_safetensors",
]

# Wrapper keys of training checkpoints, in the order they are tried.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MAX_REASON = 160
# What code named by an --arch spec may raise, beyond Exception: exit() and a stray KeyboardInterrupt
# (under the CLI a real Ctrl-C arrives as errors.Interrupted, which is not caught here).
_USER_CODE_ERRORS = (Exception, SystemExit, KeyboardInterrupt)


# --------------------------------------------------------------------------- helpers


def _one_line(text: str, limit: int | None = None) -> str:
    """Collapse whitespace and strip terminal colours so a message fits on one line."""
    text = " ".join(_ANSI.sub("", str(text)).split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text


def _fail(message: str) -> UserError:
    """Build a UserError whose message is guaranteed to be a single line."""
    return UserError(_one_line(message))


def _reason(exc: BaseException) -> str:
    """Describe an exception briefly (type and first words) for the end of a message."""
    text = _one_line(str(exc))
    # torch wraps the real cause in paragraphs of advice; keep only the cause.
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
    if len(text) > _MAX_REASON and ". " in text:
        text = text.split(". ", 1)[0]
    text = _one_line(text, _MAX_REASON)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _join_first(items: list[str], n: int = 3) -> str:
    """Join up to n items with commas, adding '...' when some are left out."""
    shown = ", ".join(items[:n])
    return shown + (", ..." if len(items) > n else "")


# --------------------------------------------------------------------------- load_weights


def _check_readable(path: Path, shown: str) -> None:
    """Fail early, in plain words, when the path is missing, a folder, empty or unreadable."""
    if not path.exists():
        raise _fail(f"no such file: {shown}")
    if path.is_dir():
        raise _fail(f"{shown} is a directory, not a checkpoint file")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise _fail(f"cannot read {shown}: {exc.strerror or exc}") from exc
    if size == 0:
        raise _fail(f"{shown} is empty, not a readable PyTorch or safetensors checkpoint")


def looks_like_safetensors(path: Path) -> bool:
    """Sniff the safetensors layout: an 8-byte little-endian header length, then '{'."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = path.stat().st_size
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") <= size - 8


def _pickled_code_hint(exc: BaseException) -> str | None:
    """Say which Python object a weights-only load refused, or None if the file is just corrupt."""
    texts = [str(exc)]
    if exc.__cause__ is not None:
        texts.append(str(exc.__cause__))
    text = " ".join(texts)
    match = re.search(r"GLOBAL ([A-Za-z_][\w.]*) (?:was not an allowed|whose module)", text)
    if match:
        return match.group(1)
    for marker in ("Can only build", "Can only create new object", "Trying to call reduce"):
        if marker in text:
            return "a Python object"
    return None


def _not_readable(shown: str, exc: BaseException) -> UserError:
    """The error for a file that neither torch nor safetensors can parse."""
    return _fail(f"{shown} is not a readable PyTorch or safetensors checkpoint "
                 f"(corrupt or truncated?): {_reason(exc)}")


def _torch_load(path: Path, shown: str, trust_pickle: bool) -> Any:
    """Run torch.load on CPU, translating every failure into a UserError that says what to do."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Detected pickle protocol.*")
            warnings.filterwarnings("ignore", message=".*TorchScript.*")
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        culprit = None if trust_pickle else _pickled_code_hint(exc)
        if culprit is None:
            raise _not_readable(shown, exc) from exc
        raise _fail(
            f"{shown} holds pickled Python code ({culprit}), not just tensors, and loading it "
            f"could run arbitrary code: save a plain state_dict "
            f"(torch.save(model.state_dict(), path)) and pass ‹arch› SPEC, "
            f"or pass ‹trust_pickle› if you trust the file"
        ) from exc
    except (ModuleNotFoundError, AttributeError) as exc:
        if not trust_pickle:
            raise _not_readable(shown, exc) from exc
        raise _fail(
            f"{shown} holds a pickled model whose Python code cannot be imported "
            f"({_reason(exc)}); run from the project that defines it, or save a "
            f"state_dict and pass ‹arch› SPEC"
        ) from exc
    except RuntimeError as exc:
        if "TorchScript" in str(exc):
            raise _torchscript_error(shown) from exc
        raise _not_readable(shown, exc) from exc
    except Exception as exc:  # noqa: BLE001 - corrupt pickles raise almost anything
        raise _not_readable(shown, exc) from exc


def _torchscript_error(shown: str) -> UserError:
    """The error for TorchScript archives, which cannot be rewritten module by module."""
    return _fail(
        f"{shown} is a TorchScript archive, which cannot be compressed: save the eager "
        f"model's state_dict (torch.save(model.state_dict(), path)) and pass ‹arch› SPEC"
    )


def _is_tensor_mapping(obj: Any) -> bool:
    """True for a non-empty mapping of string keys to tensors, i.e. a state dict."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove a DataParallel/DDP 'module.' (or torch.compile '_orig_mod.') prefix shared by all keys."""
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if state and all(k.startswith(prefix) and len(k) > len(prefix) for k in state):
                state = _keeping_metadata({k[len(prefix):]: v for k, v in state.items()}, state, prefix)
                changed = True
    return state


def _keeping_metadata(state: Mapping, source: Any, prefix: str = "") -> dict:
    """`state` as an OrderedDict carrying `source`'s `_metadata` (the per-module versions that state_dict() records
    and some modules' loading reads, e.g. torchvision's MNASNet), its keys without `prefix`."""
    metadata = getattr(source, "_metadata", None)
    out = OrderedDict(state)
    if isinstance(metadata, Mapping):
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            (k[len(prefix):] if k.startswith(prefix) else ("" if k == prefix.rstrip(".") else k), v)
            for k, v in metadata.items())
    return out


def _unwrap(obj: Any, shown: str) -> dict[str, torch.Tensor] | nn.Module:
    """Find the state dict (or module) inside what torch.load returned."""
    if isinstance(obj, nn.Module):
        return obj
    if not isinstance(obj, Mapping):
        raise _fail(f"{shown} holds a {type(obj).__name__}, not a state_dict or model")
    if not obj:
        raise _fail(f"{shown} holds an empty dict, no weights")
    if _is_tensor_mapping(obj):
        return _keeping_metadata(obj, obj)
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, nn.Module):
            return inner
        if _is_tensor_mapping(inner):
            return _keeping_metadata(inner, inner)
    candidates = [str(k) for k, v in obj.items() if _is_tensor_mapping(v)]
    keys = [str(k) for k in obj]
    if candidates:
        raise _fail(
            f"{shown} holds a dict with no 'state_dict' or 'model' entry; entries that look "
            f"like state dicts: {_join_first(candidates, 5)}; re-save the one you want, e.g. "
            f"torch.save(ckpt['{candidates[0]}'], 'weights.pt')"
        )
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    raise _fail(
        f"{shown} holds a dict that is not a state_dict: {len(bad)} non-tensor entries "
        f"({_join_first([str(k) for k in bad])}) and no 'state_dict' or 'model' entry "
        f"(top-level keys: {_join_first(keys, 6)})"
    )


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Upcast floating tensors narrower than 32 bits (fp16, bf16, fp8) to float32; leave others."""
    t = t.detach()
    if t.is_floating_point() and t.element_size() < 4:
        return t.float()
    return t


def _check_finite(items: Any, shown: str) -> None:
    """Refuse weights with NaN or Inf, naming the first offending tensor."""
    for key, t in items:
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            what = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise _fail(f"{shown}: tensor '{key}' contains {what} values; the checkpoint "
                        f"is broken (diverged training or a bad conversion?)")


def _prepare_module(model: nn.Module, shown: str) -> nn.Module:
    """Reject TorchScript, upcast half weights to float32 and check for NaN/Inf."""
    if isinstance(model, torch.jit.ScriptModule):
        raise _torchscript_error(shown)
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.is_floating_point() and t.element_size() < 4 for t in tensors):
        model = model.float()
    _check_finite(model.state_dict().items(), shown)
    return model


def load_weights(
    path: str | os.PathLike, trust_pickle: bool = False
) -> dict[str, torch.Tensor] | nn.Module:
    """Load a checkpoint as a float32 state dict (or a module, if trusted) so every format looks alike."""
    p = Path(path)
    shown = str(path)
    _check_readable(p, shown)
    if p.suffix.lower() == ".safetensors" or looks_like_safetensors(p):
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(p), device="cpu")
        except Exception as exc:  # noqa: BLE001 - SafetensorError and friends
            raise _not_readable(shown, exc) from exc
    else:
        obj = _torch_load(p, shown, trust_pickle)
    result = _unwrap(obj, shown)
    if isinstance(result, nn.Module):
        return _prepare_module(result, shown)
    state = _strip_prefixes(_keeping_metadata({k: _upcast(v) for k, v in result.items()}, result))
    _check_finite(state.items(), shown)
    return state


# --------------------------------------------------------------------------- resolve_arch


def _parse_kwargs(query: str, spec: str) -> dict[str, Any]:
    """Parse 'a=1&b=x' into keyword arguments, values via ast.literal_eval or kept as strings."""
    kwargs: dict[str, Any] = {}
    for part in query.split("&"):
        if not part:
            continue
        key, eq, raw = part.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise _fail(f"bad ‹arch› {spec!r}: expected key=value after '?', got {part!r}")
        if key in kwargs:
            raise _fail(f"bad ‹arch› {spec!r}: keyword {key!r} given twice")
        raw = raw.strip()
        try:
            kwargs[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            kwargs[key] = raw
    return kwargs


def _split_spec(spec: str) -> tuple[str, str, dict[str, Any]]:
    """Split 'module:factory?k=v' into its module part, factory path and kwargs."""
    target, _, query = spec.strip().partition("?")
    module, colon, factory = target.rpartition(":")
    module, factory = module.strip(), factory.strip()
    if not colon or not module or not factory:
        raise _fail(
            f"bad ‹arch› {spec!r}: expected MODULE:FACTORY, e.g. torchvision:resnet18, "
            f"mypkg.models:build or path/to/model.py:build"
        )
    if not all(part.isidentifier() for part in factory.split(".")):
        raise _fail(f"bad ‹arch› {spec!r}: {factory!r} is not a Python name")
    return module, factory, _parse_kwargs(query, spec)


def _is_file_spec(module: str) -> bool:
    """Decide whether the module part names a .py file rather than an importable module."""
    return module.endswith(".py") or "/" in module or os.sep in module


def _build_torchvision(name: str, kwargs: dict[str, Any], spec: str) -> Any:
    """Build a torchvision model by name with weights=None unless the user asked otherwise."""
    try:
        import torchvision.models as tvm
    except Exception as exc:  # noqa: BLE001
        raise _fail(f"bad ‹arch› {spec!r}: cannot import torchvision ({_reason(exc)})") from exc
    known = tvm.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise _fail(f"bad ‹arch› {spec!r}: torchvision has no model {name!r}{hint}")
    kwargs = {"weights": None, **kwargs}
    try:
        return tvm.get_model(name, **kwargs)
    except _USER_CODE_ERRORS as exc:  # the factory may raise anything
        raise _fail(f"bad ‹arch› {spec!r}: building torchvision {name} failed: {_reason(exc)}") from exc


def _import_module(module: str, spec: str) -> Any:
    """Import a module by dotted name, telling a missing module apart from one that fails."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            raise _fail(f"bad ‹arch› {spec!r}: no module named {exc.name!r}") from exc
        raise _fail(f"bad ‹arch› {spec!r}: importing {module} failed: {_reason(exc)}") from exc
    except _USER_CODE_ERRORS as exc:  # module code may raise anything
        raise _fail(f"bad ‹arch› {spec!r}: importing {module} failed: {_reason(exc)}") from exc


def _get_attr(obj: Any, dotted: str, where: str, spec: str) -> Any:
    """Follow a dotted attribute path, naming the missing piece on failure."""
    for part in dotted.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise _fail(f"bad ‹arch› {spec!r}: {where} has no attribute {dotted!r}") from exc
    return obj


def _call_factory(factory: Any, name: str, kwargs: dict[str, Any], spec: str) -> nn.Module:
    """Call the factory (or accept a ready module) and check the result is an nn.Module."""
    if isinstance(factory, nn.Module) and not kwargs:
        return factory
    if not callable(factory):
        raise _fail(f"bad ‹arch› {spec!r}: {name} is a {type(factory).__name__}, not callable")
    try:
        model = factory(**kwargs)
    except _USER_CODE_ERRORS as exc:  # the factory may raise anything
        raise _fail(f"bad ‹arch› {spec!r}: calling {name} failed: {_reason(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise _fail(f"bad ‹arch› {spec!r}: {name} returned a {type(model).__name__}, "
                    f"not a torch.nn.Module")
    return model


def _build_from_file(file: str, factory: str, kwargs: dict[str, Any], spec: str) -> nn.Module:
    """Execute a .py file as a fresh module (its folder first on sys.path) and call its factory."""
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise _fail(f"bad ‹arch› {spec!r}: no such file: {file}")
    stem = re.sub(r"\W", "_", path.stem)
    name = f"_sttp_arch_{stem}_{uuid.uuid4().hex[:8]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise _fail(f"bad ‹arch› {spec!r}: cannot load {file} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    saved_path = list(sys.path)
    sys.path.insert(0, str(path.parent))
    sys.modules[name] = module
    ok = False
    try:
        try:
            module_spec.loader.exec_module(module)
        except _USER_CODE_ERRORS as exc:  # user code may raise anything
            raise _fail(f"bad ‹arch› {spec!r}: running {file} failed: {_reason(exc)}") from exc
        obj = _get_attr(module, factory, file, spec)
        model = _call_factory(obj, factory, kwargs, spec)
        ok = True
        return model
    finally:
        sys.path[:] = saved_path
        if not ok:
            sys.modules.pop(name, None)


def resolve_arch(spec: str) -> nn.Module:
    """Build an architecture from 'torchvision:NAME', 'pkg.mod:factory', 'file.py:factory' (untrained), or
    'hf:DIR' (a local Hugging Face model folder, with its weights, offline; see io/hf.py)."""
    folder = hf_folder(spec)
    if folder is not None:
        from sttp_compress.io.hf import load_encoder

        return load_encoder(folder)
    module, factory, kwargs = _split_spec(spec)
    if module == "torchvision" and "." not in factory:
        model = _build_torchvision(factory, kwargs, spec)
        if not isinstance(model, nn.Module):
            raise _fail(f"bad ‹arch› {spec!r}: torchvision returned a {type(model).__name__}")
        return model
    if _is_file_spec(module):
        return _build_from_file(module, factory, kwargs, spec)
    mod = _import_module(module, spec)
    obj = _get_attr(mod, factory, f"module {module}", spec)
    return _call_factory(obj, factory, kwargs, spec)


# Architectures of this package that a recorded spec may name on its own (they only build a network).
BUILTIN_ARCHS = frozenset({"sttp_compress.example:DigitsCNN"})


def recorded_arch_problem(spec: Any) -> str | None:
    """Why building a spec read from a file would not be safe, or None when it is plain data.

    Data: `torchvision:NAME` with literal arguments and no weights (nothing imported beyond torchvision,
    nothing downloaded), one of this package's BUILTIN_ARCHS (the example's network), or `hf:DIR` naming a
    local folder (loaded offline, without remote code). Any other
    spec imports or runs code that the file names, so it needs the user's word before it is built.
    """
    if not isinstance(spec, str) or not spec.strip():
        return "it is not an architecture spec"
    if spec.strip().startswith(HF_PREFIX):
        folder = hf_folder(spec) if spec.strip() != HF_PREFIX else None
        return None if folder is not None and folder.is_dir() else f"its folder {folder} does not exist on this machine"
    try:
        module, factory, kwargs = _split_spec(spec)
    except UserError:
        return "it is not a well-formed MODULE:FACTORY spec"
    if f"{module}:{factory}" in BUILTIN_ARCHS:
        return None
    if module != "torchvision" or "." in factory:
        return "building it imports and runs the Python code it names"
    if any("weights" in key.lower() for key in kwargs):
        return "it asks torchvision for pretrained weights, which may be downloaded"
    return None


# --------------------------------------------------------------------------- load_model


def _shape(t: torch.Tensor) -> str:
    """Format a shape as '[a, b, c]' for messages."""
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _mismatch(state: Mapping[str, torch.Tensor], model: nn.Module, arch: str) -> str | None:
    """Describe how a state dict fails to fit a model (missing/unexpected/mis-shaped), or None."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = []
    for k, want in expected.items():
        if k not in state or isinstance(want, nn.parameter.UninitializedTensorMixin):
            continue
        got = state[k]
        if tuple(got.shape) != tuple(want.shape):
            misshaped.append(f"{k}: checkpoint {_shape(got)} vs model {_shape(want)}")
    if not (missing or unexpected or misshaped):
        return None
    parts = []
    for count_list, label in ((missing, "missing"), (unexpected, "unexpected"),
                              (misshaped, "mis-shaped")):
        if count_list:
            parts.append(f"{len(count_list)} {label} ({_join_first(count_list)})")
    return f"checkpoint does not match ‹arch› {arch}: " + ", ".join(parts)


def load_model(
    path: str | os.PathLike, arch: str | None = None, trust_pickle: bool = False
) -> nn.Module:
    """Load a float32 model in eval mode from a checkpoint, building it from --arch if it is a state dict."""
    obj = load_weights(path, trust_pickle=trust_pickle)
    if isinstance(obj, nn.Module):
        return obj.eval()
    if arch is None:
        raise _fail(
            f"{path} is a state_dict (weights only, no architecture): pass ‹arch› SPEC, "
            f"e.g. ‹arch› torchvision:resnet18 or ‹arch› path/to/model.py:build"
        )
    model = resolve_arch(arch)
    problem = _mismatch(obj, model, arch)
    if problem:
        raise _fail(problem)
    try:
        model.load_state_dict(obj, strict=True)
    except Exception as exc:  # noqa: BLE001 - custom _load_from_state_dict hooks
        raise _fail(f"checkpoint does not load into ‹arch› {arch}: {_reason(exc)}") from exc
    return model.float().eval()


# --------------------------------------------------------------------------- parse_size

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6,
    "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20,
    "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}
_SIZE = re.compile(r"\s*((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*")


def parse_size(text: str) -> int:
    """Parse a byte size like '5MB', '4.5MiB' or '123' (units case-insensitive) for --max-size."""
    match = _SIZE.fullmatch(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise _fail(
            f"invalid size {text!r}: expected a number with an optional unit "
            f"(B, kB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 5MB or 4.5MiB"
        )
    size = int(Fraction(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise _fail(f"invalid size {text!r}: must be at least 1 byte")
    return size
