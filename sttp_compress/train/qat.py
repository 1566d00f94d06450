"""Quantization-aware steps for int8 storage: train through the rounding the checkpoint will apply.

`--dtype int8` rounds every stored matrix (the layers' packed Householder vectors, dense weights) to int8 in
blocks (io/quantize.py). `rounded_storage(model)` makes the model compute with exactly those rounded values
while the optimizer keeps updating the float ones (straight-through: the gradient at the rounded point is
applied to the float parameters). Each forward rounds the parameters in place the first time after an
optimizer step, keeping the float values aside; each optimizer step first puts the float values back.
On leaving, the float values are restored. The phase runs after fine-tuning (`pipeline`, `--qat-steps`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from sttp_compress.io.quantize import dequantize_rows, quantize_rows, stored_in_int8

__all__ = ["stored_rounding", "rounded_storage", "rounded_parameters"]


def stored_rounding(t: Tensor) -> Tensor:
    """t as an int8 checkpoint stores it and loads it back (`quantize_rows` then `dequantize_rows`)."""
    return dequantize_rows(*quantize_rows(t)).to(t.dtype).reshape(t.shape)


def rounded_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an int8 checkpoint stores in int8 (`quantize.stored_in_int8`)."""
    return [p for p in model.parameters() if stored_in_int8(p)]


@contextmanager
def rounded_storage(model: nn.Module) -> Iterator[None]:
    """Forwards of `model` inside the block use the int8-rounded parameters; optimizer steps update the float
    ones (see the module doc). The float parameters are back when the block ends."""
    params = rounded_parameters(model)
    floats: list[Tensor] = []
    state = {"rounded": False}

    @torch.no_grad()
    def round_in(module: nn.Module, args) -> None:
        if state["rounded"]:
            return
        floats[:] = [p.detach().clone() for p in params]
        for p in params:
            p.copy_(stored_rounding(p))
        state["rounded"] = True

    @torch.no_grad()
    def restore(*_) -> None:
        if state["rounded"]:
            for p, f in zip(params, floats):
                p.copy_(f)
            state["rounded"] = False

    handles = [model.register_forward_pre_hook(round_in),
               register_optimizer_step_pre_hook(restore)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        restore()
