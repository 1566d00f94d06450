"""Input scales of Linear layers on calibration data: the column weights of an activation-aware conversion.

A Linear's output error for inputs x is ‖(W1 − W0) x‖; over data whose features have second moments
c_j = E[x_j²] (the diagonal of E[x xᵀ], as in ASVD-style methods) it is weighted per column of W.
`input_scales` measures c with forward hooks and returns c^power as `compress_to_target`'s
`col_weights`: the conversion then fits W·diag(√w) and keeps a trainable column scale (layers.SpectralTT,
col_scaled). Power 0.5 (columns weighted by their RMS activation) was the best of 0.5 and 1 on
all-MiniLM-L6-v2 (benchmarks/results/experiments/activation_aware.md: plain SVD of the encoder Linears at 4×,
held-out cosine after conversion 0.304 plain, 0.368 with power 0.5, 0.356 with power 1; the probe
scales columns by c^(power/2) and labels the rows by that exponent, "energy^0.25" and "energy^0.5").
Only nn.Linear layers are measured; convolutions convert unweighted.

`refit_spectra` then uses the full second moments C = E[x xᵀ]: with U's columns orthonormal, the
spectrum minimizing the output error ‖X (W1 − W0)ᵀ‖ on those inputs has the closed form
σ_i = ṽ_iᵀ C W0ᵀ u_i / ṽ_iᵀ C ṽ_i (ṽ_i: the i-th column of V with the column scales applied).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

__all__ = ["ACTIVATION_POWER", "CALIBRATION_BATCHES", "ENERGY_FLOOR", "input_scales", "input_moments",
           "scales_from_moments", "refit_spectrum", "refit_spectra", "calibration_batches"]

ACTIVATION_POWER = 0.5
CALIBRATION_BATCHES = 8  # batches of CALIBRATION_BATCH texts/images of the training data, fixed shuffled order
CALIBRATION_BATCH = 16  # 128 MiniLM texts (1.0-1.5 s on 2 CPU cores with full moments); 512: cosine after conversion 0.409 vs 0.407
ENERGY_FLOOR = 1e-3  # of the layer's mean energy: a dead input feature keeps a finite column scale


def input_scales(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable,
                 power: float = ACTIVATION_POWER) -> dict[str, Tensor]:
    """{name: (E[x_j²], floored at ENERGY_FLOOR × its mean)^power} (float64 on CPU, one value per input
    feature) of each nn.Linear in `layers`, over every input row the model gives it on `batches`
    (a dict of keyword tensors or a tensor / (inputs, targets) pair each), in eval mode."""
    return scales_from_moments(input_moments(model, layers, batches, full=False), power)


def scales_from_moments(moments: dict[str, Tensor], power: float = ACTIVATION_POWER) -> dict[str, Tensor]:
    """input_scales from `input_moments` (full matrices or their diagonals)."""
    out = {}
    for n, C in moments.items():
        energy = torch.diagonal(C) if C.dim() == 2 else C
        floor = ENERGY_FLOOR * float(energy.mean())
        out[n] = energy.clamp_min(max(floor, 1e-30)).pow(power)
    return out


@torch.no_grad()
def input_moments(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable,
                  full: bool = True) -> dict[str, Tensor]:
    """{name: E[x xᵀ] (d_in × d_in), or only its diagonal E[x_j²] with full=False} (float64 on CPU) of
    each nn.Linear in `layers` over the rows it sees on `batches`, in eval mode; layers never called
    are left out. For keyword batches with an `attention_mask` (text), only the rows of real tokens
    count: padding positions are computed by the encoder but never reach its output. Layers fed the same
    tensor (attention's query, key and value) share one product."""
    linears = {n: m for n, m in layers.items() if isinstance(m, nn.Linear)}
    if not linears:
        return {}
    sums = {n: torch.zeros((m.in_features,) * (2 if full else 1), dtype=torch.float64) for n, m in linears.items()}
    rows = dict.fromkeys(linears, 0)
    state: dict = {"mask": None, "last": None}  # this batch's token mask; the last input and its product

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0]
            last = state["last"]
            if last is None or last[0] is not x:  # the very tensor, held here: its id is not reused meanwhile
                mask = state["mask"]
                rows_ = x[mask] if mask is not None and x.shape[:-1] == mask.shape else x.reshape(-1, x.shape[-1])
                rows_ = rows_.float()  # float32 GEMM, float64 sums
                state["last"] = last = (x, (rows_.T @ rows_ if full else rows_.square().sum(0)).double().cpu(),
                                        rows_.shape[0])
            sums[name] += last[1]
            rows[name] += last[2]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        for batch in batches:
            state["last"], state["mask"] = None, None
            if isinstance(batch, dict):
                mask = batch.get("attention_mask")
                state["mask"] = None if mask is None else mask.to(device).bool()
                model(**{k: v.to(device) for k, v in batch.items()})
            else:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(device))
    finally:
        for h in handles:
            h.remove()
        state["last"] = None
        model.train(was_training)
    return {n: total / rows[n] for n, total in sums.items() if rows[n]}  # unused layers (a head) left out


@torch.no_grad()
def refit_spectrum(module: nn.Module, W0: Tensor, C: Tensor) -> bool:
    """Set a compressed Linear's spectrum to the least-squares fit of x ↦ W0 x on inputs with second
    moments C (see the module doc); in place. Only where U has orthonormal columns (free spectrum, no
    row scale, no zero-padded output dimension): returns whether it did."""
    from sttp_compress.core.forms import layer_originals
    from sttp_compress.core.spectral_tt import is_parametrized
    from sttp_compress.core.tt import padded_dims

    if C.dim() != 2 or not (isinstance(module, nn.Linear) and is_parametrized(module)):
        return False
    plist = module.parametrizations.weight
    p = plist[0]
    if (len(plist) != 1 or p.spectrum != "free" or p.row_scaled or p.row_ordered or tuple(W0.shape) != p.weight_shape
            or (p.dims is not None and tuple(padded_dims(p.dims[0])) != tuple(p.dims[0]))):
        return False
    originals = layer_originals(module, p)
    U, _, V = p.factors(*originals)
    U, V = U.double(), V[:C.shape[0]].double()  # a zero-padded input's extra rows meet no input
    CV = C.to(V.device, torch.float64) @ V
    num = ((W0.detach().to(V.device, torch.float64) @ CV) * U).sum(0)  # u_iᵀ W0 C ṽ_i
    den = (V * CV).sum(0)  # ṽ_iᵀ C ṽ_i
    sigma = torch.where(den > 1e-30, num / den.clamp_min(1e-30), torch.zeros_like(num))
    originals[len(p.groups)].copy_(sigma.to(originals[len(p.groups)].dtype))
    p.drop_cache()
    return True


def refit_spectra(model: nn.Module, reference: nn.Module, moments: dict[str, Tensor]) -> list[str]:
    """`refit_spectrum` for every compressed Linear of `model` with moments, against the same-named
    layer of `reference` (the original model); returns the names refitted."""
    refs = dict(reference.named_modules())
    return [n for n, m in model.named_modules()
            if n in moments and n in refs and hasattr(refs[n], "weight")
            and refit_spectrum(m, refs[n].weight, moments[n])]


def calibration_batches(dataset, n_batches: int = CALIBRATION_BATCHES, batch_size: int = CALIBRATION_BATCH,
                        seed: int = 0) -> list:
    """The first `n_batches` batches of `dataset` in a fixed shuffled order (its `collate_fn` if it has one).

    Texts (a dataset with `lengths()`): the same n_batches·batch_size texts, re-batched in order of length so
    that the batches carry little padding (MiniLM's 128 calibration texts: 1,871 tokens in 7,168 padded
    positions when shuffled)."""
    from torch.utils.data import DataLoader

    if hasattr(dataset, "plain"):  # text.TokenizedTexts: the texts as they are, without training extras
        dataset = dataset.plain()
    collate = getattr(dataset, "collate_fn", None)
    if hasattr(dataset, "lengths"):
        chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n_batches * batch_size]
        lengths = dataset.lengths()
        chosen = sorted(chosen.tolist(), key=lambda i: lengths[i])
        chunks = [chosen[i:i + batch_size] for i in range(0, len(chosen), batch_size)]
        return list(DataLoader(dataset, batch_sampler=chunks, collate_fn=collate))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
                        collate_fn=collate)
    return [b for _, b in zip(range(n_batches), loader)]
