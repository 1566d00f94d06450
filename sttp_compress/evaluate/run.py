"""Evaluate a compressed checkpoint: size, parameters, accuracy, agreement with the original, latency.

The Python API behind ``sttp-eval COMPRESSED [options]``::

    result = run_eval("model.sttp.safetensors", EvalOptions(data="val/", reference="model.pt"))
    failures = check_gates(result, opts)        # [] when every gate passes
    console.print(summary_table(result))
    export_dense("model.sttp.safetensors", "dense.pt")   # plain float32 state_dict of the original architecture

``run_eval`` returns a JSON-ready dict (the ``--json`` output). Its keys:

``file``
    The checkpoint path as given.
``arch``
    The architecture spec the model was rebuilt from (``--arch``, else the one in the checkpoint).
``dtype``
    The storage dtype of the checkpoint (``float32``/``float16``/``bfloat16``); evaluation runs in float32.
``size_bytes``
    The checkpoint's size on disk, in bytes.
``size_bytes_original``
    The original model's size as a float32 state_dict (recorded by sttp-compress in the checkpoint's
    metadata), else the size of the ``--reference`` file; or null.
``size_ratio``
    ``size_bytes_original / size_bytes``, or null.
``params``
    Parameter values of the rebuilt model (a compressed layer counts its degrees of freedom).
``params_original``
    Parameters of the original model, from the checkpoint's metadata, else counted on ``--reference``; or null.
``ratio``
    ``params_original / params``, or null when ``params_original`` is unknown.
``layers``
    One entry per compressed layer, in model order: ``name``, ``rank``, ``params_original`` (dense weight
    values), ``params_compressed`` (degrees of freedom), ``modes`` and ``tt_ranks`` (the tensor-train shape).
``data``
    What was evaluated on: the image folder, ``tensors:FILE``, ``text:FILE`` (one text per line, tokenized
    with the ``hf:DIR`` model's tokenizer), ``pairs:FILE`` (scored sentence pairs), or null without ``--data``.
``samples``
    Number of data samples evaluated (fewer than the data set with ``max_batches``), or null without data.
``accuracy``, ``top5``
    Top-1 and top-5 accuracy in percent; null without labelled data (class-index targets for 2-D logits).
``loss``
    Mean cross-entropy on the labelled data, or null.
``reference``
    The ``--reference`` file, or null.
``reference_accuracy``, ``reference_top5``
    The reference model's accuracies (percent) on the same data, or null.
``agreement``
    Percent of evaluated samples (or output positions, for outputs with more than 2 dimensions) where the
    compressed and reference models agree on the top-1 class (argmax over dimension 1); null without a
    reference or for 1-D outputs.
``cosine``
    With ``--data text:FILE`` (an ``hf:DIR`` model) and ``--reference hf:DIR``: the mean cosine similarity
    between the compressed and the original model's embedding of each text; else null.
``nn_agreement``
    With text data and a reference: percent of texts whose nearest other text (by cosine similarity of
    embeddings) is the same under both models; else null.
``similarity_spearman``
    With text data and a reference: Spearman's rank correlation between the two models' cosine similarities
    over every pair of texts (over every pair of a seeded sample of 3,162 texts when there are more): whether
    the compressed model orders pairs by similarity as the original does, which is what semantic-similarity
    benchmarks score; else null.
``sts_spearman``, ``sts_spearman_reference``
    With ``--data pairs:FILE`` (tab-separated sentence1, sentence2, score; see ``sttp_compress.data.pairs``):
    Spearman's rank correlation between the cosine similarity of each pair's embeddings and its score,
    for the compressed model and for the reference (null without one), as sentence-similarity benchmarks
    score a model; else null. ``samples`` counts the pairs; the agreement fields are measured on the
    file's distinct sentences.
``rel_output_error``
    ``‖y − y_ref‖ / ‖y_ref‖`` over all evaluated outputs together (Frobenius norm); null without a reference.
``reference_inputs``
    What the reference comparison ran on: ``"data"``, ``"random"`` (seeded standard-normal inputs of
    ``input_shape``, or random token ids for a model that starts with an embedding), or null when skipped.
``input_shape``
    The per-sample input shape used for latency and random inputs (from the first data batch, else
    ``--input-shape``, else the checkpoint's metadata), or null when unknown.
``latency_ms``
    Median wall time of one forward pass at ``batch_size`` under ``torch.no_grad`` in milliseconds, after
    warm-up, over at least 5 timed runs (CUDA is synchronised around each run). The compressed
    weights are built once and frozen into plain tensors (``sttp_compress.compress.serve.frozen``), so this is
    the cost of the dense forward pass. Null when disabled or when no input
    shape is known.
``throughput``
    Samples per second, ``batch_size / median seconds``; null with ``latency_ms``.
``latency_runs``
    Number of timed runs behind the median (null without latency).
``device``, ``batch_size``
    Where and at what batch size evaluation and timing ran.
``notes``
    Human-readable lines about anything skipped (e.g. the reference comparison without inputs).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.markup import escape
from rich.table import Table
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from sttp_compress.io.export import export, export_format
from sttp_compress.io.checkpoint import load_compressed
from sttp_compress.compress.convert import compressed_layers, count_parameters, decompress
from sttp_compress.data.images import (IMAGE_EXTENSIONS, ImageDataConfig, image_transforms, init_worker,
                   resolve_image_config, rgb_loader)
from sttp_compress.errors import UserError, terms
from sttp_compress.progress import TaskLines
from sttp_compress.compress.serve import frozen
from sttp_compress.train.loop import resolve_device
from sttp_compress.io.specs import WithDataSpec, hf_folder, parse_data
from sttp_compress.io.sources import load_model, parse_size, resolve_arch
from sttp_compress.io.outputs import atomic_torch_save
from sttp_compress.evaluate.report import largest_layers

__all__ = ["EvalOptions", "run_eval", "check_gates", "validate_options", "summary_table", "export_dense",
           "export_inputs", "export_model", "export_line"]

# The --json result's keys, in their order (the module docstring describes each).
RESULT_KEYS = ("file", "arch", "dtype", "size_bytes", "size_bytes_original", "size_ratio", "params", "params_original",
               "ratio", "layers", "data", "samples", "accuracy", "top5", "loss", "reference", "reference_accuracy",
               "reference_top5", "agreement", "cosine", "nn_agreement", "similarity_spearman", "sts_spearman",
               "sts_spearman_reference", "rel_output_error", "reference_inputs", "input_shape", "latency_ms",
               "throughput", "latency_runs", "device", "batch_size", "notes")
WARMUP_RUNS = 3          # untimed forward passes before timing
TIMING_BUDGET_S = 1.0    # time blocks of passes until this much time has passed (torch.utils.benchmark)
RANDOM_BATCHES = 4       # batches of random inputs for the reference comparison without data
RANDOM_SEED = 0
MAX_WORKERS = 4          # default loader workers for image folders
SUMMARY_LAYERS = 20      # layer rows in the summary table (the largest ones)
_DASH = "—"


@dataclass
class EvalOptions(WithDataSpec):
    """What to evaluate on, what to compare with, and the pass/fail gates (see the module docstring)."""

    arch: str | None = None             # override the checkpoint's architecture spec
    trust_arch: bool = False            # build a recorded spec that runs code (module:factory, file.py:factory)
    data: str | None = None             # ImageFolder root with class subfolders, or "tensors:FILE.pt"
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    reference: str | None = None        # original model file, loaded like sttp-compress's input
    reference_arch: str | None = None
    trust_pickle: bool = False
    input_shape: tuple[int, ...] | None = None  # e.g. (3, 32, 32): random inputs when there is no data
    device: str = "cpu"                 # "cpu" | "cuda" | "cuda:N" | "auto"
    batch_size: int = 64
    latency: bool = True                # measure latency/throughput
    max_batches: int | None = None      # cap on evaluation batches
    workers: int | None = None          # data loader workers; None: up to 4 for image folders, 0 for tensors
    # gates
    max_size: str | None = None
    max_params: int | None = None
    min_ratio: float | None = None
    min_accuracy: float | None = None   # in percent
    min_cosine: float | None = None     # text data: mean cosine similarity to the reference's embeddings
    min_sts_spearman: float | None = None  # pairs data: Spearman of pair similarities with the file's scores
    baseline: str | None = None         # a previous --json output; with max_drop gates the accuracy drop
    max_drop: float | None = None       # in percentage points


# --------------------------------------------------------------------------- option checks


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_options(opts: EvalOptions) -> None:
    """Raise a one-line UserError for an impossible option value; run_eval calls it before any work."""
    if not isinstance(opts.batch_size, int) or opts.batch_size < 1:
        raise UserError(f"‹batch_size› must be a positive integer, got {opts.batch_size}")
    if opts.max_batches is not None and (not isinstance(opts.max_batches, int) or opts.max_batches < 1):
        raise UserError(f"‹max_batches› must be a positive integer, got {opts.max_batches}")
    if opts.workers is not None and (not isinstance(opts.workers, int) or opts.workers < 0):
        raise UserError(f"‹workers› cannot be negative, got {opts.workers}")
    if opts.input_shape is not None:
        shape = tuple(opts.input_shape)
        if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise UserError(f"‹input_shape› needs positive integers, e.g. 3,32,32; got {opts.input_shape}")
    image_opts = [n for n, v in (("‹image_size›", opts.image_size), ("‹mean›", opts.mean), ("‹std›", opts.std))
                  if v is not None]
    if image_opts and opts.data_kind in (None, "tensors"):
        raise UserError(f"{'/'.join(image_opts)} only apply to an image folder given with ‹data› DIR")
    if opts.reference_arch is not None and opts.reference is None:
        raise UserError("‹reference_arch› needs ‹reference› FILE")
    resolve_device(opts.device)
    _check_gates_measurable(opts)
    _gate_limits(opts)


def _check_gates_measurable(opts: EvalOptions) -> None:
    """Refuse, before any work, a gate that the given data and reference can never measure (a usage
    error, not a failed gate)."""
    text = opts.data_kind in ("text", "pairs")
    labelled = opts.data is not None and not text
    for given, key, needs in (
            (opts.min_accuracy, "‹min_accuracy›", "labelled data: ‹data› DIR (class subfolders) or tensors:FILE.pt "
                                                  "with targets"),
            (opts.max_drop, "‹max_drop›", "labelled data: ‹data› DIR (class subfolders) or tensors:FILE.pt with "
                                          "targets")):
        if given is not None and not labelled:
            raise UserError(f"{key} cannot be checked without {needs}")
    if opts.min_cosine is not None and not (text and hf_folder(opts.reference) is not None):
        raise UserError("‹min_cosine› cannot be checked without ‹data› text:FILE (or pairs:FILE) and "
                        "‹reference› hf:DIR (the original model)")
    if opts.min_sts_spearman is not None and opts.data_kind != "pairs":
        raise UserError("‹min_sts_spearman› cannot be checked without ‹data› pairs:FILE "
                        "(tab-separated sentence1, sentence2, score)")


def _gate_limits(opts: EvalOptions) -> dict[str, Any]:
    """The checked gate limits (max_size in bytes); raises UserError for bad values or lone baseline/max_drop."""
    limits: dict[str, Any] = {}
    if opts.max_size is not None:
        limits["max_size"] = parse_size(opts.max_size)
    if opts.max_params is not None:
        if not isinstance(opts.max_params, int) or isinstance(opts.max_params, bool) or opts.max_params < 1:
            raise UserError(f"‹max_params› must be a positive integer, got {opts.max_params}")
        limits["max_params"] = opts.max_params
    if opts.min_ratio is not None:
        if not _is_number(opts.min_ratio) or opts.min_ratio <= 0:
            raise UserError(f"‹min_ratio› must be a positive number, got {opts.min_ratio}")
        limits["min_ratio"] = float(opts.min_ratio)
    for key, lo, hi, what in (("min_accuracy", 0, 100, "a percentage"), ("min_cosine", -1, 1, "a cosine similarity"),
                              ("min_sts_spearman", -1, 1, "a correlation")):  # the lower-bound gates' ranges
        value = getattr(opts, key)
        if value is not None:
            if not _is_number(value) or not lo <= value <= hi:
                raise UserError(f"‹{key}› is {what} between {lo} and {hi}, got {value}")
            limits[key] = float(value)
    if (opts.baseline is None) != (opts.max_drop is None):
        given, missing = ("‹baseline›", "‹max_drop›") if opts.baseline is not None else ("‹max_drop›", "‹baseline›")
        raise UserError(f"{given} needs {missing} as well (the accuracy drop is measured against a baseline "
                        "file written by sttp-eval --json)")
    if opts.max_drop is not None:
        if not _is_number(opts.max_drop) or opts.max_drop < 0:
            raise UserError(f"‹max_drop› is a number of accuracy points >= 0, got {opts.max_drop}")
        limits["max_drop"] = float(opts.max_drop)
        limits["baseline_accuracy"] = _baseline_accuracy(opts.baseline)
    return limits


def _baseline_accuracy(path: str) -> float:
    """The top-1 accuracy (percent) recorded in a previous sttp-eval --json output."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"baseline file not found: {path}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:120]
        raise UserError(f"cannot read baseline {path} (expected the JSON written by sttp-eval --json): "
                        f"{reason}") from None
    if not isinstance(data, dict):
        raise UserError(f"baseline {path} is not an sttp-eval --json result (expected a JSON object)")
    acc = data.get("accuracy")
    if not _is_number(acc):
        raise UserError(f"baseline {path} records no accuracy; write it with sttp-eval --data ... --json "
                        "on labelled data")
    return float(acc)


# --------------------------------------------------------------------------- gates


def _bytes_text(n: int) -> str:
    return f"{n / 1e6:.2f} MB ({n:,} bytes)"


def check_gates(result: Mapping[str, Any], opts: EvalOptions) -> list[str]:
    """One human line per failed gate (naming the gate, the measured value and the limit); [] when all pass."""
    limits = _gate_limits(opts)
    failures: list[str] = []
    if "max_size" in limits:
        size, limit = int(result["size_bytes"]), limits["max_size"]
        if size > limit:
            failures.append(f"size {_bytes_text(size)} > ‹max_size› {opts.max_size} ({limit:,} bytes)")
    if "max_params" in limits:
        params, limit = int(result["params"]), limits["max_params"]
        if params > limit:
            failures.append(f"params {params:,} > ‹max_params› {limit:,}")
    if "min_ratio" in limits:
        ratio, limit = result.get("ratio"), limits["min_ratio"]
        if not _is_number(ratio):
            failures.append(f"ratio unknown (the checkpoint records no original parameter count; pass "
                            f"‹reference› ORIGINAL) so ‹min_ratio› {limit:g} cannot be checked")
        elif ratio < limit:
            failures.append(f"ratio {ratio:.2f}x < ‹min_ratio› {limit:g}x "
                            f"({result.get('params_original'):,} → {int(result['params']):,} params)")
    accuracy = result.get("accuracy")
    lower_bounds = [  # (limit key, result key, what it is, how it prints, unit, what it needs when unknown)
        ("min_accuracy", "accuracy", "accuracy", "accuracy {:.2f}", " %",
         "labelled data (‹data› DIR with class subfolders, or tensors:FILE.pt with targets)"),
        ("min_cosine", "cosine", "cosine", "mean cosine similarity to the reference {:.4f}", "",
         "‹data› text:FILE (or pairs:FILE) and ‹reference› hf:DIR (the original model)"),
        ("min_sts_spearman", "sts_spearman", "pair-score Spearman", "Spearman of pair similarities with the scores "
         "{:.4f}", "", "‹data› pairs:FILE (tab-separated sentence1, sentence2, score)"),
    ]
    for key, field, what, measured, unit, needs in lower_bounds:
        if key not in limits:
            continue
        value, limit, flag = result.get(field), limits[key], f"‹{key}›"
        if not _is_number(value):
            failures.append(f"{what} unknown, so {flag} {limit:g} cannot be checked: it needs {needs}")
        elif value < limit:
            failures.append(f"{measured.format(value)}{unit} < {flag} {limit:g}{unit}")
    if "max_drop" in limits:
        base, limit = limits["baseline_accuracy"], limits["max_drop"]
        if not _is_number(accuracy):
            failures.append(f"accuracy unknown, so ‹max_drop› {limit:g} against ‹baseline› {opts.baseline} "
                            "cannot be checked: it needs labelled data (‹data› DIR or tensors:FILE.pt with targets)")
        elif base - accuracy > limit:
            failures.append(f"accuracy drop {base - accuracy:.2f} points ({base:.2f} % in ‹baseline› "
                            f"{opts.baseline} → {accuracy:.2f} %) > ‹max_drop› {limit:g}")
    return [terms(f) for f in failures]


# --------------------------------------------------------------------------- data


def _load_tensor_file(path: Path) -> TensorDataset:
    """All samples of a saved dict {"inputs", optional "targets"} (`tensors:FILE.pt`), unsplit, floats as float32."""
    if not path.is_file():
        raise UserError(f"tensor data file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle errors, truncated files, disallowed globals
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise UserError(f"cannot load tensor data {path}: {reason}") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("inputs"), Tensor):
        raise UserError(f"tensor data {path} must hold a dict with an 'inputs' tensor (and optional 'targets')")
    inputs, targets = blob["inputs"], blob.get("targets")
    if inputs.dim() == 0 or len(inputs) == 0:
        raise UserError(f"'inputs' in {path} must have a non-empty batch dimension")
    if inputs.is_floating_point() and inputs.dtype != torch.float32:
        inputs = inputs.float()
    if targets is None:
        return TensorDataset(inputs)
    if not isinstance(targets, Tensor) or targets.dim() == 0:
        raise UserError(f"'targets' in {path} must be a tensor with a batch dimension")
    if len(targets) != len(inputs):
        raise UserError(f"tensor data {path}: {len(inputs)} inputs but {len(targets)} targets")
    return TensorDataset(inputs, targets)


def _image_root(root: Path) -> Path:
    """The folder of class subfolders: `root` itself, or its val/ (or test/) split in a train/val layout."""
    if not root.exists():
        raise UserError(f"data folder not found: {root}")
    if not root.is_dir():
        raise UserError(f"data path is not a folder (nor tensors:FILE.pt): {root}")
    if (root / "train").is_dir():
        for name in ("val", "test"):
            if (root / name).is_dir():
                return root / name
    return root


def _image_dataset(data: str, opts: EvalOptions, meta: Mapping[str, Any]) -> Dataset:
    """An ImageFolder with validation transforms (resize, center crop, normalise; no augmentation)."""
    from torchvision.datasets import ImageFolder

    root = _image_root(Path(data).expanduser())
    try:
        ds = ImageFolder(str(root), loader=rgb_loader, allow_empty=True)
    except (FileNotFoundError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot read image folder {root}: {reason}") from None
    if len(ds) == 0:
        raise UserError(f"no images found in {root} (expected {root}/<class>/<image> with extensions "
                        f"{', '.join(IMAGE_EXTENSIONS)})")

    def pick(given: Any, key: str) -> Any:
        return given if given is not None else meta.get(key)

    mean, std = pick(opts.mean, "mean"), pick(opts.std, "std")
    cfg = ImageDataConfig(image_size=pick(opts.image_size, "image_size"),
                          mean=None if mean is None else tuple(mean), std=None if std is None else tuple(std),
                          augment="none")
    cfg = resolve_image_config(cfg, root)
    ds.transform = image_transforms(cfg)[1]
    return ds


def _data_loader(opts: EvalOptions, meta: Mapping[str, Any], device: torch.device) -> DataLoader | None:
    if opts.data is None:
        return None
    if opts.data_kind == "tensors":
        ds, workers = _load_tensor_file(opts.data_spec.path), 0
        if len(ds.tensors) < 2 and (opts.min_accuracy is not None or opts.max_drop is not None):
            gate = "‹min_accuracy›" if opts.min_accuracy is not None else "‹max_drop›"
            raise UserError(f"{gate} cannot be checked: {opts.data} has no 'targets' tensor")
    else:
        ds, workers = _image_dataset(opts.data, opts, meta), min(MAX_WORKERS, os.cpu_count() or 1)
    if opts.workers is not None:
        workers = opts.workers
    return DataLoader(ds, batch_size=opts.batch_size, shuffle=False, drop_last=False, num_workers=workers,
                      pin_memory=device.type == "cuda", worker_init_fn=init_worker if workers > 0 else None)


# --------------------------------------------------------------------------- model helpers


def _primary_output(out: Any) -> Tensor:
    """The tensor to score: the output itself, `.logits`/["logits"], or the first element."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) and out:
        return out["logits"] if "logits" in out else _primary_output(next(iter(out.values())))
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out:
        return _primary_output(out[0])
    raise UserError(f"cannot use model output of type {type(out).__name__} (expected a tensor)")


def _forward(model: nn.Module, x: Tensor | dict[str, Tensor], what: str) -> Tensor:
    """Run the model, turning a shape/dtype mismatch with the inputs into a one-line UserError."""
    if isinstance(x, Mapping):  # token batches of hf models
        return _primary_output(model(**x))
    try:
        return _primary_output(model(x))
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"out of memory running the {what} model at batch size {len(x)}; "
                        "pass a smaller ‹batch_size›") from None
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserError(f"running the {what} model on inputs of shape {list(x.shape)} ({str(x.dtype)[6:]}) "
                        f"failed: {reason}; check that the data or ‹input_shape› matches the model") from None


def _first_embedding(model: nn.Module) -> nn.Embedding | None:
    """The model's first weight-holding leaf module if it is an Embedding (the model takes token ids)."""
    for m in model.modules():
        if next(m.children(), None) is None and next(m.parameters(recurse=False), None) is not None:
            return m if isinstance(m, nn.Embedding) else None
    return None


def _random_inputs(model: nn.Module, shape: tuple[int, ...], n: int, gen: torch.Generator) -> Tensor:
    """Seeded random inputs: token ids for an embedding-first model, else standard normal float32."""
    emb = _first_embedding(model)
    if emb is not None:
        return torch.randint(0, emb.num_embeddings, (n, *shape), generator=gen)
    return torch.randn((n, *shape), generator=gen)


def _batches(loader: DataLoader | None, opts: EvalOptions, model: nn.Module,
             shape: tuple[int, ...] | None) -> Iterator[tuple[Tensor, Tensor | None]]:
    """(inputs, targets or None) on CPU: the data (capped at max_batches), or seeded random inputs."""
    if loader is not None:
        for batch in itertools.islice(loader, opts.max_batches):
            if isinstance(batch, (tuple, list)):
                yield batch[0], (batch[1] if len(batch) > 1 else None)
            else:
                yield batch, None
        return
    assert shape is not None
    gen = torch.Generator().manual_seed(RANDOM_SEED)
    for _ in range(min(RANDOM_BATCHES, opts.max_batches or RANDOM_BATCHES)):
        yield _random_inputs(model, shape, opts.batch_size, gen), None


class _Metrics:
    """Running top-1/top-5/cross-entropy over class-index targets, as finetune.evaluate computes them."""

    def __init__(self, device: torch.device):
        self.counts = torch.zeros(2, dtype=torch.long, device=device)
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.seen = 0

    def add(self, out: Tensor, targets: Tensor) -> None:
        out = out.float()
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        hits = top == targets[:, None]
        self.counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
        self.loss += F.cross_entropy(out, targets, reduction="sum").double()
        self.seen += len(targets)

    def result(self) -> tuple[float | None, float | None, float | None]:
        if self.seen == 0:
            return None, None, None
        correct, correct5 = self.counts.tolist()
        return 100.0 * correct / self.seen, 100.0 * correct5 / self.seen, float(self.loss) / self.seen


def _is_class_labels(out: Tensor, targets: Tensor | None) -> bool:
    return (targets is not None and out.dim() == 2 and targets.dim() == 1
            and not targets.is_floating_point() and not targets.is_complex())


def _check_labels(targets: Tensor, num_classes: int) -> None:
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise UserError(f"the data has class labels {int(targets.min())}..{int(targets.max())} but the model "
                        f"has {num_classes} outputs; check that the data matches the model")


@contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    """A transient rich progress display on stderr; in a log (stderr not a terminal) plain lines a tenth of the
    batches (`progress.TaskLines`), so a long evaluation under a scheduler shows that it moves; or None."""
    if not enabled:
        yield None
        return
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        yield TaskLines()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True)
    with bar:
        yield bar


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure_latency(model: nn.Module, x: Tensor | dict[str, Tensor], device: torch.device,
                     bar: Any) -> tuple[float, int]:
    """(median seconds, timed runs) of model(x) under no_grad, after WARMUP_RUNS untimed passes, with the
    compressed weights frozen into plain tensors (`serve.frozen`: the serving path, at dense cost).

    torch.utils.benchmark.Timer does the timing: blocks of runs for at least TIMING_BUDGET_S, CUDA synchronised."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # its import warns of CUDA_HOME on CPU
    from torch.utils.benchmark import Timer

    task = bar.add_task("timing", total=None) if bar is not None else None
    stmt = "model(**x)" if isinstance(x, Mapping) else "model(x)"

    def advance(number: int, _seconds: float) -> None:
        if task is not None:
            bar.update(task, advance=number)

    with frozen(model), torch.no_grad():
        for _ in range(WARMUP_RUNS):
            _forward(model, x, "compressed")
        _sync(device)
        timer = Timer(stmt, globals={"model": model, "x": x}, num_threads=torch.get_num_threads())
        measured = timer.blocked_autorange(callback=advance, min_run_time=TIMING_BUDGET_S)
    return measured.median, len(measured.raw_times) * measured.number_per_run


def _tile(x: Tensor, n: int) -> Tensor:
    """The first n rows of x repeated along the batch dimension (for a full timing batch)."""
    reps = -(-n // len(x))
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n] if reps > 1 else x[:n]


# --------------------------------------------------------------------------- run_eval


def milliseconds(ms: float) -> str:
    """A latency with the digits that mean something: '0.412 ms', '3.91 ms', '27.4 ms', '1,204 ms'."""
    if ms >= 100:
        return f"{ms:,.0f} ms"
    return f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms" if ms >= 1 else f"{ms:.3f} ms"


def _layer_entries(model: nn.Module) -> list[dict[str, Any]]:
    entries = []
    for name, p in compressed_layers(model).items():
        entries.append({"name": name, "rank": int(max(p.tt.tt_ranks)), "spectrum_rank": int(p.rank),
                        "params_original": math.prod(p.weight_shape),
                        "params_compressed": int(p.dof()), "modes": [int(m) for m in p.tt.modes],
                        "tt_ranks": [int(r) for r in p.tt.tt_ranks]})
    return entries


def _meta_int(meta: Mapping[str, Any], key: str) -> int | None:
    value = meta.get(key)
    return int(value) if _is_number(value) and value > 0 else None


def _meta_shape(meta: Mapping[str, Any]) -> tuple[int, ...] | None:
    shape = meta.get("input_shape")
    if isinstance(shape, (list, tuple)) and shape and all(isinstance(d, int) and d > 0 for d in shape):
        return tuple(shape)
    return None


def run_eval(path: str, opts: EvalOptions, progress: bool = False) -> dict[str, Any]:
    """Load the compressed checkpoint, measure everything the options ask for; returns the --json dict.

    Raises UserError for any bad input (missing or corrupt file, unresolvable arch, bad data, bad gate
    values); gates are validated here but judged by :func:`check_gates`.
    """
    validate_options(opts)
    device = resolve_device(opts.device)
    model, info = load_compressed(path, opts.arch, opts.trust_arch)
    meta = info.get("meta") if isinstance(info.get("meta"), dict) else {}
    if opts.min_ratio is not None and _meta_int(meta, "params_original") is None and opts.reference is None:
        raise UserError(f"‹min_ratio› cannot be checked: {path} records no original parameter count; "
                        "pass ‹reference› ORIGINAL")
    reference = _load_reference(opts, info)
    base = _sizes_and_params(path, opts, info, meta, model, reference)
    notes: list[str] = []
    if opts.data_kind in ("text", "pairs"):
        return _run_text_eval(base, model, reference, opts, device, notes, progress)

    loader = _data_loader(opts, meta, device)
    shape = None if loader is not None else (tuple(opts.input_shape) if opts.input_shape else _meta_shape(meta))
    model.to(device)
    if reference is not None:
        reference.to(device)
    compare = reference is not None and (loader is not None or shape is not None)
    if reference is not None and not compare:
        notes.append("reference comparison skipped: no inputs (pass ‹data›, or ‹input_shape› for random inputs)")
    with _progress(progress) as bar:
        tally = _Tally(device)
        if loader is not None or compare:
            _run_batches(tally, model, reference if compare else None, loader, opts, shape, device, bar)
        if tally.first_inputs is not None and loader is not None:
            shape = tuple(tally.first_inputs.shape[1:])
        latency_s, runs = _latency(model, tally, loader, opts, shape, device, bar, notes)
    if loader is not None and not tally.labelled:
        notes.append("accuracy not measured: the data has no class-index targets for the model's outputs")
    numbers = {**tally.result(loader is not None, compare, opts), "reference": opts.reference,
               "cosine": None, "nn_agreement": None, "similarity_spearman": None, "sts_spearman": None,
               "sts_spearman_reference": None,
               "reference_inputs": ("data" if loader is not None else "random") if compare else None,
               "input_shape": list(shape) if shape is not None else None, **_timing(latency_s, runs, opts),
               "device": str(device), "batch_size": opts.batch_size, "notes": [terms(n) for n in notes]}
    return {**base, **{key: numbers[key] for key in RESULT_KEYS if key not in base}}


def _load_reference(opts: EvalOptions, info: Mapping[str, Any]) -> nn.Module | None:
    """The original model to compare with (--reference), in eval mode, or None."""
    if opts.reference is None:
        return None
    if hf_folder(opts.reference) is not None:  # the original model folder itself
        return resolve_arch(opts.reference).float().eval()
    ref_arch = opts.reference_arch or opts.arch or info.get("arch")
    return load_model(opts.reference, arch=ref_arch, trust_pickle=opts.trust_pickle).float().eval()


def _sizes_and_params(path: str, opts: EvalOptions, info: Mapping[str, Any], meta: Mapping[str, Any],
                      model: nn.Module, reference: nn.Module | None) -> dict[str, Any]:
    """The result's first fields: the file, its architecture and dtype, sizes and parameter counts with their
    ratios (the original's from the checkpoint's metadata, else from the reference), and the layers."""
    params, size_bytes = count_parameters(model), Path(path).stat().st_size
    params_original, size_original = _meta_int(meta, "params_original"), _meta_int(meta, "size_bytes_original")
    if reference is not None and params_original is None:
        params_original = count_parameters(reference)
    if reference is not None and size_original is None and hf_folder(opts.reference) is None:
        size_original = Path(opts.reference).stat().st_size
    return {"file": str(path), "arch": opts.arch or info.get("arch"), "dtype": info.get("dtype"),
            "size_bytes": size_bytes, "size_bytes_original": size_original,
            "size_ratio": size_original / size_bytes if size_original else None, "params": params,
            "params_original": params_original,
            "ratio": params_original / params if params_original and params else None,
            "layers": _layer_entries(model)}


class _Tally:
    """What evaluating batches accumulates: accuracy of both models, output error and top-1 agreement."""

    def __init__(self, device: torch.device):
        self.metrics, self.ref_metrics = _Metrics(device), _Metrics(device)
        self.diff_sq = torch.zeros((), dtype=torch.float64, device=device)
        self.ref_sq = torch.zeros((), dtype=torch.float64, device=device)
        self.agree = torch.zeros((), dtype=torch.long, device=device)
        self.agree_total = self.samples = 0
        self.labelled = True
        self.first_inputs: Tensor | None = None

    def add(self, out: Tensor, ref: Tensor | None, y: Tensor | None) -> None:
        if y is not None:
            self.metrics.add(out, y)
        if ref is None:
            return
        if y is not None:
            self.ref_metrics.add(ref, y)
        out64, ref64 = out.double(), ref.double()
        self.diff_sq += (out64 - ref64).pow(2).sum()
        self.ref_sq += ref64.pow(2).sum()
        if out.dim() >= 2:
            self.agree += (out.argmax(dim=1) == ref.argmax(dim=1)).sum()
            self.agree_total += out.numel() // out.shape[1]

    def result(self, on_data: bool, compared: bool, opts: EvalOptions) -> dict[str, Any]:
        labelled = self.labelled and on_data
        accuracy, top5, loss = self.metrics.result() if labelled else (None, None, None)
        ref_acc, ref_top5, _ = self.ref_metrics.result() if labelled and compared else (None, None, None)
        rel_err = agreement = None
        if compared:
            d, r = float(self.diff_sq), float(self.ref_sq)
            rel_err = math.sqrt(d / r) if r > 0 else (0.0 if d == 0 else None)
            agreement = 100.0 * int(self.agree) / self.agree_total if self.agree_total else None
        return {"data": opts.data, "samples": self.samples if on_data else None, "accuracy": accuracy,
                "top5": top5, "loss": loss, "reference_accuracy": ref_acc, "reference_top5": ref_top5,
                "agreement": agreement, "rel_output_error": rel_err}


def _run_batches(tally: _Tally, model: nn.Module, reference: nn.Module | None, loader: DataLoader | None,
                 opts: EvalOptions, shape: tuple[int, ...] | None, device: torch.device, bar: Any) -> None:
    """Run the model (and the reference, when comparing) on the data's batches, or on random inputs of
    `shape` without data, into `tally`."""
    if loader is not None:
        total = len(loader) if opts.max_batches is None else min(len(loader), opts.max_batches)
    else:
        total = min(RANDOM_BATCHES, opts.max_batches or RANDOM_BATCHES)
    task = bar.add_task("evaluating", total=total) if bar is not None else None
    non_blocking = device.type == "cuda"
    with torch.no_grad():
        for inputs, targets in _batches(loader, opts, model, shape):
            if tally.first_inputs is None:
                tally.first_inputs = inputs
            x = inputs.to(device, non_blocking=non_blocking)
            out = _forward(model, x, "compressed")
            tally.samples += len(inputs)
            y = None
            if tally.labelled and loader is not None and _is_class_labels(out, targets):
                _check_labels(targets, out.shape[1])
                y = targets.to(device, non_blocking=non_blocking)
            else:
                tally.labelled = False
            ref = None
            if reference is not None:
                ref = _forward(reference, x, "reference")
                if ref.shape != out.shape:
                    raise UserError(f"the reference model's output shape {list(ref.shape)} differs from "
                                    f"the compressed model's {list(out.shape)}; check ‹reference_arch›")
            tally.add(out, ref, y)
            if task is not None:
                bar.update(task, advance=1)
    if loader is not None and tally.samples == 0:
        raise UserError(f"the data {opts.data} yields no samples")


def _latency(model: nn.Module, tally: _Tally, loader: DataLoader | None, opts: EvalOptions,
             shape: tuple[int, ...] | None, device: torch.device, bar: Any, notes: list[str]
             ) -> tuple[float | None, int | None]:
    """(median seconds of one forward at the batch size, timed runs), or (None, None) when off or no input
    shape is known; the batch is the data's first, tiled, else random inputs."""
    if not opts.latency:
        return None, None
    if shape is None:
        notes.append("latency skipped: input shape unknown (pass ‹data› or ‹input_shape›)")
        return None, None
    if tally.first_inputs is not None and loader is not None:
        x = _tile(tally.first_inputs, opts.batch_size)
    else:
        x = _random_inputs(model, shape, opts.batch_size, torch.Generator().manual_seed(RANDOM_SEED))
    return _measure_latency(model, x.to(device), device, bar)


def _timing(latency_s: float | None, runs: int | None, opts: EvalOptions) -> dict[str, Any]:
    return {"latency_ms": None if latency_s is None else 1000.0 * latency_s,
            "throughput": None if latency_s is None else opts.batch_size / latency_s, "latency_runs": runs}


def _run_text_eval(base: dict[str, Any], model: nn.Module, reference: nn.Module | None, opts: EvalOptions,
                   device: torch.device, notes: list[str], progress: bool) -> dict[str, Any]:
    """run_eval on --data text:FILE or pairs:FILE (an hf:DIR model): agreement with the reference's
    embeddings (mean cosine, nearest neighbours, pair-similarity order), for pairs:FILE also the Spearman
    correlation of each model's pair similarities with the file's scores; latency on a first batch of texts."""
    from sttp_compress.evaluate.texts import evaluate_pairs
    from sttp_compress.evaluate.texts import evaluate_texts

    folder = hf_folder(base["arch"]) or hf_folder(opts.reference)
    pairs = opts.data_kind == "pairs"
    kind = "pairs:FILE" if pairs else "text:FILE"
    if folder is None:
        raise UserError(f"‹data› {kind} needs a model built from ‹arch› hf:DIR (the tokenizer comes from DIR)")
    model.to(device)
    if reference is not None:
        reference.to(device)
    else:
        notes.append("cosine and nearest-neighbour agreement need ‹reference› hf:DIR (the original model)")
    evaluate = evaluate_pairs if pairs else evaluate_texts
    with _progress(progress) as bar:
        task = bar.add_task("embedding texts", total=None) if bar is not None else None
        metrics, first = evaluate(model, reference, opts.data_spec.path, folder, device, opts.batch_size, opts.max_batches)
        if task is not None:
            bar.update(task, completed=1, total=1)
        latency_s = runs = None
        if opts.latency:
            x = {k: _tile(v, opts.batch_size).to(device) for k, v in first.items()}
            latency_s, runs = _measure_latency(model, x, device, bar)
    compared = reference is not None
    return {
        **base, "data": opts.data, "samples": metrics["samples"], "accuracy": None, "top5": None, "loss": None,
        "reference": opts.reference, "reference_accuracy": None, "reference_top5": None, "agreement": None,
        "cosine": metrics["cosine"], "nn_agreement": metrics["nn_agreement"],
        "similarity_spearman": metrics["similarity_spearman"], "rel_output_error": metrics["rel_output_error"],
        "sts_spearman": metrics.get("sts_spearman"), "sts_spearman_reference": metrics.get("sts_spearman_reference"),
        "reference_inputs": "data" if compared else None,
        "input_shape": None, "latency_ms": None if latency_s is None else 1000.0 * latency_s,
        "throughput": None if latency_s is None else opts.batch_size / latency_s, "latency_runs": runs,
        "device": str(device), "batch_size": opts.batch_size, "notes": [terms(n) for n in notes],
    }


# --------------------------------------------------------------------------- summary table


def _count(n: Any) -> str:
    """A parameter count in compact form: 950, 12.3k, 2.36M, 1.2B."""
    if not _is_number(n):
        return _DASH
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{int(n)}"


def _size(n: Any) -> str:
    if not _is_number(n):
        return _DASH
    for div, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def _pct(x: Any) -> str:
    return f"{x:.2f} %" if _is_number(x) else "n/a"


def _x(x: Any) -> str:
    return f" ({x:.2f}x)" if _is_number(x) else ""


def _before_after(original: Any, now: Any, ratio: Any, fmt) -> str:
    """'620k → 4.39k (141.14x)', or just the current value when the original is unknown."""
    if not _is_number(original):
        return f"{fmt(now)} (original unknown)"
    return f"{fmt(original)} → {fmt(now)}{_x(ratio)}"


def summary_table(result: Mapping[str, Any], max_layers: int = SUMMARY_LAYERS) -> Table:
    """The terminal summary: params, size, ratio, accuracies, agreement, latency, then the compressed layers."""
    table = Table(title=escape(f"sttp-eval {result.get('file', '')}"), show_header=True)
    table.add_column("", overflow="fold")
    table.add_column("Value", overflow="fold")
    table.add_row("Architecture", escape(str(result.get("arch") or _DASH)))
    table.add_row("Parameters", _before_after(result.get("params_original"), result.get("params"),
                                              result.get("ratio"), _count))
    table.add_row("Size", _before_after(result.get("size_bytes_original"), result.get("size_bytes"),
                                        result.get("size_ratio"), _size))
    if result.get("data") is not None:
        samples = result.get("samples")
        table.add_row("Data", escape(str(result["data"])) + (f" ({samples:,} samples)" if _is_number(samples) else ""))
        acc = f"{_pct(result.get('accuracy'))} (top-5 {_pct(result.get('top5'))})"
        if _is_number(result.get("loss")):
            acc += f", loss {result['loss']:.4f}"
        if parse_data(str(result["data"])).kind not in ("text", "pairs"):
            table.add_row("Accuracy", acc)
        if _is_number(result.get("sts_spearman")):
            ref = result.get("sts_spearman_reference")
            table.add_row("Pair scores: Spearman", f"{result['sts_spearman']:.4f}" +
                          (f" (original {ref:.4f})" if _is_number(ref) else ""))
    if result.get("reference") is not None:
        table.add_row("Reference", escape(str(result["reference"])))
        if _is_number(result.get("reference_accuracy")):
            line = f"{_pct(result['reference_accuracy'])} (top-5 {_pct(result.get('reference_top5'))})"
            if _is_number(result.get("accuracy")):
                line += f", drop {result['reference_accuracy'] - result['accuracy']:.2f} points"
            table.add_row("Reference accuracy", line)
        if _is_number(result.get("cosine")):
            table.add_row("Mean cosine similarity", f"{result['cosine']:.4f}")
            table.add_row("Nearest-neighbour agreement", _pct(result.get("nn_agreement")))
            if _is_number(result.get("similarity_spearman")):
                table.add_row("Pair-similarity rank correlation", f"{result['similarity_spearman']:.4f}")
        elif result.get("reference_inputs"):
            on = "data" if result["reference_inputs"] == "data" else "random inputs"
            table.add_row("Top-1 agreement", f"{_pct(result.get('agreement'))} on {on}")
            err = result.get("rel_output_error")
            table.add_row("Rel. output error", f"{err:.3g}" if _is_number(err) else _DASH)
    where = f"at batch {result.get('batch_size')} on {result.get('device')}"
    if _is_number(result.get("latency_ms")):
        table.add_row("Latency", f"{milliseconds(result['latency_ms'])} {where}")
        table.add_row("Throughput", f"{result['throughput']:,.0f} samples/s")
    else:
        table.add_row("Latency", f"{_DASH} (not measured)")
    layers = list(result.get("layers") or [])
    table.add_section()
    if layers:
        table.add_row("[bold]Compressed layer[/bold]", "[bold]rank: params dense → compressed[/bold]")
    else:
        table.add_row("[dim]no compressed layers[/dim]", "")
    shown, hidden_po, hidden_pc = largest_layers(layers, max_layers)
    for i, layer in enumerate(layers):
        po, pc = layer.get("params_original"), layer.get("params_compressed")
        if i not in shown:
            continue
        ratio = po / pc if _is_number(po) and _is_number(pc) and pc else None
        table.add_row(escape(str(layer.get("name", "?"))),
                      f"rank {layer.get('rank', _DASH)}: {_count(po)} → {_count(pc)}{_x(ratio)}")
    if len(layers) > len(shown):
        table.add_row(f"[dim]… {len(layers) - len(shown)} more layers[/dim]",
                      f"[dim]{_count(hidden_po)} → {_count(hidden_pc)}[/dim]")
    return table


# --------------------------------------------------------------------------- export


def export_dense(path: str, out: str, arch: str | None = None, force: bool = False,
                 trust_arch: bool = False) -> int:
    """Rebuild the dense weights and save a plain float32 state_dict of the original architecture.

    The file loads with ``model.load_state_dict(torch.load(out, weights_only=True))`` into a fresh
    instance of the checkpoint's architecture (or ``arch``). Written atomically; returns its size in bytes.
    """
    model, _ = load_compressed(path, arch, trust_arch)
    decompress(model)
    state = {k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()).clone()
             for k, v in model.state_dict().items()}
    atomic_torch_save(state, out, force=force)
    return Path(out).stat().st_size


def export_inputs(model: nn.Module, meta: Mapping[str, Any], input_shape: tuple[int, ...] | None
                  ) -> Tensor | dict[str, Tensor]:
    """An example batch to trace the model with: token ids and a mask for an hf: encoder (input_shape: the
    sequence length, default 16); else random inputs of `input_shape` or the shape compression recorded."""
    gen = torch.Generator().manual_seed(RANDOM_SEED)
    if str(meta.get("arch", "")).startswith("hf:"):
        length = input_shape[0] if input_shape else 16
        ids = _random_inputs(model, (length,), 2, gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    shape = tuple(input_shape) if input_shape else _meta_shape(meta)
    if shape is None:
        raise UserError("the checkpoint records no input shape to export with; pass ‹input_shape›, e.g. 3,224,224")
    return _random_inputs(model, shape, 2, gen)


def export_model(path: str, out: str, arch: str | None = None, input_shape: tuple[int, ...] | None = None,
                 force: bool = False, trust_arch: bool = False) -> dict[str, Any]:
    """Export the compressed checkpoint to ONNX (.onnx) or torch.export (.pt2), runnable without this
    package (io.export); returns {"format", "size_bytes", "forms", "rel_output_error"}."""
    export_format(out)
    model, info = load_compressed(path, arch, trust_arch)
    meta = info.get("meta") if isinstance(info.get("meta"), dict) else {}
    meta = {**meta, "arch": arch or info.get("arch") or meta.get("arch", "")}
    x = export_inputs(model, meta, input_shape)
    written = export(model, out, x, force=force)
    return {**written, "input": "token ids" if isinstance(x, Mapping) else list(x.shape[1:])}


def export_line(exported: Mapping[str, Any], checkpoint_bytes: int | None) -> str:
    """'wrote m.onnx (7.92 MB, 1.74x the checkpoint; outputs within 4.6e-07 of the model's)'."""
    size = exported["size_bytes"]
    parts = [_size(size)]
    if checkpoint_bytes:
        parts.append(f"{size / checkpoint_bytes:.2f}x the checkpoint")
    error = exported.get("rel_output_error")
    check = (f"outputs within {error:.1e} of the model's" if error is not None
             else "outputs not checked: onnxruntime is not installed")
    return f"wrote {exported['path']} ({', '.join(parts)}; {check})"
