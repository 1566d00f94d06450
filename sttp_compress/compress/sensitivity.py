"""Layer sensitivities: how much a layer's weight error moves the model's output, for the allocation.

The greedy allocation spends parameters where they remove the most weight error, every layer's relative
error counted alike (`allocate._cost`). Layers differ in what that error does downstream: in a MobileNetV2 a
pointwise convolution feeding a depthwise one passes its error on almost whole, a classifier's error goes
straight to the logits. `layer_sensitivities` measures it on calibration data: each layer alone converted at
a probe rank (the plain allocation's), the model's output gap over the layer's cost there,
s = (‖y − y₀‖² / ‖y₀‖²) / cost(e²). Weighting each layer's cost by s makes the allocation minimize the
first-order sum of those output gaps instead of the weight error.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = ["SENSITIVITY_RANGE", "output_gap", "model_outputs", "layer_sensitivities"]

SENSITIVITY_RANGE = 100.0  # sensitivities are clamped to [median / this, median × this]: a probe that moved the
# output by rounding noise alone (or blew it up) does not take the whole budget away from (or to) one layer


def _first_tensor(out) -> Tensor:
    """The model's main output: the tensor itself, or the first tensor of a tuple / dict / ModelOutput."""
    if isinstance(out, Tensor):
        return out
    values = out.values() if isinstance(out, Mapping) else out
    for v in values:
        if isinstance(v, Tensor):
            return v
    raise TypeError(f"the model's output holds no tensor ({type(out).__name__})")


@torch.no_grad()
def model_outputs(model: nn.Module, batches: Iterable, batch_statistics: bool = False) -> list[Tensor]:
    """The model's main output on each batch (eval mode, float32 on the CPU); a text batch's padding
    positions are zeroed (they never reach the encoder's result). With `batch_statistics` the BatchNorm
    layers normalize by each batch's own statistics, as after recalibration or in a fine-tune, instead of the
    stored ones (which stay as they were)."""
    was_training = model.training
    model.eval()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if batch_statistics else []
    stored = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    for m in norms:
        m.train()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    outs = []
    try:
        for batch in batches:
            if isinstance(batch, dict):
                y = _first_tensor(model(**{k: v.to(device) for k, v in batch.items()}))
                mask = batch.get("attention_mask")
                if mask is not None and y.dim() == 3 and y.shape[:2] == mask.shape:
                    y = y * mask.to(y.device, y.dtype).unsqueeze(-1)
            else:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                y = _first_tensor(model(x.to(device)))
            outs.append(y.detach().float().cpu())
    finally:
        for m, buffers in zip(norms, stored):
            for k, v in buffers.items():
                getattr(m, k).copy_(v)
        model.train(was_training)
    return outs


def output_gap(outputs: list[Tensor], reference: list[Tensor]) -> float:
    """Relative squared gap Σ‖y − y₀‖² / Σ‖y₀‖² over all batches."""
    num = sum(float((y - y0).square().sum()) for y, y0 in zip(outputs, reference))
    den = sum(float(y0.square().sum()) for y0 in reference)
    return num / max(den, 1e-30)


def _relative_error2(W1: Tensor, W0: Tensor) -> float:
    return float((W1.double() - W0.double()).square().sum() / W0.double().square().sum().clamp_min(1e-60))


def layer_sensitivities(model: nn.Module, ranks: Mapping[str, int], batches: list,
                        convert: Callable[[nn.Module, int], None],
                        weight: Callable[[nn.Module], Tensor],
                        cost: Callable[[float], float], batch_statistics: bool = False) -> dict[str, float]:
    """{layer name: sensitivity} of each named layer at its probe rank (`ranks`; layers at a rank that is
    not positive are left out): a copy of the layer converted in place by `convert(copy, rank)` replaces it
    while the model runs `batches`, then the original is put back. The model is unchanged on return.
    `weight(module)` gives a module's weight tensor and `cost(e²)` the allocation's cost of a relative
    squared error. A layer whose probe left no error or moved nothing gets the median; all are clamped to
    SENSITIVITY_RANGE around it. `batch_statistics`: see `model_outputs`."""
    reference = model_outputs(model, batches, batch_statistics)
    raw: dict[str, float | None] = {}
    for name, r in ranks.items():
        if r <= 0:
            continue
        original = model.get_submodule(name)
        probe = copy.deepcopy(original)
        convert(probe, r)
        with torch.no_grad():
            e2 = _relative_error2(weight(probe).detach(), weight(original).detach())
        model.set_submodule(name, probe)
        try:
            gap = output_gap(model_outputs(model, batches, batch_statistics), reference)
        finally:
            model.set_submodule(name, original)
        c = cost(e2)
        raw[name] = gap / c if c > 1e-12 and gap > 0 and math.isfinite(gap) else None
    known = sorted(v for v in raw.values() if v is not None)
    if not known:
        return {n: 1.0 for n in raw}
    median = known[len(known) // 2]
    lo, hi = median / SENSITIVITY_RANGE, median * SENSITIVITY_RANGE
    return {n: (1.0 if v is None else min(max(v, lo), hi) / median) for n, v in raw.items()}
