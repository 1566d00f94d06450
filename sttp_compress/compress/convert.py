"""Walk a model, pick layers, convert them to STTP/SVDP parametrizations, and undo it.

The Python API in a nutshell::

    layers = compress(model, rank=32)              # in place; returns {name: SpectralTT}
    count_parameters(model)                        # what training sees (= Σ DOF + the rest)
    decompress(model)                              # back to plain modules with the current weights
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from sttp_compress.compress.memory import release_freed_memory
from sttp_compress.core.forms import layer_originals, unscaled
from sttp_compress.core.spectral_tt import EXACT_NUMEL, SUPPORTED, SpectralTT, is_parametrized, matrix_factors, to_matrix, weight_kind, weight_name
from sttp_compress.core.tt import TTShape, gram, pad_matrix, sum_squares
from sttp_compress.errors import UserError, terms

__all__ = ["compress_module", "compress", "compress_to_target", "decompress", "count_parameters",
           "candidate_layers", "compressed_layers", "parametrization", "spectral_penalty", "weight_of", "tiered_order",
           "layer_tiered_order",
           "layer_name", "named_layers", "plan_ranks"]


def weight_of(module: nn.Module) -> torch.Tensor:
    """The module's compressible weight (`weight`, or MultiheadAttention's `in_proj_weight`)."""
    return getattr(module, weight_name(module))


def layer_name(module_name: str, module: nn.Module) -> str:
    """A layer's name in reports, rank maps and checkpoints: the module's, or
    `<module>.in_proj_weight` for a MultiheadAttention's packed q/k/v projection."""
    w = weight_name(module)
    return module_name if w == "weight" else f"{module_name}.{w}"


def named_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{layer name: module} of every named submodule (see `layer_name`)."""
    return {layer_name(n, m): m for n, m in model.named_modules() if n}


def compress_module(module: nn.Module, rank: int, method: str = "sttp", spectrum: str = "free",
                    convert: bool = True, row_scaled: bool = False,
                    row_weight: torch.Tensor | None = None, col_scaled: bool = False,
                    col_weight: torch.Tensor | None = None, row_ordered: bool = False,
                    row_order: torch.Tensor | None = None, gram: torch.Tensor | None = None) -> SpectralTT:
    """Register an STTP (or SVDP) parametrization on `module.weight` (MHA: `in_proj_weight`), converted by TT-SVD.

    With convert=False the structure is attached with zero parameters (no TT-SVD), ready for
    `load_state_dict` of a compressed checkpoint. `row_weight` (one positive value per row of the
    weight matrix, e.g. per token of an embedding) makes it row-scaled and weights the TT-SVD's error
    by it (see SpectralTT); `col_weight` (one per column, e.g. the input features' activation scale)
    does the same on the input side. `row_order` (a permutation of the rows, e.g. `weight_order(row_weight)`)
    makes the tensor train factorize the rows in that order; `row_ordered` attaches that structure for a
    state_dict to fill. `gram` (W Wᵀ of the matrix the TT-SVD factorizes, as the allocation's profile computed it:
    `LayerOptions.gram`) spares the conversion of a large layer the Grams of its U chain (`tt.spectral_tt_svd`).
    """
    kind = weight_kind(module)
    if is_parametrized(module):
        raise ValueError(f"{type(module).__name__} is already compressed")
    W = weight_of(module)
    p = SpectralTT(kind, tuple(W.shape), rank, method, spectrum, row_scaled or row_weight is not None,
                   col_scaled or col_weight is not None, row_ordered or row_order is not None).to(W.device)
    if row_order is not None:
        order = torch.as_tensor(row_order, dtype=torch.long).flatten()
        if not torch.equal(order.sort().values, torch.arange(p.rows)):
            raise ValueError(f"row_order must be a permutation of the weight's {p.rows} rows")
        p.row_order.copy_(order)
    p.row_weight, p.col_weight, p.gram = row_weight, col_weight, gram
    p.skip_conversion = not convert
    # unsafe: skip parametrize's check that builds the weight once more; right_inverse returns exactly the
    # parameters forward() expects (tests/test_layers.py), and that build was a sixth of a layer's conversion
    parametrize.register_parametrization(module, weight_name(module), p, unsafe=True)
    # frames without free entries (−I) have 0-sized originals: nothing to train, and each trainable tensor
    # costs CPU time every step (gradient accumulation, optimizer loops): 106 of ResNet-18's 187 at ratio 10
    for o in layer_originals(module, p):
        if o.numel() == 0:
            o.requires_grad_(False)
    p.skip_conversion = False
    p.row_weight = p.col_weight = p.gram = None  # used once, by the conversion
    return p


def weight_order(row_weight: torch.Tensor) -> torch.Tensor:
    """The rows by descending weight (ties in index order): a `row_order` that gives the heaviest rows
    (e.g. the most frequent tokens) the tensor train's leading digits together."""
    return torch.as_tensor(row_weight).flatten().argsort(descending=True, stable=True)


def tiered_order(W: torch.Tensor, row_weight: torch.Tensor, modes: tuple[int, ...], tier_digits: int = 3,
                 dims: int | None = 128) -> torch.Tensor:
    """A `row_order` for a tensor train over the row modes `modes` (memory order, padded size ∏ modes):
    the rows by descending weight into ∏ modes[:tier_digits] equal tiers, then within each tier a
    principal-direction tree: each block is sorted along its rows' top principal direction and cut into
    the next mode's equal parts, down to single rows. Rows that share the fast digits (the bonds that the
    rank truncates) are then alike, and the heavy rows share tiers. The directions are found in W's
    leading `dims` principal coordinates (None: all), which keeps it about a second for a BERT vocabulary
    on 2 CPU cores. Deterministic; batched over blocks.
    """
    W = W.detach().to(torch.float32)
    if dims is not None and dims < W.shape[1]:
        W = W @ torch.linalg.eigh(W.T @ W)[1][:, -dims:]
    n, d, size = W.shape[0], W.shape[1], math.prod(modes)
    if size < n:
        raise ValueError(f"modes {modes} hold {size} rows, fewer than the weight's {n}")
    lead = math.prod(modes[:tier_digits])
    Wz = torch.cat([W, W.new_zeros(1, d)])  # row n: the padding's (zero) row
    slots = torch.full((size,), n, dtype=torch.long)  # padding after the last row, as tt.pad_matrix
    slots[:n] = weight_order(row_weight)
    blocks = slots.view(lead, size // lead)
    for m in modes[tier_digits:]:
        valid = (blocks < n).unsqueeze(-1)
        X = Wz[blocks]  # (blocks, S, d), padding rows zero
        X = X - valid * (X.sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1))
        if X.shape[1] <= d:  # top eigenvector of the S×S Gram matrix: the rows' coordinates on the direction
            key = torch.linalg.eigh(X @ X.transpose(1, 2))[1][..., -1]
        else:  # top eigenvector of the d×d scatter matrix, projected
            key = (X @ torch.linalg.eigh(X.transpose(1, 2) @ X)[1][..., -1:]).squeeze(-1)
        key = key.masked_fill(~valid.squeeze(-1), float("inf"))
        blocks = blocks.gather(1, key.argsort(dim=1, stable=True)).reshape(-1, blocks.shape[1] // m)
    return blocks.flatten()[:n]


def layer_tiered_order(module: nn.Module, row_weight: torch.Tensor, tier_digits: int = 3) -> torch.Tensor:
    """`tiered_order` of `module`'s weight matrix over the row modes of its STTP tensorization."""
    kind, W = weight_kind(module), weight_of(module)
    modes = TTShape.from_dims(*matrix_factors(kind, tuple(W.shape)), 1).out_modes
    return tiered_order(to_matrix(kind, W), row_weight, modes, tier_digits)


def attach_structure(module: nn.Module, cfg: Mapping) -> SpectralTT:
    """The parametrization a layer's `SpectralTT.config()` describes, with zero parameters, for a
    state_dict to fill (a compressed checkpoint, or the main process's conversion under DDP)."""
    return compress_module(module, cfg["rank"], cfg["method"], cfg["spectrum"], convert=False,
                           row_scaled=bool(cfg.get("row_scaled", False)),
                           col_scaled=bool(cfg.get("col_scaled", False)),
                           row_ordered=bool(cfg.get("row_ordered", False)))


def parametrization(module: nn.Module) -> SpectralTT:
    """The SpectralTT parametrization on a compressed module."""
    return next(p for p in getattr(module.parametrizations, weight_name(module)) if isinstance(p, SpectralTT))


def candidate_layers(model: nn.Module, include: Iterable[str] | None = None,
                     exclude: Iterable[str] | None = None,
                     keep_first_last: bool = True) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Split the model's weight layers into candidates and skipped ones (with the reason).

    Candidates: Linear, ConvNd, ConvTransposeNd (grouped and depthwise too), Embedding, MultiheadAttention's packed
    q/k/v projection (named `<module>.in_proj_weight`; its out_proj is a Linear). By default the first
    convolution and the last Linear (the classifier) stay dense, the paper's practice; `include`
    globs (on module names) select candidates explicitly and override that rule; `exclude` globs
    always win. A model with a `sttp_layer_policy()` method (hf.SentenceEncoder) replaces the first/last
    rule by its own: layers it keeps dense always, and layers dense unless `include` selects them.
    """
    include, exclude = list(include or []), list(exclude or [])
    layers = [(layer_name(n, m), m) for n, m in model.named_modules() if isinstance(m, SUPPORTED) and n]
    # a model may name its own dense layers (hf.SentenceEncoder: poolers always, embeddings by default)
    policy = getattr(model, "sttp_layer_policy", None)
    always, by_default = policy() if callable(policy) else ({}, {})
    keep_first_last = keep_first_last and not callable(policy)
    first_conv = next((n for n, m in layers
                       if not isinstance(m, (nn.Linear, nn.Embedding, nn.MultiheadAttention))), None)
    last_linear = next((n for n, m in reversed(layers) if isinstance(m, nn.Linear)), None)
    chosen, skipped = {}, {}
    for name, m in layers:
        if name in always:
            skipped[name] = always[name]
        elif any(fnmatch.fnmatchcase(name, p) for p in exclude):
            skipped[name] = terms("excluded by ‹exclude›")
        elif include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            skipped[name] = terms("not matched by ‹include›")
        elif not include and name in by_default:
            skipped[name] = by_default[name]
        elif not include and keep_first_last and name == first_conv:
            skipped[name] = "first convolution kept dense"
        elif not include and keep_first_last and name == last_linear:
            skipped[name] = "final classifier kept dense"
        elif is_parametrized(m):
            skipped[name] = "already compressed"
        else:
            try:
                weight_kind(m)
                chosen[name] = m
            except ValueError as e:
                skipped[name] = str(e)
    return chosen, skipped


def compress(model: nn.Module, rank: int | Mapping[str, int], method: str = "sttp",
             spectrum: str = "free", include: Iterable[str] | None = None,
             exclude: Iterable[str] | None = None, keep_first_last: bool = True) -> dict[str, SpectralTT]:
    """Convert the model's eligible layers in place at one rank, or per-layer ranks {name: rank}.

    With a mapping, exactly the named layers are converted. A layer whose DOF would not be smaller
    than its dense weight is left dense. Returns {name: parametrization} of the converted layers.
    """
    if isinstance(rank, Mapping):
        modules = named_layers(model)
        missing = [n for n in rank if n not in modules]
        if missing:
            raise ValueError(f"no such layers: {', '.join(missing[:3])}")
        targets = {n: (modules[n], r) for n, r in rank.items()}
    else:
        chosen, _ = candidate_layers(model, include, exclude, keep_first_last)
        targets = {n: (m, rank) for n, m in chosen.items()}
    out = {}
    for name, (m, r) in targets.items():
        W = weight_of(m)
        probe = SpectralTT(weight_kind(m), tuple(W.shape), r, method, spectrum)
        if probe.dof() >= W.numel():
            continue
        out[name] = compress_module(m, r, method, spectrum)
    return out


def spectral_penalty(model: nn.Module) -> torch.Tensor:
    """Σ over compressed layers of the D-optimal regularizer −Σ log|σ_i| (§5); add λ times it to a loss."""
    terms = []
    for m in model.modules():
        if is_parametrized(m):
            p = parametrization(m)
            if p.spectrum != "identity":
                plist = getattr(m.parametrizations, weight_name(m))
                terms.append(p.spectral_penalty(getattr(plist, f"original{len(p.groups)}")))
    if not terms:
        ref = next(model.parameters(), None)
        return torch.zeros((), device=ref.device if ref is not None else "cpu")
    return torch.stack(terms).sum()


def compressed_layers(model: nn.Module) -> dict[str, SpectralTT]:
    """{name: parametrization} of every compressed layer in the model."""
    return {layer_name(n, m): parametrization(m) for n, m in model.named_modules() if is_parametrized(m)}


def decompress(model: nn.Module) -> nn.Module:
    """Replace every STTP/SVDP parametrization by a plain weight holding its current value."""
    for m in list(model.modules()):
        if is_parametrized(m):
            _unparametrize(m, weight_name(m))
    return model


def _unparametrize(m: nn.Module, name: str) -> None:
    """`parametrize.remove_parametrizations(m, name, leave_parametrized=True)` without deleting the
    property from the parametrized class, which deep copies of the model share: torch's version would
    leave every copy's layer without its weight."""
    if len(m.parametrizations) > 1:  # other parametrizations stay: only torch can untangle the class
        with torch.enable_grad():
            parametrize.remove_parametrizations(m, name, leave_parametrized=True)
        w = getattr(m, name)
        if not isinstance(w, nn.Parameter):
            delattr(m, name)
            setattr(m, name, nn.Parameter(w.detach(), requires_grad=w.requires_grad))
        return
    with torch.no_grad():
        w = getattr(m, name).detach().clone()
    trainable = any(p.requires_grad for p in m.parametrizations[name].parameters())
    del m._modules["parametrizations"]
    m.__class__ = m.__class__.__bases__[0]  # the class parametrize derived for this layer (and its copies)
    setattr(m, name, nn.Parameter(w, requires_grad=trainable))


def _weighted_error(W1: torch.Tensor, W0: torch.Tensor, kind: str, row_weight: torch.Tensor | None,
                    col_weight: torch.Tensor | None = None) -> float:
    """‖diag(√w)(W1 − W0)diag(√c)‖ / ‖diag(√w) W0 diag(√c)‖ on the weight matrices (w: row, c: column weights)."""
    D, M = to_matrix(kind, (W1 - W0).double()), to_matrix(kind, W0.double())
    w = torch.ones((), dtype=torch.float64, device=W0.device)
    if row_weight is not None:
        w = w * torch.as_tensor(row_weight, dtype=torch.float64).reshape(-1, 1).to(W0.device)
    if col_weight is not None:
        w = w * torch.as_tensor(col_weight, dtype=torch.float64).reshape(1, -1).to(W0.device)
    return float(((D.square() * w).sum() / (M.square() * w).sum().clamp_min(1e-60)).sqrt())


def _unpadded_factors(m: nn.Module, p: SpectralTT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The factors (U, σ, V) of the layer's weight matrix W = U diag(σ) Vᵀ (row/column scales included), the
    rows of U and V that only hold zero padding (tt.pad_matrix) dropped."""
    U, s, V = (t.detach() for t in p.factors(*layer_originals(m, p)))
    if p.dims is not None and (U.shape[0], V.shape[0]) != (p.rows, p.cols):
        keep = [pad_matrix(torch.ones(math.prod(d), 1, dtype=torch.bool), d, [1]).squeeze(1) for d in p.dims]
        U, V = U[keep[0].to(U.device)], V[keep[1].to(V.device)]
    return U, s, V


FACTOR_BLOCK = 1 << 20  # float64 values per block of the error-from-factors inner product


def _frame_grams(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """UᵀU and VᵀV in float64 (r × r; the identity for orthonormal frames, not for scaled or cropped ones): what the
    error from factors and the compressed spectrum both need, computed once, from float64 copies of FACTOR_BLOCK
    values at a time (whole copies of a 4096 x 11008 layer's frames were 80 MB)."""
    def gram64(F: torch.Tensor) -> torch.Tensor:
        step = max(1, FACTOR_BLOCK // max(1, F.shape[1]))
        G = F.new_zeros((F.shape[1], F.shape[1]), dtype=torch.float64)
        for i in range(0, F.shape[0], step):
            B = F[i:i + step].double()
            G += B.T @ B
        return G
    return gram64(U), gram64(V)


def _error_from_factors(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor, grams: tuple[torch.Tensor, torch.Tensor],
                        W0: torch.Tensor) -> float:
    """‖W0 − U diag(σ) Vᵀ‖ / ‖W0‖ from the factors, without building the compressed weight: ‖W0‖² − 2⟨W0, W1⟩ +
    ‖W1‖², with ⟨W0, W1⟩ = Σ σ ⊙ (UᵀW0 ⊙ Vᵀ) and ‖W1‖² = Σ (σσᵀ ⊙ UᵀU ⊙ VᵀV) (`grams`; O(r(d_out + d_in)) memory;
    the cancellation is harmless at the errors a truncation leaves, which float32 weights bound below by ~1e-7).
    The inner product runs in float64 a block of ranks at a time: whole r × d_in float64 temporaries were
    ~200 MB at the peak of a 4096 x 11008 layer's conversion."""
    UtW = U.T.to(W0.dtype) @ W0  # r × d_in, one pass over W0
    sd = s.double()
    step = max(1, FACTOR_BLOCK // max(1, UtW.shape[1]))
    inner = sum(float((UtW[i:i + step].double() * (sd[i:i + step, None] * V[:, i:i + step].T.double())).sum())
                for i in range(0, UtW.shape[0], step))
    w1 = float((sd[:, None] * sd[None, :] * grams[0] * grams[1]).sum())
    w0 = sum_squares(W0)
    return math.sqrt(max(0.0, w0 - 2 * inner + w1) / max(w0, 1e-60))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter values (a compressed layer counts its DOF, not its dense weight)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _singular_values(M: torch.Tensor) -> list[float]:
    """Singular values, descending, from the eigenvalues of the smaller Gram matrix (float32: for the
    report's plot; a float64 Gram of a 4096 x 25088 layer took seconds and 800 MB)."""
    M = M.detach().float()
    return _gram_singular_values(gram(M) if M.shape[0] <= M.shape[1] else gram(M.T))


def _gram_singular_values(G: torch.Tensor) -> list[float]:
    """Singular values of M, descending, from its Gram G = M Mᵀ."""
    return torch.linalg.eigvalsh(G).clamp_min(0).sqrt().flip(0).tolist()


def _compressed_singular_values(s: torch.Tensor, grams: tuple[torch.Tensor, torch.Tensor]) -> list[float]:
    """The singular values of W = A diag(σ) Bᵀ (A, B: the frames with the row/column scales, padded rows and
    columns dropped) from AᵀA and BᵀB (`_frame_grams`): with AᵀA = Q Λ Qᵀ, the square roots of the eigenvalues of
    (AᵀA)^½ diag(σ) BᵀB diag(σ) (AᵀA)^½, which are those of W Wᵀ. O(r³), no Gram of the weight and no QR of a frame
    (|σ| itself when A and B are orthonormal)."""
    lam, Q = torch.linalg.eigh(grams[0])
    root = (Q * lam.clamp_min(0).sqrt()) @ Q.T
    sd = s.double()
    M = root @ (sd[:, None] * grams[1] * sd[None, :]) @ root
    return torch.linalg.eigvalsh((M + M.T) / 2).clamp_min(0).sqrt().flip(0).tolist()


def check_target(ratio: float | None, rank: int | None) -> None:
    """Exactly one of a ratio > 1 or a rank >= 1, else UserError (checked before any work is done)."""

    if (ratio is None) == (rank is None):
        raise UserError("give exactly one of ‹ratio› or ‹rank›")
    if rank is not None and rank < 1:
        raise UserError(f"‹rank› must be a positive integer, got {rank}")
    if ratio is not None and not ratio > 1:
        raise UserError(f"‹ratio› must be > 1 (original/compressed parameters), got {ratio:g}")


def compress_to_target(model: nn.Module, ratio: float | None = None, rank: int | None = None,
                       method: str = "sttp", spectrum: str = "free", allocation: str = "greedy",
                       include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                       on_layer: Callable[[str], None] | None = None,
                       spectra_of: int = 4, row_weights: Mapping[str, torch.Tensor] | None = None,
                       layer_ranks: Mapping[str, int] | None = None,
                       col_weights: Mapping[str, torch.Tensor] | None = None,
                       input_moments: Mapping[str, torch.Tensor] | None = None,
                       row_orders: Mapping[str, torch.Tensor] | None = None,
                       sensitivities: Mapping[str, float] | None = None) -> dict:
    """Compress `model` in place at one rank or to a whole-model ratio (eq. 11); return the report parts.

    Returns {"layers": [...], "skipped": [...], "totals": {...}, "spectra": {name: (before, after)}}
    in the report.json schema; `on_layer(name)` is called after each layer (for progress bars).
    `row_weights` {layer name: one weight per row} makes those layers row-scaled, their conversion
    and allocation error row-weighted (e.g. an embedding by token frequency: `text.token_weights`);
    a layer's `rel_error` stays the plain Frobenius error, `weighted_rel_error` is added.
    `col_weights` {layer name: one weight per column} does the same on the input side (e.g. each input
    feature's activation scale: `activation.input_scales`). `input_moments` {Linear name: E[x xᵀ] of
    its inputs} (`activation.input_moments`) gives those column weights when `col_weights` is None and
    refits each such layer's spectrum to its original outputs on those inputs
    (`activation.refit_spectrum`; the layer row gets `spectrum_refit`).
    `layer_ranks` {layer name: rank} pins those layers' ranks; with a ratio the others share what is left.
    `row_orders` {layer name: a permutation of its rows} makes those layers' tensor trains take their rows
    in that order (e.g. `weight_order` of the row weights; the layer row gets `row_ordered`), in the
    conversion and in the allocation's errors.
    `sensitivities` {layer name: weight} scale each layer's error in the greedy allocation
    (`sensitivity.layer_sensitivities`; 1 for a layer not named).
    """
    from sttp_compress.compress.activation import scales_from_moments
    from sttp_compress.compress.allocate import DENSE

    row_weights, layer_ranks, col_weights = dict(row_weights or {}), dict(layer_ranks or {}), dict(col_weights or {})
    input_moments, row_orders = dict(input_moments or {}), dict(row_orders or {})
    if input_moments and not col_weights:
        col_weights = scales_from_moments(input_moments)

    known_spectra: dict[str, list[float]] = {}  # singular values the allocation computed anyway
    known_grams: dict[str, torch.Tensor] = {}  # and Grams W Wᵀ, each dropped once its layer is converted
    params_original = count_parameters(model)
    chosen, skipped, ranks = plan_ranks(model, ratio, rank, method, spectrum, allocation, include, exclude,
                                        row_weights, layer_ranks, col_weights, row_orders, sensitivities,
                                        known_spectra, known_grams)
    by_size = sorted(chosen, key=lambda n: -weight_of(chosen[n]).numel())[:spectra_of]
    layers, spectra = [], {}
    for name, m in chosen.items():
        r = ranks[name]
        numel = weight_of(m).numel()
        if r == DENSE:
            skipped[name] = "kept dense by the allocation (compressing it was not worth its parameters)"
        elif SpectralTT(weight_kind(m), tuple(weight_of(m).shape), r, method, spectrum, name in row_weights,
                        name in col_weights).dof() >= numel:
            skipped[name] = f"rank {r} would not save parameters (DOF >= {numel:,} weights)"
        else:
            row, spectrum_pair = _convert_layer(name, m, r, method, spectrum, row_weights.get(name),
                                                col_weights.get(name), row_orders.get(name),
                                                input_moments.get(name), with_spectra=name in by_size,
                                                known_before=known_spectra.get(name),
                                                known_gram=known_grams.pop(name, None))  # no reference held here
            layers.append(row)
            if numel > EXACT_NUMEL:
                release_freed_memory()
            if spectrum_pair is not None:
                spectra[name] = spectrum_pair
        known_grams.pop(name, None)  # a layer not converted (its rank would not save parameters)
        if on_layer:
            on_layer(name)
    params_compressed = count_parameters(model)
    totals = {"params_original": params_original, "params_compressed": params_compressed,
              "ratio": params_original / params_compressed,
              "z_percent": 100.0 * params_compressed / params_original}
    skipped_list = [{"name": n, "reason": skipped[n]} for n, _ in model.named_modules() if n in skipped]
    return {"layers": layers, "skipped": skipped_list, "totals": totals, "spectra": spectra}


def plan_ranks(model: nn.Module, ratio: float | None = None, rank: int | None = None, method: str = "sttp",
               spectrum: str = "free", allocation: str = "greedy", include: Iterable[str] | None = None,
               exclude: Iterable[str] | None = None, row_weights: Mapping[str, torch.Tensor] | None = None,
               layer_ranks: Mapping[str, int] | None = None, col_weights: Mapping[str, torch.Tensor] | None = None,
               row_orders: Mapping[str, torch.Tensor] | None = None, sensitivities: Mapping[str, float] | None = None,
               known_spectra: dict[str, list[float]] | None = None, known_grams: dict[str, torch.Tensor] | None = None
               ) -> tuple[dict[str, nn.Module], dict[str, str], dict[str, int]]:
    """What `compress_to_target` would do, without doing it: (the layers to compress, the skipped ones with
    their reasons, each chosen layer's rank or DENSE). Arguments as there; `known_spectra` receives the
    singular values the allocation computed, `known_grams` the Grams W Wᵀ its error profile computed (for the
    conversion, `compress_module(gram=...)`)."""
    row_weights, layer_ranks, col_weights = dict(row_weights or {}), dict(layer_ranks or {}), dict(col_weights or {})
    check_target(ratio, rank)
    chosen, skipped = candidate_layers(model, include, exclude)
    _check_pinned(layer_ranks, chosen, skipped)
    if ratio is None:
        return chosen, skipped, {n: layer_ranks.get(n, rank) for n in chosen}
    params_original = count_parameters(model)
    modules = named_layers(model)
    dense = [(n, sum(p.numel() for p in modules[n].parameters()), why) for n, why in skipped.items()
             if n in modules]
    ranks = _allocate_ranks(chosen, ratio, params_original, method, spectrum, allocation, layer_ranks,
                            row_weights, col_weights, dict(row_orders or {}), dense, known_spectra,
                            dict(sensitivities or {}), known_grams)
    release_freed_memory()  # the profile's unfoldings (its Grams of layers to convert stay: `known_grams`)
    return chosen, skipped, ranks


def _check_pinned(layer_ranks: Mapping[str, int], chosen: Mapping[str, nn.Module], skipped: Mapping[str, str]) -> None:
    """Each pinned rank names a layer to compress and is a positive integer."""

    for n, r in layer_ranks.items():
        if n not in chosen:
            raise UserError(f"‹layer_rank› {n}={r}: {n!r} is not a layer to compress "
                            f"({skipped.get(n, 'no such layer')})")
        if not isinstance(r, int) or r < 1:
            raise UserError(f"‹layer_rank› {n}={r}: the rank must be a positive integer")


def _allocate_ranks(chosen: Mapping[str, nn.Module], ratio: float, params_original: int, method: str,
                    spectrum: str, allocation: str, layer_ranks: Mapping[str, int], row_weights: Mapping,
                    col_weights: Mapping, row_orders: Mapping,
                    dense: list[tuple[str, int, str]] | None = None,
                    singular_values: dict[str, list[float]] | None = None,
                    sensitivities: Mapping[str, float] | None = None,
                    grams: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Ranks (or DENSE) of the chosen layers for a whole-model ratio, the pinned ones at their rank. Errors
    are profiled lazily, only where the greedy allocation looks (uniform needs none). `singular_values`
    receives the weights' singular values where the allocation computed them (for the report's spectra),
    `grams` the Grams W Wᵀ of the layers it will compress (for their conversion). The profile held all of
    them at once already, so keeping them until each layer converts adds nothing to the peak."""
    from sttp_compress.compress.allocate import DENSE, allocate, budget_for_ratio, check_reachable, layer_options

    opts, pinned = [], []
    for n, m in chosen.items():
        free = n not in layer_ranks
        (opts if free else pinned).append(layer_options(n, m, method, spectrum, row_weight=row_weights.get(n),
                                                        with_errors=free and allocation == "greedy",
                                                        col_weight=col_weights.get(n), row_order=row_orders.get(n)))
    for o in opts:
        o.sensitivity = float((sensitivities or {}).get(o.name, 1.0))
    # parameters outside the allocation: dense layers, and the pinned layers at their rank (or dense)
    fixed = params_original - sum(o.numel for o in opts) - sum(
        o.numel - min(o.numel, o.dof(layer_ranks[o.name])) for o in pinned)
    check_reachable(params_original, fixed, opts, ratio, dense)
    ranks = allocate(opts, budget_for_ratio(params_original, fixed, ratio), allocation)
    ranks.update(layer_ranks)
    for o in opts:
        known = o.singular_values() if singular_values is not None else None
        if known is not None:
            singular_values[o.name] = known
        gram = o.gram() if grams is not None and ranks[o.name] != DENSE else None
        if gram is not None:
            grams[o.name] = gram
        o.release()
    return ranks


def _convert_layer(name: str, m: nn.Module, r: int, method: str, spectrum: str, row_weight: torch.Tensor | None,
                   col_weight: torch.Tensor | None, row_order: torch.Tensor | None, moments: torch.Tensor | None,
                   with_spectra: bool, known_before: list[float] | None = None,
                   known_gram: torch.Tensor | None = None) -> tuple[dict, tuple | None]:
    """Compress one layer in place: (its report row, (singular values before, after) or None); `known_gram` as
    `compress_module`'s `gram`."""
    from sttp_compress.compress.activation import refit_spectrum

    kind = weight_kind(m)
    W0 = weight_of(m).detach()  # the dense tensor itself: compressing drops the module's reference
    rows, cols = (math.prod(f) for f in matrix_factors(kind, tuple(W0.shape)))  # the matrix's shape, no copy made
    if with_spectra and known_before is None and known_gram is None and rows <= cols:
        # the report's spectrum needs W Wᵀ: an unscaled big layer's TT-SVD starts its U chain from the same Gram
        # (a lone 4096 x 11008 Linear, which the allocation does not profile: 10.7-11.0 s against 12.3 s on 1 thread)
        G = gram(to_matrix(kind, W0).float())
        known_before = _gram_singular_values(G)
        shared = method == "sttp" and W0.numel() > EXACT_NUMEL and row_weight is None and col_weight is None \
            and row_order is None
        known_gram = G if shared else None
        del G
    p = compress_module(m, r, method, spectrum, row_weight=row_weight, col_weight=col_weight, row_order=row_order,
                        gram=known_gram)
    del known_gram
    if W0.numel() > EXACT_NUMEL:
        release_freed_memory()  # the TT-SVD's temporaries, before the report's factors and Grams
    refit = moments is not None and refit_spectrum(m, W0, moments)
    with torch.no_grad():
        from_factors = W0.numel() > EXACT_NUMEL and unscaled(p)
        factors = _unpadded_factors(m, p) if from_factors or with_spectra else None
        grams = _frame_grams(factors[0], factors[2]) if factors is not None else None
        # a big layer whose factors give its weight matrix (padding dropped; not scaled or reordered): no dense copy
        err = _error_from_factors(*factors, grams, to_matrix(kind, W0)) if from_factors else 0.0
        W1 = None
        if err < 1e-3:  # small layers, and errors the formula's cancellation would blur: from the weight itself
            W1 = weight_of(m).detach()
            err = math.sqrt(sum_squares(W1, W0) / max(sum_squares(W0), 1e-60))
    row = {"name": name, "type": type(m).__name__.removeprefix("Parametrized"), "shape": list(W0.shape),
           "modes": list(p.tt.modes), "tt_ranks": list(p.tt.tt_ranks),
           "rank": max(p.tt.tt_ranks), "spectrum_rank": p.rank,
           "params_original": W0.numel(), "params_compressed": p.dof(), "rel_error": err}
    if row_weight is not None or col_weight is not None:
        row.update({"row_scaled": row_weight is not None, "col_scaled": col_weight is not None})
        row["weighted_rel_error"] = _weighted_error(W1, W0, kind, row_weight, col_weight)
    del W1  # the dense copy goes before the spectra: a big layer's conversion peaks lower
    if p.row_ordered:
        row["row_ordered"] = True
    if refit:
        row["spectrum_refit"] = True
    spectra = None
    if with_spectra:
        after = _compressed_singular_values(factors[1], grams)
        factors = grams = None  # the frames go before a Gram of the weight is made
        before = known_before if known_before is not None else _singular_values(to_matrix(kind, W0))
        spectra = (before, after)
    p.drop_cache()  # no dense copy kept per layer: conversion peaks lower, eval rebuilds it once
    return row, spectra
