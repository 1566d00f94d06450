"""Serve a compressed model at dense speed: bind each built weight to its layer as a plain tensor.

In eval mode a compressed layer already caches its built weight, but every call still goes through
`torch.nn.utils.parametrize`'s property and our cache check (~17 µs a layer on CPU), which is most of
a small GPU call. `freeze(model)` builds every weight once and hands it to its layer as a plain
(non-persistent) buffer under the layer's own class, so a call costs exactly what the dense layer's
costs; the STTP parameters stay in the model and `state_dict()` is unchanged (saving a frozen model
writes the compressed checkpoint). `unfreeze(model)` undoes it; `frozen(model)` does both around a block:

    with frozen(model):                  # eval mode, no autograd: weights built once, plain F.linear/conv
        y = model(x)
    freeze(model, shortcut="auto")       # serving: also the factored form where it saves FLOPs
    freeze(model, shortcut="factors")    # ... on every call, with no dense weight kept (least memory),
                                         # and Embeddings looked up in their factors or their tensor train

With `shortcut="auto"`, a compressed Linear whose factors form (method notes §7) needs fewer FLOPs per
row (`contract.best_form`) also binds V·diag(σ) and U, and runs y = (x V σ) Uᵀ + b on calls whose rows
save more than the device's `contract.CALL_OVERHEAD_FLOPS`, the dense weight on smaller calls. A Linear or
Embedding whose tensorization pads its rows or columns (a dimension with a large prime factor) runs on the
factors with the padding cropped.

A frozen layer does not follow later changes of its STTP parameters (training, `load_state_dict`):
unfreeze first. Gradients do not reach the STTP parameters through a frozen layer.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sttp_compress.core.forms import (CALL_OVERHEAD_FLOPS, best_form, call_overhead, chain_cores, crop_padding,
                                      croppable, layer_originals, mha_out_projs, row_flops)
from sttp_compress.core.spectral_tt import SpectralTT, chain, is_parametrized, weight_name

__all__ = ["freeze", "unfreeze", "frozen", "is_frozen"]

_FROZEN = "_sttp_frozen"  # instance attribute: the parametrized class to restore
_FACTORS = ("_sttp_vs", "_sttp_u", "_sttp_a", "_sttp_c", "_sttp_rows", "_sttp_rho")  # buffers of the factored forms
SHORTCUTS = ("none", "auto", "factors")
RANK_ALIGN = 16  # the factors form's rank is padded with zeros to a multiple of this
LOOKUP_SUFFIX_ROWS = 16  # an Embedding's TT lookup computes at most this many candidate rows a token (transient)


def is_frozen(module: nn.Module) -> bool:
    """True when `freeze` bound this layer's weight as a plain tensor."""
    return _FROZEN in module.__dict__


@torch.no_grad()
def freeze(model: nn.Module, shortcut: str = "none", overhead: dict[str, float] | None = None) -> dict[str, str]:
    """Bind every compressed layer's built weight as a plain tensor (see the module doc); in place.

    shortcut: 'none' (every layer runs its dense weight), 'auto' (compressed Linears run the factors
    form on calls whose rows pay for its extra kernel call, `overhead` FLOPs per device type, default
    `contract.CALL_OVERHEAD_FLOPS`) or 'factors' (those Linears run the factors form on every call and
    keep no dense weight: the least memory; `.weight` is then rebuilt from the factors when read; a compressed
    Embedding looks its rows up in the smallest of its table, U and (V σ)ᵀ, or two tables of its U chain).
    Returns {module name: 'dense' | 'factors'} of the layers frozen. Layers with another
    parametrization stacked on ours are left as they are.
    """
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
    overhead = CALL_OVERHEAD_FLOPS if overhead is None else overhead
    inside_mha = mha_out_projs(model)
    forms = {}
    for name, m in model.named_modules():
        if is_frozen(m) or not is_parametrized(m):
            continue
        wname = weight_name(m)
        plist = m.parametrizations[wname]
        if len(plist) != 1:
            continue
        p: SpectralTT = plist[0]
        originals = layer_originals(m, p)
        trainable = any(o.requires_grad for o in originals)
        W = getattr(m, wname).detach()
        form = "dense"
        if (shortcut != "none" and isinstance(m, nn.Linear) and id(m) not in inside_mha and croppable(p)
                and best_form(p.tt) == "factors"):
            form = "factors"
        elif shortcut == "factors" and isinstance(m, nn.Embedding):
            form = _embedding_form(m, p)
        _bind(m, wname, None if form != "dense" and shortcut == "factors" else W, trainable)
        if form == "lookup":
            _bind_lookup(m, p, originals, W.dtype, trainable)
            form = "factors"
        elif form == "factors":
            Vs, U = _aligned_factors(p, originals, W.dtype)
            m.register_buffer("_sttp_vs", _leaf(Vs, trainable), persistent=False)
            m.register_buffer("_sttp_u", _leaf(U, trainable), persistent=False)
            if isinstance(m, nn.Embedding):
                m.forward = _embedding_factors_forward.__get__(m)
            else:
                saving = row_flops(p.tt, "dense") - row_flops(p.tt, "factors")
                # the FLOPs a call must save to pay for the extra kernel, per device (and CUDA precision)
                m._sttp_saving, m._sttp_overhead = saving, ({} if shortcut == "factors" else dict(overhead))
                m.forward = _factors_forward.__get__(m)
        forms[name] = form
    return forms


def _embedding_form(m: nn.Embedding, p: SpectralTT) -> str:
    """The smallest way to look an Embedding's rows up: 'factors' (U's rows, then (V σ)ᵀ), 'lookup' (through
    the U chain split in two tables, `_lookup_split`) or 'dense' (its table) when neither holds fewer bytes.
    Rows renormalized in place (max_norm) need the table itself."""
    if m.max_norm is not None or not croppable(p):
        return "dense"
    rows, d = m.num_embeddings, m.embedding_dim
    r = p.tt.middle + (-p.tt.middle % RANK_ALIGN)
    sizes = {"dense": rows * d, "factors": r * (rows + d)}
    split = _lookup_split(p)
    if split is not None:  # the tables, ρ and the row order (int32) where the layer has them
        sizes["lookup"] = split[1] + rows * (p.row_scaled + p.row_ordered)
    return min(sizes, key=lambda f: (sizes[f], f != "dense"))


def _lookup_split(p: SpectralTT) -> tuple[int, int] | None:
    """(k, values) of a split of the U chain after its k-th mode into a prefix table A (m_1···m_k × R_k) and
    a suffix table C (R_k × m_{k+1}··· × d, (V σ)ᵀ folded in) with at most LOOKUP_SUFFIX_ROWS suffix rows, so
    that the row j = (hi, lo) of U σ Vᵀ is A[hi] · C[:, lo]: of the splits within 10% of the smallest, the one
    with the fewest suffix rows, whose count sets the lookup's FLOPs (2 R_k · rows · d a token; MiniLM's
    distilled token embedding: 5 rows, 1.5 MFLOP a token, for 3% more values than 15 rows at 4.4 MFLOP)."""
    modes, ranks, d = p.tt.out_modes, p.tt.u_ranks, p.weight_shape[1]
    splits = [(k, math.prod(modes[:k]) * ranks[k] + ranks[k] * math.prod(modes[k:]) * d)
              for k in range(1, len(modes)) if math.prod(modes[k:]) <= LOOKUP_SUFFIX_ROWS]
    if not splits:
        return None
    least = min(values for _, values in splits)
    return max((s for s in splits if s[1] <= 1.1 * least), key=lambda s: s[0])


def _bind_lookup(m: nn.Embedding, p: SpectralTT, originals: tuple[Tensor, ...], dtype: torch.dtype,
                 trainable: bool) -> None:
    """The buffers and forward of the TT lookup: A (m_1···m_k × R_k), C (R_k × suffix rows · d), the row order's
    inverse (int32) and ρ where the layer has them."""
    k = _lookup_split(p)[0]
    with torch.autocast(originals[0].device.type, enabled=False):
        u, sigma, v = chain_cores(p, originals)  # the frames alone: U itself is never built
    V = crop_padding(chain(v, p.tt.v_ranks), m.embedding_dim)
    gamma = p.col_scale_param(originals)
    V = V if gamma is None else V * gamma.unsqueeze(1)  # the column scale γ, as `p.factors` applies it
    ranks = p.tt.u_ranks
    lo = math.prod(p.tt.out_modes[k:])
    A = chain(u[:k], ranks[:k + 1])
    B = chain(u[k:], ranks[k:]).reshape(ranks[k], lo, ranks[-1])
    C = (B * sigma) @ V.T  # (R_k, lo, d)
    m.register_buffer("_sttp_a", _leaf(A.contiguous().to(dtype), trainable), persistent=False)
    m.register_buffer("_sttp_c", _leaf(C.reshape(ranks[k], -1).contiguous().to(dtype), trainable), persistent=False)
    rows = None if p.row_order is None else torch.argsort(p.row_order).to(torch.int32)
    m.register_buffer("_sttp_rows", rows, persistent=False)
    rho = p.row_scale_param(originals)
    m.register_buffer("_sttp_rho", None if rho is None else _leaf(rho.to(dtype), trainable), persistent=False)
    m._sttp_lo = lo
    m.forward = _embedding_lookup_forward.__get__(m)


def _aligned_factors(p: SpectralTT, originals: tuple[Tensor, ...], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """((V σ)ᵀ, U) of the weight matrix W = U (V σ)ᵀ: row and column scales in U and V (`p.factors`), padding
    rows cropped, U's rows in the weight's order (a row-ordered layer factorizes them permuted), the rank padded
    with zero columns to a multiple of RANK_ALIGN: GEMMs whose inner size is not 16-byte aligned in bf16 ran 5x
    below the dense layer's FLOP rate on an H200 (rank 318)."""
    with torch.autocast(originals[0].device.type, enabled=False):
        U, s, V = p.factors(*originals)
    d_out, d_in = p.weight_shape
    U, V = crop_padding(U, d_out), crop_padding(V, d_in)
    if p.row_order is not None:  # row i of U σ Vᵀ is row row_order[i] of the weight
        U = U.new_zeros(U.shape).index_copy(0, p.row_order.to(U.device), U)
    pad = -U.shape[1] % RANK_ALIGN
    Vs, U = F.pad(V * s, (0, pad)), F.pad(U, (0, pad))
    return Vs.T.contiguous().to(dtype), U.contiguous().to(dtype)


def _leaf(t: Tensor, requires_grad: bool) -> Tensor:
    """A fresh leaf: requiring grad like the dense parameter it stands for, so autocast caches its
    low-precision copy exactly as it does the dense model's weights."""
    return t.detach().clone().requires_grad_(requires_grad)


def _bind(m: nn.Module, wname: str, W: Tensor | None, trainable: bool) -> None:
    """The layer under its own class with W as a plain buffer; with W None (factors only) under a subclass
    whose `weight` is rebuilt from the factors buffers when read."""
    cls = type(m)
    base = cls.__bases__[0]  # the layer's own class (parametrize derived `cls` from it)
    m.__class__ = base if W is not None else _factors_only_class(base)
    object.__setattr__(m, _FROZEN, cls)
    if W is not None:
        m.register_buffer(wname, _leaf(W, trainable), persistent=False)
    m._apply = _apply_keeping_leaves.__get__(m)


@functools.lru_cache(maxsize=None)
def _factors_only_class(base: type) -> type:
    """`base` with a read-only `weight` = U · (V σ)ᵀ from the factors buffers (no dense copy kept)."""
    return type(base.__name__, (base,), {"weight": property(_weight_from_factors)})


def _weight_from_factors(self: nn.Module) -> Tensor:
    """A factors-only layer's weight: U (V σ)ᵀ, or every row through an Embedding's TT lookup."""
    if self._buffers.get("_sttp_a") is not None:
        return self.forward(torch.arange(self.num_embeddings, device=self._sttp_a.device))
    return self._sttp_u @ self._sttp_vs


def _apply_keeping_leaves(self: nn.Module, fn, recurse: bool = True) -> nn.Module:
    """Module._apply (.to, .float, .cuda), after which the frozen tensors are leaves again: Module
    converts buffers with autograd on, which would leave them results of a copy."""
    type(self)._apply(self, fn, recurse)
    for name in (weight_name(self),) + _FACTORS:
        b = self._buffers.get(name)
        if b is not None and not b.is_leaf:
            self._buffers[name] = b.detach().requires_grad_(b.requires_grad)
    return self


def _factors_forward(self: nn.Linear, x: Tensor) -> Tensor:
    """y = (x V σ) Uᵀ + b when the call has enough rows to pay for the extra kernel, else x Wᵀ + b."""
    rows = x.numel() // self.in_features
    if rows * self._sttp_saving < call_overhead(x, self._sttp_overhead):
        return F.linear(x, self.weight, self.bias)
    return F.linear(F.linear(x, self._sttp_vs), self._sttp_u, self.bias)


def _embedding_lookup_forward(self: nn.Embedding, ids: Tensor) -> Tensor:
    """Rows through the split U chain: j = the row's place in the chain (its order), then A[j // lo] · C, of
    whose lo candidate rows the (j % lo)-th is kept, times ρ_j."""
    j = ids if self._sttp_rows is None else self._sttp_rows[ids]
    hi, lo = torch.div(j, self._sttp_lo, rounding_mode="floor"), torch.remainder(j, self._sttp_lo)
    y = (F.embedding(hi, self._sttp_a) @ self._sttp_c).unflatten(-1, (self._sttp_lo, -1))
    y = torch.gather(y, -2, lo[..., None, None].expand(*lo.shape, 1, y.shape[-1])).squeeze(-2)
    return y if self._sttp_rho is None else y * self._sttp_rho[j].unsqueeze(-1)


def _embedding_factors_forward(self: nn.Embedding, ids: Tensor) -> Tensor:
    """The rows of U (V σ)ᵀ that `ids` pick: U's rows looked up, then one small matmul."""
    return F.embedding(ids, self._sttp_u, self.padding_idx) @ self._sttp_vs


def unfreeze(model: nn.Module) -> None:
    """Back to the parametrized layers (the weights follow the STTP parameters again)."""
    for m in model.modules():
        if is_frozen(m):
            _unbind(m)


def _unbind(m: nn.Module) -> None:
    cls = m.__dict__.pop(_FROZEN)
    for buf in (weight_name(m),) + _FACTORS:
        m._buffers.pop(buf, None)
    for attr in ("forward", "_apply", "_sttp_saving", "_sttp_overhead", "_sttp_lo"):
        m.__dict__.pop(attr, None)
    m.__class__ = cls


@contextmanager
def frozen(model: nn.Module, shortcut: str = "none") -> Iterator[nn.Module]:
    """Eval mode under torch.no_grad with the weights frozen (`freeze`); everything restored on exit."""
    was_training = model.training
    before = {id(m) for m in model.modules() if is_frozen(m)}  # a caller's own freeze stays
    model.eval()
    try:
        with torch.no_grad():
            freeze(model, shortcut)
            yield model
    finally:
        for m in model.modules():
            if is_frozen(m) and id(m) not in before:
                _unbind(m)
        model.train(was_training)
