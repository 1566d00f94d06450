"""`sttp-compress` and `sttp-eval`: a thin typer layer over `pipeline` and `evaluate`.

Bad input ends in one line on stderr and exit code 2 (a traceback only with --debug), and so does
running out of GPU memory (with what to change); a failed sttp-eval gate ends in one line per gate and
exit code 1.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from sttp_compress.errors import Interrupted, SharedUserError, UserError, launcher_rank, option_names
from sttp_compress.io.specs import hf_folder
from sttp_compress.progress import TenthLines
from sttp_compress.data.text import TEXT_AUGMENT, TEXT_VOCAB_SHARE

def _console(stderr: bool) -> Console:
    """A rich console; piped or redirected (no terminal, no COLUMNS), 200 columns wide rather than rich's 80, so
    tables keep one row per layer in logs and CI output."""
    stream = sys.stderr if stderr else sys.stdout
    piped = not (hasattr(stream, "isatty") and stream.isatty()) and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=200 if piped else None)


err = _console(stderr=True)
out = _console(stderr=False)


def _parser_errors() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(usage errors, exits, aborts) of the click that typer runs: typer >= 0.2x parses with its own copy of
    click (and no longer installs click), older typer with click itself; found through typer's public
    classes, plus click's own when it is installed."""
    errors = {c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"}
    exits, aborts = {typer.Exit}, {typer.Abort}
    try:
        import click
    except ImportError:
        pass
    else:
        errors.add(click.ClickException)
        exits.add(click.exceptions.Exit)
        aborts.add(click.exceptions.Abort)
    return tuple(errors), tuple(exits), tuple(aborts)


_CLICK_ERRORS, _EXITS, _ABORTS = _parser_errors()

compress_app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False,
                           context_settings={"help_option_names": ["-h", "--help"]})
eval_app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False,
                       context_settings={"help_option_names": ["-h", "--help"]})


# --help lists options in these groups, in this order (an option not named here goes under "Other")
HELP_GROUPS = {
    "Model": ("arch", "trust_pickle", "trust_arch", "example", "reference", "reference_arch", "input_shape"),
    "Target": ("ratio", "rank", "method", "spectrum", "allocation", "include", "exclude", "layer_rank",
               "token_weighting", "row_order", "order_rows", "activation_aware"),
    "Fine-tuning": ("epochs", "steps", "time_budget", "lr", "optimizer", "schedule", "temperature", "alpha",
                    "spectral_reg", "spectrum_lr", "free_cores", "bn_recalibrate", "qat_steps", "text_augment", "text_vocab_share",
                    "group_by_length"),
    "Data": ("data", "train_data", "val_data", "image_size", "mean", "std", "augment"),
    "Gates": ("max_size", "max_params", "min_ratio", "min_accuracy", "min_cosine", "min_sts_spearman", "baseline",
              "max_drop"),
    "Run": ("device", "batch_size", "workers", "gpus", "cuda_graphs", "tf32", "seed"),
    "Output": ("output", "report_dir", "dtype", "fold_batchnorm", "force", "json_out", "json_path", "export", "export_dense", "quiet", "debug",
               "version", "help"),
}


class GroupedCommand(typer.core.TyperCommand):
    """A command whose --help lists its options in the HELP_GROUPS sections (model, target, fine-tuning, data,
    gates, run, output) instead of one long list."""

    def format_options(self, ctx, formatter) -> None:
        rows: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None or param.param_type_name == "argument":
                continue
            group = next((g for g, names in HELP_GROUPS.items() if param.name in names), "Other")
            rows.setdefault(group, []).append(record)
        for group in [*HELP_GROUPS, "Other"]:
            if rows.get(group):
                with formatter.section(group):
                    formatter.write_dl(rows[group])


def _show_version(ctx: typer.Context, value: bool) -> None:
    """--version: the program's name and version, then exit 0 (eager: before any other option is checked)."""
    if value:
        from sttp_compress import __version__

        out.print(f"{ctx.info_name} {__version__}", markup=False, highlight=False)
        raise typer.Exit(0)


VERSION_OPTION = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                              help="Show the version and exit.")

# What a bare command prints: how to call it, and one example.
USAGE = {
    "sttp-compress": ("usage: sttp-compress MODEL --arch SPEC (--ratio X | --rank R) [--data DIR] [options]",
                      "example: sttp-compress model.pt --arch torchvision:resnet18?num_classes=10 --ratio 10 "
                      "--data ./cifar10 --epochs 10",
                      "sttp-compress --example runs the built-in example; --help lists every option"),
    "sttp-eval": ("usage: sttp-eval COMPRESSED [--data DIR] [--reference MODEL] [gates] [options]",
                  "example: sttp-eval model.sttp.safetensors --data ./cifar10/test --max-size 5MB --min-accuracy 90",
                  "--help lists every option"),
}


def _floats(text: Optional[str], name: str) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise UserError(f"{name} takes comma-separated numbers such as 0.485,0.456,0.406; got {text!r}") from None


_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def _duration(text: Optional[str], name: str) -> Optional[float]:
    """Seconds from a duration such as 300, 90s, 5m, 5min or 1.5h (None stays None)."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", text.lower())
    if match is None or match.group(2) not in _DURATION_UNITS or not float(match.group(1)) > 0:
        raise UserError(f"{name} takes a positive duration such as 300, 90s, 5m or 1.5h; got {text!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


@compress_app.command(cls=GroupedCommand)
def compress_cmd(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, metavar="MODEL", help="Checkpoint: a state_dict (.pt/.pth/.bin/.safetensors) or, with --trust-pickle, a pickled nn.Module; or hf:DIR, a local Hugging Face model folder (the same as --arch hf:DIR)."),
    arch: Optional[str] = typer.Option(None, metavar="SPEC", help="Architecture: torchvision:NAME?k=v, package.module:factory, path/file.py:factory, or hf:DIR (a local Hugging Face model folder, weights included: MODEL optional)."),
    ratio: Optional[float] = typer.Option(None, help="Whole-model ratio params_original / params_compressed (all parameters counted)."),
    rank: Optional[int] = typer.Option(None, help="One rank for every compressed layer (the paper's hyperparameter)."),
    method: str = typer.Option("sttp", metavar="sttp|svdp", help="sttp (spectral tensor train) or svdp (plain spectral SVD)."),
    spectrum: str = typer.Option("free", metavar="free|lipschitz|identity", help="free (learned σ), lipschitz (|σ| ≤ a fixed per-layer scale) or identity (Σ = scale·I)."),
    allocation: str = typer.Option("greedy", metavar="greedy|uniform|sensitivity", help="With --ratio: greedy (budget where it cuts most weight error), uniform (one global rank) or sensitivity (greedy, each layer's error weighted by how much it moves the model's output on --data)."),
    include: List[str] = typer.Option([], metavar="GLOB", help="Glob on module names; only matching layers are candidates (repeatable)."),
    exclude: List[str] = typer.Option([], metavar="GLOB", help="Glob on module names to keep dense (repeatable)."),
    layer_rank: List[str] = typer.Option([], metavar="NAME=RANK", help="NAME=RANK: pin one layer's rank; with --ratio the other "
                                         "layers share what is left (repeatable). An hf: encoder's token "
                                         "embedding defaults to its width, within half the target's parameters."),
    seed: int = typer.Option(0, help="Random seed."),
    output: Optional[str] = typer.Option(None, help="Compressed checkpoint path (default: <MODEL stem>.sttp.safetensors beside MODEL; a .pt name writes the format-1 torch file)."),
    force: bool = typer.Option(False, help="Overwrite an existing output."),
    dtype: str = typer.Option("float32", metavar="float32|float16|bfloat16|int8", help="Stored value type: float32, float16, bfloat16, or int8 (every matrix int8 with a float16 scale per 64 values: the cores' Householder vectors and the dense layers' weights; about 4x smaller than float32)."),
    fold_batchnorm: bool = typer.Option(False, help="Store each BatchNorm as what it computes at inference, y = a*x + b per channel: "
                                        "2 numbers a channel instead of 4 and a counter (a smaller file, most of all in int8), the "
                                        "same outputs in eval mode; a later fine-tune of the file's model uses no batch statistics."),
    report_dir: Optional[str] = typer.Option(None, help="Report folder (default: <output stem>.report/)."),
    trust_pickle: bool = typer.Option(False, help="Allow loading a pickled nn.Module (runs code from the file: only for trusted files)."),
    data: Optional[str] = typer.Option(None, help="Fine-tune data: an ImageFolder root with train/ and val/ (or test/), tensors:FILE.pt, or text:FILE (one text per line; with --arch hf:DIR)."),
    train_data: Optional[str] = typer.Option(None, help="Training ImageFolder (instead of --data)."),
    val_data: Optional[str] = typer.Option(None, help="Validation ImageFolder (with --train-data)."),
    epochs: Optional[int] = typer.Option(None, help="Fine-tune epochs (default 1 when data is given)."),
    steps: Optional[int] = typer.Option(None, help="Fine-tune steps instead of epochs."),
    time_budget: Optional[str] = typer.Option(
        None, help="Fine-tune for this long instead of epochs or steps (e.g. 300, 90s, 5m, 1.5h): the training "
                   "loop, its per-epoch validation included, stops when the time is spent, and the learning-rate "
                   "schedule follows the clock. The report's finetune block gives the steps it took."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default: 0.01 SGD, 1e-3 AdamW)."),
    optimizer: str = typer.Option("adamw", metavar="adamw|sgd", help="adamw (default, lr 1e-3) or sgd (Nesterov, lr 0.01)."),
    schedule: str = typer.Option("onecycle", metavar="onecycle|cosine|constant", help="onecycle, cosine or constant."),
    batch_size: int = typer.Option(128, help="Fine-tune batch size."),
    workers: int = typer.Option(2, help="Data-loading worker processes."),
    device: str = typer.Option("auto", metavar="auto|cpu|cuda", help="auto (CUDA when present), cpu or cuda."),
    temperature: float = typer.Option(4.0, help="Distillation temperature T."),
    alpha: float = typer.Option(0.9, help="Weight of the distillation term (1 − alpha on the labels)."),
    spectral_reg: float = typer.Option(0.0, help="Weight λ of the D-optimal spectral regularizer."),
    spectrum_lr: Optional[float] = typer.Option(
        None, help="Learning rate of the compressed layers' spectra and row/column scales, as a multiple of --lr "
                   "(their own AdamW group). Default: 10 with --data text:FILE (docs/transformers.md), 1 for images."),
    free_cores: Optional[bool] = typer.Option(
        None, "--free-cores/--no-free-cores",
        help="Fine-tune the tensor-train cores as free matrices and restore the orthonormal gauge afterwards (same "
             "checkpoint format and parameter count; faster steps). Default: on with --data text:FILE when every "
             "spectrum is free (docs/transformers.md: Free cores), off for images."),
    bn_recalibrate: int = typer.Option(0, help="Re-estimate BatchNorm statistics on this many batches before fine-tuning."),
    qat_steps: int = typer.Option(0, help="With --dtype int8: after fine-tuning, this many steps through the int8 rounding "
                                  "the checkpoint applies (straight-through, 0.1x the learning rate), kept only if the "
                                  "rounded model validates no worse (report: finetune.qat)."),
    token_weighting: bool = typer.Option(True, help="With --data text:FILE and the token embedding included: fit "
                                         "its conversion to the tokens' frequencies in FILE (row-scaled STTP)."),
    row_order: str = typer.Option("auto", metavar="auto|vocabulary|weight|tiered", help="With token weighting: the order in which the token embedding's "
                                  "tensor train takes its rows: tiered (weight tiers, alike rows together; the "
                                  "default with token weights), weight (by descending token weight), vocabulary "
                                  "(as stored). docs/transformers.md: Row order."),
    order_rows: bool = typer.Option(False, hidden=True, help="The same as --row-order weight (older name)."),
    activation_aware: Optional[bool] = typer.Option(
        None, "--activation-aware/--no-activation-aware",
        help="Fit each compressed Linear's conversion to the scale of its inputs on 8 batches of the "
             "fine-tuning data (column-scaled STTP). Default: on with --data text:FILE, off for images."),
    text_augment: float = typer.Option(
        TEXT_AUGMENT, help="With --data text:FILE: fraction of each training batch whose tokens are replaced with "
                  "chance 0.25 by tokens of the batch (teacher and student see the same texts; 0: off)."),
    text_vocab_share: float = typer.Option(
        TEXT_VOCAB_SHARE, help="With --data text:FILE: share of those replacement tokens drawn from the whole "
                               "vocabulary instead of the batch, so rows of tokens the texts rarely hold train too."),
    group_by_length: bool = typer.Option(
        True, help="With --data text:FILE: batch texts of similar length together (less padding: 1.47x faster "
                   "MiniLM steps at batch 1024 on an H200). Keep --lr at 1e-3 or below with it (docs/transformers.md)."),
    image_size: Optional[int] = typer.Option(None, help="Image side (default: from the data; 224 for large images)."),
    mean: Optional[str] = typer.Option(None, help="Normalisation mean, comma-separated (default ImageNet's)."),
    std: Optional[str] = typer.Option(None, help="Normalisation std, comma-separated (default ImageNet's)."),
    augment: str = typer.Option("auto", metavar="auto|small|imagenet|none", help="auto, small (crop+flip), imagenet (random resized crop+flip) or none."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or tables."),
    json_out: bool = typer.Option(False, "--json", help="Print report.json to stdout."),
    example: bool = typer.Option(False, help="Run the built-in example: train a small CNN on scikit-learn's digits, compress, fine-tune, evaluate."),
    cuda_graphs: bool = typer.Option(True, help="On GPUs, replay each training step (one GPU) or the weight build (several GPUs) as CUDA graphs; --no-cuda-graphs runs them eagerly (slower; for models that misbehave under graphs)."),
    tf32: Optional[bool] = typer.Option(None, "--tf32/--no-tf32", help="Run the training steps' float32 matmuls (the STTP weight build; the layers run in bfloat16 there) as TF32; default: on when training on CUDA, where the steps run under bfloat16 autocast."),
    gpus: Optional[int] = typer.Option(None, help="Fine-tune on N GPUs of this machine: starts N processes through torchrun's launcher (docs/usage.md: Multi-GPU)."),
    debug: bool = typer.Option(False, help="Show tracebacks."),
    version: bool = VERSION_OPTION,
) -> Optional[int]:
    """Compress a trained PyTorch model with STTP: a compressed checkpoint and a report."""
    from sttp_compress.train import distributed
    from sttp_compress.train.loop import FinetuneConfig
    from sttp_compress.pipeline import CompressJob

    if model is not None and hf_folder(model) is not None:  # `sttp-compress hf:DIR`: the folder holds the weights
        if arch is not None:
            raise UserError(f"MODEL {model} and --arch {arch} both name the model; give hf:DIR once")
        model, arch = None, model
    if gpus is not None:
        from sttp_compress.cli.launch import launch_self

        return launch_self(gpus, ctx.obj["argv"], device)
    if example and distributed.launched():
        raise UserError("--example runs in one process; start it without torchrun")
    if not distributed.is_main():  # under torchrun only rank 0 shows progress and writes
        quiet, json_out = True, False

    ft = None
    if data or train_data or example:
        ft = FinetuneConfig(epochs=epochs, steps=steps, time_budget=_duration(time_budget, "--time-budget"),
                            lr=lr, optimizer=optimizer, schedule=schedule, temperature=temperature, alpha=alpha,
                            spectral_reg=spectral_reg, device=device, batch_size=batch_size, workers=workers,
                            seed=seed, cuda_graph=cuda_graphs, tf32=tf32, spectrum_lr_mult=spectrum_lr,
                            free_cores=free_cores)
    elif epochs is not None or steps is not None or time_budget is not None:
        raise UserError("--epochs/--steps/--time-budget need fine-tuning data: pass --data")
    job = CompressJob(model=model, arch=arch, ratio=ratio, rank=rank, method=method, spectrum=spectrum,
                      allocation=allocation, include=include, exclude=exclude, seed=seed, output=output,
                      force=force, dtype=dtype, report_dir=report_dir, trust_pickle=trust_pickle, data=data,
                      train_data=train_data, val_data=val_data, image_size=image_size,
                      mean=_floats(mean, "--mean"), std=_floats(std, "--std"), augment=augment, finetune=ft,
                      bn_recalibrate=bn_recalibrate, qat_steps=qat_steps, fold_batchnorm=fold_batchnorm, token_weighting=token_weighting,
                      row_order="weight" if order_rows else row_order,
                      activation_aware=activation_aware, text_augment=text_augment,
                      text_vocab_share=text_vocab_share, group_by_length=group_by_length,
                      layer_ranks=_layer_ranks(layer_rank),
                      progress=not quiet and not json_out)
    if example:
        from sttp_compress.example import run_example

        report, extras = run_example(job, console=None if (quiet or json_out) else err)
    else:
        report, extras = _run_with_progress(job, quiet or json_out)
    if report is not None:  # None on torchrun ranks other than 0
        _finish(report, extras, quiet, json_out, fold_batchnorm)
    return None


def _layer_ranks(values: list[str]) -> dict[str, int]:
    """--layer-rank NAME=RANK values as {name: rank}; UserError for a malformed one."""
    out = {}
    for v in values:
        name, sep, rank = v.rpartition("=")
        if not sep or not name or not rank.strip().isdigit() or int(rank) < 1:
            raise UserError(f"bad --layer-rank {v!r}: expected NAME=RANK with a positive integer rank")
        out[name] = int(rank)
    return out


def _run_with_progress(job, quiet: bool):
    """Run the job with a progress bar over layers, shown only once the conversion starts; in a log (stderr not a
    terminal) a plain line each time another tenth of the layers is converted."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sttp_compress.pipeline import run_compress

    if quiet:
        return run_compress(job)
    if not err.is_terminal:
        lines = []

        def begin(n: int) -> None:  # no line yet: an unreachable ratio found next stays the only line
            lines.append(TenthLines("compressing", n, "layers"))

        return run_compress(job, on_layer_start=begin, on_layer=lambda name: lines[0].advance(1, name))
    prog = Progress(TextColumn("[bold]compressing"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=True)
    task = prog.add_task("", total=None, start=False)

    def start(n: int) -> None:
        prog.start()
        prog.start_task(task)
        prog.update(task, total=n, description="allocating ranks")

    try:
        return run_compress(job, on_layer_start=start,
                            on_layer=lambda name: prog.update(task, advance=1, description=name))
    finally:
        prog.stop()


def _finish(report: dict, extras: dict, quiet: bool, json_out: bool, fold_batchnorm: bool = False) -> None:
    from sttp_compress.evaluate.report import summary_table
    from sttp_compress.pipeline import STORED_DROP_HINT, collapsed

    if json_out:
        out.print_json(json.dumps(report))
    elif not quiet:
        err.print(summary_table(report))
        t = report["totals"]
        ft = report.get("finetune")
        acc = ""
        if ft and ft.get("val_accuracy_after") is not None:
            acc = (f", val accuracy {ft['original_val_accuracy']}% original → {ft['val_accuracy_before']}% "
                   f"after conversion → {ft['val_accuracy_after']}% after fine-tuning"
                   + (" (no epoch validated better: the converted model is kept)" if ft.get("chosen_epoch") == 0 else ""))
            if ft.get("test_accuracy_after") is not None:  # the test split, reported only
                acc += (f"; test accuracy {ft['original_test_accuracy']}% → {ft['test_accuracy_before']}% → "
                        f"{ft['test_accuracy_after']}%")
            if ft.get("val_accuracy_stored") is not None:  # what the file holds: int8 / float16 rounding
                acc += f"; as stored in {ft['stored_dtype']}: val {ft['val_accuracy_stored']}%"
                if ft.get("test_accuracy_stored") is not None:
                    acc += f", test {ft['test_accuracy_stored']}%"
                drop = ft["val_accuracy_after"] - ft["val_accuracy_stored"]
                if drop > STORED_DROP_HINT and not ft.get("qat"):
                    acc += f" ({drop:.2f} points below float32: --qat-steps trains through the rounding)"
        elif ft and ft.get("val_cosine_after") is not None:  # text distillation (hf:DIR models)
            acc = (f", val cosine to the original {ft['val_cosine_before']:.4f} after conversion → "
                   f"{ft['val_cosine_after']:.4f} after distillation")
        err.print(f"ratio {t['ratio']:.2f}x ({t['params_original']:,} → {t['params_compressed']:,} parameters){acc}",
                  soft_wrap=True)
        if ft and collapsed(ft):
            err.print(f"warning: the compressed model kept {ft['val_accuracy_after']}% validation accuracy of the "
                      f"original's {ft['original_val_accuracy']}%: ratio {t['ratio']:.2f}x leaves too few parameters "
                      "in the layers it compresses; try a lower --ratio, more --epochs, or --include to spread the "
                      "ratio over more layers (report.md's layer table shows which stay dense)",
                      soft_wrap=True, markup=False, highlight=False)
        if fold_batchnorm and not report.get("batchnorm_folded"):
            err.print("warning: --fold-batchnorm found no BatchNorm with running statistics: nothing was folded",
                      soft_wrap=True, markup=False, highlight=False)
        err.print(f"wrote {extras['output']} and {Path(extras['report_dir']) / 'report.md'}", soft_wrap=True,
                  markup=False)
        if extras.get("next"):
            err.print(f"next: {extras['next']}", soft_wrap=True, markup=False, highlight=False)


# ---------------------------------------------------------------------------------------------
# sttp-eval


@eval_app.command(cls=GroupedCommand)
def eval_cmd(
    compressed: str = typer.Argument(..., metavar="COMPRESSED", help="A checkpoint written by sttp-compress."),
    arch: Optional[str] = typer.Option(None, metavar="SPEC", help="Override the architecture recorded in the file."),
    data: Optional[str] = typer.Option(None, help="ImageFolder root (class subfolders), tensors:FILE.pt, text:FILE (one text per line) or pairs:FILE (tab-separated sentence1, sentence2, score; hf:DIR models)."),
    image_size: Optional[int] = typer.Option(None, help="Image side (default: recorded at compression, else from the data)."),
    mean: Optional[str] = typer.Option(None, help="Normalisation mean, comma-separated (default: recorded, else ImageNet's)."),
    std: Optional[str] = typer.Option(None, help="Normalisation std, comma-separated (default: recorded, else ImageNet's)."),
    reference: Optional[str] = typer.Option(None, help="The original model file (top-1 agreement, relative output error), or hf:DIR (with text:FILE: mean cosine, nearest-neighbour agreement, pair-similarity rank correlation)."),
    reference_arch: Optional[str] = typer.Option(None, help="Architecture of --reference (default: the compressed file's)."),
    trust_pickle: bool = typer.Option(False, help="Allow a pickled nn.Module as --reference."),
    trust_arch: bool = typer.Option(False, help="Build the architecture recorded in the file even when that runs "
                                    "code it names (module:factory, file.py:factory): only for files you trust. "
                                    "Without it such a file needs --arch."),
    input_shape: Optional[str] = typer.Option(None, help="Input shape without batch, e.g. 3,32,32, for random inputs when no data is given."),
    device: str = typer.Option("cpu", metavar="cpu|cuda|auto", help="cpu, cuda or auto."),
    batch_size: int = typer.Option(64, help="Batch size for evaluation and latency."),
    max_size: Optional[str] = typer.Option(None, help="Gate: file size at most this (e.g. 5MB, 4.5MiB)."),
    max_params: Optional[int] = typer.Option(None, help="Gate: at most this many parameters."),
    min_ratio: Optional[float] = typer.Option(None, help="Gate: compression ratio at least this."),
    min_accuracy: Optional[float] = typer.Option(None, help="Gate: top-1 accuracy (percent) at least this."),
    min_cosine: Optional[float] = typer.Option(None, help="Gate: with text:FILE and --reference hf:DIR, mean cosine similarity to the original's embeddings at least this."),
    min_sts_spearman: Optional[float] = typer.Option(None, help="Gate: with pairs:FILE, Spearman correlation of the pairs' cosine similarities with their scores at least this."),
    baseline: Optional[str] = typer.Option(None, help="Gate: a previous --json result to compare accuracy with."),
    max_drop: Optional[float] = typer.Option(None, help="Gate: accuracy drop from --baseline at most this many points."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write every number to this JSON file (- for "
                                            "standard output, instead of the table)."),
    export: Optional[str] = typer.Option(None, metavar="FILE.onnx|FILE.pt2", help="Write the model for serving "
                                         "without sttp-compress: ONNX (onnxruntime) or torch.export; dynamic batch "
                                         "size; inputs shaped as recorded at compression, or --input-shape."),
    export_dense: Optional[str] = typer.Option(None, help="Write a plain state_dict for the original architecture here."),
    force: bool = typer.Option(False, help="Overwrite an existing --export/--export-dense/--json file (never a symlink or "
                               "a device)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No tables."),
    debug: bool = typer.Option(False, help="Show tracebacks."),
    version: bool = VERSION_OPTION,
) -> None:
    """Measure a compressed checkpoint (size, parameters, accuracy, latency) and gate CI on it."""
    from sttp_compress.evaluate.run import (EvalOptions, check_gates, export_dense as _export, export_line,
                                            export_model, run_eval, summary_table)
    from sttp_compress.io.outputs import atomic_write, check_output_path

    to_stdout = json_path == "-"
    outputs = ((None if to_stdout else json_path, "--json"), (export, "--export"), (export_dense, "--export-dense"))
    for given, what in outputs:
        if given is not None:
            if Path(given).absolute() == Path(compressed).absolute():
                raise UserError(f"{what} {given} would overwrite the checkpoint it reads")
            check_output_path(given, force, what)
    named = [(Path(g).absolute(), w) for g, w in outputs if g is not None]
    for i, (p, what) in enumerate(named):
        for q, other in named[i + 1:]:
            if p == q:
                raise UserError(f"{what} and {other} name the same file")
    if export:
        from sttp_compress.io.export import export_format

        export_format(export)
    shape = None
    if input_shape:
        try:
            shape = tuple(int(v) for v in input_shape.replace(" ", "").split(","))
        except ValueError:
            raise UserError(f"--input-shape takes comma-separated integers such as 3,32,32; got {input_shape!r}") from None
    opts = EvalOptions(arch=arch, data=data, image_size=image_size, mean=_floats(mean, "--mean"),
                       std=_floats(std, "--std"), reference=reference, reference_arch=reference_arch,
                       trust_pickle=trust_pickle, trust_arch=trust_arch, input_shape=shape, device=device, batch_size=batch_size,
                       max_size=max_size, max_params=max_params, min_ratio=min_ratio, min_accuracy=min_accuracy,
                       min_cosine=min_cosine, min_sts_spearman=min_sts_spearman, baseline=baseline, max_drop=max_drop)
    result = run_eval(compressed, opts, progress=not quiet and not to_stdout)
    if export:
        result["exported"] = {"path": export, **export_model(compressed, export, arch=arch, input_shape=shape,
                                                             force=force, trust_arch=trust_arch)}
    if export_dense:
        _export(compressed, export_dense, arch=arch, force=force, trust_arch=trust_arch)
        result["exported_dense"] = export_dense
    if json_path:
        text = json.dumps(_finite(result), indent=2, allow_nan=False) + "\n"
        if to_stdout:
            sys.stdout.write(text)
        else:
            atomic_write(json_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), force=force)
    if not quiet and not to_stdout:
        out.print(summary_table(result))
        if export:
            out.print(export_line(result["exported"], result.get("size_bytes")), markup=False, highlight=False)
    failed = check_gates(result, opts)
    for line in failed:
        err.print(f"gate failed: {line}", markup=False, highlight=False, soft_wrap=True)  # one line, any width
    if failed:
        raise typer.Exit(1)
    given = [flag for flag, value in (("--max-size", max_size), ("--max-params", max_params), ("--min-ratio", min_ratio),
                                      ("--min-accuracy", min_accuracy), ("--min-cosine", min_cosine),
                                      ("--min-sts-spearman", min_sts_spearman), ("--max-drop", max_drop))
             if value is not None]
    if given and not quiet:
        err.print(f"gates passed: {', '.join(given)}", markup=False, highlight=False, soft_wrap=True)


def _finite(value):
    """The --json result with every NaN or infinity as null, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# entry points


def _is_cuda_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError)


def _oom_line(e: BaseException, prog: str) -> str:
    """One line for a CUDA out-of-memory error: PyTorch's first sentences (what was asked, what was free)
    and what to change."""
    what = str(e).split(". Including")[0].split(". Of the allocated")[0].strip().rstrip(".")
    advice = "pass a smaller --batch-size"
    if prog.startswith("sttp-compress"):
        advice += (", or --no-cuda-graphs (on one GPU each padded batch shape of a text distillation keeps "
                   "its own CUDA graph memory)")
    return f"out of GPU memory ({' '.join(what.split())[:200]}); {advice}"


def _user_message(e: UserError) -> str:
    """A UserError's message on one line. Raised in a DataLoader worker, it comes back wrapped in the worker's
    traceback; its own message is the traceback's last line."""
    text = str(e)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if last.startswith(("sttp_compress.", "UserError")) and ": " in last else last
    return " ".join(text.split())


def _interrupted_line(prog: str) -> str:
    from sttp_compress.io.outputs import written

    done = "nothing written" if not written else f"already written: {', '.join(str(p) for p in written)}"
    return f"{prog}: interrupted; {done}"


@contextmanager
def _signals_raise() -> Iterator[None]:
    """Ctrl-C and SIGTERM raise errors.Interrupted in the main thread while a command runs."""
    def handler(signum, frame):
        raise Interrupted(signum)

    try:
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave the handlers alone
        old = {}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def flag_name(option: str) -> str:
    """The flag of a library option name (`max_size` -> `--max-size`): how CLI messages name options."""
    return "--" + option.replace("_", "-")


def _main(app: typer.Typer, prog: str, argv: list[str] | None = None) -> int:
    """Run a typer app; user errors become one stderr line and exit code 2, an interrupt one line and
    128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM). Library messages name options by their flags."""
    with option_names(flag_name):
        return _run(app, prog, argv)


def _run(app: typer.Typer, prog: str, argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv and prog in USAGE:
        print("\n".join(USAGE[prog]), file=sys.stderr)
        return 2
    debug = "--debug" in argv
    cmd = typer.main.get_command(app)
    rank = launcher_rank()
    if rank:  # a torchrun rank other than 0: say which one speaks
        prog = f"{prog} [rank {rank}]"
    try:
        with _signals_raise():
            rv = cmd.main(argv, prog_name=prog, standalone_mode=False, obj={"argv": argv})
        return rv if isinstance(rv, int) else 0
    except UserError as e:
        if isinstance(e, SharedUserError) and rank:
            return 2  # every rank has it; rank 0 reports it
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {_user_message(e)}", file=sys.stderr)
        return 2
    except _EXITS as e:
        return e.exit_code
    except _ABORTS:
        print(_interrupted_line(prog), file=sys.stderr)
        return 130
    except _CLICK_ERRORS as e:
        print(f"{prog}: error: {e.format_message()}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:
        if debug:
            traceback.print_exc()
        print(_interrupted_line(prog), file=sys.stderr)
        return 128 + (e.signum if isinstance(e, Interrupted) else signal.SIGINT)
    except Exception as e:  # a bug, not bad input: still one line unless --debug
        if _is_cuda_oom(e):  # a limit the options can move, not a bug
            if debug:
                traceback.print_exc()
            print(f"{prog}: error: {_oom_line(e, prog)}", file=sys.stderr)
            return 2
        if debug:
            traceback.print_exc()
        else:
            print(f"{prog}: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                  "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def compress_main(argv: list[str] | None = None) -> None:
    rc = _main(compress_app, "sttp-compress", argv)
    if launcher_rank() is not None:
        # One of several torchrun processes: leave without interpreter finalization. torchrun
        # stops the other ranks as soon as one exits with an error, and a rank caught while
        # finalizing (or finalizing after its process group ended) can abort with "terminate
        # called without an active exception", turning a clean exit code 2 into SIGABRT noise.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


def eval_main(argv: list[str] | None = None) -> None:
    sys.exit(_main(eval_app, "sttp-eval", argv))


if __name__ == "__main__":
    compress_main()
