"""Activation-aware STTP conversion of all-MiniLM-L6-v2 at whole-model ratio 4, plain vs column-scaled (CPU).

    python benchmarks/probe_activation_aware_sttp.py STEPS [DIR] [VARIANTS]   # STEPS 0: conversion only

VARIANTS: comma-separated of plain, scales, refit (default plain,scales)

The ratio-4 student of bench_minilm (token embedding rank 384, frequency-weighted; the rest by
compress_to_target) converted: `plain`; `scales`, every Linear column-scaled by its input scales on
calibration batches of the distillation texts (`activation.input_scales`); `refit`, the same plus
each Linear's spectrum refitted by least squares on those inputs (`input_moments`; sttp-compress's
default with text data). For each: held-out cosine after conversion (400 texts of .data/text/heldout.txt), then STEPS
distillation steps at batch 32 on the first 40,000 distillation texts and the cosine again. Prints
one JSON line per variant (2 CPU threads); benchmarks/results/experiments/activation_aware_sttp.md holds a run.
"""
import copy, json, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_minilm import find, heldout_loader
from sttp_compress.compress.convert import compress_module, compress_to_target, count_parameters, candidate_layers
from sttp_compress.data.images import make_loaders
from sttp_compress.train.loop import FinetuneConfig
from sttp_compress.io.hf import load_encoder
from sttp_compress.compress.activation import calibration_batches, input_moments, scales_from_moments
from sttp_compress.train.text_distill import EmbeddingDistillLoss, distill_embeddings
from sttp_compress.data.text import text_datasets, token_weights
from sttp_compress.train.embedding_metrics import embed, embedding_agreement
torch.set_num_threads(2)
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
folder = sys.argv[2] if len(sys.argv) > 2 else '.carry-hf/minilm16'  # benchmarks/pack_minilm.py's copy
teacher = load_encoder(folder)
train_ds, _ = text_datasets(find('distill.txt'), folder)
weights = token_weights(train_ds, teacher.embeddings.word_embeddings.num_embeddings)
held = heldout_loader(Path(folder), find('heldout.txt'), 400, 100)
ref = embed(teacher, held)
t = time.time()
probe = copy.deepcopy(teacher)
moments = input_moments(probe, candidate_layers(probe, ["*"])[0], calibration_batches(train_ds))
cols = scales_from_moments(moments)
stats_s = time.time() - t
sub = train_ds.subset(range(40000))
for aware in (sys.argv[3] if len(sys.argv) > 3 else "plain,scales").split(","):
    student = copy.deepcopy(teacher)
    total = count_parameters(student)
    t = time.time()
    compress_module(student.embeddings.word_embeddings, 384, "sttp", row_weight=weights)
    compress_to_target(student, ratio=count_parameters(student) / (total / 4.0), include=["encoder.*", "embeddings.position_embeddings"],
                       col_weights=cols if aware == "scales" else None,
                       input_moments=moments if aware == "refit" else None)
    conv_s = time.time() - t
    before = embedding_agreement(embed(student, held), ref)
    row = {"variant": aware, "params": count_parameters(student), "ratio": round(total / count_parameters(student), 3),
           "convert_seconds": round(conv_s, 2), "stats_seconds": round(stats_s, 2) if aware != "plain" else None,
           "cosine_before": round(before["cosine"], 4), "nn_agreement_before": round(before["nn_agreement"], 2)}
    if steps:
        loader = make_loaders(sub, None, 32, 0, 0, "cpu")[0]
        cfg = FinetuneConfig(steps=steps, batch_size=32, device="cpu", workers=0, log_every=50, select_best=False, loss_fn=EmbeddingDistillLoss(),
                             adam_beta2=0.999)  # as when its results were made (text default: 0.98)
        t = time.time()
        distill_embeddings(student, teacher, loader, None, cfg, progress=False)
        after = embedding_agreement(embed(student, held), ref)
        row.update({"steps": steps, "batch": 32, "distill_seconds": round(time.time() - t, 1),
                    "cosine_after": round(after["cosine"], 4), "nn_agreement_after": round(after["nn_agreement"], 2)})
    print(json.dumps(row), flush=True)
