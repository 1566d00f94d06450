import math
from collections import Counter

import pytest
import torch

from sttp_compress.core.householder import frame_numel
from sttp_compress.core.spectral_tt import matrix_factors
from sttp_compress.core.tt import (TTShape, chain_matrix, chain_svd, gram, gram_chain, pad_columns, pad_matrix,
                              padded_dims, pads_columns_only, prime_factors,
                              reduce_chain, spectral_tt_svd, sum_squares,
                              svdp_dof, tt_dof, tt_ranks)


def test_prime_factors():
    assert prime_factors(72) == [2, 2, 2, 3, 3]
    assert prime_factors(997) == [997]
    assert prime_factors(1000) == [2, 2, 2, 5, 5, 5]
    assert prime_factors(30522) == [2, 3, 5087]
    assert prime_factors(1) == []


def test_paper_worked_example():
    """Sec. 8: W ∈ R^{16 × 8·3·3} (a conv 16←8 with a 3×3 kernel), r = 4."""
    out_f, in_f = matrix_factors("conv", (16, 8, 3, 3))
    shape = TTShape.from_dims(out_f, in_f, 4)
    assert list(shape.modes) == [2, 2, 2, 2, 3, 3, 2, 2, 2]
    assert shape.tt_ranks == [1, 2, 4, 4, 4, 4, 4, 4, 2, 1]
    sizes = Counter((d, r) for _, _, d, r, _ in shape.frames())
    assert sizes == Counter({(2, 2): 2, (4, 4): 2, (8, 4): 3, (12, 4): 2})
    # the two cores adjacent to Σ are full frames, every other core reduced
    assert [red for *_, red in shape.frames()] == [True, True, True, False, True, True, True, True, False]
    assert shape.dof() == tt_dof(shape.modes, shape.tt_ranks)


def test_transposed_conv_is_permuted_first():
    # ConvTranspose2d(8 → 16, 3×3) stores (8, 16, 3, 3) and reads as the same 16 × 72 matrix
    assert matrix_factors("conv_transpose", (8, 16, 3, 3)) == matrix_factors("conv", (16, 8, 3, 3))


@pytest.mark.parametrize("d_out,d_in,r", [(16, 72, 4), (64, 576, 16), (10, 997, 5), (1000, 10, 8),
                                          (512, 4608, 128), (7, 7, 100), (1, 5, 3)])
def test_dof_equals_eq9_and_frame_entries(d_out, d_in, r):
    shape = TTShape.from_dims([d_out], [d_in], r)
    R = shape.tt_ranks
    # eq. 3, recomputed independently
    n = shape.modes
    for k in range(1, len(n)):
        assert R[k] == min(r, math.prod(n[:k]), math.prod(n[k:]))
    eq9 = sum(R[k] * n[k] * R[k + 1] for k in range(len(n))) - sum(x * x for x in R[1:-1])
    assert shape.dof("free") == shape.dof("lipschitz") == eq9
    m = shape.middle
    assert shape.dof("identity") == eq9 - m * (m + 1) // 2
    assert shape.dof() == sum(frame_numel(d, rr, red) for *_, d, rr, red in shape.frames()) + m


def test_svdp_dof():
    s = TTShape.from_dims([64], [3, 3, 32], 16, method="svdp")
    assert s.modes == (64, 288)
    assert s.dof() == svdp_dof(64, 288, 16) == 16 * (64 + 288) - 16 ** 2
    assert s.dof("identity") == svdp_dof(64, 288, 16, "identity") == 16 * (64 + 288) - 16 * (3 * 16 + 1) // 2


def _cp_weight(d_out_bits, d_in_bits, cp_rank, seed=0):
    """A matrix whose tensor over binary modes has CP rank cp_rank (so TT-ranks ≤ cp_rank in any order)."""
    g = torch.Generator().manual_seed(seed)
    W = 0
    for _ in range(cp_rank):
        t = torch.ones((), dtype=torch.float64)
        for _ in range(d_out_bits + d_in_bits):
            t = torch.tensordot(t, torch.randn(2, generator=g, dtype=torch.float64), dims=0)
        W = W + t
    return W.reshape(2 ** d_out_bits, 2 ** d_in_bits)


@pytest.mark.parametrize("cp_rank,r", [(1, 1), (2, 2), (3, 3), (3, 5)])
def test_exact_when_tt_ranks_suffice(cp_rank, r):
    W = _cp_weight(5, 6, cp_rank)
    shape = TTShape.from_dims([32], [64], r)
    u, s, v = spectral_tt_svd(W, shape)
    Wa = chain_matrix(u) * s @ chain_matrix(v).T
    assert (W - Wa).norm() / W.norm() < 1e-10


def test_error_does_not_increase_with_rank():
    g = torch.Generator().manual_seed(0)
    # a weight with a decaying spectrum, like a trained layer
    A = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64)).Q
    B = torch.linalg.qr(torch.randn(288, 64, generator=g, dtype=torch.float64)).Q
    W = (A * torch.logspace(0, -2, 64, dtype=torch.float64)) @ B.T
    errs = []
    for r in [1, 2, 4, 8, 16, 32, 64, 128]:
        shape = TTShape.from_dims([64], [32, 3, 3], r)
        u, s, v = spectral_tt_svd(W, shape)
        errs.append(float((W - chain_matrix(u) * s @ chain_matrix(v).T).norm() / W.norm()))
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-10


def test_svdp_conversion_is_truncated_svd():
    W = torch.randn(40, 30, dtype=torch.float64)
    shape = TTShape.from_dims([40], [30], 7, method="svdp")
    u, s, v = spectral_tt_svd(W, shape)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(s, S[:7])
    torch.testing.assert_close(chain_matrix(u) * s @ chain_matrix(v).T, (U[:, :7] * S[:7]) @ Vh[:7])


@pytest.mark.parametrize("reduce_last", [False, True])
def test_reduce_chain_keeps_the_frame(reduce_last):
    from sttp_compress.core.householder import frame
    W = torch.randn(48, 20, dtype=torch.float64)
    shape = TTShape.from_dims([48], [20], 6)
    u, _, _ = spectral_tt_svd(W, shape)
    params, tail = reduce_chain(u, reduce_last)
    ranks = shape.u_ranks
    frames = [frame(p, ranks[k] * m, ranks[k + 1], reduced=(k < len(u) - 1 or reduce_last))
              for k, (p, m) in enumerate(zip(params, shape.out_modes))]
    # each reduced frame has an upper-triangular leading block
    for k, X in enumerate(frames):
        if k < len(u) - 1 or reduce_last:
            R = X.shape[1]
            assert torch.tril(X[:R], -1).abs().max() < 1e-12
    U_F = chain_matrix([X.reshape(ranks[k], m, ranks[k + 1]) for k, (X, m) in
                        enumerate(zip(frames, shape.out_modes))])
    torch.testing.assert_close(U_F @ tail, chain_matrix(u), rtol=0, atol=1e-12)
    torch.testing.assert_close(tail @ tail.T, torch.eye(tail.shape[0], dtype=torch.float64))


@pytest.mark.parametrize("rows,block", [(5, 8), (8, 8), (21, 8), (24, 8)])
def test_gram_equals_the_product_and_is_symmetric(rows, block):
    """The blocked Gram (the big layers' profile and TT-SVD) is M Mᵀ, for row counts below, at and off
    multiples of the block, mirrored exactly."""
    M = torch.randn(rows, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(rows))
    G = gram(M, block)
    torch.testing.assert_close(G, M @ M.T, rtol=1e-12, atol=1e-12)
    assert torch.equal(G, G.T)
    torch.testing.assert_close(gram(M.T, block), M.T @ M, rtol=1e-12, atol=1e-12)  # a transposed view too


def test_tt_ranks_helper():
    assert tt_ranks((2, 2, 2, 2, 3, 3, 2, 2, 2), 4) == [1, 2, 4, 4, 4, 4, 4, 4, 2, 1]


def test_tt_svd_error_matches_tensorly_reference():
    """tensorly's TT-SVD of the same tensor at the same TT-ranks is an independent reference."""
    import numpy as np
    import tensorly as tl
    from tensorly.decomposition import tensor_train

    g = torch.Generator().manual_seed(3)
    A = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64)).Q
    B = torch.linalg.qr(torch.randn(72, 32, generator=g, dtype=torch.float64)).Q
    W = (A * torch.logspace(0, -1.5, 32, dtype=torch.float64)) @ B.T
    for r in (2, 4, 8, 16):
        shape = TTShape.from_dims([32], [8, 3, 3], r)
        u, s, v = spectral_tt_svd(W, shape)
        ours = float((W - chain_matrix(u) * s @ chain_matrix(v).T).norm() / W.norm())
        # the paper's train: output modes, then input modes reversed (memory order 8·3·3 → 2,2,2,3,3)
        T = W.reshape(*shape.out_modes, *shape.in_modes).permute(
            *range(len(shape.out_modes)),
            *reversed(range(len(shape.out_modes), len(shape.modes)))).numpy()
        tl.set_backend("numpy")
        ref_tt = tensor_train(T, rank=shape.tt_ranks)
        ref = float(np.linalg.norm(tl.tt_to_tensor(ref_tt) - T) / np.linalg.norm(T))
        assert ours <= ref * 1.02 + 1e-12, (r, ours, ref)


@pytest.mark.parametrize("modes, ranks", [
    ((4, 4, 4), [1, 4, 8, 5]),  # bond 1 keeps its rows, bonds 2 and 3 truncate (rests of 4 rows and fewer)
    ((2,) * 8, [1, 1, 2, 3, 3, 3, 3, 3, 5]),  # truncates from bond 1 on, rests of 128, 64, 32, 16 rows ...
])
def test_gram_chain_spans_the_frames_of_chain_svd_and_keeps_their_energy(modes, ranks):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(math.prod(modes), 300, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 300, dtype=torch.float64)
    ref, rest = chain_svd(A, modes, ranks)
    cores, S = gram_chain(gram(A), modes, ranks)
    assert S is None and [c.shape for c in cores] == [c.shape for c in ref]
    U, V = chain_matrix(cores), chain_matrix(ref)
    assert torch.allclose(U.T @ U, torch.eye(ranks[-1], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(U @ U.T, V @ V.T, atol=1e-8)  # the same subspace, whatever the signs
    # stopping at the last bond: its unfolding Gram's leading eigenvalues are the energy the chain keeps
    _, S = gram_chain(gram(A), modes, ranks, last=len(modes) - 1)
    kept = float(torch.linalg.eigvalsh(S)[-ranks[-1]:].sum())
    assert kept == pytest.approx(float(rest.square().sum()), rel=1e-10)



def test_column_padding_alone_gives_the_padded_tt_svd():
    """A wide weight padded on its input side only (43 columns per channel: padded to 45) converts without a
    padded copy: pad_columns matches pad_matrix, and the TT-SVD of the unpadded matrix with `pad_in` equals
    that of the padded one."""
    out_f, in_f = [16], [4, 43]
    assert pads_columns_only(out_f, in_f) and not pads_columns_only([43], [64]) and not pads_columns_only([16], [8])
    g = torch.Generator().manual_seed(2)
    W = torch.randn(16, 4 * 43, generator=g, dtype=torch.float64)
    P = pad_matrix(W, out_f, in_f)
    assert P.shape == (16, 4 * 45) and torch.equal(pad_columns(W, in_f), P)
    shape = TTShape.from_dims(out_f, padded_dims(in_f), 6)
    u, s, v = spectral_tt_svd(W, shape, pad_in=in_f)
    u_ref, s_ref, v_ref = spectral_tt_svd(P, shape)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-12)
    approx, ref = (chain_matrix(u) * s) @ chain_matrix(v).T, (chain_matrix(u_ref) * s_ref) @ chain_matrix(v_ref).T
    torch.testing.assert_close(approx, ref, rtol=1e-9, atol=1e-10)
    assert 0.1 < float((P - approx).norm() / P.norm()) < 0.9  # a truncating rank, not an exact one


def test_sum_squares_in_row_blocks_equals_the_float64_sums():
    """‖t‖² and ‖t − u‖² a few rows at a time (block smaller than a row, and over several rows) against float64."""
    g = torch.Generator().manual_seed(3)
    t, u = torch.randn(37, 5, 3, generator=g), torch.randn(37, 5, 3, generator=g)
    for block in (4, 16, 1 << 22):
        assert sum_squares(t, block=block) == pytest.approx(float(t.double().square().sum()), rel=1e-6)
        assert sum_squares(t, u, block=block) == pytest.approx(float((t.double() - u.double()).square().sum()), rel=1e-6)
