"""int8 storage of a compressed checkpoint: symmetric block-wise quantization, dequantized on load.

Every floating tensor of two or more dimensions is stored as int8, each row (its first dimension: one frame's
packed Householder vectors for an STTP layer's group originals, one output channel of a layer that stays
dense) in blocks of BLOCK values with one scale each, a float16 one (float32 for a tensor whose scales
float16's normal range does not hold).
Vectors (biases, norms, BatchNorm statistics) are stored in float16 when it keeps the vector to its own
precision as a whole (‖v₁₆ − v‖ ≤ 2^-11 ‖v‖: tiny entries beside large ones may go subnormal), a compressed
layer's spectra σ and row/column scales when float16 keeps each value to EACH_PRECISION of itself; else float32:
not int8, since σ carries each direction's magnitude, which a shared int8 scale would round away for the small
ones, while float16 keeps each value of its normal range to 2^-11 of itself.

Rounding the reflector vectors keeps every frame exactly orthonormal: a Householder reflector
I − 2hhᵀ/‖h‖² is orthogonal for any nonzero h, so only the directions move (method notes §2).

In the state, a quantized tensor `name` is int8 under its own name, its scales (rows, blocks) under
`SCALES + name`; the checkpoint's `dtype` is "int8". `dequantize_state` undoes it before loading. A safetensors
file (format 4) stores the scales of every matrix in one tensor per scale dtype (`pack_scales`): a header
entry costs ~120 bytes, and MobileNetV2's int8 file had 184 of them (23 kB of 338 kB) for 6.7 kB of scales.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sttp_compress.compress.convert import named_layers, parametrization
from sttp_compress.core.forms import layer_originals
from sttp_compress.core.spectral_tt import is_parametrized

__all__ = ["SCALES", "PACKED", "pack_scales", "unpack_scales", "stored_in_int8", "in_float16_range", "float16_keeps", "float16_keeps_each", "quantize_state", "dequantize_state", "quantize_rows", "dequantize_rows", "storage_errors"]

SCALES = "__int8_scale__."  # prefix of the block-scale tensors (rows, blocks) in the state
PACKED = "__int8_scales__."  # + "float16" / "float32": the block scales of every matrix, flat, in a file (format 4)
PARAMETRIZED = ".parametrizations."  # in the names of a compressed layer's originals (torch.nn.utils.parametrize)
QMAX = 127
# values per scale: a block of 64 Gaussian-like values has absmax ≈ 2.4 rms, so rounding costs ~0.55% (rms,
# relative) where one scale per 10,000-value row of reflectors cost 1% (absmax ≈ 4.5 rms); float16 scales
# add 1/32 to the int8 bytes (float32 ones 1/16); rounded against its float16 scale (within 2^-11 of absmax/127),
# a block's largest value is still within half a step of its int8 value (127·(1 + 2^-11) < 127.5)
BLOCK = 64
# float16 holds a value to 2^-11 of itself between its smallest normal number and its largest
FLOAT16_RANGE = (torch.finfo(torch.float16).tiny, torch.finfo(torch.float16).max)
# what float16 may cost each value of a compressed layer's own vectors: 2^-11 in its normal range, down to 2^-9 for
# the subnormals near it (a row scale of 3e-5 among 30,522 near 0.5 kept MiniLM's whole vector float32, 61 kB); the
# int8 matrices the vectors scale are rounded to ~2^-8 of their blocks' largest values (rms), and a float16 file
# stores every subnormal
EACH_PRECISION = 2 ** -9


def _scale_shape(q: Tensor) -> tuple[int, int]:
    """(rows, blocks a row) of an int8 tensor's block scales: BLOCK values a scale in each row."""
    return q.shape[0], -(-math.prod(q.shape[1:]) // BLOCK)


def _blocks(rows: Tensor) -> Tensor:
    """(rows, n) → (rows, ⌈n/BLOCK⌉, BLOCK), the last block zero-padded."""
    pad = -rows.shape[1] % BLOCK
    return torch.nn.functional.pad(rows, (0, pad)).reshape(rows.shape[0], -1, BLOCK)


def quantize_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 values shaped like t, scales (rows, ⌈n/BLOCK⌉)): each row (t's first dimension, the rest flattened)
    in blocks of BLOCK values, each block with its own scale absmax/127 (1 for an all-zero block), in float16
    when every scale is within its normal range, else float32. The values are rounded against the stored
    scale, so `dequantize_rows` gives back exactly what a loaded checkpoint holds."""
    rows = t.detach().float().reshape(t.shape[0], -1)
    blocks = _blocks(rows)
    scale = blocks.abs().amax(dim=2) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if in_float16_range(scale):  # each scale to 2^-11: the half-step bound above holds in every block
        scale = scale.half()
    q = torch.round(blocks / scale.float()[..., None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q.reshape(rows.shape[0], -1)[:, :rows.shape[1]].reshape(t.shape), scale


def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    """float32 values of int8 `q` with the block scales of `quantize_rows`."""
    rows = q.float().reshape(q.shape[0], -1)
    return (_blocks(rows) * scale.float()[..., None]).reshape(q.shape[0], -1)[:, :rows.shape[1]].reshape(q.shape)


def stored_in_int8(t: Tensor) -> bool:
    """Whether an int8 checkpoint stores `t` in int8: floating, two or more dimensions, not empty."""
    return t.is_floating_point() and t.dim() >= 2 and t.numel() > 0


def in_float16_range(t: Tensor) -> bool:
    """Whether float16 holds every value of t to 2^-11 of itself: finite, and each nonzero magnitude between its
    smallest normal number and its largest (the rule for block scales: each one scales its own block)."""
    a = t.detach().float().abs()
    nonzero = a[a > 0]
    return bool(torch.isfinite(a).all()) and (nonzero.numel() == 0 or (
        FLOAT16_RANGE[0] <= float(nonzero.min()) and float(nonzero.max()) <= FLOAT16_RANGE[1]))


def _float16_holds(a: Tensor) -> bool:
    """Finite, and no magnitude above float16's largest number (what both float16 rules ask first)."""
    return bool(torch.isfinite(a).all()) and not (a.numel() and float(a.abs().max()) > FLOAT16_RANGE[1])


def float16_keeps_each(t: Tensor, precision: float = EACH_PRECISION) -> bool:
    """Whether float16 keeps every value of t to `precision` of itself: finite, none above its largest number,
    and |v₁₆ − v| ≤ precision·|v| for each value (zeros stay zero; a value that float16 rounds to 0 fails)."""
    a = t.detach().float()
    return _float16_holds(a) and bool(((a.half().float() - a).abs() <= precision * a.abs()).all())


def float16_keeps(t: Tensor) -> bool:
    """Whether float16 holds the tensor t as a whole to its own precision: finite, no magnitude above its largest
    number, and ‖t₁₆ − t‖ ≤ 2^-11 ‖t‖. Tiny entries beside large ones may go subnormal (a dead channel's
    BatchNorm variance of 1e-7 next to variances near 1: an absolute error of at most 3e-8, far below the
    BatchNorm's eps); a tensor made only of tiny values keeps float32."""
    a = t.detach().float()
    return _float16_holds(a) and (float(torch.linalg.vector_norm(a.half().float() - a))
                                  <= 2 ** -11 * float(torch.linalg.vector_norm(a)))


def quantize_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state dict as stored in int8: matrices as int8 with their block scales under SCALES + name, other
    floating tensors in float16 where `float16_keeps` them, else float32, and the rest unchanged. A compressed
    layer's own vectors (spectrum σ, row scales ρ, column scales γ) keep the value-wise rule (`float16_keeps_each`):
    W = diag(ρ)·U Σ Vᵀ·diag(γ) can pair a small ρ_i or γ_j with a large row or column (ρ = 1/√w, γ = 1/√c: the
    heavily weighted rows and columns have the small scales), so each of their values needs its own precision."""
    out: dict[str, Tensor] = {}
    for key, t in state.items():
        if stored_in_int8(t):
            out[key], out[SCALES + key] = quantize_rows(t)
        elif t.is_floating_point():
            keeps = float16_keeps_each(t) if PARAMETRIZED in key else float16_keeps(t)
            out[key] = t.detach().half() if keeps else t.detach().float()
        else:
            out[key] = t.detach()
    return out


def dequantize_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The float32 state dict of a stored int8 one (ValueError when a scale or its tensor is missing or
    does not fit)."""
    out: dict[str, Tensor] = {}
    for key, t in state.items():
        if key.startswith(SCALES):
            if key[len(SCALES):] not in state:
                raise ValueError(f"scale {key!r} has no tensor")
            continue
        scale = state.get(SCALES + key)
        if t.dtype == torch.int8:
            if scale is None or t.dim() < 1 or tuple(scale.shape) != _scale_shape(t):
                raise ValueError(f"int8 tensor {key!r} has no fitting per-row scale")
            if not bool(torch.isfinite(scale).all()):
                raise ValueError(f"int8 tensor {key!r} has a scale that is not finite")
            out[key] = dequantize_rows(t, scale)
        else:
            out[key] = t.float() if t.is_floating_point() else t
    return out


@torch.no_grad()
def storage_errors(model: nn.Module, stored: dict[str, Tensor]) -> dict[str, float]:
    """{compressed layer: ‖W_stored − W‖ / ‖W‖}, W built from the model's parameters and W_stored from the
    same parameters as the file stores them (int8 dequantized, or rounded to float16/bfloat16; a zero-size one
    the file leaves out is taken from the model)."""
    state = dequantize_state(stored)
    keys = {id(v): k for k, v in model.state_dict(keep_vars=True).items()}
    errors = {}
    for name, m in named_layers(model).items():
        if not is_parametrized(m):
            continue
        p = parametrization(m)
        originals = layer_originals(m, p)
        W = p(*originals).double()
        # a format-3 file leaves zero-size originals out: nothing to round there
        Wq = p(*(o if o.numel() == 0 and keys[id(o)] not in state else state[keys[id(o)]].to(o.device, o.dtype)
                 for o in originals)).double()
        errors[name] = float((Wq - W).norm() / W.norm().clamp_min(1e-30))
    return errors


def pack_scales(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """A stored int8 state with its per-matrix scales (SCALES + name) concatenated into PACKED + "float16" and
    PACKED + "float32" (each matrix's scales keep their dtype), in the order of the matrices' names; returns it and
    the names of the matrices whose scales are float32 (`unpack_scales` needs them)."""
    out = {k: v for k, v in state.items() if not k.startswith(SCALES)}
    names = sorted(k[len(SCALES):] for k in state if k.startswith(SCALES))
    wide = [n for n in names if state[SCALES + n].dtype != torch.float16]
    for dtype, members in (("float16", sorted(set(names) - set(wide))), ("float32", wide)):
        if members:
            out[PACKED + dtype] = torch.cat([state[SCALES + n].reshape(-1) for n in members]).to(getattr(torch, dtype))
    return out, wide


def unpack_scales(state: dict[str, Tensor], wide: list[str]) -> dict[str, Tensor]:
    """The state of `pack_scales` with each matrix's scales under SCALES + name again: every int8 tensor takes its
    blocks' scales, in name order, from PACKED + "float32" if it is named in `wide`, else from PACKED + "float16".
    ValueError when the packed scales do not fit the int8 matrices. A state without packed scales is returned
    unchanged."""
    if not any(k.startswith(PACKED) for k in state):
        return state
    out = {k: v for k, v in state.items() if not k.startswith(PACKED)}
    matrices = sorted(k for k, v in out.items() if v.dtype == torch.int8 and v.dim() >= 1)
    stray = sorted(set(wide) - set(matrices))
    if stray:
        raise ValueError(f"float32 scales are recorded for {stray[0]!r}, not an int8 tensor")
    extra = set(state) - set(out) - {PACKED + "float16", PACKED + "float32"}
    if extra:
        raise ValueError(f"unknown packed scales {sorted(extra)[0]!r}")
    for dtype, members in (("float16", sorted(set(matrices) - set(wide))), ("float32", sorted(set(wide)))):
        flat = state.get(PACKED + dtype, torch.empty(0, dtype=getattr(torch, dtype)))
        sizes = [math.prod(_scale_shape(out[n])) for n in members]
        if flat.dtype != getattr(torch, dtype) or flat.dim() != 1 or flat.numel() != sum(sizes):
            raise ValueError(f"packed scales {PACKED + dtype!r} ({str(flat.dtype)[6:]}, {flat.numel()} values) do not "
                             f"fit the int8 matrices, which need {sum(sizes)} {dtype} scales")
        for n, part in zip(members, flat.split(sizes)):
            out[SCALES + n] = part.reshape(out[n].shape[0], -1)
    return out
