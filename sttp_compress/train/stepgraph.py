"""Replay a model's whole training forward and backward as CUDA graphs, one per input shape.

On a GPU the train step of a compressed model is bound by the CPU that launches its kernels, not by the
kernels (benchmarks/results/experiments/train_step_profile.md: ~16 ms of CPU against ~12.6 ms of kernels for the
ResNet-18 at ratio 10). `StepGraph` captures the model's forward (the weight bank's build included) and
its backward with `torch.cuda.make_graphed_callables` the first time a training batch of a shape comes
(`capture_at`), and replays them afterwards: a step then costs the CPU two graph launches, the loss, the
gradient accumulation and the optimizer. `finetune` hands it a `finetune.DistillStep` when the loss is a
custom one (text distillation), so that the teacher's forward and the loss are captured too.

    net = StepGraph(student, bank=bank)       # on one CUDA device; DDP is not graphed
    out = net(x)                              # training + grad: graphed; otherwise student(x)
    out = net(input_ids=ids, attention_mask=mask)   # keyword tensors too (text batches)

Inputs are tensors, positional or keyword (None keywords are left out); each distinct set of names, shapes
and dtypes (and autocast state) gets its own graph, up to `max_graphs` of them. The graphs capture into one
shared memory pool, so the activation memory they keep is about that of the largest, not the sum (safe: they
replay one at a time on one stream, and what one graph keeps between replays, its input and output buffers,
is never handed to another); a new shape is captured only while the free device memory is at least
`MEMORY_MARGIN` times what the largest capture so far took (else it runs eagerly, one warning). With
`capture_at=2` a shape is captured at its second batch, so one-off shapes cost no capture; but capture then
happens while the previous step's autograd graph may still be alive, and a capture fails if it is
(autograd's gradient-accumulation nodes stay on the stream they were made on), so the default captures at a
shape's first batch and callers must not keep the previous step's outputs or loss alive (finetune keeps only
detached copies).

What runs eagerly instead (same results, the old speed): eval mode, no-grad, CPU tensors, non-tensor inputs,
a shape's first `capture_at - 1` batches, shapes beyond `max_graphs` or the free memory, and after a capture
fails every shape not captured before (one warning; the CUDA random generator's state is restored).
Python-side effects of the forward (hooks' state, Python random numbers) happen at capture only, as with any
CUDA graph (dropout masks are drawn anew each replay); the warm-up passes' BatchNorm statistics are rolled
back. A graphed call's outputs are the graph's buffers, which the next replay of any shape's graph may
overwrite: use them within the step (or clone them). Each backward must follow
`optimizer.zero_grad(set_to_none=True)` (as the fine-tune loop does): the gradients handed to autograd are
the graph's own buffers too, so accumulating two backwards into one `.grad` is not supported.
"""

from __future__ import annotations

import warnings
import weakref
from collections import Counter
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["StepGraph", "make_graphed", "release_capture_graph", "warm_backward", "hold_accumulate_grad_warning",
           "release_accumulate_grad_warning", "MEMORY_MARGIN"]

MEMORY_MARGIN = 2.0  # capture a new shape only with this many times the largest capture's memory free


def make_graphed(fn: Any, sample_args: tuple[Tensor, ...], **kwargs: Any) -> Any:
    """`torch.cuda.make_graphed_callables(fn, sample_args, **kwargs)`, leaving the CUDA random generator usable
    when the capture fails (the exception is re-raised): a failed capture leaves the generator's state marked
    as capturing, and every later random op then raises "Offset increment outside graph capture"."""
    index = sample_args[0].device.index
    generator = torch.cuda.default_generators[torch.cuda.current_device() if index is None else index]
    rng = generator.clone_state()
    warm_backward(sample_args[0].device)
    hold_accumulate_grad_warning()  # torch's own warm-up backward runs on a side stream by design
    try:
        return torch.cuda.make_graphed_callables(fn, sample_args, **kwargs)
    except Exception:
        generator.graphsafe_set_state(rng)
        raise
    finally:
        release_accumulate_grad_warning()


_QUIET = [0]  # how many holders keep PyTorch's AccumulateGrad stream-mismatch warning off


def hold_accumulate_grad_warning() -> None:
    """Turn PyTorch's AccumulateGrad stream-mismatch warning off until every holder has released it."""
    if _QUIET[0] == 0:
        _warn_on_stream_mismatch(False)
    _QUIET[0] += 1


def release_accumulate_grad_warning() -> None:
    """One holder less; the last one turns the warning back on (torch's default: it has no getter to restore
    a user's own setting)."""
    _QUIET[0] = max(0, _QUIET[0] - 1)
    if _QUIET[0] == 0:
        _warn_on_stream_mismatch(True)


def _warn_on_stream_mismatch(on: bool) -> None:
    """torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch where this torch has it."""
    setter = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
    if setter is not None:
        setter(on)


_WARMED: set[int] = set()


def warm_backward(device: torch.device) -> None:
    """One tiny eager matmul backward on `device`, once per process, before the first capture: otherwise the
    autograd engine's CUDA thread makes its cuBLAS handle inside the capture, with no current CUDA context, and
    PyTorch warns "Attempting to run cuBLAS, but there was no current CUDA context" (measured on torch 2.11)."""
    index = torch.cuda.current_device() if device.index is None else device.index
    if index in _WARMED:
        return
    a = torch.ones(2, 2, device=torch.device("cuda", index), requires_grad=True)
    (a @ a).sum().backward()
    _WARMED.add(index)


def release_capture_graph(graphed: Any) -> bool:
    """Detach, in place, the outputs `torch.cuda.make_graphed_callables` keeps from its forward capture.

    Their autograd graph is dead once the backward is captured, but it keeps the parameters' gradient-
    accumulation nodes alive, and those were made on the capture's side stream: every later backward on the
    training stream then accumulates across streams (PyTorch warns "The AccumulateGrad node's stream does not
    match the stream of the node that produced the incoming gradient"). With the outputs detached those nodes
    are freed, and the next forward makes them on the stream that trains. The outputs are reached through
    the closures of torch's graphed forward (torch internals): returns False, changing nothing, where that
    layout is not found."""
    import inspect

    try:
        functionalized = inspect.getclosurevars(graphed.forward).nonlocals["graphed"]
        graphed_cls = inspect.getclosurevars(functionalized).nonlocals["Graphed"]
        outputs = inspect.getclosurevars(graphed_cls.forward).nonlocals["static_outputs"]
    except (AttributeError, KeyError, TypeError, ValueError):
        return False
    for out in outputs:
        if isinstance(out, Tensor) and out.grad_fn is not None and not out._is_view():
            out.detach_()
    return True


class _Shell(nn.Module):
    """A hook-free module around the model, called with its input tensors positionally: make_graphed_callables
    refuses modules with hooks (the weight bank's) and takes the parameters of the module it is given as
    the graph's inputs."""

    def __init__(self, model: nn.Module, n_args: int, names: tuple[str, ...]):
        super().__init__()
        self.model, self.n_args, self.names = model, n_args, names

    def forward(self, *tensors: Tensor) -> Any:
        return self.model(*tensors[:self.n_args], **dict(zip(self.names, tensors[self.n_args:])))


class StepGraph(nn.Module):
    """`model`'s training forward/backward replayed as CUDA graphs per input shape; see the module docstring.

    A module wrapping `model` (like DistributedDataParallel): `train()`/`eval()` reach the model.
    """

    def __init__(self, model: nn.Module, bank: Any = None, max_graphs: int = 8, capture_at: int = 1,
                 warmup: int = 3):
        super().__init__()
        self.model = model
        self.bank = bank  # a WeightBank attached to model: builds eagerly inside the capture
        self.max_graphs, self.capture_at, self.warmup = max_graphs, capture_at, warmup
        self.graphs: dict[tuple, Any] = {}
        self.seen: Counter = Counter()
        self.failed: str | None = None  # why capture was given up, once it failed
        self.pool: Any = None  # the memory pool all graphs capture into (made at the first capture)
        self.capture_bytes = 0  # the most device memory one capture has taken (reserved before vs after)
        self.full = False  # a shape was left eager for want of memory (warned once)

    def _key(self, tensors: list[Any], n_args: int, names: tuple[str, ...]) -> tuple | None:
        """The graph key of a call, or None when it runs eagerly."""
        if (not tensors or not self.model.training or not torch.is_grad_enabled()
                or not all(isinstance(t, Tensor) and t.is_cuda for t in tensors)):
            return None
        amp = torch.is_autocast_enabled("cuda")
        return (n_args, names, tuple((tuple(t.shape), t.dtype, t.device) for t in tensors), amp,
                torch.get_autocast_dtype("cuda") if amp else None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = tuple(sorted(k for k, v in kwargs.items() if v is not None))
        tensors = [*args, *(kwargs[k] for k in names)]
        key = self._key(tensors, len(args), names)
        if key is None:
            return self.model(*args, **kwargs)
        graphed = self.graphs.get(key)
        if graphed is None and self.failed is None and len(self.graphs) < self.max_graphs:
            self.seen[key] += 1
            if self.seen[key] >= self.capture_at and self._room(tensors[0].device):
                graphed = self._capture(key, tensors, len(args), names)
        return self.model(*args, **kwargs) if graphed is None else graphed(*tensors)

    def _room(self, device: torch.device) -> bool:
        """Whether the device has room for one more graph: MEMORY_MARGIN × the largest capture so far free
        (what the driver has free plus what PyTorch's cache holds unused)."""
        if not self.graphs or not self.capture_bytes:
            return True
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if free >= MEMORY_MARGIN * self.capture_bytes:
            return True
        if not self.full:
            self.full = True
            warnings.warn(f"step graph: {len(self.graphs)} batch shapes captured; further shapes run eagerly "
                          f"({free / 2**30:.1f} GiB free, a capture took up to {self.capture_bytes / 2**30:.1f} GiB)",
                          stacklevel=3)
        return False

    def _capture(self, key: tuple, tensors: list[Tensor], n_args: int, names: tuple[str, ...]) -> Any:
        """Capture forward and backward for inputs like `tensors`; None when that fails (and no capture after it)."""
        buffers = list(self.model.buffers())
        saved = [b.detach().clone() for b in buffers]
        amp, dtype = key[3], key[4]
        device = tensors[0].device
        before = torch.cuda.memory_reserved(device)
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with (self.bank.eager() if self.bank is not None else nullcontext()), \
                    torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=amp, cache_enabled=False):
                # private copies of the inputs: they become the graph's input buffers, which each replay
                # overwrites (the caller's tensors may be views into its data)
                graphed = make_graphed(_Shell(self.model, n_args, names), tuple(t.detach().clone() for t in tensors),
                                       num_warmup_iters=self.warmup, allow_unused_input=True, pool=self.pool)
        except Exception as e:  # noqa: BLE001 - any model may hold what a graph cannot capture; run eagerly
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"step graph: CUDA graph capture of the training step failed, running it eagerly "
                          f"instead ({self.failed})", stacklevel=3)
            return None
        finally:
            with torch.no_grad():  # the warm-up passes updated BatchNorm statistics (and their counters)
                for b, s in zip(buffers, saved):
                    b.copy_(s)
        release_capture_graph(graphed)  # the parameters' accumulation nodes: made anew on the training stream
        if not self.graphs:
            # Replays still make PyTorch report the AccumulateGrad stream mismatch (CLI runs on an H100, torch
            # 2.11, with the release above): the replayed gradients reach nodes first made during capture. The
            # sums are right (test_graphed_steps_equal_eager_steps); the warning is a note on synchronization,
            # whose cost is inside the measured step times. Off while this module's graphs live.
            hold_accumulate_grad_warning()
            weakref.finalize(self, release_accumulate_grad_warning)
        self.graphs[key] = graphed
        self.seen.pop(key, None)
        self.capture_bytes = max(self.capture_bytes, torch.cuda.memory_reserved(device) - before)
        return graphed
