"""Replay a model's whole training forward and backward as CUDA graphs, one per input shape.

On a GPU the train step of a compressed model is bound by the CPU that launches its kernels, not by the
kernels (benchmarks/results/train_step_profile.md: ~16 ms of CPU against ~12.6 ms of kernels for the
ResNet-18 at ratio 10). `StepGraph` captures the model's forward (the weight bank's build included) and
its backward with `torch.cuda.make_graphed_callables` the first time it sees a training batch of a
shape, and replays them afterwards: a step then costs the CPU two graph launches, the loss, the
gradient accumulation and the optimizer.

    net = StepGraph(student, bank=bank)       # on one CUDA device; DDP is not graphed
    out = net(x)                              # training + grad: graphed; otherwise student(x)


What runs eagerly instead (same results, the old speed): eval mode, no-grad, CPU tensors, inputs that
are not a single tensor, shapes beyond `max_graphs`, and any model whose capture fails (one warning).
Python-side effects of the forward (hooks' state, Python random numbers) happen at capture only, as
with any CUDA graph; the warm-up passes' BatchNorm statistics are rolled back. Each backward must
follow `optimizer.zero_grad(set_to_none=True)` (as the fine-tune loop does): the gradients handed to
autograd are the graph's own buffers, so accumulating two backwards into the same `.grad` is not
supported.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["StepGraph"]


class _Shell(nn.Module):
    """A hook-free module around the model: make_graphed_callables refuses modules with hooks (the weight
    bank's), and takes the model's parameters as the graph's inputs through this one."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Any:
        return self.model(x)


class StepGraph(nn.Module):
    """`model`'s training forward/backward replayed as CUDA graphs per input shape; see the module docstring.

    A module wrapping `model` (like DistributedDataParallel): `train()`/`eval()` reach the model.
    """

    def __init__(self, model: nn.Module, bank: Any = None, max_graphs: int = 2, warmup: int = 3):
        super().__init__()
        self.model = model
        self.bank = bank  # a WeightBank attached to model: builds eagerly inside the capture
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.graphs: dict[tuple, Any] = {}
        self.failed: str | None = None  # why capture was given up, once it failed

    def _key(self, x: Any) -> tuple | None:
        """The graph key of a call, or None when it runs eagerly."""
        if (self.failed is not None or not isinstance(x, Tensor) or not x.is_cuda or not self.model.training
                or not torch.is_grad_enabled()):
            return None
        amp = torch.is_autocast_enabled("cuda")
        return (tuple(x.shape), x.dtype, x.device, amp, torch.get_autocast_dtype("cuda") if amp else None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        key = self._key(args[0]) if len(args) == 1 and not kwargs else None
        if key is None:
            return self.model(*args, **kwargs)
        x = args[0]
        graphed = self.graphs.get(key)
        if graphed is None and len(self.graphs) < self.max_graphs:
            graphed = self._capture(key, x)
        return self.model(x) if graphed is None else graphed(x)

    def _capture(self, key: tuple, x: Tensor) -> Any:
        """Capture forward and backward for inputs like `x`; None (and eager from now on) when that fails."""
        buffers = list(self.model.buffers())
        saved = [b.detach().clone() for b in buffers]
        amp, dtype = key[3], key[4]
        try:
            with (self.bank.eager() if self.bank is not None else nullcontext()), \
                    torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=amp, cache_enabled=False):
                # a private copy of the input: it becomes the graph's input buffer, which each replay
                # overwrites (x itself may be a view into the caller's data)
                graphed = torch.cuda.make_graphed_callables(_Shell(self.model), (x.detach().clone(),),
                                                            num_warmup_iters=self.warmup, allow_unused_input=True)
        except Exception as e:  # noqa: BLE001 - any model may hold what a graph cannot capture; run eagerly
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"step graph: CUDA graph capture of the training step failed, running it eagerly "
                          f"instead ({self.failed})", stacklevel=3)
            return None
        finally:
            with torch.no_grad():  # the warm-up passes updated BatchNorm statistics (and their counters)
                for b, s in zip(buffers, saved):
                    b.copy_(s)
        self.graphs[key] = graphed
        return graphed
