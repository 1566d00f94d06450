"""The skeleton form of a chain of cores: what an exported model stores instead of orthonormal frames.

A core X ((R_{k−1}·m_k) × R_k, full column rank) equals P [I; B] T for R_k of its rows, T = X[rows]: the
R_k × R_k block T passes into the next core (a change of basis), and only B ((R_{k−1}·m_k − R_k) × R_k) and
the row order are stored. Rows of (near) maximal volume (maxvol) keep every entry of B within 1.05 in
magnitude, so the form is as well conditioned as the frame. A frame stores R_{k−1}·m_k·R_k values and its
Householder reflectors R_k(R_k+1)/2 fewer (the gauge-reduced ones R_k² fewer, as many as the skeleton);
the skeleton stores R_k² fewer, square cores nothing. Applying a core needs no identity matrix:
P [I; B] Z = cat(Z, B Z) in the stored row order, so a chain is applied right to left, to the T its last core
leaves (or anything that T is folded into).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MAXVOL_TOL", "skeleton", "skeleton_chain", "apply_chain"]

MAXVOL_TOL = 1.05  # |B| bound at which the row swaps stop


def skeleton(X: Tensor, tol: float = MAXVOL_TOL) -> tuple[Tensor, Tensor, Tensor]:
    """(order, B, T) with X[order] = cat(T, B T): T = X[order[:r]] the r rows of (near) maximal volume of the
    tall full-rank X (d × r), B = X[order[r:]] T⁻¹ with |B| <= tol. Rows start from LU's partial pivoting,
    then the row of B's largest entry swaps in while it exceeds `tol` (each swap raises |det T|)."""
    d, r = X.shape
    _, piv = torch.linalg.lu_factor(X)  # partial pivoting: LAPACK's row swaps
    order = torch.arange(d)  # on the CPU while it is built (a swap a step); returned on X's device
    for i, p in enumerate(piv.tolist()):  # LAPACK's sequential swaps (1-based)
        order[[i, p - 1]] = order[[p - 1, i]]
    rows, rest = order[:r].clone(), order[r:].clone()
    B = torch.linalg.solve(X[rows].T, X[rest].T).T  # (d − r) × r
    for _ in range(4 * d):  # a bound on the swaps; in practice they stop far sooner
        flat = int(B.abs().argmax())
        i, j = divmod(flat, r)
        if abs(float(B[i, j])) <= tol:
            break
        # row rest[i] replaces rows[j]: the rank-one update of B (Goreinov et al.'s maxvol)
        b_i, b_j = B[i].clone(), B[:, j].clone()
        e_j = torch.zeros_like(b_i)
        e_j[j] = 1.0
        step = (b_i - e_j) / b_i[j]
        B -= torch.outer(b_j, step)  # every other row in the new basis
        B[i] = e_j - step  # the row that leaves the basis
        rows[j], rest[i] = rest[i].clone(), rows[j].clone()
    # on X's device: an exported model on a GPU gathers with it (a CPU order failed MiniLM's .pt2 export on CUDA)
    return torch.cat([rows, rest]).to(X.device), B, X[rows]


def skeleton_chain(frames: list[Tensor], ranks: list[int]) -> tuple[list[tuple[Tensor, Tensor] | None], Tensor]:
    """A chain (`spectral_tt.chain(frames, ranks)`) as skeleton cores and what is left of it: ([(inverse row
    order, B) per core, None for a square core], T) with chain(frames, ranks) = apply_chain(cores, T, ranks):
    T (R_K × R_K) is the last core's row block, every earlier one folded into the core after it. In float64."""
    if not frames:
        raise ValueError("a chain needs at least one core")
    cores: list[tuple[Tensor, Tensor] | None] = []
    T = None
    for k, G in enumerate(frames):
        X = G.double()
        if T is not None:  # the previous core's T, folded into this one
            X = (T @ X.reshape(ranks[k], -1)).reshape(X.shape)
        if X.shape[0] == X.shape[1]:  # square: the whole core is T
            cores.append(None)
            T = X
            continue
        order, B, T = skeleton(X)
        cores.append((torch.argsort(order).to(torch.int32), B))  # int32: half the bytes of the index
    return cores, T


def apply_chain(cores: list[tuple[Tensor, Tensor] | None], Z: Tensor, ranks: list[int]) -> Tensor:
    """U' Z for the frame matrix U' (∏ m_k × R_K) of a chain in skeleton form and Z (R_K × c), contracted right
    to left: no core is ever formed, so no identity block is either."""
    c = Z.shape[-1]
    for k in range(len(cores) - 1, -1, -1):
        Z = Z.reshape(ranks[k + 1], -1)
        if cores[k] is not None:
            inverse, B = cores[k]
            Z = torch.index_select(torch.cat([Z, B @ Z]), 0, inverse)
    return Z.reshape(-1, c)
