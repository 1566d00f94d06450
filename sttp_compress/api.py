"""The Python API in the style of PyTorch's own compression library (torchao's `quantize_`):

    import sttp_compress as sc
    sc.compress_(model, sc.CompressConfig(ratio=10), filter_fn=lambda module, name: ...)  # in place
    sc.finetune(model, teacher, train_loader, sc.FinetuneConfig(epochs=10), val_loader=val_loader)
    sc.save(model, "m.sttp.safetensors", arch="torchvision:resnet18?num_classes=10")
    model = sc.load("m.sttp.safetensors")

Each call is a thin layer over the functions `sttp-compress` runs (compress.convert.compress_to_target,
train.loop.finetune, io.checkpoint); docs/python-api.md shows a whole example.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from sttp_compress.compress.convert import candidate_layers, compress_to_target
from sttp_compress.errors import UserError
from sttp_compress.io.checkpoint import load_compressed, save_compressed
from sttp_compress.io.export import export as export_model
from sttp_compress.train.loop import FinetuneConfig
from sttp_compress.train.loop import finetune as _run_finetune

__all__ = ["CompressConfig", "FinetuneConfig", "compress_", "finetune", "save", "load", "export"]


@dataclass
class CompressConfig:
    """What to compress to: a whole-model `ratio` (original / compressed parameters; ranks allocated per layer,
    eq. 11) or one `rank` for every layer, exactly one of them; `layer_ranks` pins named layers."""

    ratio: float | None = None
    rank: int | None = None
    method: str = "sttp"  # "sttp" (tensor-train frames) or "svdp" (one frame per side)
    spectrum: str = "free"  # "free", "lipschitz" or "identity" (method notes §5)
    allocation: str = "greedy"  # "greedy" (error-driven ranks) or "uniform"
    layer_ranks: Mapping[str, int] | None = None


def compress_(model: nn.Module, config: CompressConfig,
              filter_fn: Callable[[nn.Module, str], bool] | None = None) -> dict[str, Any]:
    """Compress `model` in place: each chosen layer keeps its type (Linear stays Linear) and gets its weight as an
    STTP/SVDP parametrization. Returns the report parts {"layers", "skipped", "totals", "spectra"}.

    `filter_fn(module, name)` chooses among every layer that can be compressed (first convolution and classifier
    included); without it, the default rule keeps the first convolution and the classifier dense.
    Bad settings raise `sttp_compress.errors.UserError` with one line."""
    if not isinstance(config, CompressConfig):
        raise UserError(f"config must be a CompressConfig, got {type(config).__name__}")
    include = None
    if filter_fn is not None:
        eligible = candidate_layers(model, include=["*"])[0]
        include = [glob.escape(name) for name, module in eligible.items() if filter_fn(module, name)]
        if not include:
            raise UserError("filter_fn accepts no layer that can be compressed")
    return compress_to_target(model, ratio=config.ratio, rank=config.rank, method=config.method,
                              spectrum=config.spectrum, allocation=config.allocation, include=include,
                              layer_ranks=config.layer_ranks)


def finetune(model: nn.Module, teacher: nn.Module, train_loader: Iterable, config: FinetuneConfig | None = None,
             val_loader: Iterable | None = None, progress: bool = False) -> dict[str, Any]:
    """Distil `teacher` (usually the original model) into the compressed `model` in place, keeping the state with
    the best validation score when `val_loader` is given. Loaders yield (inputs, class targets). Returns the
    report's fine-tuning block (epochs, steps, seconds, accuracies before and after, the curve)."""
    return _run_finetune(model, teacher, train_loader, val_loader, config or FinetuneConfig(), progress=progress)


def save(model: nn.Module, path: str | os.PathLike, arch: str | None = None, dtype: str = "float32",
         meta: dict | None = None, overwrite: bool = True) -> int:
    """Write the compressed model as a safetensors checkpoint (JSON metadata, nothing pickled); returns its size
    in bytes. `arch` (e.g. "torchvision:resnet18?num_classes=10") lets `load` rebuild it without being told."""
    return save_compressed(model, path, arch, dtype=dtype, meta=meta, force=overwrite)


def load(path: str | os.PathLike, arch: str | None = None, trust_arch: bool = False) -> nn.Module:
    """The compressed model of a checkpoint, in eval mode, float32. A recorded architecture that would import or
    run code (a file, a module other than torchvision's) is built only with `arch` given or `trust_arch=True`."""
    return load_compressed(path, arch, trust_arch)[0]


def export(model: nn.Module, path: str | os.PathLike, example_inputs: Tensor | Mapping[str, Tensor],
           overwrite: bool = True) -> dict[str, Any]:
    """Write the model for serving without this package: `.onnx` (onnxruntime) or `.pt2` (torch.export), with a
    dynamic batch size; compressed layers keep their small cores and onnxruntime rebuilds the dense weights once
    at load. `example_inputs`: one batch (a tensor, or keyword tensors). Returns {"format", "size_bytes",
    "forms", "rel_output_error"} (the written file's outputs against the model's, checked before it is kept)."""
    return export_model(model, path, example_inputs, force=overwrite)
