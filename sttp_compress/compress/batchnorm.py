"""BatchNorm stored as what it computes at inference: y = a·x + b per channel, 2 numbers a channel instead of 4.

In eval mode a BatchNorm is the affine map a = γ/√(v + ε), b = β − a·μ of its running mean μ and variance v.
Its file keeps γ, β, μ, v and a counter; `fold_batchnorm_` keeps only a and b (`ChannelAffine`), so a file
in int8, where the compressed layers are small, loses the BatchNorms' share of its bytes (MobileNetV2 at
ratio 10: 68 kB of float16 running statistics, 16% of its file, and a header entry each). The model computes
the same outputs in eval mode (up to float rounding). It is no longer the same model for training: a folded
layer never normalizes by batch statistics, like a frozen BatchNorm, and a and b train as plain parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BATCHNORMS", "ChannelAffine", "fold_batchnorm_", "affine_names", "attach_affines"]

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class ChannelAffine(nn.Module):
    """y = weight·x + bias along dim 1 (a BatchNorm's channels) of (N, C, ...) inputs, in training as in eval.

    Runs as an eval-mode batch norm with mean 0, variance 1 − ε and ε = 2⁻⁸, which is exactly that map (1 − ε is
    exact in float16 and bfloat16 too, and 1 − ε + ε = 1; torch 2.11 refuses ε = 0): the same fused kernel as the
    BatchNorm it replaces, and an ONNX BatchNormalization that runtimes fold into the conv before it. The mean
    and variance are not stored (non-persistent buffers)."""

    eps = 2.0**-8

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("zeros", torch.zeros(num_features), persistent=False)
        self.register_buffer("var", torch.full((num_features,), 1.0 - self.eps), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.zeros, self.var, self.weight, self.bias, training=False, momentum=0.0,
                            eps=self.eps)

    def extra_repr(self) -> str:
        return str(self.num_features)


def _foldable(m: nn.Module) -> bool:
    """One of torch's BatchNorms (not a subclass, whose forward may do more) with running statistics (without them
    it always normalizes by the batch: nothing to fold)."""
    return type(m) in BATCHNORMS and m.track_running_stats and m.running_mean is not None


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever the model holds `old` (a module registered under several names is one module)."""
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if m is old and name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def fold_batchnorm_(model: nn.Module) -> list[str]:
    """Replace, in place, every BatchNorm with running statistics by its eval-mode `ChannelAffine`; returns their
    names. Computed in float64 and stored in the BatchNorm's dtype and device."""
    names = [n for n, m in model.named_modules() if n and _foldable(m)]
    for name in names:
        bn = model.get_submodule(name)
        var, mean = bn.running_var.double(), bn.running_mean.double()
        a = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            a = a * bn.weight.double()
        b = -a * mean + (bn.bias.double() if bn.bias is not None else 0.0)
        affine = ChannelAffine(bn.num_features).to(bn.running_mean.device, bn.running_mean.dtype)
        affine.weight.copy_(a)
        affine.bias.copy_(b)
        _replace(model, bn, affine)
    return names


def affine_names(model: nn.Module) -> list[str]:
    """Names of the model's `ChannelAffine` layers (what a checkpoint records to rebuild them)."""
    return [n for n, m in model.named_modules() if isinstance(m, ChannelAffine)]


def attach_affines(model: nn.Module, names: list[str]) -> None:
    """Give a freshly built architecture the `ChannelAffine` layers of a folded checkpoint: each named module must
    be a BatchNorm (ValueError naming the first that is not), replaced by one of its width."""
    for name in names:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{name} is not a module of the architecture") from None
        if type(m) not in BATCHNORMS:
            raise ValueError(f"{name} is a {type(m).__name__}, not a BatchNorm")
        _replace(model, m, ChannelAffine(m.num_features))
