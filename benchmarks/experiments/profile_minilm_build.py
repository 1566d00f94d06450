"""Where the MiniLM ratio-4 student's weight build goes (GPU): the WeightBank's forward + backward alone.

    python benchmarks/profile_minilm_build.py --model-dir .carry-hf/minilm16 [--embedding-rank 512]

The text step of an STTP student takes about 9.5 ms more than a dense student's at batch 1024 on an H200
(profile_minilm.py); that is the build of every compressed weight from its frames and back. This times
the graphed build (median CUDA-event ms) of the whole student, of the token embedding alone and of the
rest, with TF32 off and on, at FramePlan's max_waste 1, 2 and 4 and through torch.compile (added after
results/experiments/minilm_build.md was measured: not run yet), and prints the eager build's kernels (torch.profiler).
Prints only; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_minilm import find, model_dir, ratio4_student  # noqa: E402
from profile_step import cuda_ms  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir")
    ap.add_argument("--embedding-rank", type=int, default=512)
    args = ap.parse_args()

    from sttp_compress.train.bank import WeightBank
    from sttp_compress.io.hf import load_encoder
    from sttp_compress.data.text import text_datasets

    folder = model_dir(args.model_dir)
    teacher = load_encoder(folder)
    train_ds, _ = text_datasets(find('distill.txt'), folder)
    student = ratio4_student(teacher, train_ds, rank=args.embedding_rank).cuda()
    parts = {"all": student, "token_embedding": student.embeddings.word_embeddings,
             "encoder+position": torch.nn.ModuleList([student.encoder, student.embeddings.position_embeddings])}

    def timed(module, **options) -> float:
        bank = WeightBank(module, cuda_graph=True, **options)
        grads = None

        def fwd_bwd():
            nonlocal grads
            ws = bank.build()
            if grads is None:
                grads = [torch.randn_like(w) for w in ws]
            torch.autograd.backward(ws, grads)
        return cuda_ms(fwd_bwd)

    row = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "embedding_rank": args.embedding_rank}
    for name, module in parts.items():
        row[f"{name}_ms"] = timed(module)
    for waste in (1.0, 4.0):
        row[f"all_ms_waste{waste:g}"] = timed(student, max_waste=waste)
    torch.backends.cuda.matmul.allow_tf32 = True
    row["all_ms_tf32"] = timed(student)
    row["token_embedding_ms_tf32"] = timed(parts["token_embedding"])
    torch.backends.cuda.matmul.allow_tf32 = False
    try:  # the build through torch.compile (fusing the frames' small elementwise kernels), under the graph
        row["all_ms_compile"] = timed(student, compile=True)
    except Exception as e:  # noqa: BLE001 - a measurement, not a product path
        row["all_ms_compile"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    print(json.dumps(row), flush=True)

    from torch.profiler import ProfilerActivity, profile

    for name in ("token_embedding", "encoder+position"):
        eager = WeightBank(parts[name], cuda_graph=False)
        for _ in range(3):
            ws = eager.build()
            torch.autograd.backward(ws, [torch.ones_like(w) for w in ws])
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                ws = eager.build()
                torch.autograd.backward(ws, [torch.ones_like(w) for w in ws])
            torch.cuda.synchronize()
        print(f"== {name}: eager build forward + backward, 5 times")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70),
              flush=True)


if __name__ == "__main__":
    main()
