"""Walk a model, pick layers, convert them to STTP/SVDP parametrizations, and undo it.

The Python API in a nutshell::

    layers = compress(model, rank=32)              # in place; returns {name: SpectralTT}
    count_parameters(model)                        # what training sees (= Σ DOF + the rest)
    decompress(model)                              # back to plain modules with the current weights
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from .layers import SUPPORTED, SpectralTT, is_parametrized, weight_kind

__all__ = ["compress_module", "compress", "decompress", "count_parameters", "candidate_layers",
           "compressed_layers", "parametrization"]


def compress_module(module: nn.Module, rank: int, method: str = "sttp", spectrum: str = "free") -> SpectralTT:
    """Register an STTP (or SVDP) parametrization on `module.weight`, converted by TT-SVD."""
    kind = weight_kind(module)
    if is_parametrized(module):
        raise ValueError(f"{type(module).__name__} is already compressed")
    p = SpectralTT(kind, tuple(module.weight.shape), rank, method, spectrum).to(module.weight.device)
    parametrize.register_parametrization(module, "weight", p)
    return p


def parametrization(module: nn.Module) -> SpectralTT:
    """The SpectralTT parametrization on a compressed module."""
    return next(p for p in module.parametrizations.weight if isinstance(p, SpectralTT))


def candidate_layers(model: nn.Module, include: Iterable[str] | None = None,
                     exclude: Iterable[str] | None = None,
                     keep_first_last: bool = True) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Split the model's weight layers into candidates and skipped ones (with the reason).

    Candidates: Linear, ConvNd, ConvTransposeNd (groups == 1), Embedding. By default the first
    convolution and the last Linear (the classifier) stay dense, the paper's practice; `include`
    globs (on module names) select candidates explicitly and override that rule; `exclude` globs
    always win.
    """
    include, exclude = list(include or []), list(exclude or [])
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SUPPORTED) and n]
    first_conv = next((n for n, m in layers if not isinstance(m, (nn.Linear, nn.Embedding))), None)
    last_linear = next((n for n, m in reversed(layers) if isinstance(m, nn.Linear)), None)
    chosen, skipped = {}, {}
    for name, m in layers:
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            skipped[name] = "excluded by --exclude"
        elif include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            skipped[name] = "not matched by --include"
        elif not include and keep_first_last and name == first_conv:
            skipped[name] = "first convolution kept dense"
        elif not include and keep_first_last and name == last_linear:
            skipped[name] = "final classifier kept dense"
        elif is_parametrized(m):
            skipped[name] = "already compressed"
        else:
            try:
                weight_kind(m)
                chosen[name] = m
            except ValueError as e:
                skipped[name] = str(e)
    return chosen, skipped


def compress(model: nn.Module, rank: int | Mapping[str, int], method: str = "sttp",
             spectrum: str = "free", include: Iterable[str] | None = None,
             exclude: Iterable[str] | None = None, keep_first_last: bool = True) -> dict[str, SpectralTT]:
    """Convert the model's eligible layers in place at one rank, or per-layer ranks {name: rank}.

    With a mapping, exactly the named layers are converted. A layer whose DOF would not be smaller
    than its dense weight is left dense. Returns {name: parametrization} of the converted layers.
    """
    if isinstance(rank, Mapping):
        modules = dict(model.named_modules())
        missing = [n for n in rank if n not in modules]
        if missing:
            raise ValueError(f"no such layers: {', '.join(missing[:3])}")
        targets = {n: (modules[n], r) for n, r in rank.items()}
    else:
        chosen, _ = candidate_layers(model, include, exclude, keep_first_last)
        targets = {n: (m, rank) for n, m in chosen.items()}
    out = {}
    for name, (m, r) in targets.items():
        probe = SpectralTT(weight_kind(m), tuple(m.weight.shape), r, method, spectrum)
        if probe.dof() >= m.weight.numel():
            continue
        out[name] = compress_module(m, r, method, spectrum)
    return out


def compressed_layers(model: nn.Module) -> dict[str, SpectralTT]:
    """{name: parametrization} of every compressed layer in the model."""
    return {n: parametrization(m) for n, m in model.named_modules() if is_parametrized(m)}


def decompress(model: nn.Module) -> nn.Module:
    """Replace every STTP/SVDP parametrization by a plain weight holding its current value."""
    for m in list(model.modules()):
        if is_parametrized(m):
            # outside no_grad: parametrize re-registers the weight as a Parameter only when the
            # value it reads requires grad
            with torch.enable_grad():
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            if not isinstance(m.weight, nn.Parameter):  # frozen originals: keep a Parameter anyway
                w = m.weight
                del m.weight
                m.weight = nn.Parameter(w.detach(), requires_grad=False)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter values (a compressed layer counts its DOF, not its dense weight)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
