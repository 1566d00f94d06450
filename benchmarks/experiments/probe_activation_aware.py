"""Probe for issue 6: would an activation-aware conversion of MiniLM's encoder Linears start distillation higher?

    python benchmarks/probe_activation_aware.py [--model-dir DIR] [--held N] [--stats N] [--ratios 2.5 4]

Every encoder `nn.Linear` of all-MiniLM-L6-v2 is replaced by a truncated SVD at `ratio` (rank
k = out·in / (ratio·(out+in)); the token embedding stays dense), either plain or of W·diag(c) with
c = (mean squared input feature)^power, measured on the first `--stats` distillation texts, then
multiplied back by diag(1/c): the optimal rank-k error weighted by each input feature's energy (the
diagonal of the activations' second moment, as in ASVD-style methods). Reports the mean cosine between
the sentence embeddings of the original and of the converted model on the first `--held` held-out texts.
A plain SVD, not STTP: this only asks whether the weighting helps before building it into the STTP
conversion. CPU only; writes benchmarks/results/experiments/activation_aware.json (+ .md).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_minilm import find, model_dir  # noqa: E402
from common import machine, markdown_table, print_table, today, write_results  # noqa: E402

from sttp_compress.io.hf import load_encoder  # noqa: E402
from sttp_compress.train.embedding_metrics import embed
from sttp_compress.data.text import tokenize_texts  # noqa: E402


def _lines(path: Path, n: int) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(line.rstrip("\n"))
            if len(out) == n:
                break
    return out


def _batches(ds, batch: int = 64) -> list[dict]:
    return [ds.collate_fn([ds[i] for i in range(s, min(s + batch, len(ds)))]) for s in range(0, len(ds), batch)]


def input_energy(model: nn.Module, linears: dict[str, nn.Linear], batches: list[dict]) -> dict[str, torch.Tensor]:
    """Mean squared value of every input feature of each Linear over all token positions of `batches`."""
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}
    rows = dict.fromkeys(linears, 0)

    def hook(name):
        def record(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] += x.pow(2).sum(0)
            rows[name] += x.shape[0]
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for b in batches:
                model(**b)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / rows[n] for n in linears}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--held", type=int, default=400, help="held-out texts to compare embeddings on")
    ap.add_argument("--stats", type=int, default=600, help="distillation texts to measure input energies on")
    ap.add_argument("--ratios", type=float, nargs="+", default=[2.5, 4.0])
    ap.add_argument("--powers", type=float, nargs="+", default=[0.0, 0.25, 0.5], help="0: plain SVD")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = model_dir(args.model_dir)
    enc = load_encoder(folder).float().eval()
    held = _batches(tokenize_texts(_lines(find("heldout.txt"), args.held), folder))
    stats = _batches(tokenize_texts(_lines(find("distill.txt"), args.stats), folder))
    ref = embed(enc, held)
    linears = {n: m for n, m in enc.named_modules() if isinstance(m, nn.Linear) and "encoder" in n}
    energy = input_energy(enc, linears, stats)
    rows = []
    for ratio in args.ratios:
        for power in args.powers:
            model = copy.deepcopy(enc)
            mods = dict(model.named_modules())
            params = 0
            for n in linears:
                W = mods[n].weight.data.double()
                o, i = W.shape
                k = max(1, int(o * i / (ratio * (o + i))))
                c = energy[n].clamp_min(1e-12).pow(power)
                U, s, Vh = torch.linalg.svd(W * c, full_matrices=False)
                mods[n].weight.data = ((U[:, :k] * s[:k]) @ Vh[:k] / c).float()
                params += k * (o + i)
            emb = embed(model, held)
            cos = torch.nn.functional.cosine_similarity(emb, ref).mean().item()
            rows.append({"ratio": ratio, "weighting": "plain" if power == 0 else f"input energy^{power:g}",
                         "encoder_linear_params": params, "cosine_after_conversion": round(cos, 4),
                         "held_texts": len(ref), "stats_texts": args.stats, "device": machine("cpu")})
            print(rows[-1], flush=True)
    cols = ["ratio", "weighting", "encoder_linear_params", "cosine_after_conversion", "held_texts", "stats_texts"]
    print_table("MiniLM encoder Linears as truncated SVDs: cosine to the original", rows, cols)
    md = (f"# Activation-aware conversion probe (issue 6)\n\nDate: {today()}. Script: "
          "`benchmarks/probe_activation_aware.py` (plain truncated SVD of every encoder Linear at the ratio, "
          "token embedding dense; no distillation). Machine: " + machine("cpu") + ".\n\n"
          + markdown_table(rows, cols))
    write_results("activation_aware", rows, {"date": today(), "script": "benchmarks/probe_activation_aware.py"}, md)


if __name__ == "__main__":
    main()
