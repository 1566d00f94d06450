"""Weight-only quantization of a dense model, the byte frontier's anchors (bench_storage.py, bench_frontier.py).

Every weight matrix (a `weight` of two or more dimensions: convolutions, Linear, Embedding) is rounded per
output channel, symmetric, to `bits` (scale = max |w| of the channel / (2^(bits-1) - 1)); biases and norms
stay float32. `packed_bytes` is the file such a model needs: bits/8 per rounded value, a float16 scale per
channel, the rest in float16 (as sttp-compress's int8 files store theirs since 2fc91d3; float32 before). `straight_through` fine-tunes through the rounding (the forward sees the
rounded weight, the gradient passes to the float weight as if it were not rounded), as the usual
quantization-aware training does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize


def fake_quant(w: Tensor, bits: int) -> Tensor:
    """w rounded per output channel (dim 0), symmetric, to `bits`, back in w's dtype."""
    qmax = 2 ** (bits - 1) - 1
    rows = w.reshape(w.shape[0], -1)
    scale = (rows.abs().amax(1, keepdim=True) / qmax).clamp_min(1e-12)
    return (torch.round(rows / scale).clamp(-qmax, qmax) * scale).reshape(w.shape)


class StraightThrough(nn.Module):
    """A parametrization: the rounded weight forward, the identity backward."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, w: Tensor) -> Tensor:
        return w + (fake_quant(w, self.bits) - w).detach()


def matrices(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, "weight") of every weight of two or more dimensions."""
    return [(m, "weight") for m in model.modules()
            if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() >= 2]


def quantize_(model: nn.Module, bits: int) -> float:
    """Round every weight matrix in place; returns the mean relative weight error ‖q(W) − W‖/‖W‖."""
    errors = []
    with torch.no_grad():
        for m, name in matrices(model):
            w = getattr(m, name)
            q = fake_quant(w, bits)
            errors.append(float((q - w).norm() / w.norm().clamp_min(1e-30)))
            w.copy_(q)
    return sum(errors) / max(1, len(errors))


def packed_bytes(model: nn.Module, bits: int) -> int:
    """Bytes of the quantized model stored packed: bits/8 a rounded value, a float16 scale a channel, the
    other floating tensors of the state dict in float16 (integer buffers at their own size; buffers a state dict
    leaves out, such as a folded BatchNorm's constant zeros and ones, are not stored)."""
    quantized = {id(getattr(m, n)) for m, n in matrices(model)}
    size = 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) in quantized:
            size += (t.numel() * bits + 7) // 8 + 2 * t.shape[0]
        else:
            size += t.numel() * (2 if t.is_floating_point() else t.element_size())
    return size


def straight_through(model: nn.Module, bits: int) -> None:
    """Make every weight matrix train through its rounding (`StraightThrough`), in place."""
    for m, name in matrices(model):
        parametrize.register_parametrization(m, name, StraightThrough(bits))


def settle_(model: nn.Module) -> None:
    """After straight-through training: the float weights back as plain parameters, then rounded."""
    bits = None
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], StraightThrough):
            bits = m.parametrizations.weight[0].bits
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
    if bits is not None:
        quantize_(model, bits)
