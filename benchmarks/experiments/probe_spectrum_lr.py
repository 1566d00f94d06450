"""Does a higher learning rate for the spectra and row/column scales help MiniLM's distillation? (CPU)

    python benchmarks/probe_spectrum_lr.py MULT [STEPS] [--threads N] [--allocation uniform] [--power P]
                                                                     # -> results/spectrum_lr.{json,md}

The probes' ratio-4 student (bench_minilm.ratio4_student: token embedding at rank 512 weighted by token
counts, the rest by compress_to_target with a plain conversion), distilled for STEPS (default 400) steps at
batch 32 with sttp-compress's text defaults, with `FinetuneConfig.spectrum_lr_mult = MULT`: the compressed
layers' spectra and row/column scales (their 1-D parameters) at MULT times the learning rate, everything else
at the usual one. Held-out cosine on the first 400 texts of heldout.txt. Each call adds (or replaces) its
MULT's row, so arms can run in parallel processes. Far from the GPU runs (10,400 steps at batch 1024): a sign,
not a result. `--allocation uniform` gives the encoder one global rank instead of the greedy allocation's;
`--power P` weights the embedding's rows by (count + 1)^P in the conversion (default 0.5, text.TOKEN_WEIGHT_POWER).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_minilm import cpu_probe_texts, ratio4_student  # noqa: E402
from common import EXPERIMENT_RESULTS, machine, today, write_results  # noqa: E402
from sttp_compress.data.images import make_loaders  # noqa: E402
from sttp_compress.train.loop import FinetuneConfig  # noqa: E402
from sttp_compress.data.text import TEXT_AUGMENT, TEXT_VOCAB_SHARE, TOKEN_WEIGHT_POWER  # noqa: E402
from sttp_compress.train.embedding_metrics import embed, embedding_agreement  # noqa: E402
from sttp_compress.train.text_distill import distill_embeddings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mult", type=float)
    ap.add_argument("steps", type=int, nargs="?", default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--allocation", default="greedy", choices=["greedy", "uniform"])
    ap.add_argument("--power", type=float, default=TOKEN_WEIGHT_POWER,
                    help="token weights (count + 1)^P of the embedding's rows")
    ap.add_argument("--model-dir", default=".carry-hf/minilm16")  # benchmarks/pack_minilm.py's copy
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    teacher, train_ds, held, ref = cpu_probe_texts(args.model_dir, augment=0.0)  # the conversion sees plain texts
    student = ratio4_student(teacher, train_ds, 512, allocation=args.allocation, power=args.power).eval()
    before = embedding_agreement(embed(student, held), ref)["cosine"]
    train_ds.augment, train_ds.vocab_share = TEXT_AUGMENT, TEXT_VOCAB_SHARE
    loader = make_loaders(train_ds, None, 32, 0, 0, "cpu")[0]
    cfg = FinetuneConfig(steps=args.steps, batch_size=32, device="cpu", workers=0, log_every=50,
                         select_best=False, spectrum_lr_mult=args.mult)
    t = time.time()
    distill_embeddings(student, teacher, loader, None, cfg, progress=False)
    row = {"allocation": args.allocation, "power": args.power, "spectrum_lr_mult": args.mult, "steps": args.steps,
           "threads": args.threads, "seconds": round(time.time() - t, 1), "cosine_before": round(before, 4),
           "cosine_after": round(embedding_agreement(embed(student.eval(), held), ref)["cosine"], 4)}
    print(row, flush=True)
    path = EXPERIMENT_RESULTS / "spectrum_lr.json"

    def key(r: dict) -> tuple:  # rows from before --allocation/--power are the defaults'
        return (r["steps"], r.get("allocation", "greedy"), r.get("power", TOKEN_WEIGHT_POWER),
                r["spectrum_lr_mult"])

    rows = sorted([r for r in (json.loads(path.read_text()) if path.exists() else []) if key(r) != key(row)] + [row],
                  key=key)
    md = [f"# Spectra and scales at a higher learning rate, through a short distillation ({today()})", "",
          " ".join(__doc__.split("\n\n", 2)[2].split()), "", f"Machine: {machine('cpu')}.", "",
          "| allocation | token weight power | lr multiple | steps | threads | seconds | cosine after conversion "
          "| cosine after the steps |",
          "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r.get('allocation', 'greedy')} | {r.get('power', TOKEN_WEIGHT_POWER):g} | {r['spectrum_lr_mult']:g} "
           f"| {r['steps']} | {r['threads']} | {r['seconds']} | {r['cosine_before']:.4f} | {r['cosine_after']:.4f} |"
           for r in rows]
    write_results("spectrum_lr", rows, {"date": today(), "machine": machine("cpu")}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
