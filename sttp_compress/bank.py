"""Build every compressed weight of a model in one pass (method notes §7: batch frames of equal shape).

Per layer, a forward pass would generate each layer's frames on its own: hundreds of small
kernels per step. A `WeightBank` instead concatenates the reflector parameters of all frames of
equal shape across *all* layers, generates them in one batched call per shape, and hands each
layer its weight for the coming forward pass. On CUDA the whole build, forward and backward, can
be captured once as a CUDA graph (`torch.cuda.make_graphed_callables`) and replayed every step.

    bank = WeightBank(model, cuda_graph=True)   # after compress(...) and model.to("cuda")
    bank.attach()                               # training forwards now use the bank

`compile=True` runs the build through `torch.compile` first (fusing the frames' small elementwise
kernels), under the CUDA graph when both are on: an option to measure, not a default.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn

from .householder import frame
from .layers import SpectralTT, is_parametrized, weight_name

__all__ = ["WeightBank"]


class WeightBank:
    """All STTP/SVDP weights of a model, built together; see the module docstring."""

    def __init__(self, model: nn.Module, cuda_graph: bool = False, compile: bool = False):
        self.model = model
        self.layers: list[SpectralTT] = []
        self.originals: list[tuple[Tensor, ...]] = []
        for m in model.modules():
            if is_parametrized(m):
                pl = getattr(m.parametrizations, weight_name(m))
                p = next(q for q in pl if isinstance(q, SpectralTT))
                n = len(p.groups) + (p.spectrum != "identity")
                self.layers.append(p)
                self.originals.append(tuple(getattr(pl, f"original{i}") for i in range(n)))
        # frames of one shape across all layers: [(key, [(layer, group)])]
        by_shape: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
        for li, p in enumerate(self.layers):
            for gi, key in enumerate(p.groups):
                by_shape[key].append((li, gi))
        self.shapes = list(by_shape.items())
        self.cuda_graph, self.compile = cuda_graph, compile
        self._fn = None
        self._graphed = None
        self._handles: list = []

    @property
    def flat_originals(self) -> list[Tensor]:
        return [o for os_ in self.originals for o in os_]

    def _build(self, *flat: Tensor) -> tuple[Tensor, ...]:
        """Weights of every layer from the flat list of originals (a pure function of them)."""
        it = iter(flat)
        originals = [tuple(next(it) for _ in os_) for os_ in self.originals]
        frames: list[list[Tensor | None]] = [[None] * len(p.groups) for p in self.layers]
        for (d, r, red), members in self.shapes:
            params = [originals[li][gi] for li, gi in members]
            X = frame(torch.cat(params) if len(params) > 1 else params[0], d, r, red)
            for (li, gi), chunk in zip(members, X.split([q.shape[0] for q in params])):
                frames[li][gi] = chunk
        return tuple(p.weight_from_frames(f, p.spectrum_param(o))
                     for p, f, o in zip(self.layers, frames, originals))

    def build(self) -> list[Tensor]:
        """Every compressed layer's weight (with autograd), in `self.layers` order."""
        flat = self.flat_originals
        if self._fn is None:
            self._fn = torch.compile(self._build, dynamic=False) if self.compile else self._build
        with torch.autocast(flat[0].device.type, enabled=False):
            if self.cuda_graph and flat[0].is_cuda:
                if self._graphed is None:
                    self._graphed = torch.cuda.make_graphed_callables(self._fn, tuple(flat))
                return list(self._graphed(*flat))
            return list(self._fn(*flat))

    def _pre_hook(self, module: nn.Module, args) -> None:
        if module.training and torch.is_grad_enabled() and self.layers:
            for p, W in zip(self.layers, self.build()):
                p.override = W

    def _post_hook(self, module: nn.Module, args, output) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget the weights built for the last forward pass (layers rebuild their own again)."""
        for p in self.layers:
            p.override = None

    def attach(self) -> "WeightBank":
        """Build all weights before each training forward pass of the model."""
        self.detach()
        self._handles = [self.model.register_forward_pre_hook(self._pre_hook),
                         self.model.register_forward_hook(self._post_hook)]
        return self

    def detach(self) -> None:
        """Stop using the bank; layers build their own weights again."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()
        self._graphed = None
        self._fn = None
