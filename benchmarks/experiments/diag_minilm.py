"""Diagnostic (prints only): short MiniLM distillations with parts of the distillation step switched.

    python benchmarks/diag_minilm.py STEPS [current fused cudnn nograph]   # GPU, .carry-hf/minilm16
"""
import copy, sys, time
from contextlib import nullcontext
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2])); sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_minilm import find, heldout_loader
import sttp_compress.train.loop as ft
from sttp_compress.compress.convert import compress_module, compress_to_target, count_parameters
from sttp_compress.data.images import make_loaders
from sttp_compress.io.hf import load_encoder
from sttp_compress.train.text_distill import EmbeddingDistillLoss, distill_embeddings
from sttp_compress.data.text import text_datasets, token_weights
from sttp_compress.train.embedding_metrics import embed, embedding_agreement
dev = "cuda"
folder = '.carry-hf/minilm16'
teacher = load_encoder(folder).to(dev)
train_ds, val_ds = text_datasets(find('distill.txt'), folder)
weights = token_weights(train_ds, teacher.embeddings.word_embeddings.num_embeddings)
held = heldout_loader(Path(folder), find('heldout.txt'), 1000, 256)
ref = embed(teacher, held, dev)
base = copy.deepcopy(teacher).cpu()
total = count_parameters(base)
compress_module(base.embeddings.word_embeddings, 384, "sttp", row_weight=weights)
compress_to_target(base, ratio=count_parameters(base) / (total / 4.0), include=["encoder.*", "embeddings.position_embeddings"])
loader, val_loader = make_loaders(train_ds, val_ds.subset(range(1000)), 128, 0, 0, dev)
AdamW = torch.optim.AdamW
attn = ft._attention_backends
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
# variants: current = the product's step; fused = AdamW(fused=True); cudnn = attention with the cuDNN
# backend allowed (the step before 2026-11-29 used both cuDNN attention and unfused AdamW); nograph = no
# CUDA graph for the weight bank
for name in sys.argv[2:] or ["current", "fused", "cudnn", "nograph"]:
    torch.optim.AdamW = (lambda *a, **k: AdamW(*a, **k, fused=True)) if name == "fused" else AdamW
    ft._attention_backends = (lambda d: nullcontext()) if name == "cudnn" else attn
    cfg = ft.FinetuneConfig(steps=steps, batch_size=128, device=dev, workers=0, log_every=50, select_best=False,
                            loss_fn=EmbeddingDistillLoss(), cuda_graph=name != "nograph")
    s = copy.deepcopy(base).to(dev)
    t = time.time()
    block = distill_embeddings(s, teacher, loader, val_loader, cfg, progress=False)
    torch.cuda.synchronize()
    el = time.time() - t
    print(f"{name:8s} steps {steps} {el:6.1f} s  cosine {embedding_agreement(embed(s, held, dev), ref)['cosine']:.4f}", flush=True)
    print("  curve (epoch, train loss):", [(round(c["epoch"], 2), round(c["train_loss"], 4)) for c in block["curve"]],
          "val cosine", block.get("val_cosine_after"), flush=True)
