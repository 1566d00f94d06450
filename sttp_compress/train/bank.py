"""Build every compressed weight of a model in one pass (method notes §7: batch frames of equal shape).

Per layer, a forward pass would generate each layer's frames on its own and contract each chain of
cores with its own matmuls: hundreds of small kernels per step. A `WeightBank` instead
- concatenates the reflector parameters of all frames of equal shape across *all* layers and
  generates them in one batched call per shape, and
- contracts all chains (the U and V side of every layer) level by level with one batched matmul per
  distinct chain prefix: chains are sorted by their sequence of core shapes, so chains that share a
  prefix (e.g. the early cores of every 512-channel layer) are one contiguous batch at each level
  and split only where their shapes diverge (ResNet-18 at ratio 10: 252 chain matmuls become 37),
and hands each layer its weight for the coming forward pass. On CUDA the whole build, forward and
backward, can be captured once as a CUDA graph (`torch.cuda.make_graphed_callables`) and replayed
every step.

    bank = WeightBank(model, cuda_graph=True)   # after compress(...) and model.to("cuda")
    bank.attach()                               # training forwards now use the bank

`compile=True` runs the build through `torch.compile` first (fusing the frames' small elementwise
kernels), under the CUDA graph when both are on: an option to measure, not a default.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sttp_compress.core.forms import layer_originals
from sttp_compress.compress.convert import parametrization
from sttp_compress.core.householder import FramePlan
from sttp_compress.core.spectral_tt import SpectralTT, is_parametrized, weight_name
from sttp_compress.train.freecores import free_frames
from sttp_compress.train.stepgraph import make_graphed

__all__ = ["WeightBank", "BankedWeight"]


@dataclass
class _Node:
    """Chains [start, stop) of the sorted chain list that share their first level+1 core shapes."""

    level: int
    key: tuple[int, int, bool]  # the frame shape (d, r, reduced) of their core at this level
    start: int
    stop: int
    ends: int = 0  # how many of them (the first ones) end at this level
    children: list["_Node"] = field(default_factory=list)


def _tree(sigs: list[tuple], level: int, start: int, stop: int) -> list[_Node]:
    """Nodes of chains [start, stop) at `level`, grouped by their core shape there (sigs sorted)."""
    nodes, i = [], start
    while i < stop:
        if len(sigs[i]) <= level:
            i += 1
            continue
        key, j = sigs[i][level], i
        while j < stop and len(sigs[j]) > level and sigs[j][level] == key:
            j += 1
        node = _Node(level, key, i, j)
        node.ends = sum(len(sigs[c]) == level + 1 for c in range(i, j))
        node.children = _tree(sigs, level + 1, i + node.ends, j)
        nodes.append(node)
        i = j
    return nodes


def _walk(nodes: list[_Node]):
    for n in nodes:
        yield n
        yield from _walk(n.children)


class _FreePlan:
    """FramePlan's stand-in for free cores: each shape's frames concatenated and put in tree order."""

    def __init__(self, orders: list[list[int] | None], device: torch.device):
        self.index = [None if o is None else torch.tensor(o, device=device) for o in orders]

    def __call__(self, groups: list[list[Tensor]]) -> list[Tensor]:
        out = []
        for members, index in zip(groups, self.index):
            X = torch.cat(members) if len(members) > 1 else members[0]
            out.append(X if index is None else X.index_select(0, index))
        return out


class WeightBank:
    """All STTP/SVDP weights of a model, built together; see the module docstring."""

    def __init__(self, model: nn.Module, cuda_graph: bool = False, compile: bool = False,
                 max_waste: float | None = None):
        self.model = model
        self.modules: list[nn.Module] = []  # the compressed layers
        self.layers: list[SpectralTT] = []  # their parametrizations
        self.originals: list[tuple[Tensor, ...]] = []  # per layer: the group frames' sources, then the rest
        for m in model.modules():
            if is_parametrized(m):
                p = parametrization(m)
                self.modules.append(m)
                self.layers.append(p)
                o, free = layer_originals(m, p), free_frames(m)
                self.originals.append(o if free is None else (*free, *o[len(p.groups):]))
        released = {free_frames(m) is not None for m in self.modules}
        if len(released) > 1:
            raise ValueError("a weight bank needs every layer's cores free (freecores.release_gauge) or none")
        self.free = released == {True}  # the group sources are the frames themselves (n_frames, d, r)
        # every chain: (layer, side) with the frame (group, row) of each of its cores, sorted by core shapes
        chains = []
        for li, p in enumerate(self.layers):
            where = {sk: (gi, row) for gi, mem in enumerate(p.members) for row, sk in enumerate(mem)}
            for side, K in (("u", len(p.tt.out_modes)), ("v", len(p.tt.in_modes))):
                cores = [where[(side, k)] for k in range(K)]
                chains.append((tuple(p.groups[gi] for gi, _ in cores), li, side, cores))
        chains.sort(key=lambda c: c[0])  # stable: layer order within equal shapes
        self.chains = [(li, side, cores) for _, li, side, cores in chains]
        self.tree = _tree([c[0] for c in chains], 0, 0, len(chains))
        # frames of one shape across all layers: [(key, [(layer, group)])], and for each shape the
        # order in which the tree consumes its frames (rows of the concatenated parameters)
        by_shape: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
        for li, p in enumerate(self.layers):
            for gi, key in enumerate(p.groups):
                by_shape[key].append((li, gi))
        self.shapes = list(by_shape.items())
        offset = {}
        for key, members in self.shapes:
            o = 0
            for li, gi in members:
                offset[(li, gi)] = o
                o += len(self.layers[li].members[gi])
        order: dict[tuple, list[int]] = defaultdict(list)
        self._sizes: dict[tuple, list[int]] = defaultdict(list)
        for node in _walk(self.tree):
            for c in range(node.start, node.stop):
                li, _, cores = self.chains[c]
                gi, row = cores[node.level]
                order[node.key].append(offset[(li, gi)] + row)
            self._sizes[node.key].append(node.stop - node.start)
        self._order = {k: (None if v == list(range(len(v))) else v) for k, v in order.items()}
        self._counts = [len(order[k]) for k, _ in self.shapes]
        self.max_waste = max_waste
        self._plans: dict[torch.device, FramePlan] = {}
        self.cuda_graph, self.compile = cuda_graph, compile
        self._fn = None
        self._graphed = None
        self._handles: list = []
        self.weights: list[Tensor] | None = None  # built for the current training forward pass

    def __repr__(self) -> str:
        return f"WeightBank({len(self.layers)} layers{', free cores' if self.free else ''})"

    @property
    def flat_originals(self) -> list[Tensor]:
        return [o for os_ in self.originals for o in os_]

    @property
    def inputs(self) -> list[Tensor]:
        """The build's inputs: every non-empty original. Frames without free entries (0-sized originals)
        are constant; leaving them out spares the graph's Python wrapper a hundred tensors per step."""
        return [o for o in self.flat_originals if o.numel()]

    def _plan(self, device: torch.device) -> FramePlan:
        """The frame plan for `device`, with its constants made there (before any CUDA graph capture).

        Every frame of the model is generated in a few padded batched calls (householder.FramePlan), in
        tree order. On GPUs the build is bound by its number of kernels, so shapes share padded calls;
        on CPUs by arithmetic, so only frames of one shape are batched (padding made the CPU build of
        ResNet-18 at ratio 10 1.4x slower).
        """
        if device not in self._plans:
            if self.free:  # no reflectors: each shape's frames only gathered in tree order
                self._plans[device] = _FreePlan([self._order[k] for k, _ in self.shapes], device)
                return self._plans[device]
            waste = self.max_waste if self.max_waste is not None else (2.0 if device.type == "cuda" else 1.0)
            plan = FramePlan([k for k, _ in self.shapes], self._counts, [self._order[k] for k, _ in self.shapes],
                             max_waste=waste)
            plan.prepare(device, self.flat_originals[0].dtype)
            self._plans[device] = plan
        return self._plans[device]

    def _build(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        """Weights of every layer from `self.inputs` (a pure function of them)."""
        it = iter(inputs)
        originals = [tuple(next(it) if o.numel() else o for o in os_) for os_ in self.originals]
        frames = self._plan(inputs[0].device)([[originals[li][gi] for li, gi in members] for _, members in self.shapes])
        pieces = {key: iter(X.split(self._sizes[key])) for (key, _), X in zip(self.shapes, frames)}
        final: dict[tuple[int, str], Tensor] = {}

        def contract(node: _Node, state: Tensor | None) -> None:
            X = next(pieces[node.key])  # (n, R_{k-1}·m_k, R_k)
            if state is None:  # first cores: R_0 = 1
                state = X
            else:
                n, rows, R = X.shape
                R0 = state.shape[-1]
                state = torch.bmm(state, X.reshape(n, R0, (rows // R0) * R)).reshape(n, -1, R)
            sizes = ([node.ends] if node.ends else []) + [c.stop - c.start for c in node.children]
            parts = list(state.split(sizes)) if len(sizes) > 1 else [state]
            if node.ends:
                for c, U in zip(range(node.start, node.start + node.ends), parts.pop(0).unbind(0)):
                    li, side, _ = self.chains[c]
                    final[(li, side)] = U
            for child, part in zip(node.children, parts):
                contract(child, part)

        for node in self.tree:
            contract(node, None)
        return tuple(p.weight_from_factors(final[(li, "u")], p.sigma(p.spectrum_param(o)), final[(li, "v")],
                                           p.row_scale_param(o), p.col_scale_param(o))
                     for li, (p, o) in enumerate(zip(self.layers, originals)))

    def _function(self):
        """The build as it runs: `_build`, through torch.compile when configured."""
        if self._fn is None:
            self._fn = torch.compile(self._build, dynamic=False) if self.compile else self._build
        return self._fn

    def _graph(self, flat: list[Tensor]) -> bool:
        """True when builds replay the CUDA graph, capturing it first if that has not happened yet (when
        configured and on CUDA). Should the capture fail, the bank warns once and builds the weights eagerly
        (same values, slower)."""
        if not (self.cuda_graph and flat and flat[0].is_cuda):
            return False
        if self._graphed is None:
            self._plan(flat[0].device)  # the plan's index tensors exist before the capture
            torch.cuda.synchronize(flat[0].device)  # no collective or copy still running during capture
            try:
                with torch.autocast(flat[0].device.type, enabled=False):
                    self._graphed = make_graphed(self._function(), tuple(flat))
            except RuntimeError as e:
                warnings.warn(f"weight bank: CUDA graph capture failed, building weights eagerly instead "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})", stacklevel=3)
                self.cuda_graph = False
                return False
        return True

    def prepare(self) -> bool:
        """Capture the CUDA graph now (when configured); True when the builds will replay it.

        finetune calls this before wrapping the model in DistributedDataParallel, so the capture
        happens on a quiet device rather than inside the wrapper's first forward; otherwise the first
        build captures it.
        """
        return self._graph(self.inputs)

    def build(self) -> list[Tensor]:
        """Every compressed layer's weight (with autograd), in `self.layers` order."""
        flat = self.inputs
        self._plan(flat[0].device)
        with torch.autocast(flat[0].device.type, enabled=False):
            if self._graph(flat):
                return list(self._graphed(*flat))
            return list(self._function()(*flat))

    @contextmanager
    def eager(self) -> Iterator[None]:
        """Builds inside this block run without the bank's own CUDA graph (stepgraph.StepGraph captures the
        whole training step around them; CUDA graph captures do not nest)."""
        graph, self.cuda_graph = self.cuda_graph, False
        try:
            yield
        finally:
            self.cuda_graph = graph

    def _pre_hook(self, module: nn.Module, args) -> None:
        if module.training and torch.is_grad_enabled() and self.layers:
            self.weights = self.build()

    def _post_hook(self, module: nn.Module, args, output) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget the weights built for the last forward pass (layers rebuild their own again)."""
        self.weights = None

    def attach(self) -> "WeightBank":
        """Build all weights before each training forward pass of the model (keeps a graph `prepare` captured):
        each layer's parametrization list reads its weight through a `BankedWeight` while attached."""
        self._remove_hooks()
        self._handles = [self.model.register_forward_pre_hook(self._pre_hook),
                         self.model.register_forward_hook(self._post_hook)]
        for i, m in enumerate(self.modules):
            plist = getattr(m.parametrizations, weight_name(m))
            plist.forward = BankedWeight(self, i, plist, plist.__dict__.get("forward"))
        return self

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for m in self.modules:
            plist = getattr(m.parametrizations, weight_name(m))
            served = plist.__dict__.get("forward")
            if isinstance(served, BankedWeight) and served.bank is self:
                if served.fallback is None:
                    del plist.forward  # the class's forward again
                else:
                    plist.forward = served.fallback

    def detach(self) -> None:
        """Stop using the bank; layers build their own weights again."""
        self._remove_hooks()
        self.clear()
        self._graphed = None
        self._fn = None


class BankedWeight:
    """A layer's weight while a bank is attached: the one the bank built for this training forward pass, else
    what the layer's parametrization list computes without the bank (`fallback`, or its class's forward).

    Set as the instance's `forward` of the layer's parametrization list, so the parametrization itself keeps
    no state of the bank's."""

    def __init__(self, bank: WeightBank, index: int, plist: nn.Module, fallback=None):
        self.bank, self.index, self.plist, self.fallback = bank, index, plist, fallback

    def __call__(self) -> Tensor:
        if self.bank.weights is not None:
            return self.bank.weights[self.index]
        return self.fallback() if self.fallback is not None else type(self.plist).forward(self.plist)
