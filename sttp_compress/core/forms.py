"""Inference without the dense weight: y = x Wᵀ + b from the factors of W = U diag(σ) Vᵀ (method notes §7).

A compressed Linear can compute its output in three forms, each exact:

- ``dense``:   build W once (the default path: `SpectralTT` caches it in eval mode), 2·d_in·d_out FLOPs a row;
- ``factors``: contract each chain into its frame once, U (d_out × r) and V (d_in × r), then
               y = ((x V) σ) Uᵀ: r (2 d_in + 2 d_out + 1) FLOPs a row (SVDP's shortcut);
- ``tt``:      contract the row, reshaped to the input modes, with the V cores one by one, scale by σ,
               then expand through the U cores (`tt_linear`): Σ_k 2 R_{k−1} m_k R_k D_{k+1} FLOPs a row on
               each side; it keeps only the cores (no U, V, W in memory).

The rule (`use_shortcut(model)`, form 'auto'): per layer, the form with the fewest FLOPs per row, the
``tt`` form counted at `TT_PENALTY` times its FLOPs (its many small contractions run 3–8x fewer FLOP/s
than two large matmuls on CPU). Per call, that form is used only when the FLOPs it saves over the
dense weight for the call's rows (tokens) exceed `CALL_OVERHEAD_FLOPS` of the device — the cost of
its extra kernel calls, which decides small batches of small layers; otherwise the call runs on the
cached dense weight. The weights a form reads are in the same proportion as its FLOPs, so the rule
also follows memory traffic where that dominates (a GPU at batch 1). With STTP's TT-ranks
(R_k = min(r, …)) the ``tt`` form has more FLOPs than ``factors`` in every layer measured, so 'auto'
picks ``factors`` or ``dense``. Training mode and forwards that need gradients are unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sttp_compress.core.precision import cuda_matmul_tf32
from sttp_compress.core.spectral_tt import SpectralTT, chain, is_parametrized, weight_name
from sttp_compress.core.tt import TTShape, padded_dims

__all__ = ["FORMS", "TT_PENALTY", "CALL_OVERHEAD_FLOPS", "overhead_key", "call_overhead", "row_flops", "best_form", "tt_linear", "chain_cores",
           "use_shortcut", "remove_shortcut", "shortcut_forms", "croppable", "factorable", "crop_padding"]

FORMS = ("dense", "factors", "tt")
TT_PENALTY = 4.0
# FLOPs the extra kernel calls of a shortcut cost. CPU: measured (~40 µs at ~25 GFLOP/s). CUDA: eager
# calls of a few thousand rows are bound by their launches (~30 µs a Linear on an H200), not the GPU's
# work, so an extra kernel pays only once the dense GEMM outlasts that: 1e10 FLOPs is ~15 µs at the
# ~650 TFLOP/s of bf16 GEMMs (bench_inference: 4 x Linear(4096) at rank 318, factors vs dense 0.171 vs
# 0.144 ms at 1 row, slower at 256 rows, faster at 4096 rows; 1e10 takes it from ~430 rows). float32
# GEMMs run far below that rate, so the same ~15 µs buys fewer FLOPs: 'cuda-fp32' measured on an H100
# (bench_deploy: 4 x Linear(4096) float32 at 256 rows, 36 TFLOP/s dense, the factors form 4x faster while
# 1e10 kept it dense); 'cuda-tf32' scaled from it by the TF32/float32 GEMM rate (not measured).
CALL_OVERHEAD_FLOPS = {"cpu": 1e6, "cuda": 1e10, "cuda-tf32": 5e9, "cuda-fp32": 5e8}


def overhead_key(x: Tensor) -> str:
    """The `CALL_OVERHEAD_FLOPS` entry of a call on x: the device type, and on CUDA its GEMM precision
    ('cuda' for float16/bfloat16 or autocast, 'cuda-tf32' or 'cuda-fp32' for float32 inputs)."""
    if x.device.type != "cuda":
        return x.device.type
    if torch.is_autocast_enabled("cuda") or x.dtype in (torch.float16, torch.bfloat16):
        return "cuda"
    return "cuda-tf32" if cuda_matmul_tf32() else "cuda-fp32"


def call_overhead(x: Tensor, overhead: dict[str, float]) -> float:
    """FLOPs an extra kernel call costs for a call on x (the key's entry, else its device type's, else 0)."""
    key = overhead_key(x)
    return overhead.get(key, overhead.get(key.split("-")[0], 0.0))


def _v_flops(modes: tuple[int, ...], ranks: list[int]) -> int:
    """FLOPs a row of pushing a vector over `modes` through a chain (left to right) down to its rank."""
    total, D = 0, math.prod(modes)
    for k, m in enumerate(modes):
        D //= m
        total += 2 * ranks[k] * m * ranks[k + 1] * D
    return total


def row_flops(shape: TTShape, form: str) -> int:
    """FLOPs per input row of y = x Wᵀ (bias excluded) in `form` ('dense', 'factors', 'tt')."""
    d_in, d_out, r = shape.d_in, shape.d_out, shape.middle
    if form == "dense":
        return 2 * d_in * d_out
    if form == "factors":
        return 2 * r * (d_in + d_out) + r
    if form == "tt":  # the U side is the V computation run backwards: same count over its modes
        return _v_flops(shape.in_modes, shape.v_ranks) + r + _v_flops(shape.out_modes, shape.u_ranks)
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def best_form(shape: TTShape, tt_penalty: float = TT_PENALTY) -> str:
    """The form with the fewest FLOPs per row ('tt' weighted by `tt_penalty`; ties keep 'dense')."""
    cost = {"dense": row_flops(shape, "dense"), "factors": row_flops(shape, "factors"),
            "tt": tt_penalty * row_flops(shape, "tt")}
    return min(FORMS, key=lambda f: (cost[f], FORMS.index(f)))


def tt_linear(x: Tensor, u_cores: list[Tensor], sigma: Tensor, v_cores: list[Tensor],
              bias: Tensor | None = None) -> Tensor:
    """y = x Wᵀ + b for W = U diag(σ) Vᵀ given as chains of core frames ((R_{k−1}·m_k) × R_k, §4).

    x (..., d_in) is reshaped to its input modes and contracted with the V cores from the slowest mode
    on (the state stays (rows, R_k, D_{k+1}), never larger than the input), scaled by σ, then expanded
    through the U cores from the last one back (state (rows, R_{k−1}·n_k, E_{k+1})).
    """
    lead = x.shape[:-1]
    n = math.prod(lead)
    h = x.reshape(n, 1, -1)  # (rows, R_0 = 1, d_in)
    for G in v_cores:
        R0m, R = G.shape
        h = h.reshape(n, R0m, -1)  # (rows, R_{k-1}·m_k, D_{k+1})
        h = torch.matmul(G.T, h)  # (rows, R_k, D_{k+1})
    h = h.reshape(n, -1) * sigma  # (rows, r)
    h = h.reshape(n, -1, 1)  # (rows, R_P, E = 1)
    for G in reversed(u_cores):
        R0n, R = G.shape
        h = torch.matmul(G, h.reshape(n, R, -1))  # (rows, R_{k-1}·n_k, E_{k+1})
    y = h.reshape(*lead, -1)
    return y if bias is None else y + bias


def chain_cores(p: SpectralTT, originals: tuple[Tensor, ...]) -> tuple[list[Tensor], Tensor, list[Tensor]]:
    """The U core frames, σ and the V core frames of a parametrization, from its parameters."""
    chains: dict[str, list] = {"u": [None] * len(p.tt.out_modes), "v": [None] * len(p.tt.in_modes)}
    for members, X in zip(p.members, p.frames(originals)):
        for i, (side, k) in enumerate(members):
            chains[side][k] = X[i]
    return chains["u"], p.sigma(p.spectrum_param(originals)), chains["v"]


def layer_originals(module: nn.Module, p: SpectralTT) -> tuple[Tensor, ...]:
    plist = getattr(module.parametrizations, weight_name(module))
    return tuple(getattr(plist, f"original{i}") for i in range(p.n_originals))


class _Shortcut:
    """The factors a compressed Linear needs for its form, rebuilt when its parameters change."""

    def __init__(self, p: SpectralTT, form: str, overhead: dict[str, float] | None):
        self.p, self.form, self.overhead = p, form, overhead
        self.saving = row_flops(p.tt, "dense") - row_flops(p.tt, form)  # FLOPs per row
        self._key, self._factors = None, None

    def forget(self) -> None:
        """Drop the cached factors (rebuilt on the next eval-mode call)."""
        self._key, self._factors = None, None

    def factors(self, originals: tuple[Tensor, ...], dtype: torch.dtype) -> tuple:
        """(V, σ, Uᵀ) or (U cores, σ, V cores) in `dtype`, built in float32 or better, cached."""
        key = tuple((id(o), o._version, o.device, o.dtype) for o in originals) + (self.p.scale._version, dtype)
        if key != self._key:
            with torch.no_grad(), torch.autocast(originals[0].device.type, enabled=False):
                u, s, v = chain_cores(self.p, originals)
                if self.form == "factors":
                    d_out, d_in = self.p.weight_shape
                    f = (crop_padding(chain(v, self.p.tt.v_ranks), d_in), s,
                         crop_padding(chain(u, self.p.tt.u_ranks), d_out).T)
                    self._factors = tuple(t.to(dtype).contiguous() for t in f)
                else:
                    self._factors = ([G.to(dtype).contiguous() for G in u], s.to(dtype),
                                     [G.to(dtype).contiguous() for G in v])
            self._key = key
        return self._factors


def _forward(self: nn.Linear, x: Tensor) -> Tensor:
    """A compressed Linear's forward with the shortcut (eval mode without gradients only)."""
    sc: _Shortcut = self._sttp_shortcut
    if self.training:  # training may update the parameters in place without a version bump (fused AdamW)
        sc.forget()
        return F.linear(x, self.weight, self.bias)
    rows = x.numel() // max(1, x.shape[-1])
    if sc.overhead is not None and rows * sc.saving < call_overhead(x, sc.overhead):
        return F.linear(x, self.weight, self.bias)  # too few rows to pay for the extra calls
    originals = layer_originals(self, sc.p)
    if torch.is_grad_enabled() and (x.requires_grad or any(o.requires_grad for o in originals)):
        return F.linear(x, self.weight, self.bias)
    # F.linear's dtype rules: the autocast dtype under autocast, else the input's
    on = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if on else x.dtype
    x = x.to(dtype)
    if sc.form == "factors":
        V, s, Ut = sc.factors(originals, dtype)
        y = torch.matmul(torch.matmul(x, V) * s, Ut)
    else:
        y = tt_linear(x, *sc.factors(originals, dtype))
    return y if self.bias is None else y + self.bias.to(dtype)


def use_shortcut(model: nn.Module, form: str = "auto", tt_penalty: float = TT_PENALTY,
                 overhead: dict[str, float] | None = None) -> dict[str, str]:
    """Run the model's compressed Linear layers in eval mode without their dense weight (see the module doc).

    form 'auto': per layer `best_form`, per call only when the rows pay for the extra calls
    (`overhead`, default `CALL_OVERHEAD_FLOPS`); 'factors' or 'tt': that form on every call.
    Returns {module name: form} of every compressed Linear ('dense' = unchanged). Undo with
    `remove_shortcut`. A Linear inside nn.MultiheadAttention (out_proj) is left alone: the attention
    reads its weight directly.
    """
    if form != "auto" and form not in FORMS:
        raise ValueError(f"form must be 'auto' or one of {FORMS}, got {form!r}")
    overhead = (CALL_OVERHEAD_FLOPS if overhead is None else overhead) if form == "auto" else None
    chosen = {}
    inside_mha = mha_out_projs(model)
    for name, m in model.named_modules():
        if not (isinstance(m, nn.Linear) and is_parametrized(m)) or id(m) in inside_mha:
            continue
        p = next(q for q in m.parametrizations.weight if isinstance(q, SpectralTT))
        f = best_form(p.tt, tt_penalty) if form == "auto" else form
        if not factorable(p) or (f == "tt" and _padded(p)):  # tt_linear reads x in the padded modes
            f = "dense"
        chosen[name] = f
        _remove(m)
        if f != "dense":
            m._sttp_shortcut = _Shortcut(p, f, overhead)
            m.forward = _forward.__get__(m)
    return chosen


def _padded(p: SpectralTT) -> bool:
    """Whether the layer's tensorization pads a dimension with a large prime factor."""
    return p.dims is not None and any(tuple(padded_dims(d)) != tuple(d) for d in p.dims)


def unscaled(p: SpectralTT) -> bool:
    """Whether the factors' matrix (padding cropped) is the weight matrix as it is: neither row- nor
    column-scaled, nor its rows reordered."""
    return not (p.row_scaled or p.col_scaled or p.row_ordered)


def croppable(p: SpectralTT) -> bool:
    """Whether the factors' zero padding can be cropped as rows (`crop_padding`): padded (tt.padded_size) on no
    side, or only where that side is one natural dimension (a Linear's or an Embedding's rows and columns,
    padded at their end)."""
    return not _padded(p) or all(len(d) == 1 for d in p.dims)


def factorable(p: SpectralTT) -> bool:
    """Whether U diag(σ) Vᵀ of the bare chains, padding cropped, is exactly the layer's weight matrix:
    `croppable` and `unscaled`."""
    return croppable(p) and unscaled(p)


def crop_padding(frame: Tensor, size: int) -> Tensor:
    """The first `size` rows of a factor (U or V) of a side with one natural dimension: the rows of the weight
    matrix, without the zero padding appended to reach the tensorization's size (tt.pad_matrix)."""
    return frame if frame.shape[0] == size else frame[:size]


def mha_out_projs(model: nn.Module) -> set[int]:
    """ids of the out_proj Linears of nn.MultiheadAttention: the attention reads their weight itself,
    never calling their forward, so a replaced forward would not run."""
    return {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def _remove(m: nn.Module) -> None:
    if "_sttp_shortcut" in m.__dict__:
        del m._sttp_shortcut
        del m.forward


def remove_shortcut(model: nn.Module) -> None:
    """Back to the materialized weight everywhere."""
    for m in model.modules():
        _remove(m)


def shortcut_forms(model: nn.Module) -> dict[str, str]:
    """{module name: form} of the layers running a shortcut now."""
    return {n: m._sttp_shortcut.form for n, m in model.named_modules() if "_sttp_shortcut" in m.__dict__}
