"""The `sttp-compress` job as a Python API: load → compress → (fine-tune) → save → report.

    from sttp_compress.pipeline import CompressJob, run_compress
    report = run_compress(CompressJob(model="model.pt", arch="torchvision:resnet18", ratio=10))

Every bad input raises `UserError` before anything is written; outputs are written atomically.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from sttp_compress import __version__
from sttp_compress.train import distributed
from sttp_compress.io.checkpoint import DTYPES, checkpoint_payload, write_payload
from sttp_compress.io.quantize import storage_errors
from sttp_compress.compress.batchnorm import affine_names, fold_batchnorm_
from sttp_compress.compress.convert import candidate_layers, check_target, compress_to_target
from sttp_compress.data.images import AUGMENTS
from sttp_compress.errors import UserError
from sttp_compress.io.sources import load_model, resolve_arch
from sttp_compress.io.outputs import check_output_folder, check_output_path, publish
from sttp_compress.evaluate.report import is_report_file, render_report
from sttp_compress.data.text import TEXT_AUGMENT, TEXT_VOCAB_SHARE
from sttp_compress.io.specs import WithDataSpec, hf_folder

__all__ = ["CompressJob", "run_compress", "default_output", "state_size_bytes", "REPORT_FORMAT_VERSION"]

REPORT_FORMAT_VERSION = 1
ALLOCATIONS = ("greedy", "uniform", "sensitivity")  # sensitivity: greedy, each layer's error weighted on the data


@dataclass
class CompressJob(WithDataSpec):
    """Everything one run of sttp-compress needs (the CLI's options)."""

    model: str | None = None
    arch: str | None = None
    ratio: float | None = None
    rank: int | None = None
    method: str = "sttp"
    spectrum: str = "free"
    allocation: str = "greedy"
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    seed: int = 0
    output: str | None = None
    force: bool = False
    dtype: str = "float32"
    report_dir: str | None = None
    trust_pickle: bool = False
    # fine-tuning (optional): a FinetuneConfig and data options
    data: str | None = None
    train_data: str | None = None
    val_data: str | None = None
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: str = "auto"
    finetune: Any = None  # FinetuneConfig | None
    bn_recalibrate: int = 0
    qat_steps: int = 0  # with dtype int8: steps through the int8 rounding after fine-tuning (train/qat.py)
    fold_batchnorm: bool = False  # store each BatchNorm as its eval-mode affine (compress/batchnorm.py)
    layer_ranks: dict = field(default_factory=dict)  # {layer name: rank} pinned (--layer-rank)
    token_weighting: bool = True  # text data + token embedding included: frequency-weighted conversion
    row_order: str = "auto"  # ...and the order its tensor train takes the rows in (ROW_ORDERS; _row_orders)
    activation_aware: bool | None = None  # Linear columns weighted by input scales (None: with text data)
    text_augment: float = TEXT_AUGMENT  # text data: fraction of each training batch with tokens replaced (text.perturb_tokens)
    text_vocab_share: float = TEXT_VOCAB_SHARE  # text data: share of those replacements from the whole vocabulary
    group_by_length: bool = True  # text data: batches of texts of similar length (data.LengthGroupedSampler)
    progress: bool = True
    # in-memory inputs (the built-in example and tests): bypass file loading
    module: nn.Module | None = None
    datasets: tuple | None = None
    input_shape: list[int] | None = None

    # data_spec and data_kind come from WithDataSpec; io.specs parses both views
    @property
    def hf_folder(self) -> Path | None:
        """The folder of --arch hf:DIR, else None."""
        return hf_folder(self.arch)


def default_output(model_path: str) -> Path:
    """`<MODEL stem>.sttp.safetensors` beside MODEL."""
    p = Path(model_path)
    return p.with_name(p.stem + ".sttp.safetensors") if p.name else Path("model.sttp.safetensors")


def state_size_bytes(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the model's state_dict with floating tensors stored as `dtype` (the float32 original)."""
    size = 0
    for t in model.state_dict().values():
        item = torch.empty((), dtype=dtype).element_size() if t.is_floating_point() else t.element_size()
        size += t.numel() * item
    return size


def _check_output(job: CompressJob) -> tuple[Path, Path]:
    """Resolve and check the output checkpoint and report folder before any work is done."""
    stem = job.hf_folder.name if not job.model and job.hf_folder else "model"
    out = Path(job.output) if job.output else default_output(job.model or stem)
    if job.model and out.resolve() == Path(job.model).resolve():
        raise UserError(f"‹output› {out} would overwrite the input model; choose another path")
    check_output_path(out, job.force)
    report_dir = Path(job.report_dir) if job.report_dir else out.with_name(out.stem + ".report")
    check_output_folder(report_dir, job.force, is_report_file)
    if report_dir.absolute() == out.absolute():
        raise UserError(f"the report folder {report_dir} and the output {out} are the same path")
    return out, report_dir


def _check_target(job: CompressJob) -> None:
    check_target(job.ratio, job.rank)
    if job.method not in ("sttp", "svdp"):
        raise UserError(f"‹method› must be sttp or svdp, got {job.method!r}")
    if job.spectrum not in ("free", "lipschitz", "identity"):
        raise UserError(f"‹spectrum› must be free, lipschitz or identity, got {job.spectrum!r}")
    if job.dtype not in DTYPES:
        raise UserError(f"‹dtype› must be one of {', '.join(DTYPES)}, got {job.dtype!r}")
    if job.qat_steps < 0:
        raise UserError(f"‹qat_steps› cannot be negative, got {job.qat_steps}")
    if job.qat_steps and job.dtype != "int8":
        raise UserError("‹qat_steps› trains through int8 rounding: it needs ‹dtype› int8")
    if job.qat_steps and job.finetune is None:
        raise UserError("‹qat_steps› runs after fine-tuning: it needs fine-tuning data (‹data›)")
    if job.augment not in AUGMENTS:
        raise UserError(f"‹augment› must be one of {', '.join(AUGMENTS)}, got {job.augment!r}")
    if job.image_size is not None and job.image_size < 1:
        raise UserError(f"‹image_size› must be a positive number of pixels, got {job.image_size}")
    for name, values in (("‹mean›", job.mean), ("‹std›", job.std)):
        if values is not None and len(values) not in (1, 3):
            raise UserError(f"{name} takes 1 or 3 comma-separated values, got {len(values)}")
    if job.std is not None and min(job.std) <= 0:
        raise UserError(f"‹std› values must be positive, got {','.join(map(str, job.std))}")
    if job.allocation not in ALLOCATIONS:
        raise UserError(f"‹allocation› must be one of {', '.join(ALLOCATIONS)}, got {job.allocation!r}")
    if job.allocation == "sensitivity" and job.ratio is None:
        raise UserError("‹allocation› sensitivity shares a whole-model ‹ratio› between layers: give ‹ratio›")
    if not 0.0 <= job.text_augment <= 1.0:
        raise UserError(f"‹text_augment› is a fraction of each batch, between 0 and 1; got {job.text_augment}")
    if job.row_order not in ROW_ORDERS:
        raise UserError(f"‹row_order› must be one of {', '.join(ROW_ORDERS)}; got {job.row_order!r}")
    if job.row_order in ("weight", "tiered") and not (job.token_weighting and job.data_kind == "text"):
        raise UserError(ORDER_ROWS_NEEDS.format(job.row_order))
    if not 0.0 <= job.text_vocab_share <= 1.0:
        raise UserError(f"‹text_vocab_share› is a share of the replacement tokens, between 0 and 1; "
                        f"got {job.text_vocab_share}")


class FinetuneData(NamedTuple):
    """What fine-tuning reads: the datasets, the image settings (None for tensors and texts), and where
    validation came from (the report's finetune.validation)."""

    train: object
    val: object | None
    image_cfg: object | None = None
    test: object | None = None
    validation: dict | None = None


def _datasets(job: CompressJob) -> FinetuneData:
    """The data for fine-tuning, checked before the conversion starts."""
    if job.datasets is not None:
        train_ds, val_ds = job.datasets
        return FinetuneData(train_ds, val_ds, validation={"source": "given datasets",
                                                          "images": None if val_ds is None else len(val_ds)})
    from sttp_compress.data.images import (ImageDataConfig, build_image_splits, image_folder_splits,
                                           load_tensor_data, resolve_image_config, TENSOR_VAL_FRACTION)

    if job.data_kind == "pairs":
        raise UserError("‹data› pairs:FILE scores an encoder in sttp-eval; distil with ‹data› text:FILE "
                        "(one text per line)")
    if job.data_kind == "text":
        from sttp_compress.data.text import text_datasets

        if job.hf_folder is None:
            raise UserError("‹data› text:FILE needs ‹arch› hf:DIR (the tokenizer comes from DIR)")
        train_ds, val_ds = text_datasets(job.data_spec.path, job.hf_folder)
        return FinetuneData(train_ds, val_ds, validation={"source": f"held out of {job.data_spec.path}",
                                                          "images": None, "texts": len(val_ds)})
    if job.data_kind == "tensors":
        train_ds, val_ds = load_tensor_data(job.data_spec.path)
        return FinetuneData(train_ds, val_ds, validation={
            "source": f"held out of {job.data_spec.path}", "images": len(val_ds), "of": len(train_ds) + len(val_ds),
            "fraction": TENSOR_VAL_FRACTION})
    splits = image_folder_splits(job.data_spec and job.data_spec.path, job.train_data, job.val_data)
    cfg = resolve_image_config(ImageDataConfig(job.image_size, job.mean, job.std, job.augment), splits.train)
    ds = build_image_splits(splits, cfg)
    return FinetuneData(ds.train, ds.val, cfg, ds.test, ds.validation)


def _check_data_fits(model: nn.Module, ds) -> None:
    """Run the model on the first two training samples before any conversion, so data that does not fit it
    (wrong shape, channels or dtype) is one clear error rather than a failure deep in fine-tuning."""
    try:
        samples = [ds[i] for i in range(min(2, len(ds)))]
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a dataset may raise anything on a broken sample
        raise UserError(f"cannot read the training data's first samples: {' '.join(str(exc).split())[:160]}") \
            from None
    inputs = [s[0] if isinstance(s, (tuple, list)) else s for s in samples]
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        return  # text batches and other structured samples are checked by their own collate
    x = torch.stack(inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise UserError(f"the data's samples (shape {list(x.shape[1:])}, {str(x.dtype)[6:]}) do not fit the "
                        f"model: {reason}") from None
    finally:
        model.train(was_training)


def _input_shape(ds) -> list[int] | None:
    try:
        x = ds[0][0]
        return list(x.shape) if isinstance(x, torch.Tensor) else None
    except Exception:
        return None


def run_compress(job: CompressJob, on_layer_start: Callable[[int], None] | None = None,
                 on_layer: Callable[[str], None] | None = None) -> tuple[dict | None, dict]:
    """Run the whole job; returns (report, extras) where extras has 'spectra', 'output', 'report_dir'.

    `on_layer_start(n_layers)` and `on_layer(name)` drive a progress display.

    Started by torchrun (WORLD_SIZE > 1) this is one rank of a multi-process job: it joins the
    process group, rank 0 converts the model and broadcasts the result (distributed.run_on_main,
    then every parameter and buffer from rank 0), fine-tuning runs under DistributedDataParallel
    on this rank's shard, and only rank 0 writes the checkpoint; the other ranks return
    (None, {"model": model}) and write nothing. The process group is left when the job ends.
    """
    owns_group = distributed.launched() and not distributed.active()
    try:
        device = None
        if owns_group:
            device = distributed.setup(job.finetune.device if job.finetune is not None else "cpu")
        return _run(job, device, on_layer_start, on_layer)
    finally:
        if owns_group:
            distributed.teardown()


def _row_weights(model: nn.Module, job: CompressJob, data: tuple | None, candidates: dict[str, nn.Module]) -> dict:
    """{token embedding name: token_weights of the training texts} when distilling on text with the
    token embedding among the `candidates` to compress (and --token-weighting on), else {}."""
    if not (job.token_weighting and data is not None and job.data_kind == "text"):
        return {}
    name = getattr(model, "token_embedding_name", lambda: None)()
    if name not in candidates:
        return {}
    from sttp_compress.data.text import token_weights

    return {name: token_weights(data[0], candidates[name].num_embeddings)}


ROW_ORDERS = ("auto", "vocabulary", "weight", "tiered")
ORDER_ROWS_NEEDS = ("‹row_order› {} orders the token embedding's rows by token weight: it needs ‹data› text:FILE, "
                    "the token embedding among the layers to compress (‹include›) and ‹token_weighting›")
TIER_DIGITS = 3  # tiered order: 8 weight tiers (minilm_recipe.md, sixth part: 0.9467 against 0.9455 unordered)


def _row_orders(job: CompressJob, row_weights: dict, candidates: dict[str, nn.Module]) -> tuple[dict, str]:
    """({token embedding name: its row order}, the order's kind) for --row-order: `tiered`
    (convert.layer_tiered_order, the default with token weights and STTP), `weight` (convert.weight_order) or
    none (`vocabulary`; SVDP's factorization does not depend on the rows' order)."""
    kind = job.row_order
    if kind == "auto":
        kind = "tiered" if row_weights and job.method == "sttp" else "vocabulary"
    if kind == "vocabulary" or (job.method != "sttp" and kind == "tiered"):
        return {}, "vocabulary"
    if not row_weights:
        raise UserError(ORDER_ROWS_NEEDS.format(kind))
    from sttp_compress.compress.convert import layer_tiered_order, weight_order

    if kind == "weight":
        return {name: weight_order(w) for name, w in row_weights.items()}, kind
    return {name: layer_tiered_order(candidates[name], w, TIER_DIGITS) for name, w in row_weights.items()}, kind


TOKEN_EMBEDDING_SHARE = 0.5  # at most this share of the target's parameters for the default token-embedding rank


def _layer_ranks(model: nn.Module, job: CompressJob, candidates: dict[str, nn.Module],
                 row_weights: dict) -> tuple[dict, str | None]:
    """(--layer-rank's pins plus the default one, the name pinned by default or None).

    With a whole-model --ratio and an hf encoder's token embedding among the layers to compress (and no
    --layer-rank for it), the embedding is pinned at rank = its width (only the vocabulary side of the TT
    is compressed), lowered until its parameters are at most TOKEN_EMBEDDING_SHARE of the target's and the
    other layers can still reach the ratio. The allocation's error-per-parameter rule gives a token
    embedding, whose spectrum is flat, too little: all-MiniLM-L6-v2 at ratio 4 got 0.25M parameters and
    cosine 0.283 after conversion, against 0.444 at rank 384 (benchmarks/results/experiments/minilm_split.md), and
    distillation does not make up for it (docs/transformers.md). Parameters are counted as the allocation counts them
    (`allocate.layer_options`, row-scaled when `row_weights` weights the embedding).
    """
    ranks = dict(job.layer_ranks)
    name = getattr(model, "token_embedding_name", lambda: None)()
    if job.ratio is None or name not in candidates or name in ranks:
        return ranks, None
    from sttp_compress.compress.allocate import budget_for_ratio, layer_options
    from sttp_compress.compress.convert import count_parameters

    opts = {n: layer_options(n, m, job.method, job.spectrum, with_errors=False, row_weight=row_weights.get(n))
            for n, m in candidates.items()}
    emb = opts.pop(name)
    total = count_parameters(model)
    dense = total - emb.numel - sum(o.numel for o in opts.values())  # never compressed
    # the other layers at their least: rank 1, or their pinned rank (dense when that saves nothing)
    others = sum(min(o.numel, o.dof(ranks[n])) if n in ranks else o.dofs[0] for n, o in opts.items())
    cap = min(TOKEN_EMBEDDING_SHARE * total / job.ratio, budget_for_ratio(total, dense, job.ratio) - others)
    lo, hi = 0, emb.weight_shape[1]  # the largest rank ≤ the width whose parameters fit under the cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if emb.dof(mid) <= cap else (lo, mid - 1)
    if lo < 1 or emb.dof(lo) >= emb.numel:
        return ranks, None  # nothing sensible to pin: the allocation decides
    ranks[name] = lo
    return ranks, name


def _input_moments(model: nn.Module, job: CompressJob, data: tuple | None, candidates: dict[str, nn.Module]) -> dict:
    """{Linear name: E[x xᵀ] on calibration batches of the training data} for an activation-aware
    conversion (`activation.input_moments`: column weights and spectrum refit): with --activation-aware,
    or by default with text data."""
    text = job.data_kind == "text"
    if data is None or not (job.activation_aware or (job.activation_aware is None and text)):
        return {}
    from sttp_compress.compress.activation import calibration_batches, input_moments

    return input_moments(model, candidates, calibration_batches(data[0], seed=job.seed))


def _sensitivities(model: nn.Module, job: CompressJob, data: tuple | None, row_weights: dict | None,
                   moments: dict | None, layer_ranks: dict, row_orders: dict | None) -> dict[str, float]:
    """With ‹allocation› sensitivity: each free layer's sensitivity (`sensitivity.layer_sensitivities`) at the
    rank the plain greedy allocation gives it, on calibration batches of the training data; else {}.

    BatchNorm normalizes by each batch there when the run re-estimates its statistics after the conversion
    (‹bn_recalibrate›, or a fine-tune that trains): the gap a layer leaves is then the one those statistics see
    (MobileNetV2 at ratio 10 with ‹bn_recalibrate› 100: 44.9% before fine-tuning against 43.2% with the stored
    statistics, docs/benchmarks.md)."""
    if job.allocation != "sensitivity":
        return {}
    from sttp_compress.compress.activation import calibration_batches, scales_from_moments
    from sttp_compress.compress.allocate import DENSE, LayerOptions
    from sttp_compress.compress.convert import compress_module, plan_ranks, weight_of
    from sttp_compress.compress.sensitivity import layer_sensitivities

    col_weights = scales_from_moments(moments) if moments else {}
    _, _, ranks = plan_ranks(model, job.ratio, None, job.method, job.spectrum, "greedy", job.include, job.exclude,
                             row_weights, layer_ranks, col_weights, row_orders)
    probe = {n: r for n, r in ranks.items() if r != DENSE and n not in layer_ranks}

    def convert(m: nn.Module, r: int) -> None:
        compress_module(m, r, job.method, job.spectrum)

    return layer_sensitivities(model, probe, calibration_batches(data[0], seed=job.seed), convert, weight_of,
                               LayerOptions.unit_cost, batch_statistics=_renormalizes(job))


def _renormalizes(job: CompressJob) -> bool:
    """True when BatchNorm statistics are re-estimated after the conversion: ‹bn_recalibrate›, or a fine-tune
    that takes at least one training step (train mode normalizes by the batch)."""
    ft = job.finetune
    trains = ft is not None and 0 not in (ft.epochs, ft.steps)  # a time budget is positive (FinetuneConfig)
    return job.bn_recalibrate > 0 or trains


def _convert(model: nn.Module, job: CompressJob, device: torch.device | None,
             on_layer: Callable[[str], None] | None, row_weights: dict | None, moments: dict | None,
             layer_ranks: dict, row_orders: dict | None = None, data: tuple | None = None) -> dict:
    """compress_to_target once: in this process, or on rank 0 with the result broadcast to every rank."""

    def convert(m: nn.Module) -> dict:
        sensitivities = _sensitivities(m, job, data, row_weights, moments, layer_ranks, row_orders)
        allocation = "greedy" if job.allocation == "sensitivity" else job.allocation
        parts = compress_to_target(m, job.ratio, job.rank, job.method, job.spectrum, allocation,
                                   job.include, job.exclude, on_layer=on_layer, row_weights=row_weights,
                                   layer_ranks=layer_ranks, input_moments=moments, row_orders=row_orders,
                                   sensitivities=sensitivities)
        if sensitivities:
            for layer in parts["layers"]:
                layer["sensitivity"] = sensitivities.get(layer["name"])
        if not parts["layers"]:
            raise UserError("no layer was compressed: every candidate was skipped "
                            f"({'; '.join(s['name'] + ': ' + s['reason'] for s in parts['skipped'][:3])})")
        return parts

    parts = distributed.convert_once(model, convert, device)
    distributed.debug_dump_state(model, "converted")
    return parts


def conversion_phase(model: nn.Module, job: CompressJob, data: tuple | None, candidates: dict[str, nn.Module],
                     device: torch.device | None = None, on_layer: Callable[[str], None] | None = None,
                     stage_seconds: dict | None = None) -> dict:
    """What the report's `timings.convert` covers, in order: token weights, pinned ranks, row orders,
    activation statistics, then `compress_to_target`; returns its parts with the layer rows annotated.
    `stage_seconds`, when given, receives each stage's wall time (benchmarks/probe_convert_stages.py)."""
    seconds = stage_seconds if stage_seconds is not None else {}
    t = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t
        now = time.perf_counter()
        seconds[stage], t = now - t, now

    row_weights = _row_weights(model, job, data, candidates)
    lap("token_weights")
    layer_ranks, pinned = _layer_ranks(model, job, candidates, row_weights)
    lap("layer_ranks")
    orders, order_kind = _row_orders(job, row_weights, candidates)
    lap("row_order")
    moments = _input_moments(model, job, data, candidates)
    lap("statistics")
    parts = _convert(model, job, device, on_layer, row_weights, moments, layer_ranks, orders, data)
    lap("compress_to_target")
    for layer in parts["layers"]:
        if layer["name"] in orders and layer.get("row_ordered"):
            layer["row_order"] = order_kind
        if layer["name"] == pinned:
            layer["rank_rule"] = "token embedding: its width, at most half the target's parameters"
    return parts


def _run(job: CompressJob, device: torch.device | None, on_layer_start: Callable[[int], None] | None,
         on_layer: Callable[[str], None] | None) -> tuple[dict | None, dict]:
    t0 = time.perf_counter()
    main = distributed.is_main()
    with distributed.agreed():  # a bad input on any rank stops every rank with its message
        out, report_dir, fine = _check_job(job, main)
        model = _load(job)
        t_load = time.perf_counter() - t0
        data = _datasets(job) if fine else None
        if data is not None and job.data_kind != "text":
            _check_data_fits(model, data[0])

    torch.manual_seed(job.seed)
    size_original = state_size_bytes(model)
    teacher = copy.deepcopy(model).eval() if fine else None
    candidates = candidate_layers(model, job.include, job.exclude)[0]
    if on_layer_start:
        on_layer_start(len(candidates))
    t1 = time.perf_counter()
    parts = conversion_phase(model, job, data, candidates, device, on_layer)
    t_convert = time.perf_counter() - t1
    ft_block, image_cfg, input_shape, t_finetune = None, None, job.input_shape, 0.0
    if fine:
        image_cfg, input_shape = data[2], input_shape or _input_shape(data[0])  # before training, as ever
        t_ft = time.perf_counter()
        ft_block = _finetune_phase(model, teacher, job, data, device)
        t_finetune = time.perf_counter() - t_ft
    if not main:
        return None, {"model": model}
    if job.fold_batchnorm:  # after any fine-tune (which folded before measuring the stored model: then a no-op)
        fold_batchnorm_(model)

    meta = {"params_original": parts["totals"]["params_original"], "size_bytes_original": size_original,
            "input_shape": input_shape,
            "image_size": getattr(image_cfg, "image_size", None),
            "mean": list(image_cfg.mean) if image_cfg is not None and image_cfg.mean else None,
            "std": list(image_cfg.std) if image_cfg is not None and image_cfg.std else None,
            "method": job.method, "spectrum": job.spectrum}
    t2 = time.perf_counter()
    totals = parts["totals"]
    summary = {"layers": len(parts["layers"]), **{k: totals.get(k) for k in ("params_compressed", "params_original", "ratio")}}
    payload = checkpoint_payload(model, job.arch, job.dtype, meta, summary)
    if job.dtype != "float32":  # what storing in fewer bits costs each layer, beside its conversion error
        errors = storage_errors(model, payload["state_dict"])
        for row in parts["layers"]:
            row["storage_rel_error"] = errors.get(row["name"])
    report: dict = {}

    def render(size: int) -> dict[str, bytes]:
        """The report, once the checkpoint's size on disk is known."""
        timings = {"load": round(t_load, 3), "convert": round(t_convert, 3), "finetune": round(t_finetune, 3),
                   "save": round(time.perf_counter() - t2, 3), "total": round(time.perf_counter() - t0, 3)}
        report.update(_report(job, parts, ft_block, out, size_original, size, timings, len(affine_names(model))))
        return render_report(report, parts["spectra"])

    publish(out, lambda tmp: write_payload(payload, tmp, out), report_dir, render, job.force, is_report_file)
    return report, {"spectra": parts["spectra"], "output": out, "report_dir": report_dir, "model": model}


def _check_job(job: CompressJob, main: bool) -> tuple[Path | None, Path | None, bool]:
    """Every check that needs no file read: target and options, the outputs (on the writing rank), the
    fine-tuning settings; returns (output, report folder, whether to fine-tune)."""
    _check_target(job)
    if job.module is None and not job.model and job.hf_folder is None:
        raise UserError("missing MODEL (a checkpoint file), or ‹arch› hf:DIR, or use ‹example›")
    out, report_dir = _check_output(job) if main else (None, None)  # only rank 0 writes
    fine = job.finetune is not None and bool(job.data or job.train_data or job.datasets is not None)
    if job.allocation == "sensitivity" and not fine:
        raise UserError("‹allocation› sensitivity measures each layer on the training data: it needs ‹data›")
    if job.finetune is not None:
        job.finetune.validate()
        world = distributed.world()
        if fine and world > 1:
            from sttp_compress.data.images import per_rank_batch

            if job.data_kind == "text":
                raise UserError("text distillation (‹data› text:FILE) runs in one process; "
                                "launch it without torchrun/‹gpus›")
            per_rank_batch(job.finetune.batch_size, world)
    return out, report_dir, fine


def _load(job: CompressJob) -> nn.Module:
    """The model to compress: given in memory, a checkpoint file, or an hf:DIR folder (which holds weights)."""
    if job.module is not None:
        return job.module
    if job.model:
        return load_model(job.model, job.arch, job.trust_pickle)
    return resolve_arch(job.arch)


def _finetune_phase(model: nn.Module, teacher: nn.Module, job: CompressJob, data: tuple,
                    device: torch.device | None) -> dict:
    """Distil the teacher into the converted model (`finetune`, or `distill_embeddings` on text) on this
    rank's shard of the data; returns the report's finetune block. The model ends on the CPU."""
    from sttp_compress.data.images import finetune_loaders
    from sttp_compress.train.loop import finetune

    train_ds, val_ds = data.train, data.val
    cfg = job.finetune
    if device is not None:
        cfg = replace(cfg, device=str(device))  # this rank's GPU (or the CPU)
    dev = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else (
        "cpu" if cfg.device == "auto" else cfg.device)
    text = job.data_kind == "text"
    if text:
        train_ds.augment = job.text_augment  # after the calibration, which sees the texts as they are
        train_ds.vocab_share = job.text_vocab_share
    with distributed.agreed():
        *loaders, test_loader = finetune_loaders(train_ds, val_ds, data.test, data.image_cfg, cfg.batch_size,
                                                 cfg.workers, cfg.seed, dev, distributed.rank(), distributed.world(),
                                                 group_by_length=job.group_by_length)
    progress = job.progress and distributed.is_main()
    if text:
        from sttp_compress.train.text_distill import distill_embeddings

        block = distill_embeddings(model, teacher, *loaders, cfg, progress=progress)
        block["text_augment"], block["text_vocab_share"] = job.text_augment, job.text_vocab_share
        block["group_by_length"] = job.group_by_length
    else:
        block = finetune(model, teacher, *loaders, cfg, progress=progress, bn_recalibrate=job.bn_recalibrate,
                         test_loader=test_loader)
        if job.qat_steps:
            block["qat"] = _qat_phase(model, teacher, loaders, test_loader, cfg, job.qat_steps, progress)
        if job.fold_batchnorm:  # the stored accuracy below is the file's model
            fold_batchnorm_(model)
        if job.dtype != "float32":
            block.update(_stored_accuracy(model, job.dtype, loaders[1], test_loader, dev, cfg.amp))
    block["validation"] = data.validation
    distributed.debug_dump_state(model, "finetuned")
    model.to("cpu")
    return block


STORED_DROP_HINT = 0.2  # points of validation accuracy that storage may cost before the report suggests QAT
COLLAPSE_SHARE = 0.5  # a fine-tuned model under this share of the original's accuracy gets a warning


def collapsed(finetune_block: dict) -> bool:
    """Whether a fine-tuned model kept less than COLLAPSE_SHARE of the original's validation accuracy: a
    MobileNetV2 at ratio 46 ended at chance (10%) while the run otherwise looked like a success."""
    original, after = finetune_block.get("original_val_accuracy"), finetune_block.get("val_accuracy_after")
    return original is not None and after is not None and after < COLLAPSE_SHARE * original


def _stored_accuracy(model: nn.Module, dtype: str, val_loader, test_loader, device: str, amp) -> dict:
    """Validation and test accuracy of the model as the checkpoint stores it (`dtype` rounding, then loaded
    back): what a user gets, where the fine-tune's own numbers are the float32 parameters'."""
    from sttp_compress.io.checkpoint import stored_values
    from sttp_compress.train.loop import evaluate

    multi = distributed.world() > 1
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(stored_values(saved, dtype))
    try:
        val, test = ((evaluate(model, loader, device, amp, reduce=multi)["accuracy"] if loader is not None else None)
                     for loader in (val_loader, test_loader))
    finally:
        model.load_state_dict(saved)
    return {"stored_dtype": dtype, "val_accuracy_stored": None if val is None else round(100 * val, 2),
            "test_accuracy_stored": None if test is None else round(100 * test, 2)}


QAT_LR_SCALE = 0.1  # the straight-through phase runs at this share of the fine-tune's peak learning rate


def _qat_phase(model: nn.Module, teacher: nn.Module, loaders: tuple, test_loader, cfg, steps: int,
               progress: bool) -> dict:
    """`steps` of distillation through the int8 rounding the checkpoint applies (train/qat.py), at a constant
    QAT_LR_SCALE of the learning rate; kept only when the rounded model's validation accuracy (or loss, without
    labels) is not worse than before it, else the fine-tuned state comes back. Returns the report's
    finetune.qat block (accuracies of the rounded model, before and after)."""
    from sttp_compress.train.loop import finetune
    from sttp_compress.train.qat import rounded_storage

    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    qcfg = replace(cfg, epochs=None, steps=steps, time_budget=None, lr=cfg.resolved_lr * QAT_LR_SCALE,
                   schedule="constant", select_best=False, val_every_epoch=False, cuda_graph=False,
                   free_cores=False)
    with rounded_storage(model):
        q = finetune(model, teacher, *loaders, qcfg, progress=progress, test_loader=test_loader)
    before, after = q["val_accuracy_before"], q["val_accuracy_after"]
    kept = before is None or after is None or after >= before
    if not kept:
        model.load_state_dict(saved)
    return {"steps": q["steps"], "lr": qcfg.lr, "seconds": q["seconds"], "kept": kept,
            "val_accuracy_rounded_before": before, "val_accuracy_rounded_after": after,
            "test_accuracy_rounded_before": q["test_accuracy_before"],
            "test_accuracy_rounded_after": q["test_accuracy_after"]}


def _text_units(block: dict | None) -> dict | None:
    """A text run's fine-tune block counts texts, not images: `texts_per_s` in place of `images_per_s`."""
    if block is None or "images_per_s" not in block:
        return block
    return {("texts_per_s" if k == "images_per_s" else k): v for k, v in block.items()}


def _report(job: CompressJob, parts: dict, ft_block: dict | None, out: Path, size_original: int, size: int,
            timings: dict, batchnorm_folded: int = 0) -> dict:
    """The report.json dict (REPORT_FORMAT_VERSION)."""
    return {
        "format_version": REPORT_FORMAT_VERSION, "tool_version": __version__,
        "method": job.method, "spectrum": job.spectrum,
        "target": {"ratio": job.ratio} if job.ratio is not None else {"rank": job.rank},
        "allocation": job.allocation if job.ratio is not None else None,
        "model": {"path": job.model, "arch": job.arch, "output": str(out)},
        "totals": {**parts["totals"], "size_bytes_original": size_original, "size_bytes_compressed": size,
                   "size_ratio": size_original / size if size else None},
        "dtype": job.dtype, "batchnorm_folded": batchnorm_folded,
        "layers": parts["layers"], "skipped": parts["skipped"],
        "finetune": _text_units(ft_block) if job.data_kind == "text" else ft_block,
        "timings": timings,
    }
