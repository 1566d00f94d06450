"""Would a randomized range sketch speed up a big layer's TT-SVD (issue 36)? Error and time against the exact one.

    python benchmarks/experiments/probe_sketch_tt_svd.py [--rank 673] [--threads 2]

A 4096 x 11008 float32 matrix (the bench's Linear; rank 673 is what ratio 10 gives it) with four spectra: Gaussian
(flat, as random weights have) and σ_i ∝ i^-a for a = 0.3, 0.6, 1.0 (trained weights decay somewhere in that
range). `exact` is `tt.spectral_tt_svd` (the U chain from the Grams of W's unfoldings). `sketch pP qQ` replaces W
by its randomized range approximation Q Qᵀ W of rank middle + P (Q from W Ω, Gaussian Ω, with Q power iterations,
Halko et al. 2011) for the U chain only: the chain is a TT-SVD of the rows of Q (QᵀW), the V chain and the middle
then come from the exact UᵀW, as in the product. `rel_error` is ‖W − W_TT‖/‖W‖, `vs_exact` its relative
difference to the exact one (issue 36 allows 1%), `seconds` the factorization alone, single runs on a quiet machine.
Writes results/experiments/sketch_tt_svd.json (+ .md).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import commit, machine, markdown_table, today, write_results  # noqa: E402

from sttp_compress.core.tt import TTShape, chain_matrix, chain_svd, gram, pad_columns, spectral_tt_svd  # noqa: E402

ROWS, COLS = 4096, 11008
SPECTRA = ["gaussian", "0.3", "0.6", "1.0"]
VARIANTS = [(64, 0), (128, 0), (64, 1)]


def matrix(spectrum: str) -> torch.Tensor:
    """The test matrix: Gaussian, or random orthonormal frames around σ_i = i^-a."""
    g = torch.Generator().manual_seed(1)
    if spectrum == "gaussian":
        return torch.randn(ROWS, COLS, generator=g) / math.sqrt(COLS)
    U = torch.linalg.qr(torch.randn(ROWS, ROWS, generator=g))[0]
    V = torch.linalg.qr(torch.randn(COLS, ROWS, generator=g))[0]
    s = torch.arange(1, ROWS + 1, dtype=torch.float32) ** (-float(spectrum))
    return (U * s) @ V.T


def sketch_rows(W: torch.Tensor, k: int, power: int) -> torch.Tensor:
    """A (d_out × k) with A Aᵀ = Q (QᵀW)(QᵀW)ᵀ Qᵀ: the rows' Gram of W's rank-k randomized range approximation."""
    omega = torch.randn(W.shape[1], k, generator=torch.Generator().manual_seed(0))
    Y = W @ omega
    for _ in range(power):
        Y = W @ (W.T @ torch.linalg.qr(Y)[0])
    Q = torch.linalg.qr(Y)[0]
    lam, P = torch.linalg.eigh(gram(Q.T @ W))
    return Q @ (P * lam.clamp_min(0).sqrt())


def sketched_tt_svd(W: torch.Tensor, shape: TTShape, k: int, power: int):
    """spectral_tt_svd with the U chain from the sketch (the rest as the product does it)."""
    u_cores, _ = chain_svd(sketch_rows(W, k, power), shape.out_modes, shape.u_ranks)
    B = pad_columns(chain_matrix(u_cores).T @ W, [COLS])
    v_cores, C = chain_svd(B.T, shape.in_modes, shape.v_ranks)
    A, sigma, Ch = torch.linalg.svd(C.T)
    u_cores[-1] = u_cores[-1] @ A
    v_cores[-1] = v_cores[-1] @ Ch.T
    return u_cores, sigma, v_cores


def rel_error(W: torch.Tensor, u_cores, sigma, v_cores) -> float:
    V = chain_matrix(v_cores)[:COLS]  # the padded input rows hold zeros
    return float((W - (chain_matrix(u_cores) * sigma) @ V.T).norm() / W.norm())


def timed(f):
    t = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=673)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = TTShape.from_dims([ROWS], [COLS], args.rank)
    rows = []
    for spectrum in SPECTRA:
        W = matrix(spectrum)
        factors, seconds = timed(lambda: spectral_tt_svd(W, shape, [COLS]))
        exact = rel_error(W, *factors)
        rows.append({"spectrum": spectrum, "method": "exact", "rel_error": round(exact, 5), "vs_exact_pct": 0.0,
                     "seconds": round(seconds, 2)})
        for p, q in VARIANTS:
            factors, seconds = timed(lambda: sketched_tt_svd(W, shape, shape.middle + p, q))
            err = rel_error(W, *factors)
            rows.append({"spectrum": spectrum, "method": f"sketch p{p} q{q}", "rel_error": round(err, 5),
                         "vs_exact_pct": round(100 * (err / exact - 1), 2), "seconds": round(seconds, 2)})
        print(rows[-4:], flush=True)
    cols = ["spectrum", "method", "rel_error", "vs_exact_pct", "seconds"]
    device = machine("cpu")  # after set_num_threads: names the threads used
    md = (f"# A randomized sketch for a big layer's TT-SVD ({today()}, commit {commit()}, {device})\n\n"
          f"{ROWS} x {COLS} float32 at rank {args.rank} (middle {shape.middle}); see the script's docstring for "
          "the variants.\n\n" + markdown_table(rows, cols))
    write_results("sketch_tt_svd", rows, {"date": today(), "device": device, "rank": args.rank}, md)


if __name__ == "__main__":
    main()
