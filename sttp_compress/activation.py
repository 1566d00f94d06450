"""Input scales of Linear layers on calibration data: the column weights of an activation-aware conversion.

A Linear's output error for inputs x is ‖(W1 − W0) x‖; over data whose features have second moments
c_j = E[x_j²] (the diagonal of E[x xᵀ], as in ASVD-style methods) it is weighted per column of W.
`input_scales` measures c with forward hooks and returns c^power as `compress_to_target`'s
`col_weights`: the conversion then fits W·diag(√w) and keeps a trainable column scale (layers.SpectralTT,
col_scaled). Power 0.5 (columns weighted by their RMS activation) was the best of 0.5 and 1 on
all-MiniLM-L6-v2 (benchmarks/results/activation_aware.md: plain SVD of the encoder Linears at 4×,
held-out cosine after conversion 0.304 plain, 0.368 with power 0.5, 0.356 with power 1; the probe
scales columns by c^(power/2) and labels the rows by that exponent, "energy^0.25" and "energy^0.5").
Only nn.Linear layers are measured; convolutions convert unweighted.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

__all__ = ["ACTIVATION_POWER", "CALIBRATION_BATCHES", "ENERGY_FLOOR", "input_scales", "calibration_batches"]

ACTIVATION_POWER = 0.5
CALIBRATION_BATCHES = 8  # batches of CALIBRATION_BATCH texts/images of the training data, fixed shuffled order
CALIBRATION_BATCH = 16  # 128 MiniLM texts: 1.4 s on 2 CPU cores; 512 took 4.6 s (cosine after conversion 0.409 vs 0.407)
ENERGY_FLOOR = 1e-3  # of the layer's mean energy: a dead input feature keeps a finite column scale


@torch.no_grad()
def input_scales(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable,
                 power: float = ACTIVATION_POWER) -> dict[str, Tensor]:
    """{name: (E[x_j²], floored at ENERGY_FLOOR × its mean)^power} (float64 on CPU, one value per input
    feature) of each nn.Linear in `layers`, over every input row the model gives it on `batches`
    (a dict of keyword tensors or a tensor / (inputs, targets) pair each), in eval mode."""
    linears = {n: m for n, m in layers.items() if isinstance(m, nn.Linear)}
    if not linears:
        return {}
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}
    rows = dict.fromkeys(linears, 0)

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            sums[name] += x.double().square().sum(0).cpu()
            rows[name] += x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        for batch in batches:
            if isinstance(batch, dict):
                model(**{k: v.to(device) for k, v in batch.items()})
            else:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for n, total in sums.items():
        if rows[n] == 0:
            continue  # never called on this data (e.g. an unused head)
        energy = total / rows[n]
        floor = ENERGY_FLOOR * float(energy.mean())
        out[n] = energy.clamp_min(max(floor, 1e-30)).pow(power)
    return out


def calibration_batches(dataset, n_batches: int = CALIBRATION_BATCHES, batch_size: int = CALIBRATION_BATCH,
                        seed: int = 0) -> list:
    """The first `n_batches` batches of `dataset` in a fixed shuffled order (its `collate_fn` if it has one)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
                        collate_fn=getattr(dataset, "collate_fn", None))
    return [b for _, b in zip(range(n_batches), loader)]
