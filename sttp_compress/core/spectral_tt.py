"""STTP and SVDP parameterized weights for Linear, ConvNd, ConvTransposeNd and Embedding.

`SpectralTT` is a `torch.nn.utils.parametrize` parametrization in geotorch's style: `forward` maps the
free parameters (packed Householder reflectors of every core, grouped by frame shape, and the
spectrum) to the weight, and `right_inverse` maps a dense weight to them — which is the TT-SVD
conversion (`tt.spectral_tt_svd` + `tt.reduce_chain`). SVDP is the same class with one core per side.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from sttp_compress.core.householder import frame, frame_numel
from sttp_compress.core.tt import (SPECTRA, TTShape, crop_matrix, pad_matrix, pads_columns_only, reduce_chain,
                                  spectral_tt_svd)

__all__ = ["SpectralTT", "weight_kind", "weight_name", "matrix_factors", "to_matrix", "SUPPORTED"]

# Weights up to this many values convert in float64. A larger float32 weight converts in float32, its own
# precision: the TT-SVD's captured energies then agree with float64's to ~1e-6 (relative), far inside the
# conversion error, at half the time and memory (a 4096 x 25088 Linear: 7.6 s in float64 on 2 cores).
EXACT_NUMEL = 1 << 18
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
SUPPORTED = (nn.Linear, nn.Embedding, nn.MultiheadAttention) + _CONV + _CONVT


def weight_name(module: nn.Module) -> str:
    """The attribute holding the module's compressible weight: MultiheadAttention's packed
    q/k/v projection `in_proj_weight` (3E × E, a Linear weight), `weight` otherwise."""
    return "in_proj_weight" if isinstance(module, nn.MultiheadAttention) else "weight"


def weight_kind(module: nn.Module) -> str:
    """'linear' | 'conv' | 'conv_transpose' | 'embedding'; raises ValueError with the reason otherwise."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim:
            raise ValueError("MultiheadAttention with kdim/vdim != embed_dim keeps separate q/k/v weights "
                             "(not supported)")
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, _CONV + _CONVT):  # grouped and depthwise too: see matrix_factors
        return "conv" if isinstance(module, _CONV) else "conv_transpose"
    raise ValueError(f"{type(module).__name__} has no supported weight")


def matrix_factors(kind: str, shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """Natural dimensions of the output and input side of a weight read as a matrix (§1).

    A convolution (C_out, C_in, k_1..k_N) is C_out × (C_in·k_1···k_N) in memory order; a transposed
    convolution stores (C_in, C_out, k...) and is permuted to (C_out, C_in, k...) first. A grouped
    convolution stores (C_out, C_in/g, k...): its matrix is the g groups' blocks stacked along the output
    channels, C_out × (C_in/g·k...), which shares the input-side frame across groups — fewer DOF than a
    train per group at the same rank, and far fewer than the block-diagonal whole (rank up to C_out).
    A depthwise convolution (C_in/g = 1) is C_out × k_1···k_N.
    """
    if kind == "conv":
        return [shape[0]], list(shape[1:])
    if kind == "conv_transpose":
        return [shape[1]], [shape[0], *shape[2:]]
    return [shape[0]], [shape[1]]


def to_matrix(kind: str, W: Tensor) -> Tensor:
    """The weight read as the d_out × d_in matrix of §1 (transposed convolutions permuted first)."""
    if kind == "conv_transpose":
        W = W.transpose(0, 1)
    return W.reshape(W.shape[0], -1)


def _from_matrix(kind: str, M: Tensor, shape: tuple[int, ...]) -> Tensor:
    if kind == "conv_transpose":
        return M.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1)
    return M.reshape(shape)


class SpectralTT(nn.Module):
    """W = U diag(σ) Vᵀ with U, V tensor trains of Householder frames; SVDP when method='svdp'.

    Spectrum modes (§5): 'free' learns σ; 'lipschitz' learns S with σ = scale·S/‖S‖∞ (|σ| ≤ scale,
    the fixed per-layer scale recorded at conversion); 'identity' fixes Σ = scale·diag(±1).
    Parameters (the parametrization's originals): one tensor (n_frames, n_free) per distinct frame
    shape, then the spectrum (absent for 'identity'); their total size is exactly the DOF.

    With `row_scaled`, W = diag(ρ) U Σ Vᵀ: one more original ρ (a trainable scale per row of the
    d_out × d_in matrix, e.g. per token of an embedding) follows the spectrum. A conversion given
    `row_weight` w (e.g. token frequencies) fits the TT-SVD to diag(√w)·W, minimizing Σ_i w_i‖w_i − ŵ_i‖²
    instead of the plain Frobenius error, and starts from ρ = 1/√w; the DOF grows by d_out.
    `col_scaled` is the same on the input side, W = U Σ Vᵀ diag(γ) (γ after ρ among the originals),
    fitted to W·diag(√c) for a `col_weight` c (e.g. each input feature's activation scale, so the
    error counts where the inputs are large) and starting from γ = 1/√c; the DOF grows by d_in.

    With `row_ordered`, the tensor train factorizes the rows in the order of the buffer `row_order` (a
    permutation, set before the conversion; ρ follows it too) and the weight puts them back. A TT
    tensorizes the row index digit by digit, so which rows share its leading digits matters: rows sorted
    by weight (`convert.weight_order`) kept a frequency-weighted token embedding closer to the original
    (benchmarks/results/experiments/embedding_order.md). The order is a fixed index, not a trainable value: the DOF
    is unchanged.
    """

    def __init__(self, kind: str, weight_shape: tuple[int, ...], rank: int,
                 method: str = "sttp", spectrum: str = "free", row_scaled: bool = False,
                 col_scaled: bool = False, row_ordered: bool = False):
        super().__init__()
        if spectrum not in SPECTRA:
            raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")
        self.kind, self.weight_shape = kind, tuple(weight_shape)
        self.method, self.spectrum, self.requested_rank = method, spectrum, rank
        out_f, in_f = matrix_factors(kind, self.weight_shape)
        self.tt = TTShape.from_dims(out_f, in_f, rank, method)
        self.dims = (out_f, in_f) if method == "sttp" else None  # natural dims, for zero padding (tt.pad_matrix)
        self.rows = math.prod(out_f)  # d_out of the (unpadded) weight matrix
        self.cols = math.prod(in_f)  # d_in of the (unpadded) weight matrix
        self.row_scaled, self.col_scaled = bool(row_scaled), bool(col_scaled)
        self.row_weight: Tensor | None = None  # importance of each row for the next conversion (row_scaled only)
        self.col_weight: Tensor | None = None  # ... and of each column (col_scaled only)
        self.gram: Tensor | None = None  # W Wᵀ of the matrix the next conversion factorizes, if known
        frames = self.tt.frames(spectrum)
        # group frames of equal shape so each group is generated in one batched call
        self.groups: list[tuple[int, int, bool]] = []
        self.members: list[list[tuple[str, int]]] = []
        for side, k, d, r, red in frames:
            key = (d, r, red)
            if key not in self.groups:
                self.groups.append(key)
                self.members.append([])
            self.members[self.groups.index(key)].append((side, k))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("signs", torch.ones(self.tt.middle) if spectrum == "identity" else None)
        self.register_buffer("row_order", torch.arange(self.rows) if row_ordered else None)
        self._cache: tuple | None = None  # the eval-mode weight and the versions of what built it
        self.skip_conversion = False  # set while attaching a structure that a state_dict will fill

    # -- structure ---------------------------------------------------------------------------
    @property
    def row_ordered(self) -> bool:
        return self.row_order is not None

    @property
    def rank(self) -> int:
        return self.tt.middle

    def dof(self) -> int:
        """Trainable values: eq. (9) (SVDP: r(d_out+d_in) − r²), less r(r+1)/2 for Σ = I, plus d_out row
        scales when row_scaled and d_in column scales when col_scaled."""
        return self.tt.dof(self.spectrum) + (self.rows if self.row_scaled else 0) + (self.cols if self.col_scaled else 0)

    @property
    def n_originals(self) -> int:
        """How many tensors the parametrization holds: the frame groups, the spectrum, the row and column scales."""
        return len(self.groups) + (self.spectrum != "identity") + self.row_scaled + self.col_scaled

    def config(self) -> dict:
        """Everything needed to rebuild this parametrization (JSON/weights_only friendly)."""
        cfg = {"kind": self.kind, "weight_shape": list(self.weight_shape), "rank": self.requested_rank,
               "method": self.method, "spectrum": self.spectrum}
        if self.row_scaled:
            cfg["row_scaled"] = True
        if self.col_scaled:
            cfg["col_scaled"] = True
        if self.row_ordered:
            cfg["row_ordered"] = True
        return cfg

    # -- parameters → weight ----------------------------------------------------------------
    def sigma(self, spectrum_param: Tensor | None) -> Tensor:
        """The effective diagonal Σ from the spectrum parameter."""
        if self.spectrum == "free":
            return spectrum_param
        if self.spectrum == "lipschitz":
            return self.scale * spectrum_param / spectrum_param.abs().max().clamp_min(1e-12)
        return self.scale * self.signs

    def factors(self, *originals: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(U, σ, V) with W_matrix = U diag(σ) Vᵀ, built from the parameters (of the zero-padded matrix
        `tt.pad_matrix` when a dimension has a large prime factor)."""
        U, s, V = self.factors_from_frames(self.frames(originals), self.spectrum_param(originals))
        rho, gamma = self.row_scale_param(originals), self.col_scale_param(originals)
        U = U if rho is None else self._scale_rows(U, rho, 0)
        return U, s, (V if gamma is None else self._scale_rows(V, gamma, 1))

    def _scale_rows(self, U: Tensor, rho: Tensor, side: int = 0) -> Tensor:
        """diag(ρ)·U on the (possibly zero-padded) rows of U, the frame matrix of the output (side 0) or
        input (side 1) dimensions (padded rows, cropped off the weight, get 0)."""
        if U.shape[0] != rho.shape[0]:
            rho = pad_matrix(rho.unsqueeze(1), self.dims[side], [1]).squeeze(1)
        return U * rho.unsqueeze(1)

    def frames(self, originals: tuple[Tensor, ...]) -> list[Tensor]:
        """The frames of each group (n_frames, d, r), one batched call per group."""
        return [frame(P, d, r, red) for (d, r, red), P in zip(self.groups, originals)]

    def spectrum_param(self, originals: tuple[Tensor, ...]) -> Tensor | None:
        """The spectrum among the originals (None for Σ = I)."""
        return originals[len(self.groups)] if self.spectrum != "identity" else None

    def row_scale_param(self, originals: tuple[Tensor, ...]) -> Tensor | None:
        """The row scale ρ among the originals (None unless row_scaled)."""
        return originals[len(self.groups) + (self.spectrum != "identity")] if self.row_scaled else None

    def col_scale_param(self, originals: tuple[Tensor, ...]) -> Tensor | None:
        """The column scale γ among the originals (None unless col_scaled)."""
        return originals[-1] if self.col_scaled else None

    def chain_cores(self, frames: list[Tensor]) -> dict[str, list[Tensor]]:
        """The frames of each group (n_frames, d, r) sorted into the U and V chains, core by core."""
        chains: dict[str, list] = {"u": [None] * len(self.tt.out_modes), "v": [None] * len(self.tt.in_modes)}
        for members, X in zip(self.members, frames):
            for (side, k), Xi in zip(members, X.unbind(0)):  # one backward op, not one zero-filled grad per frame
                chains[side][k] = Xi
        return chains

    def factors_from_frames(self, frames: list[Tensor], spectrum_param: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(U, σ, V) from the frames of each group (n_frames, d, r) and the spectrum parameter."""
        chains = self.chain_cores(frames)
        U = chain(chains["u"], self.tt.u_ranks)
        V = chain(chains["v"], self.tt.v_ranks)
        return U, self.sigma(spectrum_param), V

    def weight_from_frames(self, frames: list[Tensor], spectrum_param: Tensor | None,
                           row_scale: Tensor | None = None, col_scale: Tensor | None = None) -> Tensor:
        """The weight in its module's shape from the group frames, the spectrum parameter, ρ and γ."""
        U, s, V = self.factors_from_frames(frames, spectrum_param)
        return self.weight_from_factors(U, s, V, row_scale, col_scale)

    def weight_from_factors(self, U: Tensor, s: Tensor, V: Tensor, row_scale: Tensor | None = None,
                            col_scale: Tensor | None = None) -> Tensor:
        """The weight in its module's shape from the frame matrices U, V, the effective spectrum σ, the
        row scale ρ and the column scale γ (the padded rows/columns of a zero-padded tensorization
        cropped off)."""
        M = (U * s) @ V.T
        M = crop_matrix(M, *self.dims) if self.dims else M
        if row_scale is not None:
            M = M * row_scale.unsqueeze(1)
        if col_scale is not None:
            M = M * col_scale
        if self.row_order is not None:  # row i of M is row row_order[i] of the weight
            M = M.new_zeros(M.shape).index_copy(0, self.row_order, M)
        return _from_matrix(self.kind, M, self.weight_shape)

    def forward(self, *originals: Tensor) -> Tensor:
        """The weight from the originals; in eval mode without gradients, built once until they change."""
        use_cache = not self.training and not (
            torch.is_grad_enabled() and any(o.requires_grad for o in originals))
        if use_cache:
            key = tuple((id(o), o._version, o.device, o.dtype) for o in originals) + (
                self.scale._version, id(self.scale))
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        with torch.autocast(originals[0].device.type, enabled=False):  # frames need float32 (trsm)
            W = self.weight_from_frames(self.frames(originals), self.spectrum_param(originals),
                                        self.row_scale_param(originals), self.col_scale_param(originals))
        self._cache = (key, W) if use_cache else None
        return W

    def drop_cache(self) -> None:
        """Forget the cached eval-mode weight (after the parameters changed behind the cache's back, or to keep
        no dense copy while converting a whole model)."""
        self._cache = None

    def train(self, mode: bool = True) -> "SpectralTT":
        """Also forget the cached eval-mode weight: optimizers that update in place without bumping
        the tensors' version counters (AdamW(fused=True)) would otherwise leave it stale; the
        train → eval switch after such steps rebuilds it."""
        self._cache = None
        return super().train(mode)

    # -- weight → parameters (the conversion) ------------------------------------------------
    def placeholder(self, like: Tensor) -> tuple[Tensor, ...]:
        """Zero parameters of the right shapes, for a structure that a state_dict will fill."""
        groups = tuple(like.new_zeros(len(m), frame_numel(d, r, red))
                       for (d, r, red), m in zip(self.groups, self.members))
        return (groups + (() if self.spectrum == "identity" else (like.new_zeros(self.rank),))
                + ((like.new_ones(self.rows),) if self.row_scaled else ())
                + ((like.new_ones(self.cols),) if self.col_scaled else ()))

    @torch.no_grad()
    def right_inverse(self, weight: Tensor) -> tuple[Tensor, ...]:
        """TT-SVD of `weight` into the non-redundant parameters (in float64; in float32 for a float32 weight
        of more than EXACT_NUMEL values, see there)."""
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} != {self.weight_shape}")
        if self.skip_conversion:
            return self.placeholder(weight)
        exact = weight.numel() <= EXACT_NUMEL or weight.dtype == torch.float64
        M = to_matrix(self.kind, weight.detach().to(torch.float64 if exact else torch.float32))
        row_weight = self.row_weight
        if self.row_order is not None:
            order = self.row_order.to(M.device)
            M = M[order]
            if row_weight is not None:
                row_weight = torch.as_tensor(row_weight, device=M.device)[order]
        rho = gamma = ()
        if self.row_scaled:
            sqrt_w = _sqrt_weight(row_weight, self.rows, M.device, "row_weight")
            M = M * sqrt_w.to(M.dtype).unsqueeze(1)  # in M's dtype: a float64 √w made big layers convert in float64
            rho = ((1.0 / sqrt_w).to(weight.dtype),)
        if self.col_scaled:
            sqrt_c = _sqrt_weight(self.col_weight, self.cols, M.device, "col_weight")
            M = M * sqrt_c.to(M.dtype)
            gamma = ((1.0 / sqrt_c).to(weight.dtype),)
        pad_in = None
        if self.dims and pads_columns_only(*self.dims):
            pad_in = self.dims[1]  # no padded copy of the weight: only UᵀW is padded
        elif self.dims:
            M = pad_matrix(M, *self.dims)
        gram = self.gram  # the allocation's, of the same matrix in float32: for the float32 conversion only
        if gram is not None and (exact or tuple(gram.shape) != (M.shape[0], M.shape[0]) or gram.dtype != M.dtype):
            gram = None
        u_cores, sigma, v_cores = spectral_tt_svd(M, self.tt, pad_in, gram)
        self._cache = None
        if self.spectrum != "identity":
            return self.from_cores(u_cores, sigma, v_cores, weight.dtype) + rho + gamma
        # W ≈ c·U Vᵀ with c = mean σ (least squares); U = U_F·tail, so V absorbs tailᵀ.
        u_params, u_tail = reduce_chain(u_cores, reduce_last=True)
        v_cores[-1] = v_cores[-1] @ u_tail.T
        v_params, v_tail = reduce_chain(v_cores, reduce_last=False)
        self.scale.fill_(float(sigma.mean()))
        self.signs.copy_(torch.diagonal(v_tail))
        return self._grouped(u_params, v_params, weight.dtype) + rho + gamma

    def from_cores(self, u_cores: list[Tensor], sigma: Tensor, v_cores: list[Tensor],
                    dtype: torch.dtype) -> tuple[Tensor, ...]:
        """The group originals and the spectrum parameter of W = U diag(σ) Vᵀ given by left-orthonormal chains
        (free or Lipschitz spectrum; the latter also sets `scale`)."""
        u_params, u_tail = reduce_chain(u_cores, reduce_last=False)
        v_params, v_tail = reduce_chain(v_cores, reduce_last=False)
        sigma = torch.diagonal(u_tail) * sigma * torch.diagonal(v_tail)
        if self.spectrum == "lipschitz":
            scale = sigma.abs().max().clamp_min(1e-12)
            self.scale.fill_(float(scale))
            sigma = sigma / scale
        return self._grouped(u_params, v_params, dtype) + (sigma.to(dtype),)

    def _grouped(self, u_params: list[Tensor], v_params: list[Tensor], dtype: torch.dtype) -> tuple[Tensor, ...]:
        """Each core's reflector parameters stacked into the group originals (n_frames, n_free)."""
        by_core = {("u", k): p for k, p in enumerate(u_params)} | {("v", k): p for k, p in enumerate(v_params)}
        return tuple(torch.stack([by_core[m] for m in members]).to(dtype).contiguous() for members in self.members)

    def spectral_penalty(self, spectrum_param: Tensor | None) -> Tensor:
        """D-optimal regularizer −Σ log|σ_i| of the normalized spectrum (0 for Σ = I)."""
        if spectrum_param is None or self.spectrum == "identity":
            return self.scale.new_zeros(())
        s = spectrum_param
        if self.spectrum == "lipschitz":
            s = s / s.abs().max().clamp_min(1e-12)
        return -torch.log(s.abs().clamp_min(1e-12)).sum()

    def extra_repr(self) -> str:
        return (f"{self.method}, kind={self.kind}, shape={list(self.weight_shape)}, rank={self.rank}, "
                f"spectrum={self.spectrum}, modes={list(self.tt.modes)}, dof={self.dof()}"
                + (", row_ordered" if self.row_ordered else ""))


def _sqrt_weight(w: Tensor | None, n: int, device: torch.device, what: str) -> Tensor:
    """√w as float64 on `device` (ones without w); ValueError unless n positive finite values."""
    w = torch.ones(n, dtype=torch.float64) if w is None else w
    sqrt_w = torch.as_tensor(w, dtype=torch.float64, device=device).reshape(-1).sqrt()
    if sqrt_w.shape[0] != n or not bool((sqrt_w > 0).all() and sqrt_w.isfinite().all()):
        raise ValueError(f"{what} needs {n} positive finite values")
    return sqrt_w


def chain(frames: list[Tensor], ranks: list[int]) -> Tensor:
    """Contract a chain of core frames ((R_{k−1}·m_k) × R_k) into its frame matrix."""
    U = frames[0]
    for k, X in enumerate(frames[1:], start=1):
        U = (U @ X.reshape(ranks[k], -1)).reshape(-1, ranks[k + 1])
    return U


def is_parametrized(module: nn.Module) -> bool:
    """True when the module's weight is an STTP/SVDP parametrization of ours."""
    name = weight_name(module)
    return parametrize.is_parametrized(module, name) and any(
        isinstance(p, SpectralTT) for p in getattr(module.parametrizations, name))
