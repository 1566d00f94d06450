"""Per-layer rank allocation for a whole-model compression ratio (method notes §6, eq. 11).

`greedy` spends the parameter budget where it cuts the most weight error: each layer's options
(rank → DOF, cost −log(1 − e²) of its relative TT-SVD error e) are reduced to their lower convex
hull, and hull segments are taken across layers in order of cost removed per parameter, then
single-rank steps fill what is left of the budget. `uniform` finds the largest single rank that fits, then raises
the largest layers one rank at a time while the budget allows. Both reach the target from above.

The error profile is lazy: a layer's TT-SVD error at a grid rank is computed only when the greedy
needs it. The hull is walked vertex by vertex (the next vertex is the option that removes the most
cost per parameter, the farthest on ties — what the monotone-chain hull keeps), with every
unprofiled option standing in at the least cost it can have (0, or once a layer needs it, the tail
of W's singular values beyond the option's middle rank). A segment whose end is a profiled
option is then exact (no unprofiled option can beat it); one whose end is unprofiled is an upper
bound, and its end is profiled when that bound reaches the front of the queue. A layer whose next
option does not fit in what is left of the budget stops without profiling anything above it. The
ranks are the same as profiling every grid rank first (`_greedy_exhaustive`, kept as the reference);
only the high ranks that no allocation can reach are never profiled. A lone layer profiles nothing: with no
other layer to weigh it against, the greedy gives it the largest rank that fits, whatever its errors.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import Tensor, nn

from sttp_compress.errors import UserError
from sttp_compress.core.spectral_tt import matrix_factors, to_matrix, weight_kind, weight_name
from sttp_compress.core.tt import (TTShape, chain_matrix, chain_svd, gram, gram_chain, leading_eigenvectors,
                                  pad_columns, pad_matrix, pads_columns_only, sum_squares)

__all__ = ["LayerOptions", "tt_error", "tt_error2", "layer_options", "allocate", "budget_for_ratio", "uniform_rank",
           "check_reachable"]

DENSE = 0  # rank value meaning "kept dense"
EXACT_EIGVALSH = 256  # Gram matrices up to this size get float64 eigenvalues for the lower bounds
_GRID = sorted({int(round(b * 2 ** e)) for e in range(0, 14) for b in (1, 1.5)} | {3, 5, 6})
# Layers of COARSE_NUMEL values and more profile powers of two only above rank 128: each such rank costs
# seconds there (eigenproblems of 1,000+ rows, U^T W), and `_fill` interpolates between grid ranks anyway.
COARSE_NUMEL = 1 << 22
_COARSE_GRID = [r for r in _GRID if r <= 128 or r & (r - 1) == 0]


def tt_error(W: Tensor, shape: TTShape) -> float:
    """Relative error ‖W − W_r‖/‖W‖ of the spectral TT-SVD of the matrix W at `shape`'s ranks.

    The plain computation (both chains of `tt.chain_svd` in full); `tt_error2` gets the same number
    with less work.
    """
    _, B = chain_svd(W, shape.out_modes, shape.u_ranks)
    _, C = chain_svd(B.T.contiguous(), shape.in_modes, shape.v_ranks)
    n2 = float(W.square().sum())
    return math.sqrt(max(0.0, 1.0 - float(C.square().sum()) / n2)) if n2 > 0 else 0.0


def _lossy(modes: tuple[int, ...], ranks: list[int], cols: int) -> list[bool]:
    """Which bonds of a chain truncate: R_k < min(rows, cols) of the k-th unfolding of its rest."""
    out, rest = [], math.prod(modes) * cols
    for k, m in enumerate(modes):
        rows = ranks[k] * m
        out.append(ranks[k + 1] < min(rows, rest // rows))
        rest = rest // rows * ranks[k + 1]
    return out


def _kept(M: Tensor, R: int) -> float:
    """‖U_Rᵀ M‖² for U_R the R leading left singular vectors of M: its R largest squared singular values."""
    S = gram(M) if M.shape[0] <= M.shape[1] else gram(M.T)
    return float(torch.linalg.eigvalsh(S)[-R:].sum())


def _sweep(rest: Tensor, ranks: list[int], modes: tuple[int, ...], lossy: list[bool], last: int,
           n2: float) -> tuple[float | None, Tensor]:
    """One chain's TT-SVD truncations, mode by mode: (relative squared error, None) once the final
    truncating bond `last` is reached (its kept energy is the leading eigenvalues' sum), else
    (None, what is left after every mode)."""
    for k in range(min(len(modes), last + 1)):
        M = rest.reshape(ranks[k] * modes[k], -1)
        R = ranks[k + 1]
        if not lossy[k] and R == M.shape[0]:
            rest = M
            continue
        if k == last:
            return max(0.0, 1.0 - _kept(M, R) / n2), None
        Uk = leading_eigenvectors(gram(M), R) if M.shape[0] <= M.shape[1] else torch.linalg.svd(M, full_matrices=False)[0][:, :R]
        rest = Uk.T @ M
    return None, rest


def tt_error2(W: Tensor, shape: TTShape, gram: Tensor | None = None, n2: float | None = None,
              pad_in: list[int] | None = None) -> float:
    """Relative squared error of the spectral TT-SVD of W at `shape` (= tt_error² up to rounding).

    The same truncations as `tt_error` with less work: the U chain runs on the Gram matrix
    `gram` = W Wᵀ when given (cheap when d_out <= d_in; it only ever needs W Wᵀ), bonds that keep
    their whole unfolding are identities, and nothing after the last truncating bond is computed —
    the energy it keeps is the sum of that unfolding's leading eigenvalues. `n2` = ‖W‖² if known. With
    `pad_in` (the input side's natural dims; needs `gram`), W is the weight before its column padding.
    """
    n2 = sum_squares(W) if n2 is None else n2
    if n2 <= 0:
        return 0.0
    u_lossy = _lossy(shape.out_modes, shape.u_ranks, shape.d_in)
    v_lossy = _lossy(shape.in_modes, shape.v_ranks, shape.middle)
    if not any(u_lossy) and not any(v_lossy):
        return 0.0
    u_last = max((k for k, x in enumerate(u_lossy) if x), default=-1) if not any(v_lossy) else len(u_lossy)
    ranks, modes = shape.u_ranks, shape.out_modes
    if gram is not None:  # the U chain from W Wᵀ alone (`tt.gram_chain`)
        cores, S = gram_chain(gram, modes, ranks, [not x for x in u_lossy], u_last)
        if S is not None:
            return max(0.0, 1.0 - float(torch.linalg.eigvalsh(S)[-ranks[u_last + 1]:].sum()) / n2)
        B = chain_matrix(cores).T @ W if any(u_lossy) else W
        if pad_in is not None:
            B = pad_columns(B, pad_in)
    else:
        err, rest = _sweep(W, ranks, modes, u_lossy, u_last, n2)
        if err is not None:
            return err
        B = rest.reshape(ranks[-1], -1)
    v_last = max(k for k, x in enumerate(v_lossy) if x)
    err, _ = _sweep(B.T, shape.v_ranks, shape.in_modes, v_lossy, v_last, n2)
    if err is None:
        raise AssertionError("unreachable: the V chain truncates at bond v_last")
    return err


@dataclass
class LayerOptions:
    """Candidate ranks of one layer with their DOF and relative squared error (DENSE last).

    `err2[i]` is None until option i is profiled; `error2(i)` profiles it on first use.
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    numel: int
    method: str
    spectrum: str
    ranks: list[int] = field(default_factory=list)
    dofs: list[int] = field(default_factory=list)
    err2: list[float | None] = field(default_factory=list)
    profile: Callable[[TTShape], float] | None = field(default=None, repr=False, compare=False)
    lower: list[float] | None = field(default=None, repr=False, compare=False)  # err2 bounds, see tighten()
    extra: int = 0  # parameters beside the TT at every rank (a row-scaled layer's d_out row scales)
    sensitivity: float = 1.0  # what a unit of this layer's cost does to the model's output (`sensitivity.py`)

    def error2(self, i: int) -> float:
        """Relative squared TT-SVD error of option i, computed on first use (DENSE: 0)."""
        e = self.err2[i]
        if e is None:
            if self.profile is None:
                raise ValueError(f"{self.name}: options built without an error profile")
            e = self.err2[i] = float(self.profile(self.tt(self.ranks[i])))
        return e

    def profiled(self) -> int:
        """How many grid ranks have had their error computed."""
        return sum(e is not None for e in self.err2[:-1])

    def tighten(self) -> bool:
        """Compute lower bounds of every option's err2 if the profile offers them; True if it did.

        A TT of middle rank r is a matrix of rank <= r, so its error is at least the tail of W's singular
        values beyond r (less a margin for rounding): one eigvalsh per layer, far cheaper than the
        TT-SVDs at high ranks it saves.
        """
        bounds = getattr(self.profile, "lower_bounds", None)
        if self.lower is not None or bounds is None:
            return False
        self.lower = [float(b) for b in bounds([self.tt(r) for r in self.ranks[:-1]])] + [0.0]
        return True

    def optimistic(self, i: int) -> float:
        """err2 of option i if profiled, else the least it can be."""
        e = self.err2[i]
        if e is not None:
            return e
        return self.lower[i] if self.lower is not None else 0.0

    def release(self) -> None:
        """Drop the profile's weight view and caches (the computed errors stay)."""
        self.profile = None

    def singular_values(self) -> list[float] | None:
        """The weight's singular values (descending) if the profile computed them on the plain weight
        matrix (no row or column weights, rows in order), else None."""
        prof = self.profile
        if prof is None or prof.sigma2 is None or prof.row_weight is not None or prof.col_weight is not None \
                or prof.row_order is not None:
            return None
        return prof.sigma2.sqrt().tolist()

    def gram(self) -> Tensor | None:
        """W Wᵀ of the matrix the conversion factorizes (row/column weights, row order and the padding applied, in
        float32) if the profile computed it, else None: the conversion's U chain can start from it
        (`tt.spectral_tt_svd`) instead of computing the same Grams again."""
        return self.profile._gram if self.profile is not None else None

    @staticmethod
    def unit_cost(err2: float) -> float:
        """The cost of a relative squared error at sensitivity 1."""
        return _cost(err2)

    def cost(self, err2: float) -> float:
        """What the allocation minimizes for this layer at relative squared error err2: `_cost`, scaled by
        the layer's sensitivity."""
        return self.sensitivity * _cost(err2)

    def tt(self, rank: int) -> TTShape:
        return _tt_shape(self.kind, self.weight_shape, rank, self.method)

    def dof(self, rank: int) -> int:
        """Parameters at `rank` (DENSE: the dense weight)."""
        return self.numel if rank == DENSE else self.tt(rank).dof(self.spectrum) + self.extra


@lru_cache(maxsize=65536)
def _tt_shape(kind: str, weight_shape: tuple[int, ...], rank: int, method: str) -> TTShape:
    out_f, in_f = matrix_factors(kind, weight_shape)
    return TTShape.from_dims(out_f, in_f, rank, method)


class _Profile:
    """A layer's relative squared TT-SVD (or SVD) error at any TT shape, from its current weight.

    Keeps what every rank shares: the weight as a float32 matrix (a view when it already is one),
    ‖W‖², and W Wᵀ for the U chains when d_out <= d_in (`tt_error2`). With `row_weight` w the error is
    that of diag(√w)·W, the matrix a row-scaled conversion factorizes (layers.SpectralTT); with
    `col_weight` c that of W·diag(√c) (column-scaled); with `row_order` that of its rows in that order.
    """

    def __init__(self, module: nn.Module, kind: str, method: str, row_weight: Tensor | None = None,
                 col_weight: Tensor | None = None, row_order: Tensor | None = None):
        self.module, self.kind, self.method, self.row_weight = module, kind, method, row_weight
        self.col_weight, self.row_order = col_weight, row_order
        self._W: Tensor | None = None
        self._gram: Tensor | None = None
        self._n2 = 0.0
        self._tail: list[float] | None = None
        self.sigma2: Tensor | None = None  # squared singular values, descending, once lower_bounds ran
        self._pad_in: list[int] | None = None  # W kept without its column padding (the input side's dims)

    def _matrix(self) -> Tensor:
        if self._W is None:
            weight = getattr(self.module, weight_name(self.module)).detach().to(torch.float32)
            W = to_matrix(self.kind, weight)
            if self.row_weight is not None:
                W = W * torch.as_tensor(self.row_weight, dtype=W.dtype, device=W.device).reshape(-1, 1).sqrt()
            if self.col_weight is not None:
                W = W * torch.as_tensor(self.col_weight, dtype=W.dtype, device=W.device).reshape(1, -1).sqrt()
            if self.row_order is not None:
                W = W[torch.as_tensor(self.row_order, device=W.device)]
            if self.method == "sttp":  # the zero-padded tensorization (tt.padded_size)
                dims = matrix_factors(self.kind, tuple(weight.shape))
                if pads_columns_only(*dims):  # the Gram ignores zero columns: pad only UᵀW (tt.pad_columns)
                    self._pad_in = dims[1]
                else:
                    W = pad_matrix(W, *dims)
            self._n2 = sum_squares(W)
            if self.method == "sttp" and W.shape[0] <= W.shape[1]:
                self._gram = gram(W)
            self._W = W
        return self._W

    def lower_bounds(self, shapes: list[TTShape]) -> list[float]:
        """Lower bounds of the relative squared error at each TT shape: W's singular-value tail beyond
        the middle rank, less 1e-4 for the float32 Gram's rounding (STTP only; SVDP is exact anyway)."""
        if self.method != "sttp":
            return [0.0] * len(shapes)
        W = self._matrix()
        G = self._gram if self._gram is not None else (gram(W) if W.shape[0] <= W.shape[1] else gram(W.T))
        n = G.shape[0]
        # float32 eigenvalues of a large Gram (2x faster at 4096): each is off by ~eps·λ_max, so a tail sum of
        # n of them by at most n·eps·‖W‖²; the margin covers that and the float32 Gram's own rounding
        exact = n <= EXACT_EIGVALSH
        s2 = torch.linalg.eigvalsh(G.double() if exact else G.float()).double().clamp_min(0).flip(0)
        self.sigma2 = s2
        margin = 1e-4 + (0.0 if exact else 4 * n * torch.finfo(torch.float32).eps)
        tail = (s2.flip(0).cumsum(0).flip(0) / max(self._n2, 1e-30)).tolist() + [0.0]
        return [max(0.0, tail[min(sh.middle, len(tail) - 1)] - margin) for sh in shapes]

    def __call__(self, shape: TTShape) -> float:
        W = self._matrix()
        if self.method == "svdp":
            if self._tail is None:
                s2 = torch.linalg.svdvals(W.double()).square()
                self._tail = (s2.flip(0).cumsum(0).flip(0) / s2.sum().clamp_min(1e-30)).tolist() + [0.0]
            return self._tail[shape.middle]
        return tt_error2(W, shape, self._gram, self._n2, self._pad_in)


def layer_options(name: str, module: nn.Module, method: str = "sttp", spectrum: str = "free",
                  with_errors: bool = True, eager: bool = False, row_weight: Tensor | None = None,
                  col_weight: Tensor | None = None, row_order: Tensor | None = None) -> LayerOptions:
    """Options on a geometric rank grid (1, 1.5, 2, 3, 4, 6, …; powers of two above 128 for a layer of
    COARSE_NUMEL values or more) while DOF < numel, plus DENSE.

    With errors, each grid rank's error is profiled lazily (`LayerOptions.error2`) from the module's
    weight at that time, or all at once with `eager`. A `row_weight` makes the options row-scaled
    (d_out more parameters each) and their errors row-weighted (`_Profile`); a `col_weight` the same
    on the input side (d_in more); a `row_order` profiles the rows in that order (SpectralTT.row_order).
    """
    kind = weight_kind(module)
    W = getattr(module, weight_name(module))
    opts = LayerOptions(name, kind, tuple(W.shape), W.numel(), method, spectrum)
    shape = opts.weight_shape
    out_f, in_f = matrix_factors(kind, shape)
    opts.extra = (math.prod(out_f) if row_weight is not None else 0) + (math.prod(in_f) if col_weight is not None else 0)
    last = None
    for r in (_GRID if opts.numel < COARSE_NUMEL else _COARSE_GRID):
        tt = TTShape.from_dims(out_f, in_f, r, method)
        if tt.tt_ranks == last:
            break
        last = tt.tt_ranks
        dof = tt.dof(spectrum) + opts.extra
        if dof >= opts.numel:
            break
        opts.ranks.append(r)
        opts.dofs.append(dof)
    opts.ranks.append(DENSE)
    opts.dofs.append(opts.numel)
    opts.err2 = [None] * (len(opts.ranks) - 1) + [0.0]
    if with_errors:
        opts.profile = _Profile(module, kind, method, row_weight, col_weight, row_order)
        if eager:
            for i in range(len(opts.ranks)):
                opts.error2(i)
            opts.release()
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
        return o.error2(len(grid) - 1)
    if grid[j] == rank or j == 0:
        return o.error2(j)
    d, d0, d1 = o.dof(rank), o.dofs[j - 1], o.dofs[j]
    t = (d - d0) / max(1, d1 - d0)
    return o.error2(j - 1) + t * (o.error2(j) - o.error2(j - 1))


def allocate(options: list[LayerOptions], budget: int, allocation: str = "greedy") -> dict[str, int]:
    """Choose a rank per layer (DENSE = keep dense) with Σ DOF <= budget, as full as possible."""
    minimum = sum(o.dofs[0] for o in options)
    if minimum > budget:
        raise ValueError("budget below the smallest configuration")
    if allocation == "uniform":
        return _uniform(options, budget)
    if allocation != "greedy":
        raise ValueError(f"allocation must be 'greedy' or 'uniform', got {allocation!r}")
    if len(options) == 1:  # nothing to weigh it against: the largest rank that fits, whatever the errors
        o = options[0]
        return _fill(options, {o.name: o.ranks[0]}, budget - minimum)
    left = budget - minimum
    at = [0] * len(options)  # each layer's current hull vertex (an index into its options)
    queue: list[tuple[float, int, int, bool]] = []
    for li, o in enumerate(options):
        _enqueue(queue, li, o, 0)
    while queue:
        _, li, b, exact = heapq.heappop(queue)
        o, a = options[li], at[li]
        if o.dofs[a + 1] - o.dofs[a] > left:
            continue  # not even the next grid rank fits: this layer is done, whatever its hull holds
        if not exact:
            if not o.tighten():  # the bound reached the front: bound every option, or else
                o.error2(b)  # profile the segment's end, and look again
            _enqueue(queue, li, o, a)
            continue
        extra = o.dofs[b] - o.dofs[a]
        if extra > left:
            continue  # later segments of this layer are less efficient still
        at[li] = b
        left -= extra
        _enqueue(queue, li, o, b)
    ranks = {o.name: o.ranks[at[li]] for li, o in enumerate(options)}
    return _fill(options, ranks, left)


def _next_vertex(o: LayerOptions, a: int) -> tuple[float, int] | None:
    """The hull's next vertex after vertex a as (gain, index), unprofiled options at their least cost.

    The option removing the most cost per parameter, the farthest on ties (the monotone chain of
    `_hull` keeps the same one), compared by the same cross-multiplied test as `_hull`.
    """
    ca = o.cost(o.error2(a))
    best, cb = None, 0.0
    for i in range(a + 1, len(o.dofs)):
        c = o.cost(o.optimistic(i))
        if c >= ca:
            continue
        if best is None or (ca - c) * (o.dofs[best] - o.dofs[a]) >= (ca - cb) * (o.dofs[i] - o.dofs[a]):
            best, cb = i, c
    if best is None:
        return None
    return (ca - cb) / (o.dofs[best] - o.dofs[a]), best


def _enqueue(queue: list, li: int, o: LayerOptions, a: int) -> None:
    """Queue layer li's segment from vertex a, keyed like the exhaustive sort: gain, then layer order."""
    nxt = _next_vertex(o, a) if a < len(o.dofs) - 1 else None
    if nxt is not None:
        gain, b = nxt
        heapq.heappush(queue, (-gain, li, b, o.err2[b] is not None))


def _greedy_exhaustive(options: list[LayerOptions], budget: int) -> dict[str, int]:
    """The greedy allocation with every option profiled first (the reference `allocate` must match)."""
    for o in options:
        for i in range(len(o.err2)):
            o.error2(i)
    minimum = sum(o.dofs[0] for o in options)
    choice = {o.name: 0 for o in options}  # index into the layer's options
    used = minimum
    segments = []
    for li, o in enumerate(options):
        cost = [o.cost(e) for e in o.err2]
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
    """Spend the remaining budget in single-rank steps where they remove the most error per DOF.

    Only what the choice needs is profiled: a step that is the only one to fit is taken without its gain (a
    single large layer: 2.8 s of a 4096 x 11008 Linear's conversion went to rank 1024's error), and a step whose
    grid rank above is unprofiled is compared by an upper bound of its gain (`_gain_bound`) first, profiled
    only if that bound could win. The steps are those of computing every gain."""
    by_name = {o.name: o for o in options}
    while True:
        steps = []
        for name, r in ranks.items():
            o = by_name[name]
            if r == DENSE:
                continue
            nxt = _next_rank(o, r)
            extra = o.dof(nxt) - o.dof(r)
            if 0 < extra <= left:
                steps.append((name, r, nxt, extra))
        if not steps:
            return ranks
        best = steps[0] if len(steps) == 1 else steps[_best_step(by_name, steps)]
        name, _, nxt, extra = best
        ranks[name] = nxt
        left -= extra


def _step_gain(o: LayerOptions, r: int, nxt: int, extra: int) -> float:
    return (o.cost(_interp_err2(o, r)) - o.cost(_interp_err2(o, nxt))) / extra


def _best_step(by_name: dict[str, LayerOptions], steps: list[tuple[str, int, int, int]]) -> int:
    """Index of the step with the largest gain (the first on ties), profiling no grid rank whose step's gain
    bound is below the best gain found."""
    best_i, best_g = None, None

    def better(i: int, g: float) -> bool:
        return best_g is None or g > best_g or (g == best_g and i < best_i)

    pending = []
    for i, (n, r, nxt, extra) in enumerate(steps):
        bound = _gain_bound(by_name[n], r, nxt, extra)
        if bound is None:  # nothing unprofiled: the gain itself
            g = _step_gain(by_name[n], r, nxt, extra)
            if better(i, g):
                best_i, best_g = i, g
        else:
            pending.append((-bound, i))
    for neg_bound, i in sorted(pending):  # the largest bound first
        n, r, nxt, extra = steps[i]
        o = by_name[n]
        if not better(i, -neg_bound):
            continue
        if o.tighten() and not better(i, _gain_bound(o, r, nxt, extra)):
            continue  # the layer's singular-value bounds were enough
        g = _step_gain(o, r, nxt, extra)
        if better(i, g):
            best_i, best_g = i, g
    return best_i


def _gain_bound(o: LayerOptions, r: int, nxt: int, extra: int) -> float | None:
    """An upper bound of the step r → nxt's gain when its grid rank above is unprofiled (else None).

    Within grid ranks g0 <= r < nxt <= g1 the errors are interpolated from e0 = err²(g0) and e1 = err²(g1):
    the step lowers err² by (t_nxt − t_r)(e0 − e1), at most (t_nxt − t_r)(e0 − lower(g1)), and the cost,
    convex and increasing, by at most its slope at e0 times that (nothing when e1 > e0)."""
    if nxt == DENSE:
        return None
    grid = o.ranks[:-1]
    j = next((i for i, g in enumerate(grid) if g >= nxt), None)
    if j is None or j == 0 or grid[j - 1] > r or o.err2[j] is not None or o.err2[j - 1] is None:
        return None
    e0, d0, d1 = o.err2[j - 1], o.dofs[j - 1], o.dofs[j]
    lower = o.lower[j] if o.lower is not None else 0.0
    span = (o.dof(nxt) - o.dof(r)) / max(1, d1 - d0)
    slope = 1.0 / max(1.0 - e0, 1e-6)  # of _cost at e0 (flat above its clamp)
    return o.sensitivity * slope * span * max(0.0, e0 - lower) / extra * (1 + 1e-9)


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


def check_reachable(params_original: int, params_fixed: int, options: list[LayerOptions], ratio: float,
                    dense: list[tuple[str, int, str]] | None = None) -> None:
    """Raise UserError naming the largest reachable ratio when `ratio` cannot be met, and where the dense
    parameters are: the largest layers left dense (`dense`: name, parameters, reason), and how to include them."""
    if ratio <= 1:
        raise UserError(f"‹ratio› must be > 1 (original/compressed parameters), got {ratio:g}")
    smallest = params_fixed + sum(o.dofs[0] for o in options)
    if params_original / ratio < smallest:
        largest = math.floor(100 * params_original / smallest) / 100  # rounded down: itself reachable
        raise UserError(f"‹ratio› {ratio:g} is unreachable: the largest reachable ratio is "
                        f"{largest:.2f} (every eligible layer at rank 1; "
                        f"{params_fixed:,} parameters stay dense{_dense_text(dense or [])})")


INCLUDABLE = ("first convolution kept dense", "final classifier kept dense", "unless")  # reasons ‹include› lifts


def _dense_text(dense: list[tuple[str, int, str]], show: int = 3) -> str:
    """', most in NAME (N: reason), ...; ‹include› NAME would compress them' for the largest dense layers."""
    top = sorted((d for d in dense if d[1] > 0), key=lambda d: -d[1])[:show]
    if not top:
        return ""
    text = ", most in " + ", ".join(f"{n} ({k:,}: {why})" for n, k, why in top)
    lifted = [n for n, _, why in top if any(r in why for r in INCLUDABLE)]
    if lifted:
        text += f"; ‹include› '*' makes every layer a candidate, {lifted[0]} included"
    return text
