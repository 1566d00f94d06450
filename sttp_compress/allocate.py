"""Per-layer rank allocation for a whole-model compression ratio (method notes §6, eq. 11).

`greedy` spends the parameter budget where it cuts the most weight error: each layer's options
(rank → DOF, cost −log(1 − e²) of its relative TT-SVD error e) are reduced to their lower convex
hull, and hull segments are taken across layers in order of cost removed per parameter, then
single-rank steps fill what is left of the budget. `uniform` finds the largest single rank that fits, then raises
the largest layers one rank at a time while the budget allows. Both reach the target from above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import Tensor, nn

from .errors import UserError
from .layers import matrix_factors, to_matrix, weight_kind
from .tt import TTShape, chain_svd, pad_matrix

__all__ = ["LayerOptions", "tt_error", "layer_options", "allocate", "budget_for_ratio", "uniform_rank",
           "check_reachable"]

DENSE = 0  # rank value meaning "kept dense"
_GRID = sorted({int(round(b * 2 ** e)) for e in range(0, 14) for b in (1, 1.5)} | {3, 5, 6})


def tt_error(W: Tensor, shape: TTShape) -> float:
    """Relative error ‖W − W_r‖/‖W‖ of the spectral TT-SVD of the matrix W at `shape`'s ranks."""
    _, B = chain_svd(W, shape.out_modes, shape.u_ranks)
    _, C = chain_svd(B.T.contiguous(), shape.in_modes, shape.v_ranks)
    n2 = float(W.square().sum())
    return math.sqrt(max(0.0, 1.0 - float(C.square().sum()) / n2)) if n2 > 0 else 0.0


@dataclass
class LayerOptions:
    """Candidate ranks of one layer with their DOF and relative squared error (DENSE last)."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    numel: int
    method: str
    spectrum: str
    ranks: list[int] = field(default_factory=list)
    dofs: list[int] = field(default_factory=list)
    err2: list[float] = field(default_factory=list)

    def tt(self, rank: int) -> TTShape:
        return _tt_shape(self.kind, self.weight_shape, rank, self.method)

    def dof(self, rank: int) -> int:
        """Parameters at `rank` (DENSE: the dense weight)."""
        return self.numel if rank == DENSE else self.tt(rank).dof(self.spectrum)


@lru_cache(maxsize=65536)
def _tt_shape(kind: str, weight_shape: tuple[int, ...], rank: int, method: str) -> TTShape:
    out_f, in_f = matrix_factors(kind, weight_shape)
    return TTShape.from_dims(out_f, in_f, rank, method)


def layer_options(name: str, module: nn.Module, method: str = "sttp", spectrum: str = "free",
                  with_errors: bool = True) -> LayerOptions:
    """Options on a geometric rank grid (1, 1.5, 2, 3, 4, 6, …) while DOF < numel, plus DENSE."""
    kind = weight_kind(module)
    shape = tuple(module.weight.shape)
    opts = LayerOptions(name, kind, shape, module.weight.numel(), method, spectrum)
    out_f, in_f = matrix_factors(kind, shape)
    W = None
    if with_errors:
        W = to_matrix(kind, module.weight.detach().to(torch.float32))
        if method == "sttp":
            W = pad_matrix(W, out_f, in_f)  # the zero-padded tensorization (tt.padded_size)
        if method == "svdp":
            s2 = torch.linalg.svdvals(W.double()).square()
            tail = (s2.flip(0).cumsum(0).flip(0) / s2.sum().clamp_min(1e-30)).tolist() + [0.0]
    last = None
    for r in _GRID:
        tt = TTShape.from_dims(out_f, in_f, r, method)
        if tt.tt_ranks == last:
            break
        last = tt.tt_ranks
        dof = tt.dof(spectrum)
        if dof >= opts.numel:
            break
        opts.ranks.append(r)
        opts.dofs.append(dof)
        if with_errors:
            opts.err2.append(tail[tt.middle] if method == "svdp" else tt_error(W, tt) ** 2)
    opts.ranks.append(DENSE)
    opts.dofs.append(opts.numel)
    opts.err2.append(0.0)
    return opts


def budget_for_ratio(params_original: int, params_fixed: int, ratio: float) -> int:
    """Parameter budget of the compressed layers so that original / total >= ratio."""
    return math.floor(params_original / ratio) - params_fixed


def _cost(err2: float) -> float:
    """What the allocation minimizes per layer: −log(1 − e²), the log of the weight energy lost.

    Summed over layers it is −log Π(1 − e²_ℓ), the signal kept through the whole network. For small
    errors it equals e²; near e² = 1 it grows without bound, so no layer is starved to a rank that
    leaves almost nothing of it (which a plain Σ e² allowed: at ratio 50 it left layer4 at rank 1–2).
    """
    return -math.log1p(-min(err2, 1.0 - 1e-6))


def _hull(dofs: list[int], err2: list[float]) -> list[int]:
    """Indices of the lower convex hull of (dof, err²), from the cheapest option."""
    idx = [0]
    for i in range(1, len(dofs)):
        if err2[i] >= err2[idx[-1]]:
            continue  # never worth more parameters for no less error
        while len(idx) >= 2:
            a, b = idx[-2], idx[-1]
            # drop b when the segment a→i removes error per parameter at least as fast as a→b
            if (err2[a] - err2[i]) * (dofs[b] - dofs[a]) >= (err2[a] - err2[b]) * (dofs[i] - dofs[a]):
                idx.pop()
            else:
                break
        idx.append(i)
    return idx


def _interp_err2(o: LayerOptions, rank: int) -> float:
    """Relative squared error at a rank between grid points (linear in DOF)."""
    if rank == DENSE:
        return 0.0
    grid = o.ranks[:-1]
    j = next((i for i, r in enumerate(grid) if r >= rank), None)
    if j is None:
        return o.err2[-2]
    if grid[j] == rank or j == 0:
        return o.err2[j]
    d, d0, d1 = o.dof(rank), o.dofs[j - 1], o.dofs[j]
    t = (d - d0) / max(1, d1 - d0)
    return o.err2[j - 1] + t * (o.err2[j] - o.err2[j - 1])


def allocate(options: list[LayerOptions], budget: int, allocation: str = "greedy") -> dict[str, int]:
    """Choose a rank per layer (DENSE = keep dense) with Σ DOF <= budget, as full as possible."""
    minimum = sum(o.dofs[0] for o in options)
    if minimum > budget:
        raise ValueError("budget below the smallest configuration")
    if allocation == "uniform":
        return _uniform(options, budget)
    if allocation != "greedy":
        raise ValueError(f"allocation must be 'greedy' or 'uniform', got {allocation!r}")
    choice = {o.name: 0 for o in options}  # index into the layer's options
    used = minimum
    segments = []
    for li, o in enumerate(options):
        cost = [_cost(e) for e in o.err2]
        h = _hull(o.dofs, cost)
        for a, b in zip(h, h[1:]):
            gain = (cost[a] - cost[b]) / (o.dofs[b] - o.dofs[a])
            segments.append((gain, li, a, b))
    segments.sort(key=lambda s: -s[0])
    blocked = set()
    for gain, li, a, b in segments:
        o = options[li]
        if li in blocked or choice[o.name] != a:
            continue
        extra = o.dofs[b] - o.dofs[a]
        if used + extra > budget:
            blocked.add(li)  # later segments of this layer are less efficient still
            continue
        choice[o.name] = b
        used += extra
    ranks = {o.name: o.ranks[choice[o.name]] for o in options}
    return _fill(options, ranks, budget - used)


def _fill(options: list[LayerOptions], ranks: dict[str, int], left: int) -> dict[str, int]:
    """Spend the remaining budget in single-rank steps where they remove the most error per DOF."""
    by_name = {o.name: o for o in options}
    while True:
        best = None
        for name, r in ranks.items():
            o = by_name[name]
            if r == DENSE:
                continue
            nxt = _next_rank(o, r)
            extra = o.dof(nxt) - o.dof(r)
            if 0 < extra <= left:
                gain = (_cost(_interp_err2(o, r)) - _cost(_interp_err2(o, nxt))) / extra
                if best is None or gain > best[0]:
                    best = (gain, name, nxt, extra)
        if best is None:
            return ranks
        _, name, nxt, extra = best
        ranks[name] = nxt
        left -= extra


def _next_rank(o: LayerOptions, r: int) -> int:
    """The next rank that changes the layer (DENSE once it would not save parameters)."""
    ranks = o.tt(r).tt_ranks
    nxt = r + 1
    while o.tt(nxt).tt_ranks == ranks and nxt < 10 ** 6:
        nxt += 1
    return nxt if o.dof(nxt) < o.numel and o.tt(nxt).tt_ranks != ranks else DENSE


def _total(options: list[LayerOptions], r: int) -> int:
    return sum(min(o.dof(r), o.numel) for o in options)


def uniform_rank(options: list[LayerOptions], budget: int) -> int:
    """The largest single rank r whose total DOF (layers that would not shrink kept dense) fits."""
    lo, hi = 1, max(max(o.tt(10 ** 9).tt_ranks) for o in options)
    while lo < hi:  # total(r) is non-decreasing in r
        mid = (lo + hi + 1) // 2
        if _total(options, mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _uniform(options: list[LayerOptions], budget: int) -> dict[str, int]:
    """The largest single rank that fits, then one step up on the largest layers while it fits."""
    lo = uniform_rank(options, budget)
    ranks = {o.name: (lo if o.dof(lo) < o.numel else DENSE) for o in options}
    left = budget - _total(options, lo)
    for o in sorted(options, key=lambda o: -o.numel):
        r = ranks[o.name]
        if r == DENSE:
            continue
        nxt = _next_rank(o, r)
        extra = o.dof(nxt) - o.dof(r)
        if 0 < extra <= left:
            ranks[o.name] = nxt
            left -= extra
    return ranks


def check_reachable(params_original: int, params_fixed: int, options: list[LayerOptions], ratio: float) -> None:
    """Raise UserError naming the largest reachable ratio when `ratio` cannot be met."""
    if ratio <= 1:
        raise UserError(f"--ratio must be > 1 (original/compressed parameters), got {ratio:g}")
    smallest = params_fixed + sum(o.dofs[0] for o in options)
    if params_original / ratio < smallest:
        largest = math.floor(100 * params_original / smallest) / 100  # rounded down: itself reachable
        raise UserError(f"--ratio {ratio:g} is unreachable: the largest reachable ratio is "
                        f"{largest:.2f} (every eligible layer at rank 1; "
                        f"{params_fixed:,} parameters stay dense)")
