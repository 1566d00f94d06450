"""Tensor-train shapes, TT-ranks, DOF, TT-SVD and the gauge to the non-redundant form (method notes §4).

A weight matrix W (d_out × d_in) is an SVD W = U Σ Vᵀ whose frames U (d_out × r) and V (d_in × r)
are themselves tensor trains ("chains"): U over the output modes n^out_1..n^out_P and V over the
input modes n^in_1..n^in_Q, both in PyTorch's memory order (first mode = slowest index). Core k of a
chain is a 3-tensor (R_{k−1}, m_k, R_k) whose matricization (R_{k−1}·m_k) × R_k — rows ordered with
R_{k−1} slowest — is an orthonormal frame. The paper's single train over the modes
(n^out_1..n^out_P, n^in_Q..n^in_1) is the U chain, then Σ, then the V chain read backwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch
from torch import Tensor

from sttp_compress.core.householder import frame_inverse, frame_numel

__all__ = [
    "prime_factors", "padded_size", "padded_dims", "pad_matrix", "pad_columns", "pads_columns_only", "crop_matrix",
    "TTShape", "tt_ranks", "tt_dof", "svdp_dof",
    "gram", "sum_squares", "chain_svd", "leading_eigenvectors", "gram_chain", "chain_matrix", "spectral_tt_svd", "reduce_chain",
]

SPECTRA = ("free", "lipschitz", "identity")
# A dimension with a prime factor above MAX_MODE (e.g. BERT's vocabulary 30522 = 2·3·5087) would give one
# huge core that the tensor train cannot compress; it is padded with zeros to the next size whose prime
# factors are all at most SMOOTH (30522 → 30720 = 2^11·3·5). Kernel sizes 3, 5, 7 stay as they are.
MAX_MODE = 7
SMOOTH = 5


def prime_factors(n: int) -> list[int]:
    """Prime factors of n in ascending order, with repetition (1 → [])."""
    if n < 1:
        raise ValueError(f"cannot factor {n}")
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


@lru_cache(maxsize=4096)
def padded_size(d: int) -> int:
    """d itself when its prime factors are all <= MAX_MODE, else the next size with factors <= SMOOTH (cached:
    every TTShape of a layer asks again, and the search factors every size it passes)."""
    if d < 1:
        raise ValueError(f"cannot pad {d}")
    if max(prime_factors(d), default=1) <= MAX_MODE:
        return d
    n = d
    while max(prime_factors(n), default=1) > SMOOTH:
        n += 1
    return n


def padded_dims(dims: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """padded_size of each natural dimension of one side (STTP tensorizes the padded sizes)."""
    return tuple(padded_size(d) for d in dims)


def pad_matrix(M: Tensor, out_dims: list[int], in_dims: list[int]) -> Tensor:
    """Embed the weight matrix (∏ out_dims × ∏ in_dims) in its zero-padded tensorization's matrix.

    Each natural dimension is padded at its end (for a single dimension per side: rows or columns
    appended), so index (i_1, .., i_k) of the weight keeps its position in the padded tensor.
    """
    out_p, in_p = padded_dims(out_dims), padded_dims(in_dims)
    if out_p == tuple(out_dims) and in_p == tuple(in_dims):
        return M
    dims = (*out_dims, *in_dims)
    T = M.new_zeros((*out_p, *in_p))
    T[tuple(slice(0, n) for n in dims)] = M.reshape(dims)
    return T.reshape(math.prod(out_p), math.prod(in_p))


def pad_columns(M: Tensor, in_dims: list[int]) -> Tensor:
    """`pad_matrix` on the input side only (M's rows, any number, stay): for a wide weight whose rows need no
    padding, the TT-SVD's U chain runs on the unpadded matrix (zero columns change no row Gram) and only the
    small UᵀW is padded, which spares a padded copy of the whole weight."""
    in_p = padded_dims(in_dims)
    if in_p == tuple(in_dims):
        return M
    T = M.new_zeros((M.shape[0], *in_p))
    T[(slice(None), *(slice(0, n) for n in in_dims))] = M.reshape(M.shape[0], *in_dims)
    return T.reshape(M.shape[0], math.prod(in_p))


def pads_columns_only(out_dims: list[int], in_dims: list[int]) -> bool:
    """Whether a weight's padding is on the input side alone and it is wide (d_out <= d_in): then the U chain
    may run on the unpadded matrix (`pad_columns`)."""
    return (padded_dims(out_dims) == tuple(out_dims) and padded_dims(in_dims) != tuple(in_dims)
            and math.prod(out_dims) <= math.prod(in_dims))


def crop_matrix(M: Tensor, out_dims: list[int], in_dims: list[int]) -> Tensor:
    """The inverse of pad_matrix: the weight's own entries of a padded matrix."""
    out_p, in_p = padded_dims(out_dims), padded_dims(in_dims)
    if out_p == tuple(out_dims) and in_p == tuple(in_dims):
        return M
    T = M.reshape(*out_p, *in_p)[tuple(slice(0, n) for n in (*out_dims, *in_dims))]
    return T.reshape(math.prod(out_dims), math.prod(in_dims))


def tt_ranks(modes: tuple[int, ...] | list[int], rank: int) -> list[int]:
    """TT-ranks (1, R_1, .., R_{N−1}, 1) with R_k = min(rank, ∏_{j≤k} n_j, ∏_{j>k} n_j) (eq. 3)."""
    N = len(modes)
    left = [math.prod(modes[: k + 1]) for k in range(N - 1)]
    right = [math.prod(modes[k + 1:]) for k in range(N - 1)]
    return [1] + [min(rank, a, b) for a, b in zip(left, right)] + [1]


@dataclass(frozen=True)
class TTShape:
    """The tensorization of a d_out × d_in weight and its target middle rank."""

    out_modes: tuple[int, ...]
    in_modes: tuple[int, ...]  # memory order: n^in_1 (slowest) .. n^in_Q
    rank: int  # the target rank r: R_k = min(r, R_k^max) on every bond (eq. 3)

    @classmethod
    def from_dims(cls, out_factors: list[int], in_factors: list[int], rank: int,
                  method: str = "sttp") -> "TTShape":
        """Prime-factor each dimension of the output and input sides (memory order).

        `out_factors`/`in_factors` are the natural dimensions of each side, e.g. (C_in, k_h, k_w) for a
        convolution's input side; each is padded if it has a prime factor above MAX_MODE (`padded_size`)
        and split into ascending primes. SVDP keeps one mode per side, unpadded.
        """
        d_out, d_in = math.prod(out_factors), math.prod(in_factors)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if method == "svdp":
            return cls((d_out,), (d_in,), rank)
        if method != "sttp":
            raise ValueError(f"method must be 'sttp' or 'svdp', got {method!r}")
        out_modes = tuple(p for f in padded_dims(out_factors) for p in prime_factors(f)) or (1,)
        in_modes = tuple(p for f in padded_dims(in_factors) for p in prime_factors(f)) or (1,)
        return cls(out_modes, in_modes, rank)

    @property
    def d_out(self) -> int:
        return math.prod(self.out_modes)

    @property
    def d_in(self) -> int:
        return math.prod(self.in_modes)

    @property
    def modes(self) -> tuple[int, ...]:
        """Mode sizes in the order of the paper's tensor train (output side first)."""
        return self.out_modes + self.in_modes[::-1]

    @cached_property
    def tt_ranks(self) -> list[int]:
        """Full TT-rank list (1, R_1, ..., R_P, ..., 1) of the paper's train."""
        return tt_ranks(self.modes, self.rank)

    @property
    def middle(self) -> int:
        """The rank of the spectrum Σ: R_P = min(r, d_out, d_in)."""
        return self.tt_ranks[len(self.out_modes)]

    @property
    def u_ranks(self) -> list[int]:
        """Ranks (1, R_1, .., r) of the U chain."""
        return self.tt_ranks[: len(self.out_modes) + 1]

    @property
    def v_ranks(self) -> list[int]:
        """Ranks (1, .., r) of the V chain, in input memory order."""
        return self.tt_ranks[len(self.out_modes):][::-1]

    def frames(self, spectrum: str = "free") -> list[tuple[str, int, int, int, bool]]:
        """(side, core index, d, r, reduced) of every core's frame in the non-redundant form.

        Every core is a reduced frame (St_U) except the two adjacent to Σ, which are full; with an
        identity spectrum the U-side adjacent core is reduced too (Prop. 2 gauge).
        """
        out = []
        for side, modes, ranks in (("u", self.out_modes, self.u_ranks), ("v", self.in_modes, self.v_ranks)):
            K = len(modes)
            for k in range(K):
                last = k == K - 1
                reduced = not last or (side == "u" and spectrum == "identity")
                out.append((side, k, ranks[k] * modes[k], ranks[k + 1], reduced))
        return out

    def dof(self, spectrum: str = "free") -> int:
        """Trainable values of the parameterization: eq. (9), minus r(r+1)/2 for Σ = I."""
        return sum(frame_numel(d, r, red) for _, _, d, r, red in self.frames(spectrum)) + (
            0 if spectrum == "identity" else self.middle)


def tt_dof(modes: tuple[int, ...] | list[int], ranks: list[int]) -> int:
    """Eq. (9): Σ_k R_{k−1} n_k R_k − Σ_{k=1}^{N−1} R_k², the fixed-TT-rank manifold's dimension."""
    return sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(modes)) - sum(R * R for R in ranks[1:-1])


def svdp_dof(d_out: int, d_in: int, r: int, spectrum: str = "free") -> int:
    """SVDP DOF (§3): r(d_out + d_in) − r², or r(d_out + d_in) − r(3r+1)/2 with Σ = I."""
    if spectrum == "identity":
        return r * (d_out + d_in) - r * (3 * r + 1) // 2
    return r * (d_out + d_in) - r * r


# ---------------------------------------------------------------------------------------------
# TT-SVD

GRAM_BLOCK = 512  # rows per block of `gram`


def gram(M: Tensor, block: int = GRAM_BLOCK) -> Tensor:
    """M Mᵀ from the products of each block of rows with itself and the rows after it, mirrored (so exactly
    symmetric): about half the multiplications of `M @ M.T` for tall Grams (1.6-1.8x faster at 4096 rows on 2
    cores). Plain `M @ M.T` up to `block` rows. Diagonal blocks are averaged with their transposes: BLAS need
    not return a product with its own transpose symmetric."""
    m = M.shape[0]
    if m <= block:
        return _symmetric(M @ M.T)
    G = M.new_empty(m, m)
    for i in range(0, m, block):
        P = M[i:i + block] @ M[i:].T  # this block's rows against themselves and every later row
        b = P.shape[0]
        G[i:i + b, i:i + b] = _symmetric(P[:, :b])
        G[i:i + b, i + b:] = P[:, b:]
        G[i + b:, i:i + b] = P[:, b:].T
    return G


def _symmetric(S: Tensor) -> Tensor:
    return (S + S.T) / 2


def sum_squares(t: Tensor, minus: Tensor | None = None, block: int = 1 << 22) -> float:
    """‖t − minus‖² (‖t‖² without `minus`): per row in t's dtype, over rows in float64, a block of rows at a
    time, so no full-size difference, square or float64 copy is made (each 400 MB for a 4096 x 25088 layer;
    one float32 sum of all of it was off by 3e-4)."""
    rows = t.reshape(t.shape[0], -1)
    other = minus.reshape(rows.shape) if minus is not None else None
    step = max(1, block // max(1, rows.shape[1]))
    total = 0.0
    for i in range(0, rows.shape[0], step):
        d = rows[i:i + step] if other is None else rows[i:i + step] - other[i:i + step]
        total += float(d.square().sum(1).double().sum())
    return total


def chain_svd(A: Tensor, modes: tuple[int, ...], ranks: list[int]) -> tuple[list[Tensor], Tensor]:
    """Left-to-right TT-SVD of the rows of A (D × c), D = ∏ modes, truncated to `ranks`.

    Returns the left-orthonormal cores (R_{k−1}, m_k, R_k) of a chain U (D × R_K) and the remainder
    Uᵀ A (R_K × c), so that U Uᵀ A is the TT-SVD approximation of A and ‖A‖² − ‖UᵀA‖² its squared
    error. Wide unfoldings (the common case) take the eigenvectors of their small Gram matrix
    instead of a full SVD: the same leading subspace at a fraction of the cost.
    """
    c = A.shape[1]
    cores = []
    rest = A
    for k, m in enumerate(modes):
        M = rest.reshape(ranks[k] * m, -1)
        R = ranks[k + 1]
        if R == M.shape[0]:  # no truncation at this bond: the identity is an orthonormal core
            cores.append(torch.eye(R, dtype=M.dtype, device=M.device).reshape(ranks[k], m, R))
            rest = M
            continue
        if M.shape[0] <= M.shape[1]:
            _, vecs = torch.linalg.eigh(gram(M))  # ascending eigenvalues
            Uk = vecs[:, -R:].flip(-1)
        else:
            Uk = torch.linalg.svd(M, full_matrices=False)[0][:, :R]
        cores.append(Uk.reshape(ranks[k], m, R))
        rest = Uk.T @ M
    return cores, rest.reshape(ranks[-1], c)


def leading_eigenvectors(S: Tensor, R: int) -> Tensor:
    """Eigenvectors of the R largest eigenvalues of the symmetric S, largest first."""
    return torch.linalg.eigh(S)[1][:, -R:].flip(-1)


def gram_chain(H: Tensor, modes: tuple[int, ...], ranks: list[int], keep: list[bool] | None = None,
               last: int | None = None) -> tuple[list[Tensor], Tensor | None]:
    """The cores of `chain_svd` from the Gram H = A Aᵀ alone (D × D): each bond's unfolding Gram is a partial
    trace of the rest's Gram, which the new core then compresses (Ukᵀ H Uk over the bond's rows).

    One Gram of A serves every rank (the allocator's error profile), then the work is on D × D matrices
    only. Bond k is the identity where R_k equals its rows (and `keep[k]`, when given, says it
    does not truncate). With `last`, stops at bond `last` and returns (cores so far, that bond's unfolding
    Gram), whose leading eigenvalues are the energy the chain keeps; else (cores, None).
    """
    cores = []
    for k, m in enumerate(modes):
        rows, R = ranks[k] * m, ranks[k + 1]
        if R == rows and (keep is None or keep[k]):
            cores.append(torch.eye(R, dtype=H.dtype, device=H.device).reshape(ranks[k], m, R))
            continue
        D = H.shape[0] // rows
        H4 = H.reshape(rows, D, rows, D)
        S = torch.diagonal(H4, dim1=1, dim2=3).sum(-1)
        if k == last:
            return cores, S
        Uk = leading_eigenvectors(S, R)
        cores.append(Uk.reshape(ranks[k], m, R))
        if k < len(modes) - 1:  # the last core leaves nothing to compress
            H = _project_gram(H, Uk, D)
    return cores, None


def _project_gram(H: Tensor, Uk: Tensor, D: int) -> Tensor:
    """Aᵀ H A for A = Uk ⊗ I_D: the Gram of the rest after bond k's core (R·D × R·D).

    Two products over Uk's rows when D is large (HA as a batched product, then Aᵀ(HA) as one matmul: 2-4x
    faster than the einsum at D >= 16 on 2 cores); the einsum where D is small (the batches get too small)."""
    rows, R = Uk.shape
    if D < 16:
        return torch.einsum("ia,itjs,jb->atbs", Uk, H.reshape(rows, D, rows, D), Uk).reshape(R * D, R * D)
    HA = torch.matmul(Uk.T, H.reshape(-1, rows, D))  # (rows·D, R, D)
    return (Uk.T @ HA.reshape(rows, -1)).reshape(R * D, R * D)


def chain_matrix(cores: list[Tensor]) -> Tensor:
    """Contract a chain's cores (R_{k−1}, m_k, R_k) into its frame matrix (∏ m_k × R_K)."""
    U = cores[0].reshape(-1, cores[0].shape[-1])
    for G in cores[1:]:
        U = (U @ G.reshape(G.shape[0], -1)).reshape(-1, G.shape[-1])
    return U


def spectral_tt_svd(W: Tensor, shape: TTShape, pad_in: list[int] | None = None, gram: Tensor | None = None
                    ) -> tuple[list[Tensor], Tensor, list[Tensor]]:
    """TT-SVD of W into U cores, a spectrum σ and V cores with W ≈ U diag(σ) Vᵀ (Prop. 1).

    The U chain is a TT-SVD of W's rows; the V chain a TT-SVD of the rows of (UᵀW)ᵀ; then the middle
    M = Uᵀ W V (the best middle for these frames) is diagonalized by its SVD, whose rotations are
    absorbed into the last core of each chain. Runs in W's dtype (pass float64 for accuracy). With `pad_in`
    (the natural input dims), W is the weight before its column padding. With `gram` = W Wᵀ (the allocator's
    profile computes it), the U chain comes from it (`gram_chain`): the same subspaces without the Grams of W's
    large unfoldings (a 4096 x 11008 float32 W at rank 673 on 2 cores: 1.6 s against `chain_svd`'s 2.9 s; with
    the Gram to compute first it was no faster: 1.34 s against 1.06 s at rank 400).
    """
    if gram is not None:
        u_cores, _ = gram_chain(gram, shape.out_modes, shape.u_ranks)
        B = chain_matrix(u_cores).T @ W
    else:
        u_cores, B = chain_svd(W, shape.out_modes, shape.u_ranks)  # B = Uᵀ W: r × d_in
    if pad_in is not None:  # W came unpadded (`pads_columns_only`): pad UᵀW instead, the same matrix
        B = pad_columns(B, pad_in)
    v_cores, C = chain_svd(B.T, shape.in_modes, shape.v_ranks)  # C = Vᵀ Bᵀ = Mᵀ: r × r
    A, sigma, Ch = torch.linalg.svd(C.T)
    u_cores[-1] = u_cores[-1] @ A
    v_cores[-1] = v_cores[-1] @ Ch.T
    return u_cores, sigma, v_cores


# ---------------------------------------------------------------------------------------------
# Gauge to the non-redundant form


def _rq(B: Tensor) -> tuple[Tensor, Tensor]:
    """RQ decomposition B = R Q (R upper triangular, Q orthogonal) of a square matrix."""
    J = torch.flip(torch.eye(B.shape[0], dtype=B.dtype, device=B.device), [0])
    Q0, R0 = torch.linalg.qr((J @ B).T)
    return J @ R0.T @ J, J @ Q0.T


def reduce_chain(cores: list[Tensor], reduce_last: bool) -> tuple[list[Tensor], Tensor]:
    """Gauge a left-orthonormal chain to reduced frames and return their reflector parameters.

    Core k (all but the last, and the last too when `reduce_last`) is rotated by an orthogonal Q_k
    so that the leading R_k×R_k block of its frame is upper triangular (an RQ decomposition), with
    Q_k passed into core k+1 (§4); the column signs that reflectors cannot produce are passed on the
    same way. Returns (params per core, tail) where chain_matrix(cores) == U_F @ tail, U_F being the
    chain generated by the returned parameters, and tail an R_K×R_K orthogonal matrix.
    """
    cores = [G.clone() for G in cores]
    params = []
    K = len(cores)
    for k in range(K):
        R0, m, R = cores[k].shape
        X = cores[k].reshape(R0 * m, R)
        reduced = k < K - 1 or reduce_last
        Q = None
        if reduced:
            _, Q = _rq(X[:R])
            X = X @ Q.T
        p, s = frame_inverse(X, reduced=reduced)
        params.append(p)
        carry = s[:, None] * Q if Q is not None else torch.diag(s)  # X_orig = F · carry
        if k < K - 1:
            nxt = cores[k + 1]
            cores[k + 1] = (carry @ nxt.reshape(R, -1)).reshape(nxt.shape)
        else:
            tail = carry
    return params, tail
