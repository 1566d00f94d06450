"""Does the frozen MiniLM with its embeddings looked up through their tensor train (f6fb97d) capture in a CUDA
graph, and what does each serving form cost there? A short probe for the last minutes of a GPU budget.

    python benchmarks/experiments/probe_lookup_graph.py --device cuda --minilm .carry/minilm16

The ratio-4 MiniLM (every layer, as bench_deploy.py), dense and `freeze`d with shortcut "auto" and "factors",
each captured in a CUDA graph at batch 1 and 256 (x 16 tokens) with bench_deploy's `graphed`: the median
replay time, and the CUDA memory each adds (`serve`). Prints one line per form and batch; writes nothing.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_deploy as bd  # noqa: E402

import sttp_compress as sc  # noqa: E402
from sttp_compress.compress.convert import compress_to_target  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--minilm", default=None)
    args = ap.parse_args()
    dense, inputs = bd.minilm([], args.minilm)
    comp = copy.deepcopy(dense)
    compress_to_target(comp, ratio=4, include=["*"])
    comp.eval()
    models = {"dense": dense}
    for shortcut in ("auto", "factors"):
        models[shortcut] = copy.deepcopy(comp)
        forms = sc.freeze(models[shortcut], shortcut=shortcut)
        print(shortcut, {n: f for n, f in forms.items() if "embeddings" in n}, flush=True)
    for b in (1, 256):
        x = inputs(b)
        with torch.no_grad():
            reference = bd.main_output(comp(**x))
        xd = bd.to_device(x, args.device)
        for name, model in models.items():
            with torch.no_grad():
                mem, err = bd.serve(model, xd, args.device, reference)
                model.to(args.device)
                ms = bd.timed(lambda: bd.call(model, xd), args.device, False)  # noqa: B023 (called right here)
            line = f"batch {b} {name}: eager {ms:.3f} ms, adds {mem:.1f} MB, rel error {err:.1e}"
            if args.device == "cuda":
                replay, why = bd.graphed(model, xd)
                line += f"; graph {bd.timed(replay, 'cuda', False):.3f} ms" if replay else f"; no graph: {why}"
                del replay
            model.cpu()
            print(line, flush=True)


if __name__ == "__main__":
    main()
